"""FlashHead stage 2: the exact logits of the probed clusters' rows and the greedy token, in two
dispatches (score, then reduce) on Metal; for a batch of rows, one matmul over the union of
their clusters."""

import functools
from typing import Optional, Tuple

import mlx.core as mx

from ..transform import Transform, apply
from ._common import (  # KERNEL_BITS: the packed formats the kernels take, also from here
    KERNEL_BITS,
    ROWS,
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

# Threads per threadgroup of the reduction to the greedy token, at most.
REDUCE_THREADS = 256
# How a decode step of M > 1 rows (the rows of a batch, the positions of a verification block) is
# scored: "rows" gathers and scores each row's clusters on its own (the fused kernel on Metal),
# reading about M times the scored share of the head; "union" scores the union of the rows'
# clusters once, in one gathered matmul (pure MLX), each row keeping the logits of its own
# clusters only; "dense" is the dense switch: the dense head's product over every row in place of
# stage 2 (FlashHead.dense_greedy_logits at greedy steps, with no stage 1; sampled rows take their
# candidates and drawn cluster from it, FlashHead.cluster_logits).
# Stage 2 called alone (a row's candidates, as evaluation asks for them) takes "dense" as the
# dense matmul over every cluster, from which each row keeps its own clusters' logits.
BATCH_PATHS = ("rows", "union", "dense")
# The union is padded to min(M * clusters per row, n_clusters) clusters (its size cannot depend on
# the values without a host synchronisation), and stage 1 scores every cluster for every row, so
# FlashHead's cost grows with M while the dense head's barely does. Once the rows' probes (counted
# with repeats) reach this many times n_clusters, a decode step takes the dense head itself.
# Measured with `flashhead-mlx bench --batch-sizes` on an idle 2-core x86-64 CPU (docs/measuring.md,
# 2026-12-03): the dense switch (greedy steps in cluster order, FlashHead.dense_greedy_logits)
# beat the union from 1.3 probes per cluster on SmolLM2-135M and tied it at 1.4 on Gemma-3-270M
# (B = 24), beating it at 1.8 (B = 32); the union won at 0.9 (B = 16) on both. Not measured on a
# GPU (the same rule applies where the kernels run).
DENSE_PROBE_RATIO = 1.25


def cluster_argmax(
    h: mx.array,
    probes: mx.array,
    weight: mx.array,
    scales: Optional[mx.array],
    biases: Optional[mx.array],
    order: mx.array,
    cluster_size: int,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    transform: Optional[Transform] = None,
    mode: str = "affine",
    path: Optional[str] = None,
) -> Tuple[mx.array, mx.array]:
    """Score the rows of the probed clusters and pick the best token.

    Args:
        h (mx.array): hidden states ``[..., d]`` (float32, float16 or bfloat16).
        probes (mx.array): cluster ids ``[..., n_probes]``.
        weight (mx.array): the head's rows in cluster order ``[n_clusters * cluster_size, d]``
            (float32, float16 or bfloat16), or packed ``[..., d * bits / 32]``.
        scales, biases (mx.array, optional): quantization parameters of packed rows.
        order (mx.array): the token id of each slot ``[n_clusters * cluster_size]`` (int32),
            -1 for padding.
        cluster_size (int): rows per cluster.
        group_size, bits (int, optional): quantization of packed rows. Default: ``None``.
        transform (Transform, optional): what the model does to the head's logits (a softcap, a
            scale), applied to the scored ones. Default: ``None``.
        mode (str): quantization mode of packed rows; the kernel takes ``"affine"`` rows, the
            others (``"mxfp4"``, ...) take the pure-MLX path. Default: ``"affine"``.
        path (str, optional): one of :data:`BATCH_PATHS` (``"dense"``: the dense matmul over
            every cluster); ``None``: ``"rows"`` where the Metal kernel runs, else
            :func:`choose_batch_path`'s. Default: ``None``.

    Returns:
        The token with the highest logit ``[...]`` (int32, ties to the lowest token id) and the
        logits ``[..., n_probes * cluster_size]`` (float32, ``-inf`` at padding slots), the
        rows of probe ``p`` at ``p * cluster_size ... (p + 1) * cluster_size - 1``. Whatever
        the path, a row's logits are its single-row call's up to float32 rounding (a different
        matmul shape sums in a different order).
    """
    lead = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1])
    probes = probes.reshape(h.shape[0], -1).astype(mx.uint32)
    args = (h, probes, weight, scales, biases, order, cluster_size, group_size, bits, transform)
    kernel_format = mode == "affine" and kernel_rows(h.shape[-1], weight.dtype, bits)
    kernel = use_metal() and kernel_format and cluster_size % ROWS == 0
    if path is None:
        # Where the fused kernel runs, batches keep it until the union is measured against it
        # (a decode step above the dense threshold takes the dense head before stage 1).
        path = "rows" if kernel else choose_batch_path(*probes.shape, order.size // cluster_size)
    record("cluster_argmax", "metal" if kernel and path == "rows" else "mlx")
    record("batch_path", path)
    if path != "rows":
        tokens, logits = _cluster_argmax_batch(*args, mode, path == "dense")
    elif kernel:
        tokens, logits = _cluster_argmax_metal(*args)
    else:
        tokens, logits = _cluster_argmax_mlx(*args, mode)
    return tokens.reshape(lead), logits.reshape(*lead, -1)


def choose_batch_path(rows: int, clusters_per_row: int, n_clusters: int) -> str:
    """The path (:data:`BATCH_PATHS`) of ``rows`` rows of ``clusters_per_row`` clusters each:
    ``"rows"`` for one row, else ``"dense"`` (in a decode step, the dense head) when the rows'
    clusters (counted with repeats) number at least :data:`DENSE_PROBE_RATIO` times
    ``n_clusters``, else ``"union"``."""
    if rows == 1:
        return "rows"
    return "dense" if rows * clusters_per_row >= DENSE_PROBE_RATIO * n_clusters else "union"


def union_clusters(probes: mx.array, n_clusters: int) -> Tuple[mx.array, mx.array]:
    """The union of the clusters ``probes`` ``[M, K]`` of all rows, built without a host
    synchronisation (a sort, then a mask of where the sorted ids change): the distinct ids,
    ascending, padded with cluster 0 to the fixed size ``min(M * K, n_clusters)`` (uint32), and
    each probe's position in it ``[M, K]`` (int32)."""
    flat = probes.reshape(-1).astype(mx.uint32)
    size = min(flat.size, n_clusters)
    order = mx.argsort(flat)
    ids = flat[order]
    first = mx.concatenate([mx.array([True]), ids[1:] != ids[:-1]])
    rank = mx.cumsum(first.astype(mx.int32)) - 1
    union = mx.zeros((size + 1,), mx.uint32)
    union[mx.where(first, rank, size)] = ids  # repeats write to the spare last slot
    positions = mx.zeros((flat.size,), mx.int32)
    positions[order] = rank
    return union[:size], positions.reshape(probes.shape)


def row_logits(h, weight, scales=None, biases=None, group_size=None, bits=None, mode="affine"):
    """``h`` ``[..., d]`` against every row of ``weight`` (float, or packed with ``scales`` and
    ``biases``): logits ``[..., rows]``, the dense head's matmul."""
    if scales is None:
        return h @ weight.T
    return mx.quantized_matmul(
        h, weight, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode
    )


def cluster_slots(probes: mx.array, cluster_size: int) -> mx.array:
    """The slots ``[..., n_probes * cluster_size]`` (int32) of clusters ``probes``
    ``[..., n_probes]``, in the order of :func:`cluster_argmax`'s logits."""
    slots = probes[..., None].astype(mx.int32) * cluster_size
    slots = slots + mx.arange(cluster_size, dtype=mx.int32)
    return slots.reshape(*probes.shape[:-1], -1)


def slot_tokens(probes: mx.array, order: mx.array, cluster_size: int) -> mx.array:
    """The token ids ``[..., n_probes * cluster_size]`` of the slots of clusters ``probes``
    ``[..., n_probes]`` (-1 at padding), in the order of :func:`cluster_argmax`'s logits: one
    gather of whole clusters."""
    return order.reshape(-1, cluster_size)[probes].reshape(*probes.shape[:-1], -1)


def best_token(tokens: mx.array, logits: mx.array) -> mx.array:
    """The token ``[...]`` of the largest of ``logits`` ``[..., K]`` at token ids ``tokens``
    (``[..., K]`` or ``[K]``; -1 for padding, which never wins); ties go to the lowest token id,
    as the dense head's argmax breaks them. Every greedy choice among scored rows is made here."""
    keys = mx.where(tokens >= 0, order_key(logits), 0)
    best = mx.where(keys == keys.max(axis=-1, keepdims=True), tokens, mx.iinfo(mx.int32).max)
    return best.min(axis=-1)


# On a CPU, MLX runs each stream's operations on a thread of its own, and a gathered matmul of
# float32 rows is one small product per cluster on that thread: it reads the rows at about one
# core's memory bandwidth. Rows of many clusters are split over two streams, one per core of
# this project's 2-core machines. Measured there in a decode step (greedy generate_step,
# alternated with the dense and a free head, 2026-12-02): Gemma-3-270M's 934 probed clusters
# (38 MB) 99.5 -> 87.7 ms per step; SmolLM2-135M's 168 (6 MB) 66.6 -> 69.9 ms, slower.
# The least bytes of gathered rows that are split.
SPLIT_BYTES = 16 * 2**20


@functools.cache
def cpu_streams() -> Tuple[mx.Stream, mx.Stream]:
    """The two CPU streams split gathers run on (two: the shares are halves), made at first use
    (each stream starts a thread)."""
    return mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)


