"""Balanced clustering, probe fitting and containment, checked against brute force."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import AUSTEN_DIR, TINY_TEXT
from flashhead_mlx.calibration import calibration_hidden_states, text_windows
from flashhead_mlx.clustering import balanced_assign, cluster_head
from flashhead_mlx.assets import make_assets
from flashhead_mlx.containment import containment, target_ranks, token_clusters
from flashhead_mlx.head import FlashHead


def clustered_data(vocab_size: int, dim: int = 32, n_hidden: int = 512, seed: int = 0):
    """Head rows drawn around a few directions (so clusters exist) and hidden states."""
    rng = np.random.default_rng(seed)
    modes = rng.normal(size=(vocab_size // 8 + 1, dim))
    rows = modes[rng.integers(0, modes.shape[0], vocab_size)] + 0.3 * rng.normal(
        size=(vocab_size, dim)
    )
    hidden = rng.normal(size=(n_hidden, dim)) * np.linspace(2.0, 0.2, dim)
    return mx.array(rows.astype(np.float32)), mx.array(hidden.astype(np.float32))


@pytest.mark.parametrize("vocab_size, cluster_size", [(1000, 16), (1024, 16), (777, 32), (10, 16)])
@pytest.mark.parametrize("calibrated", [False, True])
def test_exact_sizes_and_padding(vocab_size, cluster_size, calibrated):
    weight, hidden = clustered_data(vocab_size)
    clusters = cluster_head(weight, cluster_size, hidden_states=hidden if calibrated else None)
    order = np.array(clusters["order"])
    n_clusters = -(-vocab_size // cluster_size)
    assert order.dtype == np.int32 and order.shape == (n_clusters * cluster_size,)
    assert np.array_equal(np.sort(order[order >= 0]), np.arange(vocab_size))
    n_padding = int((order < 0).sum())
    assert n_padding == n_clusters * cluster_size - vocab_size
    assert (n_padding > 0) == (vocab_size % cluster_size != 0)
    # Padding slots never take a whole cluster.
    assert (order.reshape(n_clusters, cluster_size) >= 0).any(axis=1).all()
    for key in ("centroids", "spherical_centroids"):
        assert (
            clusters[key].shape == (n_clusters, weight.shape[1])
            and clusters[key].dtype == mx.float32
        )
    assert clusters["cluster_bias"].shape == (n_clusters,)
    norms = np.linalg.norm(np.array(clusters["spherical_centroids"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_deterministic_for_a_seed():
    weight, hidden = clustered_data(600)
    first = cluster_head(weight, 16, hidden_states=hidden, seed=3)
    again = cluster_head(weight, 16, hidden_states=hidden, seed=3)
    other = cluster_head(weight, 16, hidden_states=hidden, seed=4)
    for key in ("order", "centroids", "cluster_bias"):
        assert mx.array_equal(first[key], again[key])
    assert not mx.array_equal(first["order"], other["order"])


def test_recovers_planted_clusters():
    """Rows planted as 64 tight groups of 16 come back (nearly all) as those groups."""
    rng = np.random.default_rng(1)
    group = rng.permutation(np.repeat(np.arange(64), 16))
    rows = rng.normal(size=(64, 32))[group] + 0.05 * rng.normal(size=(1024, 32))
    order = np.array(cluster_head(mx.array(rows.astype(np.float32)), 16)["order"]).reshape(64, 16)
    pure = (group[order] == group[order[:, :1]]).all(axis=1)
    assert pure.mean() >= 0.9


def test_balanced_assign_respects_capacity_and_prefers_the_best():
    rng = np.random.default_rng(0)
    n, n_clusters = 400, 25
    scores = rng.normal(size=(n, n_clusters)).astype(np.float32)
    candidates = np.broadcast_to(np.arange(n_clusters), scores.shape)
    capacity = np.full(n_clusters, 16)
    labels = balanced_assign(scores, candidates, capacity)
    assert (np.bincount(labels, minlength=n_clusters) == capacity).all()
    chosen = scores[np.arange(n), labels].sum()
    # Much better than a random balanced assignment, and no better than the unconstrained best.
    random_labels = rng.permutation(np.repeat(np.arange(n_clusters), 16))
    assert (
        scores[np.arange(n), random_labels].sum() < 0.5 * chosen <= 0.5 * scores.max(axis=1).sum()
    )


def brute_force_containment(weight, hidden, order, centroids, bias, n_probes):
    """Dense argmax, then whether its cluster is among the n_probes best by a plain loop."""
    weight, hidden, order = np.array(weight), np.array(hidden), np.array(order)
    centroids, bias = np.array(centroids), np.array(bias)
    cluster_size = order.size // centroids.shape[0]
    hits = 0
    for h in hidden:
        target = int(np.argmax(weight @ h))
        slot = int(np.flatnonzero(order == target)[0])
        probed = np.argsort(-(centroids @ h + bias), kind="stable")[:n_probes]
        hits += slot // cluster_size in probed
    return hits / hidden.shape[0]


def test_containment_matches_brute_force():
    weight, hidden = clustered_data(1000, n_hidden=300, seed=2)
    clusters = cluster_head(weight, 16, hidden_states=hidden[:200])
    held_out = hidden[200:]
    head = FlashHead(make_assets(clusters, 1, centroid_bits=None), weight)
    rows = containment(head, held_out, [1, 4, 16, 63])
    for row in rows:
        expected = brute_force_containment(
            weight,
            held_out,
            clusters["order"],
            clusters["centroids"],
            clusters["cluster_bias"],
            row["n_probes"],
        )
        assert row["containment"] == pytest.approx(expected)
        assert row["scored_fraction"] == pytest.approx((63 + row["n_probes"] * 16) / 1000)
    assert rows[-1]["containment"] == 1.0
    # The fitted probes retrieve far better than chance (4 of 63 clusters probed).
    assert rows[1]["containment"] > 0.6


def test_quantized_probes_close_to_float():
    weight, hidden = clustered_data(1000, dim=64, n_hidden=400, seed=3)
    clusters = cluster_head(weight, 16, hidden_states=hidden[:200])
    heads = (FlashHead(make_assets(clusters, 1, centroid_bits=b), weight) for b in (None, 4))
    exact, quantized = (containment(head, hidden[200:], [8])[0] for head in heads)
    assert abs(exact["containment"] - quantized["containment"]) < 0.05


def test_target_ranks_follow_the_stored_centroid_bits():
    """Ranks by the head's own stage 1 (8-bit centroids): a plain count of the clusters that
    score higher, or as high with a lower id, at the dense argmax of a plain matmul; a head with
    4-bit centroids ranks otherwise."""
    weight, hidden = clustered_data(1000, dim=64, n_hidden=300, seed=4)
    clusters = cluster_head(weight, 16, hidden_states=hidden[:200])
    held_out = hidden[200:]
    targets = np.array(mx.argmax(held_out @ weight.T, axis=1))
    head = FlashHead(make_assets(clusters, 1, centroid_bits=8), weight)
    scores = np.array(head.cluster_scores(held_out))
    owner = np.array(token_clusters(clusters["order"], 16))[targets]
    own = scores[np.arange(owner.size), owner][:, None]
    ids = np.arange(scores.shape[1])
    expected = ((scores > own) | ((scores == own) & (ids < owner[:, None]))).sum(axis=1)
    same = {
        bits: np.mean(
            target_ranks(FlashHead(make_assets(clusters, 1, centroid_bits=bits), weight), held_out)
            == expected
        )
        for bits in (8, 4)
    }
    assert same[8] == 1.0 and same[4] < 1.0


def test_token_clusters_rejects_incomplete_order():
    with pytest.raises(ValueError, match="exactly once"):
        token_clusters(mx.array([0, 1, 1, -1], dtype=mx.int32), 2)
    with pytest.raises(ValueError, match="exactly once"):
        token_clusters(mx.array([0, 5, 1, -1], dtype=mx.int32), 2)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="hidden_states"):
        cluster_head(mx.zeros((100, 8)), 16, hidden_states=mx.zeros((10, 9)))
    with pytest.raises(ValueError, match="cluster_size"):
        cluster_head(mx.zeros((100, 8)), 0)


def test_calibration_hidden_states_are_the_heads_input(tiny_llama):
    from mlx_lm import load

    from flashhead_mlx.model_head import head_module, head_rows

    model, tokenizer = load(str(tiny_llama))
    hidden = calibration_hidden_states(
        model, tokenizer, TINY_TEXT, n_tokens=200, seq_len=64, batch_size=2
    )
    assert hidden.shape == (200, 64) and hidden.dtype == mx.float32
    windows = text_windows(tokenizer, TINY_TEXT, n_tokens=200, seq_len=64)
    assert windows.shape[0] == 4
    # The logits of the first window, from the full model, match the head applied to the states.
    n_prefix = windows.shape[1] - 64
    logits = model(windows[:1])[0, n_prefix:]
    weight = head_rows(head_module(model))
    np.testing.assert_allclose(
        np.array(hidden[:64] @ weight.T), np.array(logits), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="seq_len"):
        calibration_hidden_states(model, tokenizer, "too short", seq_len=64)


@pytest.mark.slow
def test_smollm2_containment_on_held_out_text(smollm2_dir):
    """Calibrate on the first part of Pride and Prejudice, measure on its last part: the
    probed clusters hold the dense argmax almost always at 10% of the vocabulary scored."""
    from mlx_lm import load

    from flashhead_mlx.model_head import head_module, head_rows

    text = (AUSTEN_DIR / "calibration.txt").read_text()
    model, tokenizer = load(str(smollm2_dir))
    weight = head_rows(head_module(model))
    hidden = calibration_hidden_states(model, tokenizer, text[:400_000], n_tokens=2048, seq_len=256)
    held_out = calibration_hidden_states(
        model, tokenizer, text[500_000:], n_tokens=1024, seq_len=256
    )
    clusters = cluster_head(weight, 16, hidden_states=hidden)
    n_clusters = clusters["centroids"].shape[0]
    p = (weight.shape[0] // 10 - n_clusters) // 16  # 10% of the vocabulary scored
    head = FlashHead(make_assets(clusters, 1), weight)
    row = containment(head, held_out, [p])[0]
    assert row["scored_fraction"] <= 0.10
    assert row["containment"] >= 0.97


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_target_ranks_agree_with_the_heads_own_probes(dtype):
    """tune's and eval's ranks (containment.target_ranks) say "contained with p probes" exactly
    when the head, probing p clusters, scores the dense argmax: for a bfloat16 head too, and with
    tied centroids, where only the shared tie-break (lowest cluster id) decides."""
    weight, hidden = clustered_data(1000, dim=64, n_hidden=300, seed=5)
    clusters = cluster_head(weight, 16, hidden_states=hidden[:200])
    centroids = np.array(clusters["centroids"])
    centroids[1::2] = centroids[::2][: centroids[1::2].shape[0]]  # pairs of equal centroids
    bias = np.array(clusters["cluster_bias"])
    bias[1::2] = bias[::2][: bias[1::2].shape[0]]
    clusters = {**clusters, "centroids": mx.array(centroids), "cluster_bias": mx.array(bias)}
    head = FlashHead(make_assets(clusters, 1), weight.astype(dtype))
    held_out = hidden[200:].astype(dtype)
    ranks = target_ranks(head, held_out)
    targets = np.array(mx.argmax(head.dense_logits(held_out), axis=-1))
    owner = np.array(token_clusters(clusters["order"], 16))[targets]
    for p in (1, 3, 8, 20):
        head.n_probes = p
        probed = np.array(head.probe(held_out))
        assert np.array_equal(ranks < p, (probed == owner[:, None]).any(axis=1))
