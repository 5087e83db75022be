"""Full-vocabulary sampling: draws follow the sampler's exact distribution, which covers every
token and is the dense softmax when every cluster is probed."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_clusters
from flashhead_mlx.assets import make_assets
from flashhead_mlx.head import FlashHead
from flashhead_mlx.sampling import (
    FIT_TEMPERATURES,
    fit_mass_bias,
    sample,
    sampler_distribution,
    total_variation,
)

VOCAB, DIMS = 1000, 64


@pytest.fixture(scope="module")
def weight():
    return np.random.default_rng(0).normal(0, 0.3, (VOCAB, DIMS)).astype(np.float32)


@pytest.fixture(scope="module")
def clusters(weight):
    return make_clusters(weight)


@pytest.fixture(scope="module")
def hidden(weight):
    rng = np.random.default_rng(1)
    picks = weight[rng.integers(0, VOCAB, 64)]
    return mx.array(1.5 * picks + rng.normal(0, 0.5, picks.shape), mx.float32)


def make_head(weight, clusters, n_probes, mass_bias):
    return FlashHead(make_assets(clusters, n_probes, mass_bias=mass_bias), mx.array(weight))


def dense_softmax(weight, h, temperature):
    return mx.softmax(h @ mx.array(weight).T / temperature, axis=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_all_probes_is_the_dense_softmax(weight, clusters, hidden, temperature):
    n_clusters = clusters["centroids"].shape[0]
    head = make_head(weight, clusters, n_clusters, mx.zeros((3, n_clusters)))
    exact = sampler_distribution(head, hidden, temperature)
    dense = np.array(dense_softmax(weight, hidden, temperature))
    np.testing.assert_allclose(np.array(exact), dense, rtol=1e-4, atol=1e-7)


def test_every_token_can_be_drawn(weight, clusters, hidden):
    head = make_head(weight, clusters, 4, mx.zeros((3, clusters["centroids"].shape[0])))
    probs = np.array(sampler_distribution(head, hidden, 0.7))
    assert np.all(probs > 0)
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-5)


def chi_square(counts, expected):
    """Pearson's statistic and its degrees of freedom, the bins expecting under 5 pooled."""
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], max(expected[~big].sum(), 1e-9))
    return ((observed - expected) ** 2 / expected).sum(), observed.size - 1


def assert_chi_square(counts, expected):
    """Pearson's test, rare bins pooled, at about five standard deviations."""
    chi2, dof = chi_square(counts, expected)
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draws_follow_the_exact_distribution(weight, clusters, hidden, temperature):
    n_clusters = clusters["centroids"].shape[0]
    # Few probes and flat distributions, so that most draws come from non-probed clusters.
    head = make_head(weight, clusters, 3, mx.full((2, n_clusters), 0.5))
    h = 0.3 * hidden[:2]
    exact = np.array(sampler_distribution(head, h, temperature))
    candidates = np.array(head.candidates(h)[0])
    order = clusters["order"]
    cluster_of = np.empty(VOCAB, int)
    cluster_of[order[order >= 0]] = np.flatnonzero(order >= 0) // 16
    draws = 40000
    tokens = np.array(sample(head, mx.repeat(h, draws, axis=0), temperature, key=mx.random.key(3)))
    for row in range(2):
        drawn = tokens[row * draws : (row + 1) * draws]
        assert 0.02 < np.isin(drawn, candidates[row]).mean() < 0.5  # both parts are exercised
        assert_chi_square(np.bincount(drawn, minlength=VOCAB), exact[row] * draws)
        assert_chi_square(
            np.bincount(cluster_of[drawn], minlength=n_clusters),
            np.bincount(cluster_of, weights=exact[row], minlength=n_clusters) * draws,
        )


def test_batch_rows_are_independent(weight, clusters, hidden):
    head = make_head(weight, clusters, 3, mx.zeros((3, clusters["centroids"].shape[0])))
    tokens = np.array(sample(head, hidden[:4].reshape(2, 2, DIMS), 1.0, key=mx.random.key(0)))
    assert tokens.shape == (2, 2) and np.all((tokens >= 0) & (tokens < VOCAB))


def test_one_position_fit_is_exact(weight, clusters, hidden):
    """Fitted on one hidden state at two temperatures, the estimated tail masses of that state are
    exact there, so the importance weights are too and the sampler is the dense softmax."""
    h = 0.3 * hidden[:1]
    head = make_head(weight, clusters, 3, None)
    head.mass_bias = fit_mass_bias(head, h, temperatures=(0.7, 1.0))
    assert head.mass_bias.shape == (2, clusters["centroids"].shape[0])
    for temperature in (0.7, 1.0):
        exact = np.array(sampler_distribution(head, h, temperature))
        dense = np.array(dense_softmax(weight, h, temperature))
        np.testing.assert_allclose(exact, dense, rtol=1e-3, atol=1e-7)
    exact = sampler_distribution(head, h, 0.5)
    assert total_variation(exact, dense_softmax(weight, h, 0.5)).item() > 1e-4


def test_fit_matches_a_numpy_reference(weight, clusters, hidden):
    head = make_head(weight, clusters, 3, None)
    mass_bias = np.array(fit_mass_bias(head, hidden, chunk_size=16))
    logits = (np.array(hidden) @ weight.T).astype(np.float64)
    order = clusters["order"].reshape(-1, 16)
    scores = np.array(head.cluster_scores(hidden)).astype(np.float64)
    probes = np.argsort(-scores, axis=1)[:, :3]
    tail = np.ones_like(scores, bool)
    np.put_along_axis(tail, probes, False, 1)
    offsets = []
    for t in FIT_TEMPERATURES:
        z = np.where(order >= 0, logits[:, np.maximum(order, 0)] / t, -np.inf)
        gap = np.log(np.exp(z).sum(-1)) - scores / t
        mean_tail = (gap * tail).sum(0) / np.maximum(tail.sum(0), 1)
        offsets.append(np.where(tail.sum(0) > 0, mean_tail, gap.mean(0)))
    design = np.array([[1, 1 / t] for t in FIT_TEMPERATURES])
    expected = np.linalg.lstsq(design, np.array(offsets), rcond=None)[0]
    np.testing.assert_allclose(mass_bias, expected, rtol=1e-3, atol=1e-3)


def test_needs_mass_bias(weight, clusters, hidden):
    with pytest.raises(ValueError, match="mass_bias"):
        sample(make_head(weight, clusters, 3, None), hidden, 1.0)
