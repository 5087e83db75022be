"""FlashHead stage 2: the exact logits of the probed clusters' rows and the greedy token, in
one kernel."""

from typing import Optional, Tuple

import mlx.core as mx

from ._common import THREADGROUP, metal_kernel, order_key, placeholder, use_metal

# Probes (clusters) per threadgroup: one per SIMD group (see metal/cluster_argmax.metal).
PROBES_PER_THREADGROUP = 8
KERNEL_BITS = (None, 2, 4, 8)


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
    softcap: Optional[float] = None,
    mode: str = "affine",
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
        softcap (float, optional): final logit softcap ``tanh(x / c) * c``. Default: ``None``.
        mode (str): quantization mode of packed rows; the kernel takes ``"affine"`` rows, the
            others (``"mxfp4"``, ...) take the pure-MLX path. Default: ``"affine"``.

    Returns:
        The token with the highest logit ``[...]`` (int32, ties to the lowest token id) and the
        logits ``[..., n_probes * cluster_size]`` (float32, ``-inf`` at padding slots), the
        rows of probe ``p`` at ``p * cluster_size ... (p + 1) * cluster_size - 1``.
    """
    lead = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1])
    probes = probes.reshape(h.shape[0], -1).astype(mx.uint32)
    args = (h, probes, weight, scales, biases, order, cluster_size, group_size, bits, softcap)
    kernel_format = mode == "affine" and bits in KERNEL_BITS
    if use_metal() and kernel_format and (bits is not None or h.shape[-1] % 4 == 0):
        tokens, logits = _cluster_argmax_metal(*args)
    else:
        tokens, logits = _cluster_argmax_mlx(*args, mode)
    return tokens.reshape(lead), logits.reshape(*lead, -1)


def slot_tokens(probes: mx.array, order: mx.array, cluster_size: int) -> mx.array:
    """The token ids ``[..., n_probes * cluster_size]`` of the slots of clusters ``probes``
    ``[..., n_probes]`` (-1 at padding), in the order of :func:`cluster_argmax`'s logits."""
    slots = probes[..., None].astype(mx.int32) * cluster_size
    slots = slots + mx.arange(cluster_size, dtype=mx.int32)
    return order[slots.reshape(*probes.shape[:-1], -1)]


def best_token(tokens: mx.array, logits: mx.array) -> mx.array:
    """The token ``[...]`` of the largest of ``logits`` ``[..., K]`` at token ids ``tokens``
    (``[..., K]`` or ``[K]``; -1 for padding, which never wins); ties go to the lowest token id,
    as the dense head's argmax breaks them. Every greedy choice among scored rows is made here."""
    keys = mx.where(tokens >= 0, order_key(logits), 0)
    best = mx.where(keys == keys.max(axis=-1, keepdims=True), tokens, mx.iinfo(mx.int32).max)
    return best.min(axis=-1)


def gathered_logits(
    h: mx.array,
    indices: mx.array,
    weight: mx.array,
    scales: Optional[mx.array],
    biases: Optional[mx.array],
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
) -> mx.array:
    """Each row of ``h`` ``[B, d]`` against its own blocks of rows: ``weight`` ``[n_blocks,
    rows, d]`` (float, or packed with ``scales`` and ``biases``), blocks ``indices`` ``[B, K]``.
    Returns the logits ``[B, K * rows]`` (float32), block by block. Pure MLX."""
    x = h.astype(mx.float32)[:, None, None, :]  # [B, 1, 1, d] against [B, K] blocks
    if bits is not None:
        logits = mx.gather_qmm(x, weight, scales, biases, rhs_indices=indices, transpose=True,
                               group_size=group_size, bits=bits, mode=mode)
    elif weight.dtype == mx.float32:
        logits = mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices)
    else:
        # gather_mm would cast the whole head to float32: cast the gathered rows only.
        rows = mx.take(weight, indices, axis=0).astype(mx.float32)
        logits = rows @ x.swapaxes(-1, -2)
    return logits.reshape(indices.shape[0], -1)


def _cluster_argmax_mlx(h, probes, weight, scales, biases, order, cluster_size, group_size, bits,
                        softcap, mode):
    n_clusters = order.size // cluster_size

    def by_cluster(a):  # [n_clusters, cluster_size, ...]: a probe picks one cluster's rows
        return None if a is None else a.reshape(n_clusters, cluster_size, -1)

    logits = gathered_logits(h, probes, by_cluster(weight), by_cluster(scales),
                             by_cluster(biases), group_size, bits, mode)
    if softcap is not None:
        logits = mx.tanh(logits / softcap) * softcap
    tokens = slot_tokens(probes, order, cluster_size)
    logits = mx.where(tokens >= 0, logits, -mx.inf)
    return best_token(tokens, logits), logits


def _cluster_argmax_metal(h, probes, weight, scales, biases, order, cluster_size, group_size,
                          bits, softcap):
    B, n_probes = probes.shape
    if scales is None:
        scales = biases = placeholder(weight.dtype)
    kernel = metal_kernel(
        "cluster_argmax",
        ["h", "probes", "w", "scales", "biases", "order", "cluster_size", "softcap"],
    )
    n_groups = -(-n_probes // PROBES_PER_THREADGROUP)
    n_logits = B * n_probes * cluster_size
    out = kernel(
        inputs=[h, probes, weight, scales, biases, order, cluster_size, float(softcap or 0.0)],
        template=[("BITS", bits or 0), ("GS", group_size if bits else 0)],
        grid=(n_groups * THREADGROUP, B, 1),
        threadgroup=(THREADGROUP, 1, 1),
        output_shapes=[(n_logits + B + 2 * B * n_groups + B,)],
        output_dtypes=[mx.uint32],
        init_value=0,
    )[0]
    logits = out[:n_logits].view(mx.float32).reshape(B, -1)
    return out[n_logits : n_logits + B].view(mx.int32), logits