def split_gather(rows_bytes: int) -> bool:
    """Whether a gathered matmul of ``rows_bytes`` bytes of float32 rows on the default
    device is split over :func:`cpu_streams`: on a CPU, from :data:`SPLIT_BYTES` on."""
    return mx.default_device().type == mx.cpu and rows_bytes >= SPLIT_BYTES


def gathered_logits(x, clusters, weight, scales, biases, cluster_size, group_size, bits, mode):
    """``x`` ``[..., R, d]`` (float32) against the rows of each of ``clusters``, in one gathered
    matmul: ``[..., R, cluster_size]`` per cluster (``x``'s and ``clusters``' leading axes
    broadcast)."""
    n_clusters = weight.shape[0] // cluster_size

    def by_cluster(a):  # [n_clusters, cluster_size, ...]: an index picks one cluster's rows
        return None if a is None else a.reshape(n_clusters, cluster_size, -1)

    if bits is not None:
        return mx.gather_qmm(x, by_cluster(weight), by_cluster(scales), by_cluster(biases),
                             rhs_indices=clusters, transpose=True, group_size=group_size,
                             bits=bits, mode=mode)
    if weight.dtype == mx.float32:
        rows = by_cluster(weight).swapaxes(-1, -2)
        if not split_gather(clusters.size * cluster_size * weight.shape[-1] * 4):
            return mx.gather_mm(x, rows, rhs_indices=clusters)
        # Each stream multiplies a share of the clusters; the products are the same.
        half = clusters.shape[-1] // 2
        shares = clusters[..., :half], clusters[..., half:]
        return mx.concatenate([mx.gather_mm(x, rows, rhs_indices=c, stream=stream)
                               for c, stream in zip(shares, cpu_streams())], axis=-3)
    # gather_mm would cast the whole head to float32: cast the gathered rows only.
    rows = mx.take(by_cluster(weight), clusters, axis=0).astype(mx.float32)
    return x @ rows.swapaxes(-1, -2)


