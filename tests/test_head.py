"""FlashHead against the dense head and a numpy reference of the two stages."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_batch_matches_single_rows, make_clusters
from flashhead_mlx.assets import make_assets
from flashhead_mlx.decode import decoding, in_context, make_context
from flashhead_mlx.head import FlashHead
from flashhead_mlx.kernels import BATCH_PATHS, choose_batch_path, recording, union_clusters
from flashhead_mlx.kernels.cluster_argmax import DENSE_PROBE_RATIO
from flashhead_mlx.sampling import sampling_logits
from flashhead_mlx.transform import softcap

VOCAB, DIMS, CLUSTER = 1000, 64, 16  # 63 clusters, 8 padding slots


@pytest.fixture(scope="module")
def weight():
    return np.random.default_rng(0).normal(0, 1, (VOCAB, DIMS)).astype(np.float32)


@pytest.fixture(scope="module")
def clusters(weight):
    return make_clusters(weight, CLUSTER)


def make_head(weight, clusters, quantized=False, n_probes=8, centroid_bits=4, cap=None):
    assets = make_assets(clusters, n_probes, centroid_bits=centroid_bits)
    if not quantized:
        return FlashHead(assets, mx.array(weight), transform=softcap(cap)), weight
    packed, scales, biases = mx.quantize(mx.array(weight), 32, 4)
    head = FlashHead(assets, packed, scales, biases, group_size=32, bits=4, transform=softcap(cap))
    return head, np.array(mx.dequantize(packed, scales, biases, 32, 4))


def reference_candidates(head, rows, h):
    """Candidate token sets and their dense logits, computed independently with numpy."""
    if head.centroid_bits is None:
        centroids = np.array(head.centroids)
    else:
        centroids = np.array(
            mx.dequantize(head.centroids, head.centroid_scales, head.centroid_biases,
                          head.centroid_group_size, head.centroid_bits)
        )
    scores = h @ centroids.T + np.array(head.cluster_bias)
    order = np.array(head.order).reshape(head.n_clusters, head.cluster_size)
    probes = np.argsort(-scores, axis=-1)[..., : head.n_probes]
    tokens = [set(order[p].ravel()) - {-1} for p in probes.reshape(-1, head.n_probes)]
    return tokens, h @ rows.T


def hidden(weight, n, seed=1):
    """Hidden states near some head rows, so that argmaxes are often contained."""
    rng = np.random.default_rng(seed)
    picks = weight[rng.integers(0, VOCAB, n)]
    return (2 * picks + rng.normal(0, 1, picks.shape)).astype(np.float32)


def decode_step(head, h) -> np.ndarray:
    """The head's logits for ``h`` in a decode step."""
    with decoding():
        return np.array(head(mx.array(h)))


