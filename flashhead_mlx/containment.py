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


def cluster_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank ``[..., n_clusters]`` of every cluster by its stage-1 score (0 = best), ties to the
    lowest cluster id as the head's probes break them: with ``n_probes`` probes, exactly the
    clusters of rank below ``n_probes`` are probed."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    positions = np.broadcast_to(np.arange(scores.shape[-1]), order.shape)
    np.put_along_axis(ranks, order, positions, axis=-1)
    return ranks


def target_ranks(
    hidden_states: mx.array,
    targets: mx.array,
    clusters: dict,
    quantized: bool = True,
    chunk_size: int = 1024,
    bits: int = 4,
) -> np.ndarray:
    """Rank ``[N]`` (:func:`cluster_ranks`) of the cluster holding each target token, by the
    stage-1 score ``h @ centroids.T + cluster_bias`` (centroids stored with ``bits`` bits when
    ``quantized``). The target is retrieved with ``n_probes`` probes exactly when its rank is
    below ``n_probes``."""
    n_clusters = clusters["centroids"].shape[0]
    owner = np.array(token_clusters(clusters["order"], clusters["order"].size // n_clusters))
    owner = owner[np.asarray(targets)]
    probes = probe_vectors(clusters["centroids"], quantized, bits=bits)
    ranks = []
    for i in range(0, hidden_states.shape[0], chunk_size):
        scores = hidden_states[i : i + chunk_size] @ probes.T + clusters["cluster_bias"]
        rows = np.arange(scores.shape[0])
        ranks.append(cluster_ranks(np.array(scores))[rows, owner[i : i + chunk_size]])
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
