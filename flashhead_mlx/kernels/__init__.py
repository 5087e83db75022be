"""Fused Metal kernels for the two FlashHead stages, one kernel per file, each with the
pure-MLX path it must agree with. The sources live in ``metal/``."""

from ._common import kernel_implementation
from .centroid_topk import (
    centroid_topk,
    cluster_rank,
    cluster_ranks,
    cluster_scores,
    ranking_key,
    top_clusters,
)
from .cluster_argmax import (
    BATCH_PATHS,
    best_token,
    choose_batch_path,
    cluster_argmax,
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
    "gathered_logits",
    "kernel_implementation",
    "ranking_key",
    "row_logits",
    "slot_tokens",
    "top_clusters",
    "union_clusters",
]
