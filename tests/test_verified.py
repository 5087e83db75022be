"""Verified greedy decoding (``flashhead_verify=K``) against the dense head: the same tokens and
log-probabilities on every architecture, caches rolled back to what incremental dense decoding
holds, EOS where dense ends, and the ``flashhead-mlx generate --flashhead-verify`` command."""

import functools
import re

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import (
    ArraysCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)
from mlx_lm.sample_utils import make_sampler
from mlx.utils import tree_flatten

from conftest import make_clusters, make_tiny_model
from flashhead_mlx import generation, load, stream_generate
from flashhead_mlx.assets import make_assets
from flashhead_mlx.model_head import final_hidden_states, head_module, head_rows
from flashhead_mlx.patch import apply_flashhead, describe_head, flash_head
from flashhead_mlx.pipeline import convert
from flashhead_mlx import verified
from flashhead_mlx.verified import Verification, layers, parse_block, set_verification
from test_generate_cli import generated_text, run_generate

N_PROBES = 2  # few probes: the unverified FlashHead text differs from the dense one
LONG = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
    "minds of the surrounding families, that he is considered the rightful property of some "
    "one or other of their daughters."
)
PROMPTS = [
    "It is a truth",
    "a single man in possession",
    "<|im_start|>user\nWho is the man of good fortune?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nA wife?<|im_end|>\n",
    "def add(a, b):\n    return a + b\n\nprint(add(",
    "for i in range(10):\n    if i % 2 == 0:\n",
    LONG,
    LONG + " " + LONG,
]
ARCHITECTURES = {
    "llama": dict(model_type="llama"),
    "llama-untied-quantized": dict(model_type="llama", tied=False, quantize=True),
    "qwen2": dict(model_type="qwen2"),
    "qwen3-untied": dict(model_type="qwen3", tied=False),
    "gemma3_text": dict(model_type="gemma3_text"),
    "gemma3": dict(model_type="gemma3"),
    "gemma2-softcap": dict(model_type="gemma2"),
}


def flash_pair(folder, n_probes=N_PROBES):
    """The dense model, the same with a FlashHead of ``n_probes`` random clusters, the tokenizer."""
    dense, tokenizer = mlx_lm.load(str(folder))
    model, _ = mlx_lm.load(str(folder))
    rows = np.array(head_rows(head_module(model)))
    apply_flashhead(model, make_assets(make_clusters(rows), n_probes))
    return dense, model, tokenizer


def run(model, prompt, max_tokens, **kwargs):
    """Tokens and log-probabilities of :func:`flashhead_mlx.generation.generate_step`."""
    steps = generation.generate_step(prompt, model, max_tokens=max_tokens, **kwargs)
    pairs = [(int(token), np.array(logprobs)) for token, logprobs in steps]
    return [t for t, _ in pairs], [p for _, p in pairs]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("verified") / request.param
    return flash_pair(make_tiny_model(folder, **ARCHITECTURES[request.param]))


def test_verified_greedy_is_dense_on_every_architecture(pair):
    dense, model, tokenizer = pair
    set_verification(model, 8)
    differs = 0
    for text in PROMPTS:
        prompt = mx.array(tokenizer.encode(text))
        expected, expected_logprobs = run(dense, prompt, 24)
        tokens, logprobs = run(model, prompt, 24)
        assert tokens == expected, text
        for actual, reference in zip(logprobs, expected_logprobs):
            np.testing.assert_allclose(actual, reference, rtol=0, atol=1e-5)
        differs += run(model, prompt, 24, flashhead_verify=0)[0] != expected
    assert differs, "the unverified FlashHead gives the dense text everywhere: no test"
    verification = flash_head(model).verification
    assert verification.tokens == 24 * len(PROMPTS) and verification.rollbacks > 0


def incremental_cache(dense, prompt, tokens, cache, quantize):
    """``cache`` filled as dense decoding fills it: the prompt but its last token in one
    prefill, then ``prompt[-1]`` and ``tokens`` one at a time, ``quantize(cache)`` after each."""
    for chunk in [prompt[:-1], prompt[-1:]] + [mx.array([t]) for t in tokens]:
        final_hidden_states(dense, chunk[None], cache)
        quantize(cache)
    mx.eval([c.state for c in cache])
    return cache


