"""Verified sampling: at a fixed hidden state, 1e5 draws of the acceptance rule follow the dense
sampler's distribution (Pearson's chi-square, pooled bins, fixed seed and alpha) where
FlashHead's own draws do not; end to end, blocks roll back and the log-probabilities are the
dense ones."""

import math
from statistics import NormalDist

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from conftest import make_clusters, make_tiny_model
from flashhead_mlx import generation, make_logits_processors, make_sampler
from flashhead_mlx.acceptance import accept
from flashhead_mlx.assets import make_assets
from flashhead_mlx.head import FlashHead
from flashhead_mlx.model_head import head_module, head_rows
from flashhead_mlx.patch import apply_flashhead, flash_head
from flashhead_mlx.verified import SampledProposal, log_softmax, process, set_verification
from test_sampling import chi_square
from test_verified import LONG, run

VOCAB, DIMS = 1000, 64
DRAWS, TAIL_DRAWS = 100_000, 20_000
ALPHA = 1e-3
SETTINGS = {  # sampler settings, logit bias, the proposal verified decoding picks
    "temperature": (dict(temp=1.0), None, "tail"),
    "temperature-0.7": (dict(temp=0.7), None, "tail"),
    "top_p-min_p-top_k-bias": (
        dict(temp=0.7, top_p=0.9, min_p=0.02, top_k=50), {7: 3.0, 11: -2.0}, "candidates"
    ),
    "xtc": (dict(temp=1.0, xtc_probability=0.5, xtc_threshold=0.05), None, "candidates"),
}


def passes(counts: np.ndarray, expected: np.ndarray, label: str) -> bool:
    """Pearson's test at level ``ALPHA``: the statistic below Wilson-Hilferty's critical value.
    Prints (``pytest -s``) the statistic, degrees of freedom, p-value (the same approximation),
    alpha and draws of ``label``."""
    chi2, dof = chi_square(counts, expected)
    scale = np.sqrt(2 / (9 * dof))
    z = NormalDist().inv_cdf(1 - ALPHA)
    critical = dof * (1 - 2 / (9 * dof) + z * scale) ** 3
    p_value = 0.5 * math.erfc(((chi2 / dof) ** (1 / 3) - 1 + 2 / (9 * dof)) / scale / math.sqrt(2))
    print(f"chi-square {label}: statistic {chi2:.1f}, {dof} degrees of freedom, p {p_value:.3g}, "
          f"alpha {ALPHA:g} (critical {critical:.1f}), {counts.sum()} draws")
    return chi2 < critical


@pytest.fixture(scope="module")
def weight():
    return np.random.default_rng(0).normal(0, 0.3, (VOCAB, DIMS)).astype(np.float32)


def position(weight, name):
    """A FlashHead of 2 probes, verified sampling's proposal for the settings ``name``, a
    hidden state ``[d]`` and its dense log-probabilities ``[1, V]`` after the processors."""
    options, bias, kind = SETTINGS[name]
    clusters = make_clusters(weight)
    n_clusters = clusters["centroids"].shape[0]
    assets = make_assets(clusters, 2, mass_bias=mx.zeros((2, n_clusters)))
    head = FlashHead(assets, mx.array(weight))
    processors = make_logits_processors(bias) if bias else None
    proposal = SampledProposal(head, make_sampler(**options), processors)
    assert proposal.kind == kind
    rng = np.random.default_rng(1)
    h = mx.array(0.6 * weight[rng.integers(VOCAB)] + rng.normal(0, 0.3, DIMS), mx.float32)
    logprobs = log_softmax(process(processors, None, h[None] @ mx.array(weight).T))
    return proposal, h, logprobs


@pytest.mark.parametrize("name", list(SETTINGS))
def test_acceptance_follows_the_dense_sampler(weight, name):
    """DRAWS positions at one hidden state: FlashHead's proposals, then the acceptance rule."""
    proposal, h, logprobs = position(weight, name)
    share = proposal.settings.xtc_probability
    mx.random.seed(0)
    on = np.random.default_rng(0).binomial(DRAWS, share)
    kept, proposed, expected = [], [], 0
    for xtc, draws in ((True, on), (False, DRAWS - on)):  # XTC's coin, one per position
        proposal.start(1)
        proposal.xtc = mx.array([[xtc]])
        proposal.draw(h[None, None], None)  # the block keeps what the check computes q from
        p, q = proposal.distributions(logprobs)
        tokens = mx.random.categorical(mx.log(q), num_samples=draws).reshape(-1)
        kept.append(np.array(accept(p, q, tokens)))
        proposed.append(np.array(tokens))
        expected = expected + draws * np.array(p[0])
    counts = [np.bincount(np.concatenate(t), minlength=VOCAB) for t in (kept, proposed)]
    assert passes(counts[0], expected, f"{name}, verified"), "verified is not the dense sampler"
    assert not passes(counts[1], expected, f"{name}, unverified"), "FlashHead alone passes"


def test_the_tail_proposal_is_what_flashhead_draws(weight):
    """FlashHead's own draws at a hidden state follow the ``q`` the acceptance rule uses."""
    proposal, h, logprobs = position(weight, "temperature")
    mx.random.seed(0)
    proposal.start(TAIL_DRAWS)
    tokens = proposal.draw(mx.broadcast_to(h, (TAIL_DRAWS, 1, DIMS)), None)
    proposal.start(1)
    proposal.draw(h[None, None], None)
    _, q = proposal.distributions(logprobs)
    counts = np.bincount(np.array(tokens), minlength=VOCAB)
    assert passes(counts, TAIL_DRAWS * np.array(q[0]), "tail proposal, FlashHead's draws vs q")


def dense_replay(dense, prompt, tokens):
    """The tokens and log-probabilities of incremental dense decoding forced through ``tokens``."""
    forced = iter(tokens + [0, 0])
    sampler = lambda logprobs: mx.array([next(forced)], mx.uint32)  # noqa: E731
    steps = generation.MLX_GENERATE.generate_step(
        prompt, dense, max_tokens=len(tokens), sampler=sampler
    )
    pairs = [(int(t), np.array(p)) for t, p in steps]
    return [t for t, _ in pairs], [p for _, p in pairs]


@pytest.mark.parametrize("mass_bias", [True, False], ids=["tail", "candidates"])
def test_verified_sampling_rolls_back_with_dense_logprobs(tmp_path, mass_bias):
    folder = make_tiny_model(tmp_path / "m")
    dense, tokenizer = mlx_lm.load(str(folder))
    model, _ = mlx_lm.load(str(folder))
    clusters = make_clusters(np.array(head_rows(head_module(model))))
    n_clusters = clusters["centroids"].shape[0]
    bias = mx.zeros((2, n_clusters)) if mass_bias else None
    apply_flashhead(model, make_assets(clusters, 2, mass_bias=bias))
    prompt = mx.array(tokenizer.encode(LONG))
    mx.random.seed(0)
    set_verification(model, 8)
    sampler = make_sampler(temp=1.0, top_k=0 if mass_bias else 40)
    tokens, logprobs = run(model, prompt, 32, sampler=sampler)
    verification = flash_head(model).verification
    assert verification.mode == "sampling" and verification.tokens == 32
    assert verification.rollbacks > 0
    assert verification.describe().startswith("verified sampling (K=8, ")
    expected, expected_logprobs = dense_replay(dense, prompt, tokens)
    assert expected == tokens
    for actual, reference in zip(logprobs, expected_logprobs):
        np.testing.assert_allclose(actual, reference, rtol=0, atol=1e-5)
