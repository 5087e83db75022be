"""A FlashHead installed on tiny random mlx-lm models, against the same model's dense head, in
every way mlx-lm calls a head: forward passes, decode steps, generation, batches, speculative
decoding, sampling, logit bias, log-probabilities and perplexity."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import batch_generate, generate_step, stream_generate
from mlx_lm.perplexity import eval_ppl
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from conftest import make_clusters, make_tiny_model
from flashhead_mlx import decoding, flash_head, patch, unpatch
from flashhead_mlx.assets import make_assets
from flashhead_mlx.head import FlashHead
from flashhead_mlx.model_head import final_hidden_states, head_module, head_rows
from flashhead_mlx.patch import apply_flashhead, is_patched
from flashhead_mlx.sampling import fit_mass_bias

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 999]])
PROMPTS = ["It is a truth", "a single man in possession", "must be in want"]
N_PROBES = 6
MODELS = {
    "llama-tied": dict(model_type="llama"),
    "llama-untied": dict(model_type="llama", tied=False),
    "llama-quantized": dict(model_type="llama", quantize=True),
    "qwen2": dict(model_type="qwen2"),
    "qwen3-untied-quantized": dict(model_type="qwen3", tied=False, quantize=True),
    "gemma3_text": dict(model_type="gemma3_text"),
    "gemma3": dict(model_type="gemma3"),
    "gemma2-softcap": dict(model_type="gemma2"),
}
GREEDY = make_sampler(temp=0.0)


def assert_close(actual, expected):
    np.testing.assert_allclose(np.array(actual), np.array(expected), rtol=1e-4, atol=1e-4)


def clusters_of(model):
    return make_clusters(np.array(head_rows(head_module(model))))


def patched(folder, n_probes=N_PROBES):
    dense, tokenizer = mlx_lm.load(str(folder))
    model, _ = mlx_lm.load(str(folder))
    apply_flashhead(model, make_assets(clusters_of(model), n_probes))
    return dense, model, tokenizer


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", **MODELS[request.param])
    return (folder, *patched(folder))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tied llama with mass offsets fitted, so it samples the full vocabulary."""
    folder = make_tiny_model(tmp_path_factory.mktemp("llama") / "m")
    dense, model, tokenizer = patched(folder)
    head = flash_head(model)
    head.mass_bias = fit_mass_bias(head, final_hidden_states(dense, mx.arange(1000)[None]))
    return dense, model, tokenizer


def greedy_tokens(model, tokenizer, prompt, max_tokens=12, **kwargs):
    return [r.token for r in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=GREEDY, **kwargs
    )]


def test_forward_passes_are_dense(pair):
    """Outside mlx-lm's decode loops every call is the dense head's, bit for bit, even at a
    single position."""
    _, dense, model, _ = pair
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(dense(TOKENS)))
    np.testing.assert_array_equal(np.array(model(TOKENS[:, :1])), np.array(dense(TOKENS[:, :1])))


def test_hidden_states_are_unchanged(pair):
    _, dense, model, _ = pair
    np.testing.assert_array_equal(
        np.array(final_hidden_states(model, TOKENS)), np.array(final_hidden_states(dense, TOKENS))
    )


def test_decode_step(pair):
    _, dense, model, _ = pair
    batch = TOKENS.reshape(-1, 1)  # B = 8 decode rows, each with its own probes
    head = flash_head(model)
    head.batch_path = "union"  # 8 rows of this tiny head are above the dense switch
    try:
        with decoding():
            step = np.array(model(batch))[:, 0]
    finally:
        head.batch_path = None
    reference = np.array(dense(batch))[:, 0]
    finite = np.isfinite(step)
    # The candidates and the row's own input token (a call without a cache: its recent tokens).
    assert np.all(finite.sum(-1) <= N_PROBES * head.cluster_size + 1) and np.all(finite.sum(-1) > 0)
    assert np.all(finite[np.arange(len(batch)), np.array(batch)[:, 0]])
    assert len({tuple(np.flatnonzero(f)) for f in finite}) > 1
    assert np.all(np.isneginf(step[~finite]))
    np.testing.assert_allclose(step[finite], reference[finite], rtol=1e-4, atol=1e-4)
    contained = finite[np.arange(len(batch)), reference.argmax(-1)]
    np.testing.assert_array_equal(step.argmax(-1)[contained], reference.argmax(-1)[contained])


