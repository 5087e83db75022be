"""Balanced clustering of a classification head's rows for FlashHead.

The head's ``V`` rows are split into ``n_clusters = ceil(V / cluster_size)`` clusters of
exactly ``cluster_size`` tokens. A two-level balanced hierarchy (about ``sqrt(n_clusters)``
groups, each split into its leaves) builds the clusters; every level is balanced k-means whose
assignment step is capacity constrained. Distances are taken in a data-aware metric when
calibration hidden states are given: with ``S = E[h h^T]``, rows are clustered as ``S^(1/2) w``,
so two tokens are close when their logits move together on real hidden states.
"""

import math

import mlx.core as mx
import numpy as np
from tqdm import tqdm


def _deferred_acceptance(
    scores: np.ndarray, candidates: np.ndarray, capacity: np.ndarray
) -> np.ndarray:
    """Points propose to their candidates from the best down; a full cluster keeps the
    proposers that would lose the most by moving on. Points rejected everywhere get -1."""
    n, n_candidates = scores.shape
    regret = np.empty_like(scores)
    regret[:, :-1] = scores[:, :-1] - scores[:, 1:]
    regret[:, -1] = np.inf
    next_choice = np.zeros(n, dtype=np.int64)
    held = np.zeros(0, dtype=np.int64)
    free = np.arange(n)
    while free.size:
        proposers = np.concatenate([held, free])
        choice = next_choice[proposers]
        cluster = candidates[proposers, choice]
        order = np.lexsort((-regret[proposers, choice], cluster))
        cluster = cluster[order]
        rank = np.arange(cluster.size) - np.searchsorted(cluster, cluster, side="left")
        keep = rank < capacity[cluster]
        held = proposers[order[keep]]
        rejected = proposers[order[~keep]]
        next_choice[rejected] += 1
        free = rejected[next_choice[rejected] < n_candidates]
    labels = np.full(n, -1, dtype=np.int64)
    labels[held] = candidates[held, next_choice[held]]
    return labels


def balanced_assign(
    scores: np.ndarray, candidates: np.ndarray, capacity: np.ndarray, n_rounds: int = 64
) -> np.ndarray:
    """Assign each point to one of its candidate clusters, filling each exactly to ``capacity``.

    Auction rounds raise the price of over-demanded clusters until almost every point's best
    priced candidate has room; the few points still in conflict are settled by deferred
    acceptance. Points that fit in none of their candidates get -1.

    Args:
        scores: ``[n, K]`` affinity of each point to each of its candidates (higher is better).
        candidates: ``[n, K]`` cluster ids.
        capacity: ``[n_clusters]`` how many points each cluster takes.
        n_rounds: auction rounds before the conflicts are settled.
    """
    n, n_candidates = scores.shape
    rows = np.arange(n)
    prices = np.zeros(capacity.size, dtype=scores.dtype)
    for _ in range(n_rounds):
        value = scores - prices[candidates]
        top2 = np.argpartition(-value, 1, axis=1)[:, :2] if n_candidates > 1 else np.zeros((n, 2), int)
        v1, v2 = value[rows, top2[:, 0]], value[rows, top2[:, 1]]
        swap = v2 > v1
        best = np.where(swap, top2[:, 1], top2[:, 0])
        margin = np.abs(v1 - v2) if n_candidates > 1 else np.full(n, np.inf, scores.dtype)
        cluster = candidates[rows, best]
        load = np.bincount(cluster, minlength=capacity.size)
        if np.all(load <= capacity):
            break
        # Raise each over-demanded cluster's price by the margin of its first excess claimant.
        order = np.lexsort((-margin, cluster))
        sorted_cluster = cluster[order]
        rank = np.arange(n) - np.searchsorted(sorted_cluster, sorted_cluster, side="left")
        first_out = rank == capacity[sorted_cluster]
        raise_by = margin[order[first_out]]
        prices[sorted_cluster[first_out]] += np.minimum(raise_by, 1e30) + 1e-6 * (np.abs(raise_by) + 1e-6)
    value = scores - prices[candidates]
    pref = np.argsort(-value, axis=1, kind="stable")
    value = np.take_along_axis(value, pref, axis=1)
    candidates = np.take_along_axis(candidates, pref, axis=1)
    # Claimants of clusters with room, and the most attached claimants of full ones, stay.
    cluster = candidates[:, 0]
    order = np.lexsort((-(value[:, 0] - value[:, 1]) if n_candidates > 1 else np.zeros(n), cluster))
    sorted_cluster = cluster[order]
    rank = np.arange(n) - np.searchsorted(sorted_cluster, sorted_cluster, side="left")
    stay = np.zeros(n, dtype=bool)
    stay[order[rank < capacity[sorted_cluster]]] = True
    labels = np.where(stay, cluster, -1)
    room = capacity - np.bincount(cluster[stay], minlength=capacity.size)
    moved = np.flatnonzero(~stay)
    labels[moved] = _deferred_acceptance(value[moved], candidates[moved], room)
    return labels


def _centroids(x: mx.array, labels: np.ndarray, n_clusters: int) -> mx.array:
    """Mean of the rows of each cluster (zero for an empty cluster)."""
    labels = mx.array(labels.astype(np.int32))
    sums = mx.zeros((n_clusters, x.shape[1]), dtype=mx.float32).at[labels].add(x)
    counts = mx.zeros((n_clusters,), dtype=mx.float32).at[labels].add(1.0)
    return sums / mx.maximum(counts, 1.0)[:, None]


