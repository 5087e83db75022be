"""Top-1 containment: how often the dense head's argmax is among a FlashHead's candidates, and
the smallest ``n_probes`` that meets a containment target.

Every rank here comes from the head's own stage 1 (:meth:`FlashHead.cluster_scores`, ranked by
:func:`flashhead_mlx.kernels.cluster_ranks`) and every dense argmax from the head's own exact
logits (ties to the lowest token id, :func:`flashhead_mlx.kernels.best_token`): a position
counts as contained with ``n_probes`` probes exactly when the head, probing ``n_probes``
clusters, scores its dense argmax; given each position's recent tokens, also when the argmax is
among them (the head scores them exactly at greedy steps: :mod:`flashhead_mlx.recent`).
"""

import bisect
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .clustering import most_probes, scored_fraction
from .head import FlashHead
from .kernels import best_token, cluster_rank, cluster_ranks

# The top-1 containment a conversion's default n_probes meets on every domain of the development
# suite (within the cap below) or on a tuning text.
TARGET_CONTAINMENT = 0.999
# The most of the vocabulary (centroids included) the development suite's tuning may score: where
# a domain needs more probes for the target, the cap is kept (docs/clustering.md, "Tuning").
MAX_SCORED_FRACTION = 0.12
# Positions of the tuning text a conversion measures (all of the built-in text's ~7k tokens).
TUNING_TOKENS = 8192
# Hidden states scored per pass: their slot logits ``[CHUNK_SIZE, V]`` are held at once.
CHUNK_SIZE = 256


def token_clusters(order: mx.array, cluster_size: int) -> mx.array:
    """Cluster id ``[V]`` of every token, from the slot order of ``cluster_head``."""
    order = np.asarray(order)
    slots = np.flatnonzero(order >= 0)
    if not np.array_equal(np.sort(order[slots]), np.arange(slots.size)):
        raise ValueError("order must hold every token id 0..V-1 exactly once")
    clusters = np.empty(slots.size, dtype=np.int32)
    clusters[order[slots]] = slots // cluster_size
    return mx.array(clusters)


def dense_targets(
    head: FlashHead, hidden: mx.array
) -> Iterator[Tuple[mx.array, mx.array, mx.array]]:
    """For each chunk ``h`` of :data:`CHUNK_SIZE` rows of ``hidden`` ``[N, d]``: ``h``, its exact
    slot logits ``[n, slots]`` (float32, cluster order, ``-inf`` at padding) and its dense argmax
    token ``[n]``."""
    for start in range(0, hidden.shape[0], CHUNK_SIZE):
        h = hidden[start : start + CHUNK_SIZE]
        logits = head.slot_logits(h).astype(mx.float32)
        yield h, logits, best_token(head.order, logits)


def ranked_chunks(
    head: FlashHead, hidden: mx.array
) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each chunk of :data:`CHUNK_SIZE` rows of ``hidden`` ``[N, d]``: the exact slot logits ``[n, slots]`` (float32,
    cluster order, ``-inf`` at padding), every cluster's stage-1 rank ``[n, n_clusters]`` and the
    dense argmax token ``[n]``, as numpy arrays."""
    for h, logits, targets in dense_targets(head, hidden):
        ranks = cluster_ranks(head.cluster_scores(h))
        mx.eval(logits, ranks, targets)
        yield np.array(logits, copy=False), np.array(ranks), np.array(targets)


def counted_ranks(
    ranks: np.ndarray, targets: np.ndarray, contexts: Optional[mx.array]
) -> np.ndarray:
    """``ranks`` ``[N]`` with 0 where the dense argmax ``targets`` ``[N]`` is among the position's
    recent tokens ``contexts`` ``[N, R]`` (:func:`flashhead_mlx.calibration.text_contexts`), which
    the head scores exactly at greedy steps whatever the probes: contained with any ``n_probes``.
    Unchanged without ``contexts``."""
    if contexts is None or contexts.shape[-1] == 0:
        return ranks
    recent = (np.array(contexts) == np.asarray(targets)[:, None]).any(axis=1)
    return np.where(recent, 0, ranks)


def target_ranks(
    head: FlashHead, hidden: mx.array, contexts: Optional[mx.array] = None
) -> np.ndarray:
    """The stage-1 rank ``[N]`` of the cluster holding the dense argmax at each hidden state: it
    is a candidate with ``n_probes`` probes exactly when its rank is below ``n_probes``; 0 where
    it is among the position's recent tokens ``contexts`` (:func:`counted_ranks`)."""
    owner = token_clusters(head.order, head.cluster_size)
    ranks, targets = [], []
    for h, _, chunk_targets in dense_targets(head, hidden):
        ranks.append(cluster_rank(head.cluster_scores(h), owner[chunk_targets]))
        targets.append(chunk_targets)
        mx.eval(ranks[-1], targets[-1])
    return counted_ranks(
        np.array(mx.concatenate(ranks)), np.array(mx.concatenate(targets)), contexts
    )


