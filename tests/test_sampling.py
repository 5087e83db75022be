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
    return mx.array(weight[rng.integers(0, VOCAB, 64)] * 4 + rng.normal(0, 1, (64, DIMS)), mx.float32)


def make_head(weight, clusters, n_probes, mass_bias):
    return FlashHead(make_assets(clusters, n_probes, mass_bias=mass_bias), mx.array(weight))


def dense_softmax(weight, h, temperature):
    return mx.softmax(h @ mx.array(weight).T / temperature, axis=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_all_probes_is_the_dense_softmax(weight, clusters, hidden, temperature):
    n_clusters = clusters["centroids"].shape[0]
    head = make_head(weight, clusters, n_clusters, mx.zeros((3, n_clusters)))
    exact = sampler_distribution(head, hidden, temperature)
    np.testing.assert_allclose(np.array(exact), np.array(dense_softmax(weight, hidden, temperature)), atol=1e-6)


def test_every_token_can_be_drawn(weight, clusters, hidden):
    head = make_head(weight, clusters, 4, mx.zeros((3, clusters["centroids"].shape[0])))
    probs = np.array(sampler_distribution(head, hidden, 0.7))
    assert np.all(probs > 0)
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draws_follow_the_exact_distribution(weight, clusters, hidden, temperature):
    n_clusters = clusters["centroids"].shape[0]
    # Small probes and a generous tail, so that many draws come from non-probed clusters.
    head = make_head(weight, clusters, 3, mx.full((3, n_clusters), 2.0))
    h = hidden[:2]
    exact = np.array(sampler_distribution(head, h, temperature))
    candidates = np.array(head.candidates(h)[0])
    draws = 40000
    tokens = np.array(sample(head, mx.repeat(h, draws, axis=0), temperature, key=mx.random.key(3)))
    for row in range(2):
        drawn = tokens[row * draws : (row + 1) * draws]
        assert np.isin(drawn, candidates[row]).mean() < 0.9  # the tail is exercised
        counts = np.bincount(drawn, minlength=VOCAB)
        expected = exact[row] * draws
        big = expected >= 5
        observed = np.append(counts[big], counts[~big].sum())
        expected = np.append(expected[big], expected[~big].sum())
        chi2 = ((observed - expected) ** 2 / expected).sum()
        dof = observed.size - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


def test_batch_rows_are_independent(weight, clusters, hidden):
    head = make_head(weight, clusters, 3, mx.zeros((3, clusters["centroids"].shape[0])))
    tokens = np.array(sample(head, hidden[:4].reshape(2, 2, DIMS), 1.0, key=mx.random.key(0)))
    assert tokens.shape == (2, 2) and np.all((tokens >= 0) & (tokens < VOCAB))


def test_fitted_mass_bias_beats_no_offsets(weight, clusters, hidden):
    n_clusters = clusters["centroids"].shape[0]
    mass_bias = fit_mass_bias(mx.array(weight), clusters, hidden)
    assert mass_bias.shape[-1] == n_clusters
    for temperature in (1.0, 0.7):
        dense = dense_softmax(weight, hidden, temperature)
        fitted = sampler_distribution(make_head(weight, clusters, 3, mass_bias), hidden, temperature)
        zeros = sampler_distribution(make_head(weight, clusters, 3, mx.zeros_like(mass_bias)), hidden, temperature)
        assert total_variation(fitted, dense).mean() < 0.5 * total_variation(zeros, dense).mean()


def test_one_position_fits_exactly(weight, clusters, hidden):
    """Fitted on one hidden state, the tail masses of that state are exact at the fit temperatures."""
    h = hidden[:1]
    mass_bias = fit_mass_bias(mx.array(weight), clusters, h)
    head = make_head(weight, clusters, 3, mass_bias)
    for temperature in FIT_TEMPERATURES:
        exact = sampler_distribution(head, h, temperature)
        assert total_variation(exact, dense_softmax(weight, h, temperature)).item() < 2e-3


def test_needs_mass_bias(weight, clusters, hidden):
    with pytest.raises(ValueError, match="mass_bias"):
        sample(make_head(weight, clusters, 3, None), hidden, 1.0)