def assert_same_cache(actual, expected):
    assert len(layers(actual)) == len(layers(expected))
    for a, e in zip(layers(actual), layers(expected)):
        assert type(a) is type(e)
        if isinstance(a, ArraysCache):  # the recurrent states, entry by entry
            for x, y in zip(a.cache, e.cache, strict=True):
                np.testing.assert_array_equal(np.array(x), np.array(y))
            continue
        assert a.offset == e.offset
        if isinstance(a, RotatingKVCache):
            assert a._idx == e._idx
            arrays = [(a.keys, e.keys), (a.values, e.values)]
        else:
            pairs = zip(tree_flatten([a.keys, a.values]), tree_flatten([e.keys, e.values]))
            # The entries up to the offset: a trimmed buffer keeps stale ones after it.
            arrays = [(x[..., : a.offset, :], y[..., : e.offset, :]) for (_, x), (_, y) in pairs]
        for x, y in arrays:
            np.testing.assert_array_equal(np.array(x), np.array(y))


# Each cache kind: the tiny model's config, the cache (None: the model's own), generate options.
CACHES = {
    "KVCache": (dict(model_type="llama"), None, {}),
    "QuantizedKVCache": (
        dict(model_type="llama", hidden_size=128),
        None,
        dict(kv_bits=4, kv_group_size=32, quantized_kv_start=20),
    ),
    "RotatingKVCache": (dict(model_type="llama"), 16, {}),  # as max_kv_size=16 makes it
    "RotatingKVCache-sliding": (dict(model_type="gemma3_text", sliding_window=16), None, {}),
}


def make_cache(model, max_size):
    """The model's own cache, or rotating caches of ``max_size`` keeping 4 entries."""
    if max_size is None:
        return make_prompt_cache(model)
    return [RotatingKVCache(max_size, keep=4) for _ in model.layers]


@pytest.mark.parametrize("kind", list(CACHES))
def test_rollback_leaves_the_cache_of_incremental_dense_decoding(kind, tmp_path):
    config, max_size, options = CACHES[kind]
    dense, model, tokenizer = flash_pair(make_tiny_model(tmp_path / "m", **config))
    prompt = mx.array(tokenizer.encode(LONG)[:12])
    expected, _ = run(dense, prompt, 40, prompt_cache=make_cache(dense, max_size), **options)
    set_verification(model, 8)
    cache = make_cache(model, max_size)
    tokens, _ = run(model, prompt, 40, prompt_cache=cache, **options)
    assert tokens == expected
    assert flash_head(model).verification.rollbacks > 0
    if kind == "QuantizedKVCache":
        assert all(isinstance(c, QuantizedKVCache) for c in cache)
    if kind.startswith("RotatingKVCache"):
        assert any(isinstance(c, RotatingKVCache) and c.offset > c.max_size for c in cache)
    quantize = functools.partial(
        generation.MLX_GENERATE.maybe_quantize_kv_cache,
        quantized_kv_start=options.get("quantized_kv_start"),
        kv_group_size=options.get("kv_group_size"),
        kv_bits=options.get("kv_bits"),
    )
    reference = incremental_cache(dense, prompt, tokens, make_cache(dense, max_size), quantize)
    assert_same_cache(cache, reference)


def test_eos_inside_a_block_ends_where_dense_ends(tmp_path):
    dense, model, tokenizer = flash_pair(make_tiny_model(tmp_path / "m"))
    expected = [r.token for r in stream_generate(dense, tokenizer, LONG, max_tokens=20)]
    eos = expected[10]
    stop = expected.index(eos)
    tokenizer._eos_token_ids = {eos}
    cache = make_prompt_cache(model)
    responses = list(
        stream_generate(model, tokenizer, LONG, max_tokens=20, flashhead_verify=8, prompt_cache=cache)
    )
    assert [r.token for r in responses] == expected[: stop + 1]
    assert responses[-1].finish_reason == "stop"
    # The caches hold the prompt and the tokens yielded, as dense decoding leaves them.
    dense_cache = make_prompt_cache(dense)
    list(stream_generate(dense, tokenizer, LONG, max_tokens=20, prompt_cache=dense_cache))
    assert_same_cache(cache, dense_cache)