def containment(head: FlashHead, hidden: mx.array, n_probes: List[int]) -> List[dict]:
    """Top-1 containment of ``head`` on the hidden states ``hidden`` ``[N, d]`` for each probe
    count in ``n_probes``: dicts with ``n_probes``, ``scored_fraction`` and ``containment``."""
    ranks = target_ranks(head, hidden)
    return [
        {
            "n_probes": p,
            "scored_fraction": scored_fraction(
                head.n_clusters, head.cluster_size, p, head.vocab_size
            ),
            "containment": float(np.mean(ranks < p)),
        }
        for p in n_probes
    ]


def smallest_n_probes(ranks: np.ndarray, target: float, n_clusters: int) -> int:
    """The smallest ``p`` in ``[1, n_clusters]`` with ``mean(ranks < p) >= target``."""
    ranks = np.sort(ranks)

    def meets(p: int) -> bool:
        return np.searchsorted(ranks, p, side="left") / ranks.size >= target

    return bisect.bisect_left(range(1, n_clusters + 1), True, key=meets) + 1


def tuned_n_probes(
    head: FlashHead,
    hidden: mx.array,
    target: float = TARGET_CONTAINMENT,
    contexts: Optional[mx.array] = None,
) -> Tuple[int, float]:
    """The smallest ``n_probes`` whose top-1 containment on ``hidden`` (the recent tokens
    ``contexts`` counted: :func:`counted_ranks`) is at least ``target``, and the containment it
    reaches."""
    ranks = target_ranks(head, hidden, contexts)
    n_probes = smallest_n_probes(ranks, target, head.n_clusters)
    return n_probes, float(np.mean(ranks < n_probes))


def domains_n_probes(
    ranks: Dict[str, np.ndarray], target: float, n_clusters: int, max_probes: Optional[int] = None
) -> Tuple[int, Dict[str, float]]:
    """The smallest ``n_probes`` whose top-1 containment is at least ``target`` on every domain
    (the minimum over domains: the largest of the domains' own smallest), from each domain's
    target ranks (:func:`target_ranks`), but at most ``max_probes`` (then the domains that need
    more stay below ``target``); and each domain's containment with it."""
    if not ranks:
        raise ValueError("no domains to tune on")
    n_probes = max(smallest_n_probes(r, target, n_clusters) for r in ranks.values())
    n_probes = min(n_probes, max_probes or n_clusters)
    return n_probes, {domain: float(np.mean(r < n_probes)) for domain, r in ranks.items()}


def suite_n_probes(
    head: FlashHead,
    ranks: Dict[str, np.ndarray],
    target: float = TARGET_CONTAINMENT,
    max_scored_fraction: Optional[float] = MAX_SCORED_FRACTION,
) -> Tuple[int, str]:
    """:func:`domains_n_probes` for ``head`` with at most ``max_scored_fraction`` of its
    vocabulary scored, its recent tokens included (``None``: no cap), and a line saying what it
    reaches on each domain and, where the cap binds, which domains stay below ``target`` and the
    probes each would need. ``ranks``: each domain's :func:`target_ranks`, its recent tokens
    counted."""
    rows = (head.n_clusters, head.cluster_size)
    recent = head.recent_tokens
    cap = max_scored_fraction and most_probes(max_scored_fraction, *rows, head.vocab_size, recent)
    n_probes, reached = domains_n_probes(ranks, target, head.n_clusters, cap)
    scored = scored_fraction(*rows, n_probes, head.vocab_size, recent)
    shares = ", ".join(f"{domain} {share:.4f}" for domain, share in reached.items())
    line = f"n_probes {n_probes} ({100 * scored:.1f}% scored): top-1 {shares}"
    below = {
        domain: smallest_n_probes(ranks[domain], target, head.n_clusters)
        for domain, share in reached.items()
        if share < target
    }
    if below:
        needs = ", ".join(f"{domain} {p}" for domain, p in below.items())
        line += (
            f"; capped at {100 * max_scored_fraction:g}% of the vocabulary scored, below "
            f"{target:g} where the domains need more probes ({needs})"
        )
    return n_probes, line