def test_verification_positions_are_scored_per_position(pair):
    """Speculative decoding verifies [1, k + 1, d]: each position gets its own candidates."""
    _, dense, model, _ = pair
    with decoding():
        step = np.array(model(TOKENS[:, :4]))[0]
    reference = np.array(dense(TOKENS[:, :4]))[0]
    finite = np.isfinite(step)
    assert np.all(finite.sum(-1) <= N_PROBES * flash_head(model).cluster_size + 4)  # + its inputs
    np.testing.assert_allclose(step[finite], reference[finite], rtol=1e-4, atol=1e-4)


def test_all_probes_generate_like_dense(pair):
    folder, _, flash, tokenizer = pair
    dense, model, _ = patched(folder, n_probes=flash_head(flash).n_clusters)
    with decoding():
        assert_close(model(TOKENS.reshape(-1, 1)), dense(TOKENS.reshape(-1, 1)))
    for prompt in PROMPTS[:2]:
        assert greedy_tokens(model, tokenizer, prompt) == greedy_tokens(dense, tokenizer, prompt)


def test_greedy_generation_follows_the_candidates(llama):
    """Each greedy token is the argmax of the dense logits over that step's candidates and the
    context's recent tokens."""
    dense, model, tokenizer = llama
    head = flash_head(model)
    prompt = mx.array(tokenizer.encode(PROMPTS[0]))
    tokens = greedy_tokens(model, tokenizer, PROMPTS[0])
    context = mx.concatenate([prompt, mx.array(tokens[:-1])])
    hidden = final_hidden_states(dense, context[None])[0, prompt.size - 1 :]
    ids, _ = head.candidates(hidden)
    reference = np.array(dense(context[None]))[0, prompt.size - 1 :]
    expected = []
    for step, row in enumerate(reference):
        scored = np.zeros(row.size, dtype=bool)
        scored[np.array(ids[step])] = True
        scored[np.array(context[: prompt.size + step][-head.recent_tokens :])] = True
        expected.append(int(np.argmax(np.where(scored, row, -np.inf))))
    assert tokens == expected


def test_no_dense_logits_while_generating(llama, monkeypatch):
    """Prompt processing and decoding never ask for the full logits."""
    dense, model, tokenizer = llama
    calls = []
    monkeypatch.setattr(FlashHead, "dense_logits", lambda self, h: calls.append(h.shape))
    long_prompt = " ".join(PROMPTS * 4)
    greedy_tokens(model, tokenizer, long_prompt, max_tokens=4)
    batch_generate(model, tokenizer, [tokenizer.encode(p) for p in PROMPTS], max_tokens=4)
    greedy_tokens(model, tokenizer, long_prompt, max_tokens=4, draft_model=dense)
    assert calls == []


def test_batch_rows_match_single_rows(llama):
    dense, model, tokenizer = llama
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    for m in (dense, model):
        batch = batch_generate(m, tokenizer, prompts, max_tokens=10, return_token_ids=True)
        single = [greedy_tokens(m, tokenizer, p, max_tokens=10) for p in PROMPTS]
        assert batch.token_ids == single


def test_speculative_decoding(llama):
    """Verification through the FlashHead gives the same tokens as FlashHead decoding alone."""
    dense, model, tokenizer = llama
    for prompt in PROMPTS:
        plain = greedy_tokens(model, tokenizer, prompt)
        responses = list(stream_generate(
            model, tokenizer, prompt, max_tokens=12, sampler=GREEDY, draft_model=dense,
            num_draft_tokens=3,
        ))
        assert [r.token for r in responses] == plain
        assert any(r.from_draft for r in responses)


