"""Top-1 containment: how often the dense head's argmax lies inside the probed clusters."""

import mlx.core as mx
import numpy as np


def token_clusters(order: mx.array, cluster_size: int, vocab_size: int) -> mx.array:
    """Cluster id ``[V]`` of every token, from the slot order of ``cluster_head``."""
    order = np.asarray(order)
    clusters = np.full(vocab_size, -1, dtype=np.int32)
    slots = np.flatnonzero(order >= 0)
    clusters[order[slots]] = slots // cluster_size
    if (clusters < 0).any():
        raise ValueError("order does not place every token in a cluster")
    return mx.array(clusters)


def probe_vectors(centroids: mx.array, quantized: bool, group_size: int = 64, bits: int = 4) -> mx.array:
    """The probe vectors stage 1 scores against: as given, or after a 4-bit round trip
    (``mx.quantize`` with ``group_size``), which is how the head stores them."""
    if not quantized:
        return centroids
    return mx.dequantize(*mx.quantize(centroids, group_size=group_size, bits=bits), group_size=group_size, bits=bits)


def target_cluster_ranks(
    hidden_states: mx.array,
    targets: mx.array,
    clusters: dict,
    quantized: bool = True,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Rank ``[N]`` of the cluster holding each target token among all clusters by the
    stage-1 score ``h @ centroids.T + cluster_bias`` (0 = best); a target is retrieved with
    ``n_probes`` probes when its rank is below ``n_probes``."""
    cluster_size = clusters["order"].size // clusters["centroids"].shape[0]
    owner = token_clusters(clusters["order"], cluster_size, int(mx.max(clusters["order"]).item()) + 1)
    probes = probe_vectors(clusters["centroids"], quantized)
    target_cluster = owner[targets]
    ranks = []
    for i in range(0, hidden_states.shape[0], chunk_size):
        scores = hidden_states[i : i + chunk_size] @ probes.T + clusters["cluster_bias"]
        own = mx.take_along_axis(scores, target_cluster[i : i + chunk_size, None], axis=1)
        rank = (scores > own).sum(axis=1)
        mx.eval(rank)
        ranks.append(np.array(rank))
    return np.concatenate(ranks)


def containment(
    hidden_states: mx.array,
    targets: mx.array,
    clusters: dict,
    n_probes: list[int],
    vocab_size: int,
    quantized: bool = True,
) -> list[dict]:
    """Top-1 containment for each entry of ``n_probes``.

    Args:
        hidden_states: ``[N, d]`` final hidden states of real text.
        targets: ``[N]`` the dense head's argmax token at each position.
        clusters: the output of ``clustering.cluster_head``.
        n_probes: probe counts to evaluate.
        vocab_size: V, for the scored fraction.
        quantized: score against 4-bit probe vectors, as the head ships them.

    Returns one dict per probe count: ``n_probes``, ``scored_fraction`` (rows scored per
    token, ``(n_clusters + n_probes * cluster_size) / V``) and ``containment``.
    """
    n_clusters, cluster_size = clusters["centroids"].shape[0], clusters["order"].size // clusters["centroids"].shape[0]
    ranks = target_cluster_ranks(hidden_states, targets, clusters, quantized)
    return [
        {
            "n_probes": p,
            "scored_fraction": (n_clusters + p * cluster_size) / vocab_size,
            "containment": float(np.mean(ranks < p)),
        }
        for p in n_probes
    ]
