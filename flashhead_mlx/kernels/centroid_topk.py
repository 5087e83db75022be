"""FlashHead stage 1: the ``n_probes`` best clusters of each hidden state, in two dispatches
(score, then select)."""

from typing import Optional, Tuple

import mlx.core as mx

from ._common import (  # KERNEL_BITS: the packed formats the kernels take, also from here
    KERNEL_BITS,
    ROWS_PER_THREADGROUP,
    SCORE_THREADS,
    kernel_rows,
    metal_kernel,
    order_key,
    placeholder,
    record,
    threads_for,
    use_metal,
)

# The selection's threadgroup (one per row of h): at most this many threads, each holding
# KPT keys (a power of two, so that few instantiations are compiled) in registers, counted in
# 8-bit fields (see metal/centroid_topk.metal): the kernel takes at most SELECT_THREADS * 128
# clusters.
SELECT_THREADS = 512
KEYS_PER_THREAD = 16
MAX_KEYS_PER_THREAD = 128


def centroid_topk(
    h: mx.array,
    centroids: mx.array,
    scales: Optional[mx.array],
    biases: Optional[mx.array],
    cluster_bias: mx.array,
    n_probes: int,
    group_size: int = 64,
    bits: Optional[int] = 4,
) -> Tuple[mx.array, mx.array]:
    """The ``n_probes`` best clusters of each row of ``h`` and their scores.

    A cluster's score is ``h . centroid + cluster_bias`` in float32 (the centroid dequantized
    when packed); ties go to the lowest cluster id.

    Args:
        h (mx.array): hidden states ``[..., d]`` (float32, float16 or bfloat16).
        centroids (mx.array): ``[n_clusters, d]`` floats, or packed ``[n_clusters, d * bits / 32]``.
        scales, biases (mx.array, optional): the packed centroids' quantization parameters.
        cluster_bias (mx.array): ``[n_clusters]``.
        n_probes (int): clusters to keep, from 1 to ``n_clusters``.
        group_size (int): quantization group size. Default: ``64``.
        bits (int, optional): quantization bits, ``None`` for float centroids. Default: ``4``.

    Returns:
        The cluster ids ``[..., n_probes]`` (uint32, ascending) and their scores (float32).
    """
    if not 1 <= n_probes <= centroids.shape[0]:
        n_clusters = centroids.shape[0]
        raise ValueError(f"n_probes must be in 1..{n_clusters} (the clusters), got {n_probes}")
    lead = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1])
    kernel = kernel_rows(h.shape[-1], centroids.dtype, bits)
    kernel = use_metal() and kernel and centroids.shape[0] <= SELECT_THREADS * MAX_KEYS_PER_THREAD
    record("centroid_topk", "metal" if kernel else "mlx")
    if kernel:
        ids, scores = _centroid_topk_metal(
            h, centroids, scales, biases, cluster_bias, n_probes, group_size, bits
        )
    else:
        ids, scores = _centroid_topk_mlx(
            h, centroids, scales, biases, cluster_bias, n_probes, group_size, bits
        )
    return ids.reshape(*lead, n_probes), scores.reshape(*lead, n_probes)


def cluster_scores(h, centroids, scales, biases, cluster_bias, group_size, bits) -> mx.array:
    """Every cluster's score ``[..., n_clusters]`` in float32, as :func:`centroid_topk` scores
    them (the arguments are its own)."""
    f32 = mx.float32
    if bits is None:
        scores = h.astype(f32) @ centroids.astype(f32).T
    else:
        scores = mx.quantized_matmul(
            h.astype(f32),
            centroids,
            scales.astype(f32),
            biases.astype(f32),
            transpose=True,
            group_size=group_size,
            bits=bits,
        )
    return scores + cluster_bias.astype(f32)


def float32_centroids(centroids, scales, biases, group_size, bits) -> mx.array:
    """The centroids ``[n_clusters, d]`` in float32: dequantized when packed (``bits`` set), the
    values MLX's quantized matmul multiplies by (the arguments are :func:`centroid_topk`'s)."""
    if bits is None:
        return centroids.astype(mx.float32)
    f32 = mx.float32
    return mx.dequantize(centroids, scales.astype(f32), biases.astype(f32),
                         group_size=group_size, bits=bits)


