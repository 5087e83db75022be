"""Each row's recent tokens scored exactly at greedy decode steps (flashhead_mlx.recent), against
the dense head of the same tiny models: the exact set is the candidates plus the row's own last
tokens, a context holding every token makes greedy FlashHead decoding dense, the tokens are
tracked per sequence on its cache, and a batch row (batch_generate, BatchGenerator with rows
joining and leaving) decodes as its prompt alone."""

from types import SimpleNamespace

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

from conftest import make_clusters, make_tiny_model
from flashhead_mlx import decoding, flash_head, unpatch
from flashhead_mlx.assets import make_assets
from flashhead_mlx.generation import BatchGenerator, batch_generate, generate, generate_step
from flashhead_mlx.model_head import head_module, head_rows, language_model
from flashhead_mlx.patch import apply_flashhead
from flashhead_mlx.recent import (
    CACHE_ATTRIBUTE,
    RecentTokensModel,
    batch_windows,
    batched,
    track,
    windows,
)
from flashhead_mlx.verified import set_verification

MODELS = {
    "llama-tied": dict(model_type="llama"),
    "qwen3-untied-quantized": dict(model_type="qwen3", tied=False, quantize=True),
    "gemma2-softcap": dict(model_type="gemma2"),
}
N_PROBES = 2
ROWS = np.random.default_rng(0).integers(0, 1000, size=(2, 40))