def test_unreadable_samplers_and_batches_are_refused(pair):
    dense, model, tokenizer = pair
    prompt = mx.array(tokenizer.encode("It is"))
    with pytest.raises(ValueError, match="flashhead_mlx.make_sampler"):
        run(model, prompt, 4, flashhead_verify=8, sampler=make_sampler(temp=0.7))
    set_verification(model, 8)
    with pytest.raises(ValueError, match="batches"):
        generation.BatchGenerator(model)
    set_verification(model, None)
    assert flash_head(model).verification is None


def test_describe_reports_the_mode_and_rollbacks():
    assert Verification(8, tokens=2000, rollbacks=25).describe() == (
        "verified greedy (K=8, 12.5 rollbacks per 1000 tokens)"
    )
    assert "(K=4-32, " in Verification((4, 32)).describe()


def test_head_line_reports_the_calls_k_and_counts(tmp_path):
    """A call's ``flashhead_verify=4`` on a model whose default is K=8: the ``Head:`` line
    says K=4 and counts that call's tokens; the next call, at the default, K=8 and its own."""
    _, model, tokenizer = flash_pair(make_tiny_model(tmp_path / "m"))
    set_verification(model, 8)
    prompt = mx.array(tokenizer.encode("It is"))
    for kwargs, label, tokens in (({"flashhead_verify": 4}, "K=4", 5), ({}, "K=8", 3)):
        run(model, prompt, tokens, **kwargs)
        assert f"verified greedy ({label}, " in describe_head(model)
        assert flash_head(model).verification.tokens == tokens
        assert verified.verify_block(model) == 8  # the default stays


def test_blocks_are_parsed_and_checked():
    assert parse_block("8") == 8 and parse_block("4-32") == (4, 32)
    for text in ("0", "32-4", "0-4", "x", "4-", "-4", "2-4-8"):
        with pytest.raises(ValueError, match="LOW-HIGH"):
            parse_block(text)


def test_adaptive_block_halves_after_a_rollback_and_doubles_after_a_clean_block(
    tmp_path, monkeypatch
):
    """flashhead_verify=(2, 16): each block's K follows the rule, written out here, from the
    blocks' own rollbacks; the output is still the dense head's."""
    dense, model, tokenizer = flash_pair(make_tiny_model(tmp_path / "m"))
    blocks, verify = [], verified.verify

    def spy(*args):
        result = verify(*args)
        blocks.append((args[4], len(result[0]), result[2]))  # K, tokens verified, rollback
        return result

    monkeypatch.setattr(verified, "verify", spy)
    prompt = mx.array(tokenizer.encode(LONG))
    expected, _ = run(dense, prompt, 64)
    assert run(model, prompt, 64, flashhead_verify=(2, 16))[0] == expected
    target, remaining = 16, 64
    for k, n, rolled_back in blocks:
        assert k == min(target, remaining)
        target = max(2, target // 2) if rolled_back else min(16, 2 * target)
        remaining -= n
    assert remaining == 0
    assert any(r for _, _, r in blocks), "no rollback: no test"
    assert any(not r and k < 16 for k, _, r in blocks), "K never grew back: no test"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verified-cli")
    source = make_tiny_model(folder / "untied", tied=False)
    return convert(str(source), str(folder / "untied-flashhead"), calibration_tokens=256)


def test_generate_command_verifies(converted):
    model, tokenizer = load(str(converted), flashhead=False)
    expected = mlx_lm.generate(model, tokenizer, "It is a truth", max_tokens=8)
    result = run_generate(converted, "--flashhead-verify", "4", "--n-probes", "1")
    assert result.returncode == 0, result.stderr
    assert generated_text(result.stdout) == expected
    assert re.search(
        r"^Head: FlashHead \(n_probes=1, .*\), verified greedy \(K=4, \d+\.\d rollbacks per "
        r"1000 tokens\)$",
        result.stdout,
        re.M,
    ), result.stdout
    default = run_generate(converted, "--flashhead-verify", "--n-probes", "1")
    assert default.returncode == 0, default.stderr
    assert "verified greedy (K=8," in default.stdout
    assert generated_text(default.stdout) == expected
    sampled = run_generate(
        converted, "--flashhead-verify", "2-8", "--temp", "0.7", "--top-p", "0.9"
    )
    assert sampled.returncode == 0, sampled.stderr
    assert "verified sampling (K=2-8," in sampled.stdout


REAL_PROMPTS = ["Once upon a time", "The three laws of robotics are", "def add(a, b):"]


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_verified_greedy_is_dense_on_real_models(name, request):
    """Two probes of random clusters: FlashHead's own text differs, the verified one must not."""
    dense, model, tokenizer = flash_pair(request.getfixturevalue(f"{name}_dir"))
    differs = 0
    for text in REAL_PROMPTS:
        prompt = mx.array(tokenizer.encode(text))
        expected, _ = run(dense, prompt, 10)
        assert run(model, prompt, 10, flashhead_verify=4)[0] == expected, text
        differs += run(model, prompt, 10, flashhead_verify=0)[0] != expected
    assert differs == len(REAL_PROMPTS)


def token_order_argmax(order, slots):
    """An independent reference: mlx-lm's greedy token on logits put back in token order
    (numpy's argmax: the first, i.e. lowest, token among equal log-probabilities)."""
    order = np.array(order)
    logits = np.full((slots.shape[0], order.max() + 1), -np.inf, dtype=np.float32)
    logits[:, order[order >= 0]] = np.array(slots)[:, order >= 0]
    logits = mx.array(logits)
    logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))  # mlx-lm's
    return logprobs.argmax(axis=-1).tolist()


