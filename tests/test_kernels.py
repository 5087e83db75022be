"""The FlashHead Metal kernels, run through the CPU emulator, against float64 references and
against the pure-MLX path of the same functions."""

import importlib

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_clusters
from flashhead_mlx.kernels import centroid_topk, cluster_argmax, cluster_rank, cluster_ranks, cluster_scores
from flashhead_mlx.kernels.centroid_topk import _centroid_topk_metal
from flashhead_mlx.assets import make_assets
from flashhead_mlx import transform
from flashhead_mlx.head import FlashHead
from flashhead_mlx.kernels._common import order_key
from flashhead_mlx.decode import make_context
from flashhead_mlx.recent import reading
from flashhead_mlx.testing.metal_emulator import emulate

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# The kernels' dispatches (metal/*.metal), by file and kernel.
KERNELS = [("centroid_topk", "score"), ("centroid_topk", "select"), ("cluster_argmax", "score"),
           ("cluster_argmax", "reduce")]
QUANTIZED = [(bits, gs) for bits in (4, 8) for gs in (32, 64, 128)]
FORMATS = [(None, None)] + QUANTIZED


def grid(shapes):
    """(seed, dtype, bits, group_size, shape): every dtype and format with every shape
    (B, d, ...) of shapes whose d is a multiple of the group size."""
    cases = [(dtype, bits, group_size, shape) for dtype in DTYPES for bits, group_size in FORMATS
             for shape in shapes if group_size is None or shape[1] % group_size == 0]
    return [
        pytest.param(seed, dtype, bits, group_size, shape,
                     id=f"{dtype}-{bits}-{group_size}-" + "x".join(map(str, shape)))
        for seed, (dtype, bits, group_size, shape) in enumerate(cases)
    ]


def both_paths(fn, *args, shuffle=False, seed=0, mode=None, msl="3.2", **kwargs):
    """fn's results through its Metal kernel (emulated with these options, forced with
    FLASHHEAD_KERNELS=metal, and checked to have run) and through the pure-MLX path."""
    with emulate(shuffle=shuffle, seed=seed, mode=mode, msl=msl) as launches, \
            pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHHEAD_KERNELS", "metal")
        metal = [np.array(a) for a in fn(*args, **kwargs)]
    assert launches[:1] == [fn.__name__ + "_score"], f"{fn.__name__} launched {launches}"
    assert all(name.startswith(fn.__name__ + "_") for name in launches), launches
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHHEAD_KERNELS", "mlx")
        reference = [np.array(a) for a in fn(*args, **kwargs)]
    return metal, reference


def assert_same_choice(a, b, value, tol) -> np.ndarray:
    """a and b (ids ``[rows, k]``: greedy tokens, probed clusters) are the same sets per row but
    for near-ties: where they differ, the differing ids' exact values ``value[row, id]`` lie
    within ``2 * tol[row]`` of each other, a tie that another summation order (a GPU's) may
    break the other way. Returns the rows where they agree."""
    a, b = (np.asarray(x).reshape(len(value), -1) for x in (a, b))
    same = np.array([set(x) == set(y) for x, y in zip(a, b)])
    for row in np.nonzero(~same)[0]:
        differ = value[row, np.setxor1d(a[row], b[row]).astype(np.int64)]
        assert differ.max() - differ.min() <= 2 * tol[row], f"row {row}: {a[row]} vs {b[row]}"
    return same


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MLX's affine packing: value i of a uint32 in bits [bits * i, bits * (i + 1))."""
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    q = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(*packed.shape[:-1], -1).astype(np.float64)


def as64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def rows64(weight, scales, biases, group_size, bits):
    """The exact rows (float64), and the rows of magnitudes that bound float32 rounding."""
    if bits is None:
        w = as64(weight)
        return w, np.abs(w)
    q = unpack(np.array(weight), bits)
    s, b = (np.repeat(as64(a), group_size, axis=-1) for a in (scales, biases))
    return s * q + b, np.abs(s) * q + np.abs(b)


def store(rows: np.ndarray, dtype, bits, group_size):
    """rows as the kernels take them: float in dtype, or quantized with scales in dtype."""
    rows = mx.array(rows.astype(np.float32)).astype(dtype)
    if bits is None:
        return rows, None, None
    return mx.quantize(rows, group_size=group_size, bits=bits)


def test_order_key_sorts_like_the_floats():
    """order_key against numpy's bits: increasing along sorted floats, -0 just below +0."""
    rng = np.random.default_rng(0)
    special = [-np.inf, -3.4e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3.4e38, np.inf]
    x = np.concatenate([special, rng.normal(size=1000) * 10.0 ** rng.integers(-30, 30, 1000)])
    x = np.sort(x.astype(np.float32), kind="stable")  # -0.0 stays before 0.0
    keys = np.array(order_key(mx.array(x))).astype(np.int64)
    assert np.all(np.diff(keys) > 0)
    bits = x.view(np.uint32)
    expected = np.where(bits >= 0x80000000, ~bits, bits | np.uint32(0x80000000))
    np.testing.assert_array_equal(keys, expected)


