"""The architecture matrix: every mlx-lm text architecture is tested on a tiny random model, or
refused by FlashHead with its reason, or skipped with a written reason
(flashhead_mlx/testing/architectures.py)."""

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from conftest import make_clusters
from flashhead_mlx import decoding, flash_head, unpatch
from flashhead_mlx.assets import make_assets
from flashhead_mlx.model_head import final_hidden_states, head_module, head_rows
from flashhead_mlx.patch import apply_flashhead
from flashhead_mlx.probe import Unsupported, probe_head
from flashhead_mlx.sampling import fit_mass_bias
from flashhead_mlx.testing.architectures import (
    REFUSED,
    REFUSED_VARIANTS,
    SKIPPED,
    TESTED,
    build,
    matrix_page,
    readme_section,
    text_architectures,
)
from flashhead_mlx.transform import Transform

ROOT = Path(__file__).resolve().parents[1]
PROMPT = mx.array([5, 17, 42, 99, 3, 250, 7])
FEW_PROBES = 2


@pytest.fixture(scope="module", autouse=True)
def uncompiled():
    """mx.compile'd functions compile C++ on the CPU backend (seconds each): run them as is."""
    mx.disable_compile()
    yield
    mx.enable_compile()


def test_every_architecture_is_tested_refused_or_skipped():
    listed = [*TESTED, *REFUSED, *SKIPPED]
    assert len(listed) == len(set(listed)), "an architecture is listed twice"
    missing = sorted(set(text_architectures()) - set(listed))
    assert not missing, f"neither tested, refused nor skipped with a reason: {missing}"
    assert not set(listed) - set(text_architectures()), "listed but not in mlx_lm.models"


def test_readme_and_matrix_page_are_generated_from_the_matrix():
    readme = (ROOT / "README.md").read_text()
    assert readme_section() in readme, "run scripts/architectures.py"
    assert (ROOT / "docs" / "architectures.md").read_text() == matrix_page(), (
        "run scripts/architectures.py"
    )


def greedy_tokens(model, n: int = 4) -> list:
    return [int(t) for t, _ in generate_step(PROMPT, model, max_tokens=n, sampler=make_sampler(0.0))]


def step_logits(model, dense: np.ndarray, **context) -> np.ndarray:
    """A decode step's logits over the prompt's positions, checked: some finite, each finite one
    the dense logit, the others -inf."""
    with decoding(**context):
        step = np.array(model(PROMPT[None]).astype(mx.float32))
    finite = np.isfinite(step)
    assert finite.any(axis=-1).all()
    assert np.all(np.isneginf(step[~finite]))
    if not context:
        np.testing.assert_allclose(step[finite], dense[finite], rtol=1e-4, atol=1e-4)
    return step


def wrong(transform):
    """A post-head transform other than ``transform``."""
    if transform is None:
        return Transform("multiply", 2.0)
    return Transform(transform.kind, transform.value * (0.25 if transform.kind == "softcap" else 2))


@pytest.mark.parametrize("name", sorted(TESTED))
def test_architecture(name):
    model = build(name)
    assert probe_head(model).describe() == TESTED[name]
    dense = np.array(model(PROMPT[None]))
    dense_tokens = greedy_tokens(model)
    original = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    kinds = {k: type(m) for k, m in model.named_modules()}
    clusters = make_clusters(np.array(head_rows(head_module(model))))
    apply_flashhead(model, make_assets(clusters, len(clusters["centroids"])))
    head = flash_head(model)

    # Every cluster probed: the exact path is dense bit for bit, so is greedy decoding.
    np.testing.assert_array_equal(np.array(model(PROMPT[None])), dense)
    assert greedy_tokens(model) == dense_tokens
    step_logits(model, dense)
    right, head.transform = head.transform, wrong(head.transform)
    with pytest.raises(AssertionError):  # the check can fail
        step_logits(model, dense)
    head.transform = right

    # Few probes: -inf outside the candidates and the row's tokens, sampling well defined.
    head.n_probes = FEW_PROBES
    step = step_logits(model, dense)
    assert np.isfinite(step).sum(-1).max() <= FEW_PROBES * head.cluster_size + PROMPT.size
    head.mass_bias = fit_mass_bias(head, final_hidden_states(model, mx.arange(64)[None]))
    sampled = step_logits(model, dense, temperatures=[1.0])[0, -1]
    assert np.isfinite(sampled).sum() > FEW_PROBES * head.cluster_size
    probabilities = np.exp(sampled - sampled.max())
    assert np.isclose(probabilities.sum() / probabilities.sum(), 1.0) and probabilities.sum() >= 1
    for token, logprobs in generate_step(PROMPT, model, max_tokens=2, sampler=make_sampler(1.0)):
        assert np.isfinite(np.array(logprobs)[int(token)])
        assert np.isclose(float(mx.exp(logprobs).sum()), 1.0, rtol=1e-4)

    unpatch(model)
    assert {k: type(m) for k, m in model.named_modules()} == kinds
    restored = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert restored.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(restored[key], value)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_architecture(name):
    with pytest.raises(Unsupported, match=REFUSED[name][0]):
        probe_head(build(name))