def test_sampling_draws_from_the_full_vocabulary(llama):
    """A sampler from make_sampler tells the head its temperature: each step's logits are the
    candidates plus the tokens of one drawn cluster."""
    dense, model, tokenizer = llama
    head = flash_head(model)
    prompt = mx.array(tokenizer.encode(PROMPTS[0]))
    steps = generate_step(prompt, model, max_tokens=6, sampler=make_sampler(temp=0.7, top_p=0.9))
    for _, logprobs in steps:
        finite = np.isfinite(np.array(logprobs))
        assert head.n_probes * head.cluster_size < finite.sum()
        assert finite.sum() <= (head.n_probes + 1) * head.cluster_size
        np.testing.assert_allclose(np.exp(np.array(logprobs)).sum(), 1.0, rtol=1e-4)


def test_logprobs_are_exact_over_the_candidates(llama):
    """Greedy log-probabilities: a distribution over the candidates, each the dense logit minus
    the logsumexp of the candidates' dense logits."""
    dense, model, tokenizer = llama
    prompt = mx.array(tokenizer.encode(PROMPTS[1]))
    token, logprobs = next(generate_step(prompt, model, max_tokens=1, sampler=GREEDY))
    logprobs = np.array(logprobs)
    reference = np.array(dense(prompt[None]))[0, -1]
    finite = np.isfinite(logprobs)
    expected = reference[finite] - np.log(np.exp(reference[finite]).sum())
    np.testing.assert_allclose(logprobs[finite], expected, rtol=1e-4, atol=1e-4)


def test_logit_bias_reaches_tokens_outside_the_candidates(llama):
    dense, model, tokenizer = llama
    prompt = mx.array(tokenizer.encode(PROMPTS[2]))
    _, logprobs = next(generate_step(prompt, model, max_tokens=1, sampler=GREEDY))
    outside = int(np.flatnonzero(np.isneginf(np.array(logprobs)))[0])
    processors = make_logits_processors(logit_bias={outside: 1000.0})
    token, logprobs = next(generate_step(
        prompt, model, max_tokens=1, sampler=GREEDY, logits_processors=processors
    ))
    assert int(token) == outside


def test_perplexity_is_dense(llama):
    dense, model, _ = llama
    data = mx.random.randint(0, 1000, (4, 33), key=mx.random.key(1))
    assert float(eval_ppl(model, data, batch_size=2)[0]) == float(eval_ppl(dense, data, batch_size=2)[0])


def test_unpatch_restores_the_dense_head_and_patch_puts_it_back(pair):
    folder, dense, _, tokenizer = pair
    model, _ = mlx_lm.load(str(folder))
    original = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    kinds = {k: type(m) for k, m in model.named_modules()}
    patch(model, make_assets(clusters_of(model), N_PROBES))
    assert is_patched(model)
    unpatch(model)
    assert not is_patched(model)
    assert {k: type(m) for k, m in model.named_modules()} == kinds
    restored = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert restored.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(restored[key], value)
    with decoding():
        assert_close(model(TOKENS.reshape(-1, 1)), dense(TOKENS.reshape(-1, 1)))
    patch(model)
    assert flash_head(model).n_probes == N_PROBES


def test_flashhead_disable(llama, monkeypatch, tmp_path):
    dense, _, _ = llama
    monkeypatch.setenv("FLASHHEAD_DISABLE", "1")
    with pytest.warns(UserWarning, match="FLASHHEAD_DISABLE"):
        patch(dense, make_assets(clusters_of(dense), N_PROBES))
    assert not is_patched(dense)


def test_no_second_copy_of_the_head(pair):
    _, dense, model, _ = pair

    def nbytes(m):
        return sum(v.nbytes for _, v in tree_flatten(m.parameters()))

    head = flash_head(model)
    padding = (head.order.size - head.vocab_size) * head.weight.nbytes // head.order.size
    small = ("order", "inverse", "centroids", "centroid_scales", "centroid_biases", "cluster_bias",
             "stage1_centroids")  # the float32 centroids a CPU FlashHead multiplies
    extras = sum(head[name].nbytes for name in small if name in head)
    assert nbytes(model) - nbytes(dense) <= padding * 2 + extras


def test_unsupported_architecture():
    class Model(nn.Module):
        pass

    with pytest.raises(ValueError, match="cannot serve the head of test_patch: its forward pass"):
        apply_flashhead(Model(), {})