def test_unpack_matches_mlx_dequantize():
    w = mx.random.normal((8, 128), key=mx.random.key(0))
    for bits in (2, 4, 8):
        packed, s, b = mx.quantize(w, group_size=32, bits=bits)
        np.testing.assert_allclose(rows64(packed, s, b, 32, bits)[0],
                                   np.array(mx.dequantize(packed, s, b, group_size=32, bits=bits)),
                                   rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# centroid_topk


def check_topk(ids, scores, exact, bound, n_probes):
    """ids [B, P] ascending; every cluster clearly above the P-th best is in, every one
    clearly below is out (closer ones may go either way by float32 rounding); scores agree."""
    tol = 1e-5 * bound + 1e-5
    for row in range(exact.shape[0]):
        assert (np.diff(ids[row].astype(np.int64)) > 0).all()
        ranking = np.lexsort((np.arange(exact.shape[1]), -exact[row]))
        kth = exact[row, ranking[n_probes - 1]]
        chosen = np.zeros(exact.shape[1], bool)
        chosen[ids[row]] = True
        assert chosen[exact[row] > kth + 2 * tol[row]].all()
        assert not chosen[exact[row] < kth - 2 * tol[row]].any()
        np.testing.assert_allclose(scores[row], exact[row, ids[row]], rtol=0,
                                   atol=tol[row, ids[row]].max())


def centroid_case(seed, B, d, n_clusters, dtype, bits, group_size):
    rng = np.random.default_rng(seed)
    h = mx.array(rng.normal(size=(B, d)).astype(np.float32)).astype(dtype)
    rows = rng.normal(size=(n_clusters, d)) * 0.3
    centroids, scales, biases = store(rows, dtype, bits, group_size)
    cluster_bias = mx.array(rng.normal(size=n_clusters).astype(np.float32)).astype(dtype)
    return h, centroids, scales, biases, cluster_bias


# (B, d, n_clusters, n_probes): n_probes mostly not a multiple of 32, and all clusters once.
TOPK_SHAPES = [(1, 64, 130, 7), (3, 576, 200, 37), (8, 640, 97, 33), (5, 640, 64, 64),
               (2, 896, 150, 19), (1, 2048, 70, 9)]


@pytest.mark.parametrize("seed,dtype,bits,group_size,shape", grid(TOPK_SHAPES))
def test_centroid_topk_matches_reference(seed, dtype, bits, group_size, shape):
    B, d, n_clusters, n_probes = shape
    h, centroids, scales, biases, cluster_bias = centroid_case(seed, B, d, n_clusters, dtype,
                                                               bits, group_size)
    args = (h, centroids, scales, biases, cluster_bias, n_probes, group_size or 64, bits)
    metal, reference = both_paths(centroid_topk, *args)
    rows, magnitude = rows64(centroids, scales, biases, group_size, bits)
    exact = as64(h) @ rows.T + as64(cluster_bias)
    bound = np.abs(as64(h)) @ magnitude.T + np.abs(as64(cluster_bias))
    for ids, scores in (metal, reference):
        assert ids.shape == (B, n_probes) and ids.dtype == np.uint32
        check_topk(ids, scores, exact, bound, n_probes)


def exact_centroid_case(dtype, bits, group_size, B=3, d=128, n_clusters=90):
    """Integer data, so that every path computes the same scores exactly, with many ties."""
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(n_clusters // 3, d)).astype(np.uint32)
    q = np.repeat(q, 3, axis=0)[rng.permutation(n_clusters)]  # each row three times
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    packed = (q.reshape(n_clusters, -1, 32 // bits) << shifts).sum(-1, dtype=np.uint32)
    scales = mx.ones((n_clusters, d // group_size), dtype=dtype)
    biases = mx.full((n_clusters, d // group_size), -(1 << (bits - 1)), dtype=dtype)
    # Few nonzero entries in h: few distinct scores, so long runs of ties at the cut.
    h = rng.integers(-2, 3, size=(B, d)) * (rng.random((B, d)) < 0.05)
    h = mx.array(h.astype(np.float32)).astype(dtype)
    cluster_bias = mx.array(rng.integers(-1, 2, size=n_clusters).astype(np.float32)).astype(dtype)
    exact = as64(h) @ (q.astype(np.float64) - (1 << (bits - 1))).T + as64(cluster_bias)
    return (h, mx.array(packed), scales, biases, cluster_bias), exact


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_centroid_topk_breaks_ties_by_lowest_cluster_id(dtype, bits):
    inputs, exact = exact_centroid_case(dtype, bits, 32)
    n_probes = 29
    metal, reference = both_paths(centroid_topk, *inputs, n_probes, 32, bits)
    for row in range(exact.shape[0]):
        best = np.sort(np.lexsort((np.arange(exact.shape[1]), -exact[row]))[:n_probes])
        np.testing.assert_array_equal(metal[0][row], best)
        np.testing.assert_array_equal(metal[1][row], exact[row, best])
    for a, b in zip(metal, reference):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_float32_centroids_rank_as_the_stored_format(dtype, bits):
    """A FlashHead on the CPU multiplies float32 centroids dequantized at load; one built for a
    GPU keeps the packed ones (MLX's quantized matmul, run here on the CPU). Both score within
    float32 rounding of the float64 scores of the stored format, and probe the same clusters
    but for near-ties."""
    rng = np.random.default_rng(bits)
    weight = mx.array(rng.normal(size=(1000, 128)).astype(np.float32)).astype(dtype)
    assets = make_assets(make_clusters(np.array(weight.astype(mx.float32))), 9, centroid_bits=bits)
    cpu, gpu = FlashHead(assets, weight), FlashHead(assets, weight, device=mx.Device(mx.gpu))
    assert cpu.stage1_format == "float32" and cpu.stage1_centroids.dtype == mx.float32
    assert cpu.stage1_arguments()[-1] is None and cpu.stage1_arguments()[0].shape == (63, 128)
    assert "stage1_centroids" not in gpu and gpu.stage1_format == f"{bits}-bit"
    assert gpu.stage1_arguments()[0].dtype == mx.uint32 and gpu.stage1_arguments()[-1] == bits
    h = mx.array(rng.normal(size=(19, 128)).astype(np.float32)).astype(dtype)
    rows, magnitude = rows64(gpu.centroids, gpu.centroid_scales, gpu.centroid_biases, 64, bits)
    exact = as64(h) @ rows.T + as64(gpu.cluster_bias)
    bound = 1e-6 * (np.abs(as64(h)) @ magnitude.T + np.abs(as64(gpu.cluster_bias))) + 1e-6
    for head in (cpu, gpu):
        assert np.all(np.abs(np.array(head.cluster_scores(h), np.float64) - exact) <= bound)
    same = assert_same_choice(cpu.probe(h), gpu.probe(h), exact, bound.max(axis=1))
    assert same.mean() > 0.5


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_cluster_rank_counts_as_cluster_ranks_sorts(dtype):
    """One cluster's rank by counting equals its rank in the full sort, ties included."""
    inputs, _ = exact_centroid_case(dtype, 4, 32)
    scores = cluster_scores(inputs[0], *inputs[1:], 32, 4)
    ranks = np.array(cluster_ranks(scores))
    clusters = mx.array(np.random.default_rng(0).integers(0, scores.shape[1], scores.shape[0]))
    expected = ranks[np.arange(ranks.shape[0]), np.array(clusters)]
    np.testing.assert_array_equal(np.array(cluster_rank(scores, clusters)), expected)
    assert len(set(np.array(scores)[0])) < scores.shape[1]  # there are ties


@pytest.mark.parametrize("n_probes", [1, 37, 300])
def test_centroid_topk_when_every_score_is_equal(n_probes):
    h, centroids, scales, biases, _ = centroid_case(5, 2, 64, 300, mx.float32, 4, 64)
    args = (h * 0, centroids, scales, biases, mx.zeros((300,)), n_probes, 64, 4)
    metal, reference = both_paths(centroid_topk, *args)
    for ids, scores in (metal, reference):
        np.testing.assert_array_equal(ids, np.tile(np.arange(n_probes), (2, 1)))
        np.testing.assert_array_equal(scores, 0)


def test_centroid_topk_is_the_same_in_any_thread_order():
    h, centroids, scales, biases, cluster_bias = centroid_case(0, 4, 64, 150, mx.bfloat16, 4, 64)
    args = (h, centroids, scales, biases, cluster_bias, 21, 64, 4)
    ordered, _ = both_paths(centroid_topk, *args)
    for seed in range(2):
        shuffled, _ = both_paths(centroid_topk, *args, shuffle=True, seed=seed)
        for a, b in zip(ordered, shuffled):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_probes", [0, 71])
def test_centroid_topk_validates_n_probes(n_probes):
    h, centroids, scales, biases, cluster_bias = centroid_case(0, 2, 64, 70, mx.float32, 4, 64)
    for kernels in ("metal", "mlx"):
        with emulate(), pytest.MonkeyPatch.context() as mp:
            mp.setenv("FLASHHEAD_KERNELS", kernels)
            with pytest.raises(ValueError, match="1..70"):
                centroid_topk(h, centroids, scales, biases, cluster_bias, n_probes, 64, 4)
    # Without the check, the selection would leave ids unwritten (0xff bytes in the emulator).
    with emulate(mode="check"):
        ids, _ = _centroid_topk_metal(h, centroids, scales, biases, cluster_bias, n_probes, 64, 4)
    assert (np.array(ids) == 0xFFFFFFFF).any() == (n_probes > 0)


# ---------------------------------------------------------------------------------------------
# cluster_argmax


def head_case(seed, B, d, vocab_size, cluster_size, n_probes, dtype, bits, group_size,
              h_dtype=None):
    """A random head in cluster order (padding slots copy row 0, as FlashHead stores them)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(vocab_size, d)).astype(np.float32) * 0.3
    order = make_clusters(weight, cluster_size, seed)["order"]
    n_clusters = order.size // cluster_size
    rows = weight[np.maximum(order, 0)]
    stored = store(rows, dtype, bits, group_size)
    h = mx.array(rng.normal(size=(B, d)).astype(np.float32)).astype(h_dtype or dtype)
    probes = np.stack([rng.choice(n_clusters, n_probes, replace=False) for _ in range(B)])
    return h, mx.array(probes.astype(np.uint32)), *stored, mx.array(order)


def reference_logits(h, probes, weight, scales, biases, order, cluster_size, group_size, bits,
                     softcap):
    """Exact logits (float64, -inf at padding), their rounding bounds, and the slots' tokens."""
    slots = np.array(probes)[..., None] * cluster_size + np.arange(cluster_size)
    slots = slots.reshape(len(probes), -1)
    taken = [None if a is None else mx.take(a, mx.array(slots.ravel()), axis=0)
             for a in (weight, scales, biases)]
    rows, magnitude = (a.reshape(*slots.shape, -1) for a in rows64(*taken, group_size, bits))
    x = as64(h)
    logits = np.einsum("bd,bkd->bk", x, rows)
    bound = np.einsum("bd,bkd->bk", np.abs(x), magnitude)
    if softcap:
        logits = np.tanh(logits / softcap) * softcap
    tokens = np.array(order)[slots]
    return np.where(tokens >= 0, logits, -np.inf), bound, tokens


def check_argmax(token, logits, exact, bound, tokens):
    tol = 1e-5 * bound + 1e-5
    assert logits.dtype == np.float32 and token.dtype == np.int32
    np.testing.assert_array_equal(np.isinf(logits), np.isinf(exact))
    finite = np.isfinite(exact)
    assert (np.abs(logits[finite] - exact[finite]) <= tol[finite]).all()
    for row in range(len(token)):
        best = exact[row].max()
        near = tokens[row][finite[row] & (exact[row] >= best - 2 * tol[row])]
        assert token[row] in near
        if near.size == 1:
            assert token[row] == near[0]
        # Exactly the argmax of its own logits, ties to the lowest token id.
        keys = np.where(finite[row], np.array(order_key(mx.array(logits[row]))), 0)
        assert token[row] == tokens[row][keys == keys.max()].min()


# (B, d, vocab_size, cluster_size, n_probes): vocabularies with padding, n_probes not a
# multiple of 8 or 32 (one threadgroup scores 8 probes).
ARGMAX_SHAPES = [(1, 64, 1000, 16, 5), (4, 576, 700, 32, 13), (8, 640, 1500, 16, 37),
                 (2, 640, 900, 32, 21), (3, 576, 600, 16, 1), (2, 896, 500, 32, 7),
                 (1, 2048, 300, 16, 11)]


@pytest.mark.parametrize("seed,dtype,bits,group_size,shape", grid(ARGMAX_SHAPES))
def test_cluster_argmax_matches_reference(seed, dtype, bits, group_size, shape):
    B, d, vocab_size, cluster_size, n_probes = shape
    softcap = 30.0 if seed % 2 else None
    case = head_case(seed, B, d, vocab_size, cluster_size, n_probes, dtype, bits, group_size)
    args = (*case, cluster_size, group_size, bits)
    metal, reference = both_paths(cluster_argmax, *args, transform.softcap(softcap))
    exact, bound, tokens = reference_logits(*args, softcap)
    for token, logits in (metal, reference):
        assert token.shape == (B,) and logits.shape == (B, n_probes * cluster_size)
        check_argmax(token, logits, exact, bound, tokens)


@pytest.mark.parametrize("h_dtype,dtype", [(mx.float32, mx.bfloat16), (mx.bfloat16, mx.float32),
                                           (mx.float16, mx.float32)], ids=str)
def test_cluster_argmax_mixed_precision(h_dtype, dtype):
    case = head_case(1, 3, 64, 500, 16, 9, dtype, None, None, h_dtype=h_dtype)
    args = (*case, 16, None, None, None)
    metal, reference = both_paths(cluster_argmax, *args)
    exact, bound, tokens = reference_logits(*args)
    for token, logits in (metal, reference):
        check_argmax(token, logits, exact, bound, tokens)


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cluster_argmax_ties_go_to_the_lowest_token_and_never_to_padding(dtype, bits):
    """Integer rows, so that logits are exact; the best row appears at several tokens and at
    the padding slots (which copy row 0, the best row)."""
    rng = np.random.default_rng(0)
    d, s, vocab_size = 64, 16, 150
    weight = rng.integers(0, 16, size=(vocab_size, d)).astype(np.float32) - 8
    h = rng.integers(-2, 3, size=(2, d)).astype(np.float32)
    best_row = np.where(h[0] > 0, 7, -8).astype(np.float32)
    twins = [0, 37, 101, 149]
    weight[twins] = best_row
    order = make_clusters(weight, s, 3)["order"]
    rows = weight[np.maximum(order, 0)]
    n_clusters = order.size // s
    assert (order < 0).any()
    slots = np.argsort(order)[order.size - vocab_size :]  # the slot of each token
    first = np.concatenate([np.unique(slots[twins] // s), np.nonzero(order < 0)[0][:2] // s])
    probes = np.stack([
        np.concatenate([first, np.setdiff1d(rng.permutation(n_clusters), first)])[:9],
        rng.permutation(n_clusters)[:9],
    ])
    if bits is None:
        stored = (mx.array(rows).astype(dtype), None, None)
    else:
        shifts = np.arange(8, dtype=np.uint32) * 4
        packed = (rows + 8).astype(np.uint32).reshape(len(rows), -1, 8) << shifts
        packed = packed.sum(-1, dtype=np.uint32)
        scales = mx.ones((len(rows), d // 32), dtype=dtype)
        stored = (mx.array(packed), scales, mx.full(scales.shape, -8, dtype=dtype))
    args = (mx.array(h).astype(dtype), mx.array(probes.astype(np.uint32)), *stored,
            mx.array(order), s, 32 if bits else None, bits, None)
    metal, reference = both_paths(cluster_argmax, *args)
    exact, _, tokens = reference_logits(*args)
    for row in range(2):
        candidates = tokens[row][exact[row] == exact[row].max()]
        assert (candidates >= 0).all()
        assert metal[0][row] == candidates.min()
    assert metal[0][0] == min(t for t in twins if np.isin(t, tokens[0]))
    for a, b in zip(metal, reference):
        np.testing.assert_array_equal(a, b)


def test_cluster_argmax_is_the_same_in_any_thread_order():
    case = head_case(2, 3, 64, 900, 16, 19, mx.float16, 8, 64)
    args = (*case, 16, 64, 8, transform.softcap(30.0))
    ordered, _ = both_paths(cluster_argmax, *args)
    for seed in range(2):
        shuffled, _ = both_paths(cluster_argmax, *args, shuffle=True, seed=seed)
        for a, b in zip(ordered, shuffled):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Dispatch


def test_kernels_choose_their_path(monkeypatch):
    case = head_case(3, 2, 64, 300, 16, 3, mx.float32, None, None)
    args = (*case, 16, None, None, None)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Metal kernel was made")

    monkeypatch.setattr(mx.fast, "metal_kernel", no_kernel)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setenv("FLASHHEAD_KERNELS", "mlx")
    cluster_argmax(*args)
    monkeypatch.setenv("FLASHHEAD_KERNELS", "metal")
    with pytest.raises(AssertionError, match="was made"):
        cluster_argmax(*args)
    # Formats the kernels do not cover (3-bit rows, other modes) take the pure-MLX path.
    rows, scales, biases = mx.quantize(case[2], group_size=32, bits=3)
    cluster_argmax(case[0], case[1], rows, scales, biases, case[5], 16, 32, 3)
    rows, scales = mx.quantize(case[2], group_size=32, bits=4, mode="mxfp4")
    cluster_argmax(case[0], case[1], rows, scales, None, case[5], 16, 32, 4, mode="mxfp4")
    # So do clusters of a size that is not a multiple of 4 (a SIMD group scores 4 rows), and
    # float rows whose d is not a multiple of 16 bytes (a lane reads 16 bytes).
    cluster_argmax(*head_case(3, 2, 64, 300, 6, 3, mx.float32, None, None), 6)
    odd = head_case(3, 2, 38, 300, 16, 3, mx.float32, None, None)
    cluster_argmax(*odd, 16)
    centroid_topk(odd[0], odd[2][:40], None, None, mx.zeros((40,)), 3, 64, None)
    monkeypatch.setenv("FLASHHEAD_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FLASHHEAD_KERNELS"):
        cluster_argmax(*args)


def test_leading_dimensions_are_kept():
    h, centroids, scales, biases, cluster_bias = centroid_case(4, 6, 64, 40, mx.float32, 4, 32)
    with emulate():
        args = (centroids, scales, biases, cluster_bias, 5, 32, 4)
        ids, scores = centroid_topk(h.reshape(2, 3, 64), *args)
        flat_ids, _ = centroid_topk(h, *args)
    assert ids.shape == scores.shape == (2, 3, 5)
    np.testing.assert_array_equal(np.array(ids).reshape(6, 5), np.array(flat_ids))


# ---------------------------------------------------------------------------------------------
# FlashHead runs the kernels


# (dtype, bits, group_size, centroid_bits, cluster_size, softcap)
HEADS = [(mx.float32, None, None, 4, 16, None), (mx.bfloat16, None, None, None, 32, 30.0),
         (mx.float16, 4, 64, 8, 16, 30.0), (mx.bfloat16, 8, 32, 4, 32, None)]


@pytest.mark.parametrize("dtype,bits,group_size,centroid_bits,cluster_size,softcap", HEADS)
def test_flashhead_gives_the_same_tokens_on_both_paths(dtype, bits, group_size, centroid_bits,
                                                       cluster_size, softcap):
    rng = np.random.default_rng(cluster_size)
    weight = rng.normal(size=(900, 64)).astype(np.float32)
    assets = make_assets(make_clusters(weight, cluster_size), 7, centroid_bits=centroid_bits)
    stored = store(weight, dtype, bits, group_size)
    if bits is None:
        head = FlashHead(assets, stored[0], transform=transform.softcap(softcap))
    else:
        head = FlashHead(assets, *stored, group_size, bits, transform=transform.softcap(softcap))
    # Near some head rows, so that the best candidates stand out; leading dimensions [2, 3].
    h = 2 * weight[rng.integers(0, 900, 6)] + rng.normal(size=(6, 64))
    h = mx.array(h.astype(np.float32)).astype(dtype).reshape(2, 3, 64)

    def run():
        return [np.array(a) for a in (head.greedy(h), *head.candidates(h), head.probe(h),
                                      head.probe(h, head.cluster_scores(h)))]

    with emulate() as launches, pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHHEAD_KERNELS", "metal")
        metal = run()
    assert sorted(set(launches)) == sorted(f"{stage}_{kernel}" for stage, kernel in KERNELS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHHEAD_KERNELS", "mlx")
        reference = run()

    for greedy, tokens, logits, probes, scored_probes in (metal, reference):
        assert greedy.shape == (2, 3) and greedy.dtype == np.int32
        assert tokens.shape == logits.shape == (2, 3, 7 * cluster_size)
        assert logits.dtype == np.float32 and probes.shape == (2, 3, 7)
        # The kernel's probes are the ones ranked from cluster_scores: one ranking.
        np.testing.assert_array_equal(probes, scored_probes)
        best = logits == logits.max(axis=-1, keepdims=True)
        np.testing.assert_array_equal(greedy, np.where(best, tokens, 1 << 30).min(axis=-1))
    # The same tokens and probes, up to near-ties in the exact logits and the clusters' scores.
    x = as64(h).reshape(6, 64)
    exact_rows, magnitude = rows64(*stored, group_size, bits)
    exact, tol = x @ exact_rows.T, 1e-5 * (np.abs(x) @ magnitude.T) + 1e-5
    if softcap:
        exact = np.tanh(exact / softcap) * softcap
    scores = np.array(head.cluster_scores(h), dtype=np.float64).reshape(6, -1)
    assert_same_choice(metal[0], reference[0], exact, tol.max(axis=-1))
    same = assert_same_choice(metal[3], reference[3], scores, 1e-5 * np.abs(scores).max(-1) + 1e-5)
    (tokens, logits), (ref_tokens, ref_logits) = (
        [a.reshape(6, -1)[same] for a in path[1:3]] for path in (metal, reference))
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(np.isinf(logits), np.isinf(ref_logits))
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_two_bit_rows_on_both_stages():
    """2-bit rows: one 4-byte word per lane and step (the 4- and 8-bit paths load 8 and 16)."""
    stage1 = centroid_case(6, 3, 128, 90, mx.float16, 2, 32)
    metal, _ = both_paths(centroid_topk, *stage1, 11, 32, 2)
    rows, magnitude = rows64(*stage1[1:4], 32, 2)
    exact = as64(stage1[0]) @ rows.T + as64(stage1[4])
    check_topk(*metal, exact, np.abs(as64(stage1[0])) @ magnitude.T + np.abs(as64(stage1[4])), 11)
    stage2 = (*head_case(7, 2, 128, 400, 32, 5, mx.float16, 2, 32), 32, 32, 2)
    metal, _ = both_paths(cluster_argmax, *stage2)
    check_argmax(*metal, *reference_logits(*stage2, None))


def decode_head(cluster_size=32, n_probes=5):
    """A small FlashHead (float32 rows, 4-bit centroids, a zero mass_bias for sampling) and
    hidden states ``[2, 1, 64]`` near some of its rows."""
    rng = np.random.default_rng(cluster_size)
    weight = rng.normal(size=(500, 64)).astype(np.float32)
    clusters = make_clusters(weight, cluster_size)
    n_clusters = clusters["order"].size // cluster_size
    assets = make_assets(clusters, n_probes, mass_bias=mx.zeros((2, n_clusters)))
    head = FlashHead(assets, mx.array(weight))
    h = 2 * weight[rng.integers(0, 500, 2)] + rng.normal(size=(2, 64))
    return head, mx.array(h.astype(np.float32))[:, None, :]


def test_dispatches_per_decode_step(monkeypatch):
    """Kernel launches per decode step (the emulator runs each kernel when called; on a Mac MLX
    dispatches a kernel only when an output is used, see metal/README.md): greedy, 2 + 2 (the
    token reduction unused by mlx-lm's route, used by verified decoding's greedy_step); sampling,
    stage 2 only (stage 1 by MLX's matmul, whose scores the draw also needs)."""
    head, h = decode_head()
    head.batch_path = "rows"  # 2 rows of 5 probes of 16 clusters are above the dense switch
    monkeypatch.setenv("FLASHHEAD_KERNELS", "metal")
    both = [f"{stage}_{kernel}" for stage, kernel in KERNELS]
    for step in (lambda: head.decode_logits(h, make_context([0.0])),
                 lambda: head.greedy_step(h)):
        with emulate() as launches:
            mx.eval(step())
        assert launches == both
    with emulate() as launches:
        mx.eval(head.decode_logits(h, make_context([0.7])))
    assert launches == both[2:]


@pytest.mark.parametrize("kernels", ["metal", "mlx"])
@pytest.mark.parametrize("cluster_size", [16, 32])
def test_greedy_step_is_the_argmax_of_the_greedy_logits(kernels, cluster_size, monkeypatch):
    """Item 7: the kernel's token (with the recent tokens') is the token mlx-lm's greedy sampler
    takes from the [..., V] greedy logits, also when a recent token outscores the candidates."""
    head, h = decode_head(cluster_size, n_probes=2)
    monkeypatch.setenv("FLASHHEAD_KERNELS", kernels)
    with emulate():
        dense = np.array(head.dense_logits(h))
        candidates = np.array(head.candidates(h)[0]).reshape(2, -1)
        outside = [np.setdiff1d(np.arange(500), row) for row in candidates]
        best_outside = [row[np.argmax(logits[0, row])] for row, logits in zip(outside, dense)]
        winners = dense[[0, 1], 0, best_outside]
        np.testing.assert_array_equal(winners, dense.max(axis=-1)[:, 0])  # they beat the probes
        for recent in ([[-1, 3]], [[best_outside[0], -1]], [[7, best_outside[1]]]):
            recent = mx.array(np.broadcast_to(np.array(recent, np.int32), (2, 1, 2)))
            with reading(recent):
                step = np.array(head.greedy_step(h))
                expected = np.argmax(np.array(head.greedy_logits(h)), axis=-1)
            np.testing.assert_array_equal(step, expected)
    assert step.shape == (2, 1) and step.dtype == np.int32


# ---------------------------------------------------------------------------------------------
# The emulator's checks (tests/test_emulator.py) on one small shape per kernel; the whole file
# runs in one mode with FLASHHEAD_EMULATOR_MODE=check (or sanitize)


def small_cases():
    """Small stage-1 and stage-2 calls and their checks: 4-bit rows with bfloat16 scales (both
    stages), float16 centroid rows and 8-bit head rows in clusters of 32."""

    def stage1(seed, dtype, bits):
        args = (*centroid_case(seed, 2, 64, 70, dtype, bits, 32), 9, 32, bits)
        rows, magnitude = rows64(*args[1:4], 32, bits)
        exact = as64(args[0]) @ rows.T + as64(args[4])
        bound = np.abs(as64(args[0])) @ magnitude.T + np.abs(as64(args[4]))
        return centroid_topk, args, lambda ids, scores: check_topk(ids, scores, exact, bound, 9)

    def stage2(seed, dtype, bits, cluster_size):
        args = (*head_case(seed, 2, 64, 400, cluster_size, 11, dtype, bits, 32), cluster_size,
                32 if bits else None, bits)
        return (cluster_argmax, (*args, transform.softcap(30.0)),
                lambda token, logits: check_argmax(token, logits, *reference_logits(*args, 30.0)))

    return [stage1(1, mx.bfloat16, 4), stage2(2, mx.bfloat16, 4, 16),
            stage1(3, mx.float16, None), stage2(4, mx.float32, 8, 32)]


SMALL_CASES = ["centroid_topk-4bit", "cluster_argmax-4bit", "centroid_topk-float16",
               "cluster_argmax-8bit"]


@pytest.mark.parametrize("mode,shuffle,kernel", [
    pytest.param(mode, mode == "check", kernel, id=f"{mode}-{SMALL_CASES[kernel]}")
    for mode, kernels in (("check", range(4)), ("sanitize", range(2))) for kernel in kernels])
def test_kernels_pass_the_emulator_checks(mode, shuffle, kernel):
    """Every kernel in the checking mode (shuffled) and under the sanitizers (the 4-bit cases:
    each sanitizer build takes seconds)."""
    fn, args, check = small_cases()[kernel]
    metal, _ = both_paths(fn, *args, mode=mode, shuffle=shuffle, seed=3)
    check(*metal)


@pytest.mark.parametrize("kernel", range(4), ids=SMALL_CASES)
def test_kernels_compile_as_msl_3_1(kernel):
    fn, args, check = small_cases()[kernel]
    metal, _ = both_paths(fn, *args, msl="3.1")
    check(*metal)


# ---------------------------------------------------------------------------------------------
# Real hidden states and heads


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_kernels_on_real_hidden_states_and_heads(model_name, request):
    from mlx_lm import load

    model, tokenizer = load(str(request.getfixturevalue(f"{model_name}_dir")))
    tokens = tokenizer.encode("It is a truth universally acknowledged, that a single man in")
    hidden = model.model(mx.array(tokens)[None])[0, -3:]
    weight = model.model.embed_tokens.weight
    clusters = make_clusters(np.array(weight), 16)
    order = clusters["order"]
    n_clusters = order.size // 16
    n_probes = n_clusters // 16 + 3

    centroids, scales, biases = mx.quantize(mx.array(clusters["centroids"]), group_size=64, bits=4)
    cluster_bias = mx.array(clusters["cluster_bias"])
    stage1 = (hidden, centroids, scales, biases, cluster_bias, n_probes, 64, 4)
    metal, reference = both_paths(centroid_topk, *stage1)
    rows, magnitude = rows64(centroids, scales, biases, 64, 4)
    exact = as64(hidden) @ rows.T + as64(cluster_bias)
    bound = np.abs(as64(hidden)) @ magnitude.T
    for ids, scores in (metal, reference):
        check_topk(ids, scores, exact, bound, n_probes)

    probes = mx.array(metal[0])
    head = mx.take(weight, mx.array(np.maximum(order, 0)), axis=0)
    for bits in (None, 4):
        stored = (head, None, None) if bits is None else mx.quantize(head, group_size=64, bits=bits)
        args = (hidden, probes, *stored, mx.array(order), 16, 64 if bits else None, bits, None)
        metal2, reference2 = both_paths(cluster_argmax, *args)
        exact2, bound2, tokens2 = reference_logits(*args)
        for token, logits in (metal2, reference2):
            check_argmax(token, logits, exact2, bound2, tokens2)
        by_token = np.full((len(tokens2), int(tokens2.max()) + 1), -np.inf)
        for row, (ids, values) in enumerate(zip(tokens2, exact2)):
            by_token[row, ids[ids >= 0]] = values[ids >= 0]
        tol = 1e-5 * bound2.max(axis=-1) + 1e-5
        assert_same_choice(metal2[0][:, None], reference2[0][:, None], by_token, tol)


@pytest.mark.parametrize("kind,value", [("softcap", 3.0), ("multiply", 0.0625), ("divide", 8.0)])
def test_cluster_argmax_applies_the_transform(kind, value):
    """On both paths, a transform's logits are the transform of the untransformed ones (padding
    slots -inf, not a softcap's -c), and the greedy token is their argmax."""
    case = head_case(3, 4, 64, 700, 16, 9, mx.float32, 4, 32)
    args = (*case, 16, 32, 4)
    f = transform.Transform(kind, value)
    plain = both_paths(cluster_argmax, *args)
    transformed = both_paths(cluster_argmax, *args, f)
    for (_, logits), (token, capped) in zip(plain, transformed):
        expected = np.where(np.isneginf(logits), -np.inf, np.array(f(mx.array(logits))))
        np.testing.assert_allclose(capped, expected, rtol=1e-6, atol=1e-6)  # padding stays -inf
        tokens = np.array(case[-1])[np.array(case[1])[..., None] * 16 + np.arange(16)]
        tokens = tokens.reshape(len(token), -1)
        best = [row_tokens[r == r.max()].min() for row_tokens, r in zip(tokens, capped)]
        np.testing.assert_array_equal(token, best)


@pytest.mark.parametrize("path", ["rows", "union"])
def test_split_gather_gives_the_same_logits(path, monkeypatch):
    """On a CPU, float32 rows of many clusters are scored on two streams, a half each: the
    logits match the float64 reference and equal the unsplit call's bit for bit (each
    cluster's product is the same)."""
    module = importlib.import_module("flashhead_mlx.kernels.cluster_argmax")
    B, d, vocab_size, cluster_size, n_probes = 3, 640, 1500, 16, 37
    case = head_case(5, B, d, vocab_size, cluster_size, n_probes, mx.float32, None, None)
    args = (*case, cluster_size, None, None, None, "affine", path)
    splits = []
    original = module.split_gather
    monkeypatch.setattr(module, "split_gather", lambda n: splits.append(n) or original(n))
    monkeypatch.setattr(module, "SPLIT_BYTES", 0)
    token, logits = cluster_argmax(*args)
    assert splits and all(original(n) for n in splits)  # the split ran
    exact, bound, tokens = reference_logits(*case, cluster_size, None, None, None)
    check_argmax(np.array(token), np.array(logits), exact, bound, tokens)
    monkeypatch.setattr(module, "SPLIT_BYTES", 2**62)
    unsplit_token, unsplit_logits = cluster_argmax(*args)
    assert not original(max(splits))
    assert mx.array_equal(token, unsplit_token) and mx.array_equal(logits, unsplit_logits)
