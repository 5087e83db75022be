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

from .durable import kill_point

# Tokens per cluster by default. 32 halves stage 1, but at an equal containment on the suite it
# reads 14-42% more bytes per step than 16 with a float or bf16 head (docs/clustering.md,
# "Cluster size").
CLUSTER_SIZE = 16


def _deferred_acceptance(
    scores: np.ndarray, candidates: np.ndarray, capacity: np.ndarray
) -> np.ndarray:
    """Points propose to their candidates (columns sorted best first) in turn; a full cluster
    keeps the proposers that would lose the most by moving on. Points rejected everywhere get -1."""
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


def _best_two(
    scores: np.ndarray, candidates: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each point's best priced candidate and its margin over the second best."""
    value = scores - prices[candidates]
    rows = np.arange(value.shape[0])
    best = np.argmax(value, axis=1)
    top = value[rows, best]
    value[rows, best] = -np.inf
    return candidates[rows, best], top - value.max(axis=1)


def _keep_most_attached(
    cluster: np.ndarray, margin: np.ndarray, capacity: np.ndarray
) -> np.ndarray:
    """Mask of the claimants each cluster keeps: up to its capacity, largest margin first."""
    order = np.lexsort((-margin, cluster))
    sorted_cluster = cluster[order]
    rank = np.arange(cluster.size) - np.searchsorted(sorted_cluster, sorted_cluster, side="left")
    keep = np.zeros(cluster.size, dtype=bool)
    keep[order[rank < capacity[sorted_cluster]]] = True
    return keep


def balanced_assign(
    scores: np.ndarray, candidates: np.ndarray, capacity: np.ndarray, n_rounds: int = 8
) -> np.ndarray:
    """Assign each point to one of its candidate clusters, filling each at most to ``capacity``.

    Auction rounds raise the price of each over-demanded cluster until its extra claimants
    prefer another candidate (only those claimants are re-scored, since prices only rise);
    the few points still in conflict are settled by deferred acceptance. Points that fit in
    none of their candidates get -1.

    Args:
        scores: ``[n, K]`` affinity of each point to each of its candidates (higher is better).
        candidates: ``[n, K]`` cluster ids.
        capacity: ``[n_clusters]`` how many points each cluster takes.
        n_rounds: auction rounds before the conflicts are settled.
    """
    prices = np.zeros(capacity.size, dtype=scores.dtype)
    cluster, margin = _best_two(scores, candidates, prices)
    for _ in range(n_rounds if scores.shape[1] > 1 else 0):
        over = np.bincount(cluster, minlength=capacity.size) > capacity
        if not over.any():
            break
        claim = np.flatnonzero(over[cluster])
        order = np.lexsort((-margin[claim], cluster[claim]))
        sorted_cluster = cluster[claim][order]
        rank = np.arange(claim.size) - np.searchsorted(sorted_cluster, sorted_cluster, side="left")
        first_out = rank == capacity[sorted_cluster]
        # The raise leaves the first excess claimant indifferent; the tie goes elsewhere.
        raise_by = margin[claim[order[first_out]]]
        prices[sorted_cluster[first_out]] += raise_by + 1e-6 * np.abs(raise_by) + 1e-12
        cluster[claim], margin[claim] = _best_two(scores[claim], candidates[claim], prices)
    stay = _keep_most_attached(cluster, margin, capacity)
    labels = np.where(stay, cluster, -1)
    moved = np.flatnonzero(~stay)
    if moved.size:
        value = scores[moved] - prices[candidates[moved]]
        pref = np.argsort(-value, axis=1, kind="stable")
        room = capacity - np.bincount(cluster[stay], minlength=capacity.size)
        labels[moved] = _deferred_acceptance(
            np.take_along_axis(value, pref, axis=1),
            np.take_along_axis(candidates[moved], pref, axis=1),
            room,
        )
    return labels


def _centroids(x: mx.array, labels: np.ndarray, n_clusters: int) -> mx.array:
    """Mean of the rows of each cluster (zero for an empty cluster)."""
    labels = mx.array(labels.astype(np.int32))
    sums = mx.zeros((n_clusters, x.shape[1]), dtype=mx.float32).at[labels].add(x)
    counts = mx.zeros((n_clusters,), dtype=mx.float32).at[labels].add(1.0)
    return sums / mx.maximum(counts, 1.0)[:, None]


def _top_candidates(scores: mx.array, n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """The values and column indices of the ``n_candidates`` best columns of each row."""
    scores = np.array(scores)
    if n_candidates < scores.shape[-1]:
        idx = np.argpartition(-scores, n_candidates - 1, axis=-1)[..., :n_candidates]
    else:
        idx = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
    return np.take_along_axis(scores, idx, axis=-1), idx


def _assign(
    x: mx.array,
    rows: np.ndarray,
    centroids: mx.array,
    scores: np.ndarray,
    candidates: np.ndarray,
    capacity: np.ndarray,
    n_candidates: int,
) -> np.ndarray:
    """``balanced_assign`` of the points ``x[rows]``, then the points rejected by all their
    candidates go to the nearest clusters that still have room, until every point is placed."""
    labels = balanced_assign(scores, candidates, capacity)
    lost = np.flatnonzero(labels < 0)
    while lost.size:
        room = capacity - np.bincount(labels[labels >= 0], minlength=capacity.size)
        open_clusters = np.flatnonzero(room > 0)
        c = centroids[mx.array(open_clusters.astype(np.int32))]
        s = x[mx.array(rows[lost].astype(np.int32))] @ c.T - 0.5 * (c * c).sum(-1)
        vals, idx = _top_candidates(s, n_candidates)
        placed = balanced_assign(vals, idx, room[open_clusters])
        labels[lost[placed >= 0]] = open_clusters[placed[placed >= 0]]
        lost = lost[placed < 0]
    return labels


def _kmeans_in_groups(
    x: mx.array,
    group: np.ndarray,
    leaf_start: np.ndarray,
    capacity: np.ndarray,
    n_iters: int,
    rng: np.random.Generator,
    bar: tqdm,
    n_candidates: int = 16,
) -> np.ndarray:
    """Balanced k-means run independently inside each group of points.

    Group ``j`` holds the points with ``group == j`` and owns the clusters
    ``leaf_start[j] .. leaf_start[j + 1] - 1``, whose sizes are given by ``capacity``.
    Each iteration scores every point against its group's centroids in one batched matmul.
    Returns the cluster of every point.
    """
    n_groups = leaf_start.size - 1
    n_leaves = np.diff(leaf_start)
    members = np.argsort(group, kind="stable")
    sizes = np.bincount(group, minlength=n_groups)
    width, n_local = int(sizes.max()), int(n_leaves.max())
    real = np.arange(width) < sizes[:, None]
    # [n_groups, width] rows of x, padded with a zero row.
    index = np.full((n_groups, width), x.shape[0])
    index[real] = members
    x_pad = mx.concatenate([x, mx.zeros((1, x.shape[1]), dtype=x.dtype)])
    grouped = x_pad[mx.array(index.astype(np.int32))]
    # [n_groups, n_local] cluster ids, padded with a dummy cluster with no room.
    local_valid = np.arange(n_local) < n_leaves[:, None]
    leaf_index = np.where(local_valid, leaf_start[:-1, None] + np.arange(n_local), capacity.size)

    # Initial centroids: distinct random members of each group.
    picks = np.argsort(rng.random((n_groups, width)) + ~real, axis=1)[:, :n_local]
    centroids = x[mx.array(np.take_along_axis(index, picks, axis=1)[local_valid].astype(np.int32))]
    labels = np.full(x.shape[0], -1)
    for iteration in range(n_iters):
        c_pad = mx.concatenate([centroids, mx.zeros((1, x.shape[1]), dtype=x.dtype)])
        bias = mx.concatenate([-0.5 * (centroids * centroids).sum(-1), mx.array([-1e30])])
        leaf = mx.array(leaf_index.astype(np.int32))
        scores = grouped @ c_pad[leaf].transpose(0, 2, 1) + bias[leaf][:, None, :]
        vals, local = _top_candidates(scores, min(n_candidates, n_local))
        candidates = np.take_along_axis(leaf_index[:, None, :], local, axis=2)
        previous, labels = labels, np.empty_like(labels)
        labels[members] = _assign(
            x,
            members,
            centroids,
            vals[real],
            candidates[real],
            np.append(capacity, 0),
            n_candidates,
        )
        centroids = _centroids(x, labels, capacity.size)
        bar.update()
        if np.array_equal(labels, previous):
            bar.update(n_iters - 1 - iteration)
            break
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
    """Cluster id of every row of ``x`` ``[V, d]``, with exactly ``cluster_size`` rows per
    cluster except the last, which is short by its ``n_clusters * cluster_size - V`` padding
    slots. Two levels of balanced k-means: about ``sqrt(n_clusters)`` groups, then each
    group's clusters (``n_iters`` iterations each)."""
    vocab_size = x.shape[0]
    n_clusters = math.ceil(vocab_size / cluster_size)
    capacity = np.full(n_clusters, cluster_size)
    capacity[-1] -= n_clusters * cluster_size - vocab_size
    rng = np.random.default_rng(seed)
    n_groups = max(1, round(math.sqrt(n_clusters)))
    leaf_start = np.arange(n_groups + 1) * n_clusters // n_groups
    group_capacity = np.add.reduceat(capacity, leaf_start[:-1])
    with tqdm(total=2 * n_iters, desc="Clustering head") as bar:
        top = np.array([0, n_groups])
        group = _kmeans_in_groups(
            x, np.zeros(vocab_size, dtype=np.int64), top, group_capacity, n_iters, rng, bar
        )
        return _kmeans_in_groups(x, group, leaf_start, capacity, n_iters, rng, bar)


def slot_order(labels: np.ndarray, cluster_size: int) -> np.ndarray:
    """Token id of every slot ``[n_clusters * cluster_size]`` (cluster k owns slots
    ``k * cluster_size .. (k + 1) * cluster_size - 1``); padding slots, at the end, are -1."""
    n_slots = math.ceil(labels.size / cluster_size) * cluster_size
    order = np.full(n_slots, -1, dtype=np.int32)
    order[: labels.size] = np.argsort(labels, kind="stable")
    return order


def cluster_rows(weight: mx.array, order: np.ndarray) -> mx.array:
    """The head's rows in slot order ``[n_slots, d]``, zero rows in the padding slots."""
    padded = mx.concatenate([weight, mx.zeros((1, weight.shape[1]), dtype=weight.dtype)])
    return padded[mx.array(np.where(order >= 0, order, weight.shape[0]).astype(np.int32))]


def mean_rows(weight: mx.array, order: np.ndarray, cluster_size: int) -> mx.array:
    """Mean ``[n_clusters, d]`` of each cluster's raw rows (padding slots excluded)."""
    rows = cluster_rows(weight, order).reshape(-1, cluster_size, weight.shape[1])
    counts = mx.array((order >= 0).reshape(-1, cluster_size).sum(axis=1).astype(np.float32))
    return rows.sum(axis=1) / counts[:, None]


def fit_centroids(
    weight: mx.array,
    order: np.ndarray,
    cluster_size: int,
    hidden_states: mx.array,
    ridge: float = 1e-3,
    chunk_size: int = 256,
) -> tuple[mx.array, mx.array]:
    """Centroids ``[n_clusters, d]`` and biases ``[n_clusters]`` whose score
    ``h @ probe + bias`` is the least-squares estimate of the cluster's largest logit.

    The fit runs over the calibration ``hidden_states``; it shares one Gram matrix across all
    clusters, so it costs one pass of dense logits. ``ridge`` (relative to the mean eigenvalue
    of the Gram matrix) pulls each probe toward the mean of its cluster's rows.
    """
    n_clusters = order.size // cluster_size
    rows = cluster_rows(weight, order)
    padding = mx.array(np.where(order >= 0, 0.0, -np.inf).astype(np.float32))
    h = mx.concatenate(
        [hidden_states.astype(mx.float32), mx.ones((hidden_states.shape[0], 1))], axis=1
    )
    moments = mx.zeros((h.shape[1], n_clusters))
    for i in tqdm(range(0, h.shape[0], chunk_size), desc="Fitting centroids"):
        logits = h[i : i + chunk_size, :-1] @ rows.T + padding
        best = logits.reshape(-1, n_clusters, cluster_size).max(axis=-1)
        moments = moments + h[i : i + chunk_size].T @ best
        mx.eval(moments)
    gram = np.array(h.T @ h, dtype=np.float64)
    prior = np.concatenate(
        [np.array(mean_rows(weight, order, cluster_size)).T, np.zeros((1, n_clusters))]
    )
    penalty = np.ones(gram.shape[0])
    penalty[-1] = 0.0  # the bias is not pulled toward anything
    penalty *= ridge * np.trace(gram) / gram.shape[0]
    theta = np.linalg.solve(
        gram + np.diag(penalty), np.array(moments, dtype=np.float64) + penalty[:, None] * prior
    )
    theta = mx.array(theta.astype(np.float32))
    return theta[:-1].T, theta[-1]


def cluster_head(
    weight: mx.array,
    cluster_size: int = CLUSTER_SIZE,
    hidden_states: mx.array | None = None,
    seed: int = 0,
    ridge: float = 1e-3,
) -> dict:
    """Cluster the head's rows and build the stage-1 centroids of FlashHead.

    Args:
        weight: the head's rows ``[V, d]`` (float32).
        cluster_size: tokens per cluster.
        hidden_states: ``[N, d]`` calibration hidden states (``calibration_hidden_states``).
            With them, rows are clustered in the data-aware metric and the centroids are fitted
            to estimate each cluster's largest logit; without them, rows are clustered as they
            are and the centroids are the clusters' mean rows with no bias.
        seed: seed of the centroid initialisation (the result is deterministic for a seed).
        ridge: regularisation of the centroid fit (see ``fit_centroids``).

    Returns a dict of MLX arrays:
        ``order``: int32 ``[n_clusters * cluster_size]`` token of each slot, cluster k owning
        slots ``k * cluster_size .. (k + 1) * cluster_size - 1``; padding slots are -1.
        ``centroids``: float32 ``[n_clusters, d]`` stage-1 centroids.
        ``cluster_bias``: float32 ``[n_clusters]``; the stage-1 score is
        ``h @ centroids.T + cluster_bias``.
        ``spherical_centroids``: float32 ``[n_clusters, d]`` unit-norm mean direction of each
        cluster (the plain FlashHead probes, kept for reference).
    """
    if weight.ndim != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be a [V, d] matrix of head rows, got shape {weight.shape}")
    if cluster_size < 1:
        raise ValueError(f"cluster_size must be a positive integer, got {cluster_size}")
    if hidden_states is not None and (
        hidden_states.ndim != 2 or hidden_states.shape[1] != weight.shape[1]
    ):
        raise ValueError(
            f"hidden_states must be [N, {weight.shape[1]}] to match the head, "
            f"got {hidden_states.shape}"
        )
    weight = weight.astype(mx.float32)
    x = weight if hidden_states is None else data_aware_rows(weight, hidden_states)
    order = slot_order(balanced_clusters(x, cluster_size, seed), cluster_size)
    kill_point("clustering")
    return clusters_from_order(weight, order, cluster_size, hidden_states, ridge)


def clusters_from_order(
    weight: mx.array,
    order: np.ndarray,
    cluster_size: int,
    hidden_states: mx.array | None = None,
    ridge: float = 1e-3,
) -> dict:
    """The stage-1 centroids of given clusters: :func:`cluster_head`'s result for the slot
    ``order`` (from :func:`slot_order`), probes fitted when ``hidden_states`` are given."""
    weight = weight.astype(mx.float32)
    means = mean_rows(weight, order, cluster_size)
    if hidden_states is None:
        centroids, bias = means, mx.zeros((means.shape[0],), dtype=mx.float32)
    else:
        centroids, bias = fit_centroids(weight, order, cluster_size, hidden_states, ridge)
    return {
        "order": mx.array(order),
        "centroids": centroids,
        "cluster_bias": bias,
        "spherical_centroids": means
        / mx.maximum(mx.linalg.norm(means, axis=1, keepdims=True), 1e-12),
    }


def scored_fraction(
    n_clusters: int, cluster_size: int, n_probes: int, vocab_size: int, extra_rows: int = 0
) -> float:
    """Rows scored per token over the vocabulary: ``(n_clusters + n_probes * cluster_size +
    extra_rows) / V`` (``extra_rows``: e.g. the recent tokens scored exactly)."""
    return (n_clusters + n_probes * cluster_size + extra_rows) / vocab_size


def most_probes(
    fraction: float, n_clusters: int, cluster_size: int, vocab_size: int, extra_rows: int = 0
) -> int:
    """The most probes in ``[1, n_clusters]`` whose :func:`scored_fraction` (with
    ``extra_rows``) is at most ``fraction`` (one probe where the rest alone exceeds it)."""
    probes = math.floor((fraction * vocab_size - n_clusters - extra_rows) / cluster_size + 1e-9)
    return min(n_clusters, max(1, probes))