def _top_candidates(scores: mx.array, n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_candidates`` best columns of each row of ``scores`` and their values."""
    if n_candidates >= scores.shape[-1]:
        idx = mx.broadcast_to(mx.arange(scores.shape[-1]), scores.shape)
    else:
        idx = mx.argpartition(-scores, n_candidates - 1, axis=-1)[..., :n_candidates]
    vals = mx.take_along_axis(scores, idx, axis=-1)
    return np.array(vals), np.array(idx).astype(np.int64)


def _assign_with_fallback(
    x: mx.array,
    centroids: mx.array,
    scores: np.ndarray,
    candidates: np.ndarray,
    capacity: np.ndarray,
) -> np.ndarray:
    """``balanced_assign``, then place points rejected by all candidates in the free slots."""
    labels = balanced_assign(scores, candidates, capacity)
    lost = np.flatnonzero(labels < 0)
    if lost.size:
        room = capacity - np.bincount(labels[labels >= 0], minlength=capacity.size)
        open_clusters = np.flatnonzero(room > 0)
        c = centroids[mx.array(open_clusters.astype(np.int32))]
        s = x[mx.array(lost.astype(np.int32))] @ c.T - 0.5 * (c * c).sum(-1)
        s = np.array(s)
        labels[lost] = open_clusters[
            balanced_assign(s, np.broadcast_to(np.arange(open_clusters.size), s.shape), room[open_clusters])
        ]
    return labels


def _kmeans_in_groups(
    x: mx.array,
    group: np.ndarray,
    leaf_start: np.ndarray,
    capacity: np.ndarray,
    n_iters: int,
    rng: np.random.Generator,
    n_candidates: int = 16,
) -> np.ndarray:
    """Balanced k-means run independently inside each group of points.

    Group ``j`` holds the points with ``group == j`` and owns the clusters
    ``leaf_start[j] .. leaf_start[j + 1] - 1``, whose sizes are given by ``capacity``.
    Returns the cluster of every point.
    """
    n_groups = leaf_start.size - 1
    n_leaves = np.diff(leaf_start)
    members = np.argsort(group, kind="stable")
    sizes = np.bincount(group, minlength=n_groups)
    width, n_local = int(sizes.max()), int(n_leaves.max())
    slot = np.arange(width)
    real = slot < sizes[:, None]
    # [n_groups, width] rows of x, padded with a zero row.
    index = np.full((n_groups, width), x.shape[0])
    index[real] = members
    x_pad = mx.concatenate([x, mx.zeros((1, x.shape[1]), dtype=x.dtype)])
    grouped = x_pad[mx.array(index.astype(np.int32))]
    # [n_groups, n_local] cluster ids, padded with a dummy cluster that never wins.
    local_valid = np.arange(n_local) < n_leaves[:, None]
    leaf_index = np.where(local_valid, leaf_start[:-1, None] + np.arange(n_local), capacity.size)
    leaf_index = mx.array(leaf_index.astype(np.int32))
    x_members = x[mx.array(members.astype(np.int32))]

    # Initial centroids: distinct random members of each group.
    picks = np.argsort(rng.random((n_groups, width)) + ~real, axis=1)[:, :n_local]
    centroids = x[mx.array(index[np.arange(n_groups)[:, None], picks][local_valid].astype(np.int32))]
    for _ in range(n_iters):
        c_pad = mx.concatenate([centroids, mx.zeros((1, x.shape[1]), dtype=x.dtype)])
        bias = mx.concatenate([-0.5 * (centroids * centroids).sum(-1), mx.array([-mx.inf])])
        scores = grouped @ c_pad[leaf_index].transpose(0, 2, 1) + bias[leaf_index][:, None, :]
        vals, local = _top_candidates(scores, min(n_candidates, n_local))
        cand = np.take_along_axis(np.array(leaf_index)[:, None, :], local, axis=2)
        labels = np.empty(members.size, dtype=np.int64)
        labels[members] = _assign_with_fallback(x_members, centroids, vals[real], cand[real], capacity)
        centroids = _centroids(x, labels, capacity.size)
    return labels


def data_aware_rows(weight: mx.array, hidden_states: mx.array) -> mx.array:
    """Rows mapped to ``S^(1/2) w`` with ``S = E[h h^T]`` over ``hidden_states``.

    Squared distances between mapped rows are the mean squared differences of the two
    tokens' logits over the hidden states.
    """
    h = hidden_states.astype(mx.float32)
    second_moment = np.array(h.T @ h / h.shape[0], dtype=np.float64)
    eigvals, eigvecs = np.linalg.eigh(second_moment)
    root = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
    return weight @ mx.array(root.astype(np.float32))


def balanced_clusters(
    x: mx.array, cluster_size: int, seed: int = 0, n_iters: int = 8
) -> np.ndarray:
    """Cluster of every row of ``x`` ``[V, d]``: exactly ``cluster_size`` rows per cluster.

    The last cluster is short by ``n_clusters * cluster_size - V`` rows (its padding slots).
    """
    vocab_size = x.shape[0]
    n_clusters = math.ceil(vocab_size / cluster_size)
    capacity = np.full(n_clusters, cluster_size)
    capacity[-1] -= n_clusters * cluster_size - vocab_size
    rng = np.random.default_rng(seed)
    n_groups = max(1, round(math.sqrt(n_clusters)))
    leaf_start = np.arange(n_groups + 1) * n_clusters // n_groups
    group_capacity = np.add.reduceat(capacity, leaf_start[:-1])
    with tqdm(total=2, desc="Clustering head") as bar:
        group = _kmeans_in_groups(
            x, np.zeros(vocab_size, dtype=np.int64), np.array([0, n_groups]), group_capacity, n_iters, rng
        )
        bar.update()
        labels = _kmeans_in_groups(x, group, leaf_start, capacity, n_iters, rng)
        bar.update()
    return labels
