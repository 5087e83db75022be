"""Every decoding mode on SmolLM2-135M and Gemma-3-270M against their dense heads.

The clusters are the quick stand-in of conftest (random balanced clusters): these tests check
that each mode computes what it should over whatever candidates the probes give, not how often
the probes find the argmax (tests/test_clustering.py measures that with the real clustering)."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import batch_generate, generate_step, stream_generate
from mlx_lm.perplexity import eval_ppl
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from conftest import assert_batch_matches_single_rows, make_clusters
from flashhead_mlx import flash_head, patch
from flashhead_mlx.assets import make_assets
from flashhead_mlx.kernels import BATCH_PATHS
from flashhead_mlx.model_head import final_hidden_states, head_module, head_rows
from flashhead_mlx.sampling import fit_mass_bias

PROMPTS = ["Emma Woodhouse, handsome, clever, and rich,", "Sir Walter Elliot, of Kellynch Hall,"]
GREEDY = make_sampler(temp=0.0)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request):
    folder = request.getfixturevalue(f"{request.param}_dir")
    dense, tokenizer = mlx_lm.load(str(folder))
    model, _ = mlx_lm.load(str(folder))
    clusters = make_clusters(np.array(head_rows(head_module(model))))
    n_probes = clusters["centroids"].shape[0] // 16
    patch(model, make_assets(clusters, n_probes))
    head = flash_head(model)
    calibration = mx.array(tokenizer.encode(PROMPTS[0] + " " + PROMPTS[1]))[None]
    head.mass_bias = fit_mass_bias(head, final_hidden_states(dense, calibration))
    return dense, model, tokenizer


def tokens_of(model, tokenizer, prompt, max_tokens=8, **kwargs):
    return [r.token for r in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=GREEDY, **kwargs
    )]


def test_perplexity_is_dense(pair):
    dense, model, tokenizer = pair
    data = mx.array(tokenizer.encode(" ".join(PROMPTS * 8))[:130]).reshape(2, 65)
    assert float(eval_ppl(model, data, batch_size=2)[0]) == float(eval_ppl(dense, data, batch_size=2)[0])


def test_greedy_tokens_are_the_argmax_of_the_candidates(pair):
    dense, model, tokenizer = pair
    prompt = mx.array(tokenizer.encode(PROMPTS[0]))
    tokens = tokens_of(model, tokenizer, prompt)
    context = mx.concatenate([prompt, mx.array(tokens[:-1])])[None]
    hidden = final_hidden_states(dense, context)[0, prompt.size - 1 :]
    reference = np.array(dense(context))[0, prompt.size - 1 :]
    head = flash_head(model)
    ids = np.array(head.candidates(hidden)[0])
    history = np.array(context[0])
    for step, token in enumerate(tokens):
        # The candidates and the context's recent tokens, exact; ties to the lowest token id.
        scored = np.zeros(reference.shape[-1], dtype=bool)
        scored[ids[step][ids[step] >= 0]] = True
        scored[history[: prompt.size + step][-head.recent_tokens :]] = True
        assert token == np.argmax(np.where(scored, reference[step], -np.inf))


def test_batch_rows_match_single_rows(pair):
    _, model, tokenizer = pair
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    batch = batch_generate(model, tokenizer, prompts, max_tokens=6, return_token_ids=True)
    assert batch.token_ids == [tokens_of(model, tokenizer, p, max_tokens=6) for p in PROMPTS]


def test_batch_paths_match_single_rows_on_real_hidden_states(pair):
    dense, model, tokenizer = pair
    context = mx.array(tokenizer.encode(" ".join(PROMPTS)))[None]
    hidden = final_hidden_states(dense, context)[0, -4:]
    assert_batch_matches_single_rows(flash_head(model), hidden, BATCH_PATHS)


def test_speculative_verification_matches_plain_decoding(pair):
    dense, model, tokenizer = pair
    responses = list(stream_generate(
        model, tokenizer, PROMPTS[1], max_tokens=8, sampler=GREEDY, draft_model=dense,
        num_draft_tokens=3,
    ))
    assert [r.token for r in responses] == tokens_of(model, tokenizer, PROMPTS[1])


def test_sampling_logprobs_and_logit_bias(pair):
    _, model, tokenizer = pair
    head = flash_head(model)
    prompt = mx.array(tokenizer.encode(PROMPTS[0]))
    steps = generate_step(prompt, model, max_tokens=3, sampler=make_sampler(temp=1.0, top_k=50))
    for _, logprobs in steps:
        finite = np.isfinite(np.array(logprobs)).sum()
        assert head.n_probes * head.cluster_size < finite <= (head.n_probes + 1) * head.cluster_size
        np.testing.assert_allclose(np.exp(np.array(logprobs)).sum(), 1.0, rtol=1e-4)
    _, logprobs = next(generate_step(prompt, model, max_tokens=1, sampler=GREEDY))
    outside = int(np.flatnonzero(np.isneginf(np.array(logprobs)))[0])
    biased = make_logits_processors(logit_bias={outside: 1000.0})
    token, _ = next(generate_step(prompt, model, max_tokens=1, sampler=GREEDY, logits_processors=biased))
    assert int(token) == outside
