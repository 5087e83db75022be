"""Fused Metal kernels for the two FlashHead stages, one kernel per file, each with the
pure-MLX path it must agree with. The sources live in ``metal/``; which path runs: ``use_metal``
(``FLASHHEAD_KERNELS``, a ``kernel_path`` block), and for a FlashHead the first-use self-test
(``flashhead_mlx.kernels.selftest``)."""

from ._common import forced_path, kernel_path, record, recording
from .centroid_topk import (
    centroid_topk,
    cluster_rank,
    cluster_ranks,
    cluster_scores,
    float32_centroids,
    ranking_key,
    top_clusters,
)
from .cluster_argmax import (
    BATCH_PATHS,
    best_token,
    choose_batch_path,
    cluster_argmax,
    cluster_slots,
    gathered_logits,
    row_logits,
    slot_tokens,
    union_clusters,
)

__all__ = [
    "BATCH_PATHS",
    "best_token",
    "choose_batch_path",
    "centroid_topk",
    "cluster_argmax",
    "cluster_rank",
    "cluster_ranks",
    "cluster_scores",
    "cluster_slots",
    "float32_centroids",
    "forced_path",
    "gathered_logits",
    "kernel_path",
    "ranking_key",
    "record",
    "recording",
    "row_logits",
    "slot_tokens",
    "top_clusters",
    "union_clusters",
]