def ranking_key(scores: mx.array) -> mx.array:
    """One uint64 per cluster that orders ``scores`` ``[..., n_clusters]`` as stage 1 ranks them:
    a larger key is a better cluster, and ties go to the lowest cluster id. Every ranking of
    clusters (the probes, tune's and eval's ranks) is made from this key."""
    ids = mx.arange(scores.shape[-1], dtype=mx.uint64)
    return (order_key(scores).astype(mx.uint64) << 32) | (0xFFFFFFFF - ids)


def top_clusters(scores: mx.array, n_probes: int) -> Tuple[mx.array, mx.array]:
    """The ``n_probes`` best of ``scores`` ``[..., n_clusters]`` as :func:`centroid_topk` ranks
    them: their ids ``[..., n_probes]`` (uint32, ascending; ties to the lowest id) and scores."""
    n = scores.shape[-1]
    best = mx.argpartition(ranking_key(scores), kth=n - n_probes, axis=-1)[..., n - n_probes :]
    best = mx.sort(best, axis=-1)
    return best.astype(mx.uint32), mx.take_along_axis(scores, best, axis=-1)


def cluster_ranks(scores: mx.array) -> mx.array:
    """The rank ``[..., n_clusters]`` (int32, 0 = best) of every cluster by ``scores``, as
    :func:`top_clusters` ranks them: with ``n_probes`` probes, exactly the clusters of rank below
    ``n_probes`` are probed."""
    n = scores.shape[-1]
    by_rank = mx.argsort(ranking_key(scores), axis=-1)[..., ::-1]  # best cluster first
    positions = mx.broadcast_to(mx.arange(n, dtype=mx.int32), by_rank.shape)
    return mx.put_along_axis(mx.zeros(by_rank.shape, mx.int32), by_rank, positions, axis=-1)


def cluster_rank(scores: mx.array, clusters: mx.array) -> mx.array:
    """The rank ``[...]`` (int32, 0 = best) of cluster ``clusters`` ``[...]`` by ``scores``
    ``[..., n_clusters]``, as :func:`cluster_ranks` ranks it: the clusters ranked above it
    counted, without sorting."""
    keys = ranking_key(scores)
    own = mx.take_along_axis(keys, clusters[..., None].astype(mx.int32), axis=-1)
    return (keys > own).sum(axis=-1).astype(mx.int32)


def _centroid_topk_mlx(h, centroids, scales, biases, cluster_bias, n_probes, group_size, bits):
    scores = cluster_scores(h, centroids, scales, biases, cluster_bias, group_size, bits)
    return top_clusters(scores, n_probes)


def select_shape(n_clusters: int) -> Tuple[int, int]:
    """The selection's threads per threadgroup and keys per thread for ``n_clusters``."""
    threads = threads_for(-(-n_clusters // KEYS_PER_THREAD), SELECT_THREADS)
    per_thread = 1 << (-(-n_clusters // threads) - 1).bit_length()
    return threads, per_thread


def _centroid_topk_metal(h, centroids, scales, biases, cluster_bias, n_probes, group_size, bits):
    B, n = h.shape[0], centroids.shape[0]
    if scales is None:
        scales = biases = placeholder(centroids.dtype)
    score = metal_kernel("centroid_topk", "centroid_topk_score",
                         ["h", "w", "scales", "biases", "cluster_bias"], ["keys"])
    (keys,) = score(
        inputs=[h, centroids, scales, biases, cluster_bias],
        template=[("BITS", bits or 0), ("GS", group_size if bits else 0)],
        grid=(-(-n // ROWS_PER_THREADGROUP) * SCORE_THREADS, B, 1),
        threadgroup=(SCORE_THREADS, 1, 1),
        output_shapes=[(B, n)],
        output_dtypes=[mx.uint32],
    )
    threads, per_thread = select_shape(n)
    select = metal_kernel("centroid_topk", "centroid_topk_select", ["keys", "n_probes"],
                          ["ids", "scores"])
    ids, scores = select(
        inputs=[keys, n_probes],
        template=[("KPT", per_thread)],
        grid=(threads, B, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, n_probes), (B, n_probes)],
        output_dtypes=[mx.uint32, mx.float32],
    )
    return ids, scores