def _cluster_argmax_mlx(h, probes, weight, scales, biases, order, cluster_size, group_size, bits,
                        transform, mode):
    x = h.astype(mx.float32)[:, None, None, :]  # [B, 1, 1, d] against [B, n_probes] probes
    logits = gathered_logits(x, probes, weight, scales, biases, cluster_size, group_size, bits,
                              mode)
    return _finish(logits.reshape(probes.shape[0], -1), probes, order, cluster_size, transform)


def _cluster_argmax_batch(h, probes, weight, scales, biases, order, cluster_size, group_size,
                          bits, transform, mode, dense):
    """The union path (or, with ``dense``, the dense one): every row against the union of the
    rows' clusters (every cluster), then each row takes its own clusters' logits."""
    x = h.astype(mx.float32)
    if dense:
        logits = row_logits(x, weight, scales, biases, group_size, bits, mode)
        logits, positions = logits.reshape(h.shape[0], -1, cluster_size), probes
    else:
        union, positions = union_clusters(probes, order.size // cluster_size)
        logits = gathered_logits(x[None], union, weight, scales, biases, cluster_size,
                                  group_size, bits, mode).swapaxes(0, 1)  # [M, union, s]
    own = mx.take_along_axis(logits, positions[..., None].astype(mx.int32), axis=1)
    return _finish(own.reshape(probes.shape[0], -1), probes, order, cluster_size, transform)


def _finish(logits, probes, order, cluster_size, transform):
    """The transform and the padding mask on the probed slots' logits ``[M, K * s]``, and the
    greedy token."""
    logits = apply(transform, logits)
    tokens = slot_tokens(probes, order, cluster_size)
    logits = mx.where(tokens >= 0, logits, -mx.inf)
    return best_token(tokens, logits), logits


def _cluster_argmax_metal(h, probes, weight, scales, biases, order, cluster_size, group_size,
                          bits, transform):
    """The score kernel, which applies a softcap itself, then the reduction to the greedy token;
    another transform is applied to its logits after it, and the greedy token taken from them."""
    B, n_probes = probes.shape
    n = n_probes * cluster_size
    softcap = transform.value if transform is not None and transform.kind == "softcap" else None
    if scales is None:
        scales = biases = placeholder(weight.dtype)
    score = metal_kernel(
        "cluster_argmax",
        "cluster_argmax_score",
        ["h", "probes", "w", "scales", "biases", "order", "cluster_size", "softcap"],
        ["logits", "partials"],
    )
    n_groups = -(-n // ROWS_PER_THREADGROUP)
    n_pairs = n_groups * SCORE_THREADS // 32  # one per SIMD group
    logits, partials = score(
        inputs=[h, probes, weight, scales, biases, order, cluster_size, float(softcap or 0.0)],
        template=[("BITS", bits or 0), ("GS", group_size if bits else 0)],
        grid=(n_groups * SCORE_THREADS, B, 1),
        threadgroup=(SCORE_THREADS, 1, 1),
        output_shapes=[(B, n), (B, n_pairs, 2)],
        output_dtypes=[mx.float32, mx.uint32],
    )
    if transform is not None and softcap is None:
        logits = transform(logits)
        return best_token(slot_tokens(probes, order, cluster_size), logits), logits
    reduce = metal_kernel("cluster_argmax", "cluster_argmax_reduce", ["partials"], ["tokens"])
    threads = threads_for(n_pairs, REDUCE_THREADS)
    (tokens,) = reduce(
        inputs=[partials],
        grid=(threads, B, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B,)],
        output_dtypes=[mx.int32],
    )
    return tokens, logits