def test_greedy_check_is_the_dense_argmax_without_log_probabilities(monkeypatch):
    """Rows whose largest logit is clear of the others: the argmax of the logits, without an
    exponential per slot; and it is mlx-lm's argmax of the token-order log-probabilities."""
    rng = np.random.default_rng(0)
    order = mx.array(np.concatenate([rng.permutation(60), [-1, -1, -1, -1]]).astype(np.int32))
    slots = mx.array(rng.normal(size=(6, 64)).astype(np.float32) * 4)
    slots = mx.where(order >= 0, slots, -mx.inf)
    calls = []
    monkeypatch.setattr(verified, "log_softmax",
                        lambda x: calls.append(x) or verified.mx.zeros_like(x))
    assert verified.greedy_check(order, slots).tolist() == token_order_argmax(order, slots)
    assert not calls


def test_greedy_check_takes_the_log_probabilities_at_a_near_tie():
    """Two logits one float32 step apart round to the same log-probability once a logsumexp
    near 20 is subtracted: mlx-lm's argmax then takes the lower token id, not the larger logit.
    The check sees the near-tie and searches the log-probabilities as the dense step does."""
    n = 2**20
    top = np.float32(0.5)
    below = np.nextafter(top, np.float32(-1))
    values = np.full(n, -30.0, dtype=np.float32)
    values[:2] = [below, top]  # token 0 is one step below token 1
    order = mx.array(np.arange(n, dtype=np.int32)[::-1].copy())  # cluster order reversed
    slots = mx.array(values[np.array(order)][None])
    assert token_order_argmax(order, slots) == [0]  # the tie went to the lower token id
    assert verified.best_token(order, slots).tolist() == [1]  # the larger logit
    assert verified.greedy_check(order, slots).tolist() == [0]
    # One step further apart than the margin, the order survives and no log-probabilities
    # are needed: both searches give the larger logit.
    values[0] = top - float(verified.near_tie_margin(mx.array(top))) * 1.01
    slots = mx.array(values[np.array(order)][None])
    assert token_order_argmax(order, slots) == verified.greedy_check(order, slots).tolist() == [1]
    # An exact tie goes to the lower token id, as in mlx-lm (token 0 sits in the later slot).
    values[0] = top
    slots = mx.array(values[np.array(order)][None])
    assert token_order_argmax(order, slots) == verified.greedy_check(order, slots).tolist() == [0]