@pytest.mark.parametrize("name", sorted(REFUSED_VARIANTS))
def test_refused_configuration(name):
    overrides, (reason, _) = REFUSED_VARIANTS[name]
    with pytest.raises(Unsupported, match=reason):
        probe_head(build(name, **overrides))


def patched_with_every_cluster(name: str):
    model = build(name)
    clusters = make_clusters(np.array(head_rows(head_module(model))))
    dense = build(name)
    apply_flashhead(model, make_assets(clusters, len(clusters["centroids"])))
    return dense, model


def test_tied_embedding_read_by_the_body():
    """gemma4_text matches input embeddings against its tied table (``embed_tokens.weight``
    and ``as_linear``) before the head: those reads get the dense table and logits."""
    dense, model = patched_with_every_cluster("gemma4_text")
    embeddings = dense.model.embed_tokens(PROMPT[None])
    reference = np.array(dense(None, input_embeddings=embeddings))
    np.testing.assert_array_equal(np.array(model(None, input_embeddings=embeddings)), reference)
    with decoding():
        step = np.array(model(None, input_embeddings=embeddings))
    np.testing.assert_allclose(step, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["qwen3_5", "lfm2", "mamba", "falcon_h1"])
def test_caches_without_trim(name):
    """Hybrid and recurrent models (falcon_h1: a CacheList of both kinds): verified greedy
    decoding rolls back their ArraysCache states and the recent-token history kept on them to
    what incremental dense decoding of the emitted tokens holds, and gives the dense tokens
    where FlashHead's own differ; plain and batched decoding work, recent tokens included."""
    from flashhead_mlx.generation import batch_generate
    from flashhead_mlx.recent import CACHE_ATTRIBUTE, HISTORY_SLACK, batched
    from flashhead_mlx.verified import set_verification
    from mlx_lm.models.cache import ArraysCache, make_prompt_cache
    from test_verified import assert_same_cache, incremental_cache, run

    assert batched([ArraysCache(2, left_padding=[0, 1])]) and not batched([ArraysCache(2)])
    dense, model = patched_with_every_cluster(name)
    assert greedy_tokens(model, 6) == greedy_tokens(dense, 6)
    prompts = [[5, 17, 42], [99, 3, 250, 7, 8]]
    no_eos = SimpleNamespace(eos_token_ids=[], decode=str)
    rows = batch_generate(model, no_eos, prompts, max_tokens=3, return_token_ids=True).token_ids
    singles = [greedy_tokens_of(dense, p, 3) for p in prompts]
    assert rows == singles

    head = flash_head(model)
    head.n_probes = FEW_PROBES
    set_verification(model, 8)
    differs = 0
    # Tiny random models often repeat their last token, which the recent tokens then always
    # score: FlashHead's own text differs from the dense one more often without them.
    for recent in (head.recent_tokens, 0):
        head.recent_tokens = recent
        for prompt in (PROMPT, mx.array(prompts[1])):
            expected, expected_logprobs = run(dense, prompt, 24)
            cache = make_prompt_cache(model)
            tokens, logprobs = run(model, prompt, 24, prompt_cache=cache)
            assert tokens == expected
            for actual, reference in zip(logprobs, expected_logprobs):
                np.testing.assert_allclose(actual, reference, rtol=0, atol=1e-5)
            differs += run(model, prompt, 24, flashhead_verify=0)[0] != expected
            replay = incremental_cache(dense, prompt, tokens, make_prompt_cache(dense), no_quantize)
            assert_same_cache(cache, replay)
            if recent:  # the history kept on the first cache entry: the context, rolled back
                history, _ = getattr(cache[0], CACHE_ATTRIBUTE)
                kept = recent + HISTORY_SLACK
                context = [-1] * kept + prompt.tolist() + tokens
                assert np.array(history)[0].tolist() == context[-kept:]
    assert differs, "the unverified FlashHead gives the dense text everywhere: no test"
    assert head.verification.rollbacks > 0


def no_quantize(cache) -> None:
    """Dense decoding's KV quantization, off."""


def greedy_tokens_of(model, prompt, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n,
                                             sampler=make_sampler(0.0))]