@pytest.fixture(scope="module", params=list(MODELS))
def folder(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", **MODELS[request.param])


def patched(folder, recent_tokens, n_probes=N_PROBES, batch_path=None):
    model, tokenizer = mlx_lm.load(str(folder))
    assets = make_assets(make_clusters(np.array(head_rows(head_module(model)))), n_probes)
    model = apply_flashhead(model, assets, recent_tokens=recent_tokens)
    flash_head(model).batch_path = batch_path
    return model, tokenizer


def decode_step(model, rows: np.ndarray) -> np.ndarray:
    """Prefill ``rows`` but their last token, then one greedy decode step on it: logits [B, V]."""
    cache = make_prompt_cache(model)
    with decoding(temperatures=[0.0]):
        model(mx.array(rows[:, :-1]), cache=cache)
        return np.array(model(mx.array(rows[:, -1:]), cache=cache)[:, -1])


@pytest.mark.parametrize("batch_path", [None, "dense"])
def test_the_exact_set_is_the_candidates_and_the_rows_own_recent_tokens(folder, batch_path):
    """On FlashHead's own paths; on the dense switch, whose candidates grow with the recent
    tokens (tests/test_head.py), the row's own recent tokens are exact too."""
    dense, _ = mlx_lm.load(str(folder))
    reference = np.array(dense(mx.array(ROWS))[:, -1])
    candidates = np.isfinite(decode_step(patched(folder, 0, batch_path=batch_path)[0], ROWS))
    recent = 16
    step = decode_step(patched(folder, recent, batch_path=batch_path)[0], ROWS)
    for b in range(len(ROWS)):
        own = np.zeros(reference.shape[-1], dtype=bool)
        own[ROWS[b, -recent:]] = True
        if batch_path == "dense":
            exact = np.isfinite(step[b])
            assert exact[own].all() and step[b].argmax() == reference[b].argmax()
            np.testing.assert_allclose(step[b, exact], reference[b, exact], rtol=1e-4, atol=1e-4)
            continue
        # Exact at a candidate or one of the row's last 16 tokens (not another row's), else -inf.
        np.testing.assert_array_equal(np.isfinite(step[b]), candidates[b] | own)
        assert (own & ~candidates[b]).any()  # the recent tokens add exact logits
        np.testing.assert_allclose(step[b, own], reference[b, own], rtol=1e-4, atol=1e-4)
        assert np.all(np.isneginf(step[b, ~(candidates[b] | own)]))


def test_a_recent_candidate_keeps_its_stage_two_logit(folder, monkeypatch):
    """The recent tokens' logits are written first and the candidates' over them: a recent token
    among the candidates keeps the logit stage 2 gave it (spied: the recent tokens' own logits
    are shifted by one, so the order shows), the others get their own."""
    dense, _ = mlx_lm.load(str(folder))
    reference = np.array(dense(mx.array(ROWS))[:, -1])
    candidates = decode_step(patched(folder, 0)[0], ROWS)
    model, _ = patched(folder, ROWS.shape[1])
    head = flash_head(model)
    own_logits = type(head).row_token_logits
    monkeypatch.setattr(type(head), "row_token_logits",
                        lambda self, h, tokens: own_logits(self, h, tokens) + 1)
    step = decode_step(model, ROWS)
    both = 0
    for b in range(len(ROWS)):
        kept = np.isfinite(candidates[b])
        own = np.zeros(kept.shape, dtype=bool)
        own[ROWS[b]] = True
        both += (own & kept).sum()
        np.testing.assert_array_equal(step[b, kept], candidates[b, kept])
        np.testing.assert_array_equal(np.isfinite(step[b]) & ~kept, own & ~kept)
        np.testing.assert_allclose(step[b, own & ~kept], reference[b, own & ~kept] + 1,
                                   rtol=1e-4, atol=1e-4)
    assert both  # some recent tokens are candidates


def test_a_context_holding_every_token_makes_greedy_decoding_dense(folder):
    """With every vocabulary token among the recent ones, FlashHead's greedy output is the dense
    head's whatever the probes; without them the same few probes change it."""
    dense, tokenizer = mlx_lm.load(str(folder))
    prompt = list(map(int, np.random.default_rng(1).permutation(1000)))
    expected = mlx_lm.generate(dense, tokenizer, prompt, max_tokens=12)
    model, _ = patched(folder, recent_tokens=1024, n_probes=1)
    assert generate(model, tokenizer, prompt, max_tokens=12) == expected
    flash_head(model).recent_tokens = 0
    assert generate(model, tokenizer, prompt, max_tokens=12) != expected


def test_verified_greedy_decoding_reads_the_recent_tokens(folder):
    """Verified decoding's FlashHead steps score the recent tokens too: with every token among
    them no block is rolled back; without them the same few probes are."""
    dense, tokenizer = mlx_lm.load(str(folder))
    prompt = list(map(int, np.random.default_rng(1).permutation(1000)))
    expected = mlx_lm.generate(dense, tokenizer, prompt, max_tokens=12)
    model, _ = patched(folder, recent_tokens=1024, n_probes=1)
    rollbacks = []
    for recent in (1024, 0):
        flash_head(model).recent_tokens = recent
        set_verification(model, 4)
        assert generate(model, tokenizer, prompt, max_tokens=12) == expected
        rollbacks.append(flash_head(model).verification.rollbacks)
    assert rollbacks[0] == 0 < rollbacks[1]


def test_each_sequence_keeps_its_own_last_tokens_on_its_cache(folder):
    model, _ = patched(folder, recent_tokens=8)
    cache = make_prompt_cache(model)
    short = ROWS[:1, :5]
    with decoding(temperatures=[0.0]):
        model(mx.array(short), cache=cache)
    history, end = getattr(cache[0], CACHE_ATTRIBUTE)
    np.testing.assert_array_equal(np.array(history[:, -8:]), [[-1] * 3 + list(short[0])])
    assert end == 5
    with decoding(temperatures=[0.0]):
        for token in ROWS[0, 5:12]:
            model(mx.array([[int(token)]]), cache=cache)
    history, _ = getattr(cache[0], CACHE_ATTRIBUTE)
    np.testing.assert_array_equal(np.array(history[:, -8:]), ROWS[:1, 4:12])


def test_each_position_sees_the_tokens_up_to_itself():
    sequence = mx.array([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(np.array(windows(sequence, 2, 3)), [[[2, 3, 4], [3, 4, 5]]])
    np.testing.assert_array_equal(
        np.array(windows(sequence, 2, 5)), [[[-1, 1, 2, 3, 4], [1, 2, 3, 4, 5]]]
    )


def test_a_trimmed_cache_drops_the_trimmed_tokens_and_new_rows_start_again():
    cache = [SimpleNamespace(offset=0)]
    np.testing.assert_array_equal(
        np.array(track(cache, mx.array([[1, 2, 3]]), 4)),
        [[[-1, -1, -1, 1], [-1, -1, 1, 2], [-1, 1, 2, 3]]],
    )
    cache[0].offset = 3  # what the model's forward pass does to the cache
    np.testing.assert_array_equal(np.array(track(cache, mx.array([[4]]), 4)), [[[1, 2, 3, 4]]])
    cache[0].offset = 2  # trimmed by 2: tokens 3 and 4 are gone (a rejected draft, a rollback)
    np.testing.assert_array_equal(np.array(track(cache, mx.array([[9]]), 4)), [[[-1, 1, 2, 9]]])
    cache[0].offset = 3
    two_rows = mx.array([[7], [8]])  # a batch of other rows: their own history only
    np.testing.assert_array_equal(np.array(track(cache, two_rows, 2)), [[[-1, 7]], [[-1, 8]]])


def test_batch_caches_are_told_apart_and_rows_read_their_own_tokens():
    """mlx-lm's batch caches (per-row offset arrays) keep no history: each row's tokens come from
    the batch (flashhead_mlx.recent.batch_windows), without padding."""
    assert batched([SimpleNamespace(offset=mx.array([3, 5]))])
    assert not batched([SimpleNamespace(offset=3)]) and not batched(None) and not batched([])
    histories = [[1, 2, 3, 4, 5], [], [7]]
    np.testing.assert_array_equal(
        np.array(batch_windows(histories, mx.array([[6], [8], [9]]), 3)),
        [[[4, 5, 6]], [[-1, -1, 8]], [[-1, 7, 9]]],
    )


# Prompts of different lengths for the batch tests (random tokens: the dense argmax is often a
# recent token outside the probed clusters, so the recent tokens change the output).
BATCH_PROMPTS = [
    list(map(int, np.random.default_rng(seed).integers(0, 1000, size=n)))
    for seed, n in enumerate((3, 60, 150, 290))
]
# Where a batch row's greedy token may differ from its single row's: a near-tie, the two logits
# within this at the single row's step (float32 sums of another matmul shape).
NEAR_TIE = 1e-4


def single_row(model, prompt, max_tokens: int) -> list:
    """The greedy tokens of ``prompt`` decoded alone (flashhead_mlx.generate_step)."""
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


def assert_decodes_as_alone(model, prompt, row: list, alone: list) -> None:
    """A batch row's tokens ``row`` are its single row's ``alone``, up to a near-tie (then the
    rest may differ)."""
    for step, (token, expected) in enumerate(zip(row, alone)):
        if token != expected:
            context = prompt + alone[:step]
            logits = decode_step(model, np.array([context]))[0]
            assert abs(logits[token] - logits[expected]) <= NEAR_TIE, (step, token, expected)
            return
    assert len(row) == len(alone)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("batch") / "m", seed=2)
    model, tokenizer = patched(folder, recent_tokens=128, n_probes=1)
    return model, tokenizer


def test_batch_rows_decode_as_their_prompts_alone(llama):
    """batch_generate's greedy rows, of different lengths (left-padded in the batch): each row's
    tokens are its prompt's alone, with the recent tokens scored; without them they differ."""
    model, tokenizer = llama
    batch = batch_generate(model, tokenizer, BATCH_PROMPTS, max_tokens=10, return_token_ids=True)
    eos = set(tokenizer.eos_token_ids)
    unlike = 0
    for prompt, row in zip(BATCH_PROMPTS, batch.token_ids):
        alone = single_row(model, prompt, 10)
        stop = next((i for i, t in enumerate(alone) if t in eos), len(alone))
        assert_decodes_as_alone(model, prompt, row, alone[:stop])
        flash_head(model).recent_tokens = 0
        unlike += single_row(model, prompt, 10) != alone
        flash_head(model).recent_tokens = 128
    assert unlike  # the recent tokens change some row's output


def test_rows_joining_and_leaving_a_batch_decode_as_alone(llama):
    """BatchGenerator rows inserted while others decode (merged, extended with left padding) and
    finishing at different steps (filtered out): each decodes as its prompt alone."""
    model, _ = llama
    max_tokens = [4, 12, 9, 5]
    generator = BatchGenerator(model, stop_tokens=[])
    uids = generator.insert(BATCH_PROMPTS[:2], max_tokens[:2])
    rows = {}
    for step in range(20):
        if step == 3:  # two more rows join while the first two decode
            uids += generator.insert(BATCH_PROMPTS[2:], max_tokens[2:])
        for response in generator.next_generated():
            rows.setdefault(response.uid, []).append(response.token)
    generator.close()
    for uid, prompt, n in zip(uids, BATCH_PROMPTS, max_tokens):
        assert_decodes_as_alone(model, prompt, rows[uid], single_row(model, prompt, n))


def test_a_quantized_cache_keeps_the_sequences_tokens(tmp_path):
    """With ``kv_bits``, mlx-lm replaces the first cache by a new ``QuantizedKVCache`` once it
    reaches ``quantized_kv_start``: the history moves with it, so it still holds every token in
    the cache, the prompt's included (unverified and verified decoding)."""
    model, _ = patched(make_tiny_model(tmp_path / "m", hidden_size=128), recent_tokens=128)
    prompt = ROWS[0, :24].tolist()
    for verify in (0, 4):
        cache = make_prompt_cache(model)
        steps = generate_step(mx.array(prompt), model, max_tokens=6, prompt_cache=cache,
                              kv_bits=4, kv_group_size=32, quantized_kv_start=8,
                              flashhead_verify=verify)
        tokens = prompt + [int(token) for token, _ in steps]
        assert isinstance(cache[0], QuantizedKVCache)
        history, end = getattr(cache[0], CACHE_ATTRIBUTE)
        assert end == cache[0].offset > len(prompt)
        assert np.array(history[0, -end:]).tolist() == tokens[:end], verify


def test_unpatch_gives_the_language_model_its_class_back(folder):
    model, _ = patched(folder, recent_tokens=8)
    lm = language_model(model)
    original = type(lm).flashhead_original
    assert isinstance(lm, RecentTokensModel) and type(lm).flashhead_head is flash_head(model)
    unpatch(model)
    assert type(lm) is original and not isinstance(lm, RecentTokensModel)