@pytest.mark.parametrize("quantized", [False, True])
def test_prefill_is_exact_dense(weight, clusters, quantized):
    head, rows = make_head(weight, clusters, quantized)
    h = hidden(weight, 2 * 5).reshape(2, 5, DIMS)
    np.testing.assert_allclose(np.array(head(mx.array(h))), h @ rows.T, rtol=1e-4, atol=1e-4)
    # Outside a decode step even a single position is exact.
    single = mx.array(h[:, :1])
    np.testing.assert_allclose(np.array(head(single)), h[:, :1] @ rows.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("centroid_bits", [None, 8, 4])
def test_decode_logits_are_dense_at_candidates(weight, clusters, quantized, centroid_bits):
    head, rows = make_head(weight, clusters, quantized, centroid_bits=centroid_bits)
    head.batch_path = "union"  # 6 rows of 8 probes of 63 clusters: above the dense switch
    h = hidden(weight, 6).reshape(6, 1, DIMS)
    logits = decode_step(head, h)[:, 0]
    tokens, dense = reference_candidates(head, rows, h[:, 0])
    for row, expected, ref in zip(logits, tokens, dense):
        finite = set(np.flatnonzero(np.isfinite(row)))
        assert finite == expected
        idx = sorted(finite)
        np.testing.assert_allclose(row[idx], ref[idx], rtol=1e-4, atol=1e-4)
        assert np.all(row[np.isinf(row)] < 0)


@pytest.mark.parametrize("quantized", [False, True])
def test_all_probes_is_dense(weight, clusters, quantized):
    head, rows = make_head(weight, clusters, quantized, n_probes=clusters["centroids"].shape[0])
    h = hidden(weight, 3).reshape(3, 1, DIMS)
    np.testing.assert_allclose(decode_step(head, h), h @ rows.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
def test_greedy_matches_dense_argmax_when_contained(weight, clusters, quantized):
    head, rows = make_head(weight, clusters, quantized)
    h = hidden(weight, 64)
    tokens, dense = reference_candidates(head, rows, h)
    greedy = np.array(head.greedy(mx.array(h)))
    contained = [int(d.argmax()) in t for d, t in zip(dense, tokens)]
    assert 0 < sum(contained) < len(contained)
    for g, d, t, c in zip(greedy, dense, tokens, contained):
        assert g in t
        if c:
            assert g == d.argmax()


def test_candidates_are_compact_and_padding_never_wins(weight, clusters):
    head, rows = make_head(weight, clusters, n_probes=clusters["centroids"].shape[0])
    h = 10 * weight[:1]  # padding slots copy row 0: they must stay -inf
    ids, logits = head.candidates(mx.array(h))
    ids, logits = np.array(ids)[0], np.array(logits)[0]
    assert ids.shape == logits.shape == (head.n_probes * CLUSTER,)
    assert np.all(np.isneginf(logits[ids == -1])) and (ids == -1).sum() == 8
    np.testing.assert_allclose(logits[ids >= 0], (h @ rows.T)[0, ids[ids >= 0]], rtol=1e-4)
    assert int(head.greedy(mx.array(h))[0]) == 0


def test_ties_go_to_the_lowest_token_id(weight, clusters):
    tied = weight.copy()
    tied[700] = tied[3] = 5 * tied[3]
    head, _ = make_head(tied, clusters, n_probes=clusters["centroids"].shape[0])
    assert int(head.greedy(mx.array(tied[3:4]))[0]) == 3
    assert int(np.argmax(decode_step(head, tied[None, 3:4])[0, 0])) == 3


@pytest.mark.parametrize("path", [None, "rows", "union"])
def test_batch_rows_get_their_own_probes(weight, clusters, path):
    head, _ = make_head(weight, clusters, n_probes=4)
    head.batch_path = path
    h = mx.array(hidden(weight, 5)).reshape(5, 1, DIMS)
    batched = decode_step(head, h)
    finite = np.isfinite(batched[:, 0])
    assert len({tuple(np.flatnonzero(f)) for f in finite}) > 1
    for row in range(5):  # exactly its own candidates: no other row's cluster
        single = decode_step(head, h[row : row + 1])[0, 0]
        np.testing.assert_array_equal(finite[row], np.isfinite(single))
    assert np.array_equal(np.array(head.greedy(h))[:, 0], np.array(head.greedy(h[:, 0])))


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_batch_paths_match_single_rows(weight, clusters, quantized, cap):
    """Rows that share some clusters and not others, and more rows than the union can hold."""
    head, _ = make_head(weight, clusters, quantized, n_probes=8, cap=cap)
    h = hidden(weight, 12)
    h[6:] = h[:6] + np.random.default_rng(2).normal(0, 0.3, h[:6].shape)  # neighbours
    assert_batch_matches_single_rows(head, mx.array(h), [None, *BATCH_PATHS])


@pytest.mark.parametrize("path", ["union", "dense"])
def test_batch_sampling_keeps_each_rows_tail_cluster(weight, clusters, path):
    head, _ = make_head(weight, clusters, n_probes=4)
    head.mass_bias = mx.zeros((2, head.n_clusters))
    h = mx.array(hidden(weight, 6))
    temperature = mx.array([[0.0], [1.0], [0.7], [1.0], [2.0], [1.0]])
    key = mx.random.key(3)
    head.batch_path = "rows"
    tokens, logits = (np.array(a) for a in sampling_logits(head, h, temperature, key))
    head.batch_path = path
    batch_tokens, batch_logits = (np.array(a) for a in sampling_logits(head, h, temperature, key))
    np.testing.assert_array_equal(batch_tokens, tokens)  # the same drawn cluster per row
    np.testing.assert_array_equal(np.isinf(batch_logits), np.isinf(logits))
    finite = np.isfinite(logits)
    assert np.isfinite(logits[1:, -CLUSTER:]).any()  # sampled rows have their tail cluster
    np.testing.assert_allclose(batch_logits[finite], logits[finite], rtol=1e-5, atol=1e-5)


def test_union_clusters_is_the_sorted_union():
    rng = np.random.default_rng(4)
    for rows, k, n in ((3, 5, 40), (6, 4, 10), (4, 7, 7), (1, 3, 9)):
        probes = np.stack([np.sort(rng.choice(n, k, replace=False)) for _ in range(rows)])
        probes[-1] = probes[0]  # shared clusters
        union, positions = union_clusters(mx.array(probes.astype(np.uint32)), n)
        union, positions = np.array(union), np.array(positions)
        distinct = np.unique(probes)
        assert union.shape == (min(rows * k, n),) and union.dtype == np.uint32
        np.testing.assert_array_equal(union[: distinct.size], distinct)
        assert np.all(union[distinct.size :] == 0)
        np.testing.assert_array_equal(union[positions], probes)
        assert positions.max() < distinct.size


@pytest.mark.parametrize("quantized", [False, True])
def test_dense_switch_is_the_dense_head(weight, clusters, quantized, monkeypatch):
    """A decode step of rows above the threshold runs no stage 2, one product over every row
    instead: greedy rows (no stage 1 either) keep the dense logits of the ``recent_tokens + 1``
    clusters holding their highest ones (checked by brute force here), ``-inf`` elsewhere;
    sampled rows the candidates and drawn cluster of the gathering path's draw (the same
    random draws), their logits taken from the product. Below it, the rows' candidates only."""
    head, rows = make_head(weight, clusters, quantized, cap=5.0)
    head.recent_tokens = 4
    head.mass_bias = mx.array(np.random.default_rng(6).normal(0, 1, (2, head.n_clusters)),
                              mx.float32)
    below = int(np.ceil(DENSE_PROBE_RATIO * head.n_clusters / head.n_probes)) - 1
    assert choose_batch_path(below, head.n_probes, head.n_clusters) == "union"
    with decoding():
        step = np.array(head(mx.array(hidden(weight, below)[:, None])))
    assert np.isneginf(step).any()
    h = hidden(weight, below + 1, seed=5)
    dense = np.tanh(h @ rows.T / 5.0) * 5.0  # numpy's dense head
    order = np.array(head.order).reshape(head.n_clusters, head.cluster_size)

    def cluster_max(logits):
        return np.where(order >= 0, logits[:, order], -np.inf).max(axis=-1)

    def step(temperatures, path):
        head.batch_path = path
        mx.random.seed(7)
        with decoding(temperatures):
            return np.array(head(mx.array(h[:, None])))[:, 0]

    mixed = [float(row % 2) for row in range(len(h))]  # greedy and sampled rows
    settings = (None, [0.0], [0.7], mixed)
    gathered = {str(t): step(t, "rows") for t in settings[2:]}  # stage 2's own draws
    calls = []
    for stage in ("probe", "cluster_scores", "_cluster_argmax", "greedy_logits"):
        method = getattr(FlashHead, stage)
        monkeypatch.setattr(FlashHead, stage, lambda *a, m=method, s=stage, **k:
                            calls.append(s) or m(*a, **k))
    with recording() as ran:
        for temperatures in settings:
            logits = step(temperatures, None)
            sampled = np.broadcast_to(np.array(temperatures or [0.0]) > 0, len(h))
            if sampled.any():
                mine, theirs = logits[sampled], gathered[str(temperatures)][sampled]
                np.testing.assert_array_equal(np.isinf(mine), np.isinf(theirs))
                finite = np.isfinite(theirs)
                np.testing.assert_allclose(mine[finite], theirs[finite], rtol=1e-5, atol=1e-5)
            greedy, reference = logits[~sampled], dense[~sampled]
            if not len(greedy):
                continue
            exact = np.isfinite(greedy)
            np.testing.assert_allclose(greedy[exact], reference[exact], rtol=1e-5, atol=1e-5)
            # Whole clusters, recent_tokens + 1 of them, none below one left out (up to ties).
            whole = np.where(order >= 0, exact[:, order], True).all(axis=-1)
            assert np.all(whole.sum(-1) == head.recent_tokens + 1)
            assert np.all(exact.sum(-1) == whole @ (order >= 0).sum(-1))  # and nothing else
            kept, left = (np.where(mask, cluster_max(reference), np.nan) for mask in (whole, ~whole))
            assert np.all(np.nanmin(kept, -1) >= np.nanmax(left, -1) - 1e-5)
            mine, best = greedy.argmax(-1), reference.argmax(-1)  # near-ties: within 2e-5
            rows_ = np.arange(len(greedy))
            assert np.all((mine == best) | (reference[rows_, mine] >= reference.max(-1) - 2e-5))
    assert "_cluster_argmax" not in calls and "greedy_logits" not in calls
    assert set(calls) == {"probe", "cluster_scores"}  # the sampled steps' stage 1
    assert ran == {"batch_path": "dense"}


@pytest.mark.parametrize("recent", [0, 3, 16])
def test_dense_switch_keeps_the_best_token_outside_the_recent_ones(weight, clusters, recent):
    """A greedy step on the dense switch holds, exact, each row's highest token outside any
    ``recent_tokens`` others: with the dense head's ``recent`` highest tokens pushed down (as a
    repetition penalty pushes the recent tokens down), the step's argmax is the dense one."""
    head, rows = make_head(weight, clusters)
    head.recent_tokens, head.batch_path = recent, "dense"
    h = hidden(weight, 12, seed=7)
    dense = h @ rows.T
    with decoding():
        step = np.array(head(mx.array(h[:, None])))[:, 0]
    top = np.argsort(-dense, axis=-1)[:, :recent]
    for logits in (step, dense):
        np.put_along_axis(logits, top, -1e9, axis=-1)
    np.testing.assert_array_equal(step.argmax(-1), dense.argmax(-1))


def test_dense_switch_without_processors_keeps_the_best_cluster(weight, clusters):
    """Rows read to have no logits processors keep only the cluster of their highest logit,
    whatever ``recent_tokens``, and take the dense head's token."""
    head, rows = make_head(weight, clusters)
    head.batch_path = "dense"
    h = hidden(weight, 12, seed=8)
    dense = h @ rows.T
    with in_context(replace(make_context([0.0]), processors=False)):
        step = np.array(head(mx.array(h[:, None])))[:, 0]
    order = np.array(head.order).reshape(head.n_clusters, head.cluster_size)
    for row, token in enumerate(dense.argmax(-1)):
        cluster = order[(order == token).any(-1)][0]
        np.testing.assert_array_equal(np.flatnonzero(np.isfinite(step[row])),
                                      np.sort(cluster[cluster >= 0]))
    np.testing.assert_array_equal(step.argmax(-1), dense.argmax(-1))


def test_dense_switch_above_the_break_even():
    n = 1000
    assert choose_batch_path(1, n, n) == "rows"
    assert choose_batch_path(2, 10, n) == "union"
    probes = int(np.ceil(DENSE_PROBE_RATIO * n))
    assert choose_batch_path(probes, 1, n) == "dense"
    assert choose_batch_path(probes - 1, 1, n) == "union"
    assert choose_batch_path(2, probes // 2, n) == "dense"


@pytest.mark.parametrize("quantized", [False, True])
def test_embedding_lookup_is_unchanged(weight, clusters, quantized):
    head, rows = make_head(weight, clusters, quantized)
    ids = np.array([[0, 999, 5], [17, 17, 640]])
    np.testing.assert_allclose(np.array(head.embed(mx.array(ids))), rows[ids], rtol=1e-6, atol=1e-6)


def test_softcap(weight, clusters):
    head, rows = make_head(weight, clusters, cap=3.0)
    h = hidden(weight, 2)
    capped = np.tanh(h @ rows.T / 3.0) * 3.0
    dense = np.array(head.dense_logits(mx.array(h)))
    np.testing.assert_allclose(dense, capped, rtol=1e-5, atol=1e-5)
    step = decode_step(head, h[:, None])[:, 0]
    finite = np.isfinite(step)
    assert finite.any() and np.all(np.isneginf(step[~finite]))
    np.testing.assert_allclose(step[finite], capped[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_exact_logits_are_the_dense_ones(weight, clusters, quantized):
    """The cluster-order product with its logits gathered into token order equals the dense
    head's logits (numpy's product of the token-order rows) and ranks tokens as they do."""
    head, rows = make_head(weight, clusters, quantized, cap=5.0)
    h = hidden(weight, 6).reshape(2, 3, DIMS)
    expected = np.tanh(h @ rows.T / 5.0) * 5.0
    exact = np.array(head.exact_logits(mx.array(h)))
    assert exact.shape == (2, 3, VOCAB)
    np.testing.assert_allclose(exact, expected, rtol=1e-5, atol=1e-5)
    mine, theirs = exact.argmax(-1), expected.argmax(-1)
    best = np.take_along_axis(expected, theirs[..., None], -1)[..., 0]
    near_tie = np.take_along_axis(expected, mine[..., None], -1)[..., 0] >= best - 1e-5
    assert np.all((mine == theirs) | near_tie)


def test_bad_n_probes(weight, clusters):
    with pytest.raises(ValueError, match="n_probes"):
        make_head(weight, clusters, n_probes=0)
    assets = make_assets(clusters, 4)
    with pytest.raises(ValueError, match="n_probes"):
        FlashHead(assets, mx.array(weight), n_probes=64)
