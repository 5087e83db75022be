"""Top-1 containment: how often the dense head's argmax lies inside the probed clusters."""

import mlx.core as mx
import numpy as np

from .clustering import scored_fraction


def probe_vectors(
    centroids: mx.array, quantized: bool, group_size: int = 64, bits: int = 4
) -> mx.array:
    """The probe vectors stage 1 scores against: as given, or after the 4-bit round trip
    (``mx.quantize``, ``group_size`` 64) that storing them in the head applies."""
    if not quantized:
        return centroids
    return mx.dequantize(
        *mx.quantize(centroids, group_size=group_size, bits=bits), group_size=group_size, bits=bits
    )


def token_clusters(order: mx.array, cluster_size: int) -> mx.array:
    """Cluster id ``[V]`` of every token, from the slot order of ``cluster_head``."""
    order = np.asarray(order)
    slots = np.flatnonzero(order >= 0)
    if not np.array_equal(np.sort(order[slots]), np.arange(slots.size)):
        raise ValueError("order must hold every token id 0..V-1 exactly once")
    clusters = np.empty(slots.size, dtype=np.int32)
    clusters[order[slots]] = slots // cluster_size
    return mx.array(clusters)


def target_ranks(
    hidden_states: mx.array,
    targets: mx.array,
    clusters: dict,
    quantized: bool = True,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Rank ``[N]`` of the cluster holding each target token among all clusters, by the
    stage-1 score ``h @ centroids.T + cluster_bias`` (0 = best). The target is retrieved with
    ``n_probes`` probes exactly when its rank is below ``n_probes``."""
    n_clusters = clusters["centroids"].shape[0]
    owner = token_clusters(clusters["order"], clusters["order"].size // n_clusters)[targets]
    probes = probe_vectors(clusters["centroids"], quantized)
    ranks = []
    for i in range(0, hidden_states.shape[0], chunk_size):
        scores = hidden_states[i : i + chunk_size] @ probes.T + clusters["cluster_bias"]
        own = mx.take_along_axis(scores, owner[i : i + chunk_size, None], axis=1)
        rank = (scores > own).sum(axis=1)
        mx.eval(rank)
        ranks.append(np.array(rank))
    return np.concatenate(ranks)


def containment(
    hidden_states: mx.array,
    targets: mx.array,
    clusters: dict,
    n_probes: list[int],
    quantized: bool = True,
) -> list[dict]:
    """Top-1 containment for each probe count in ``n_probes``.

    Args:
        hidden_states: ``[N, d]`` final hidden states of real text.
        targets: ``[N]`` the dense head's argmax token at each position (``dense_argmax``).
        clusters: the output of ``clustering.cluster_head``.
        n_probes: probe counts to evaluate.
        quantized: score against 4-bit probe vectors, as the head stores them.

    Returns one dict per probe count: ``n_probes``, ``scored_fraction`` (rows scored per
    token over V: ``(n_clusters + n_probes * cluster_size) / V``) and ``containment``.
    """
    n_clusters, n_slots = clusters["centroids"].shape[0], clusters["order"].size
    vocab_size = int((clusters["order"] >= 0).sum().item())
    ranks = target_ranks(hidden_states, targets, clusters, quantized)
    return [
        {
            "n_probes": p,
            "scored_fraction": scored_fraction(n_clusters, n_slots // n_clusters, p, vocab_size),
            "containment": float(np.mean(ranks < p)),
        }
        for p in n_probes
    ]
