"""Full-vocabulary sampling with a FlashHead: every token can be drawn.

The probed clusters' tokens get their exact logits. Every other cluster ``k`` gets an estimated
mass from its stage-1 score ``s_k``: ``log m_k = s_k / T + a_k(T)``, with ``a_k(T) = sum_j
mass_bias[j, k] / T**j`` fitted on calibration hidden states (:func:`fit_mass_bias`). A draw
picks one non-probed cluster in proportion to its mass, then samples the combined categorical of
the candidates (exact softmax) and that cluster's tokens (exact softmax inside it, weighted by the
total estimated tail mass). A token of a non-probed cluster ``k`` is thus drawn with probability
``m_k p(token | k) / Z``: only the cluster masses are estimated, never the tokens inside them.
"""

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

# Temperatures the mass offsets are fitted at (1 / T spans the range samplers use).
FIT_TEMPERATURES = (0.5, 0.7, 1.0, 1.4, 2.0)


def mass_offsets(mass_bias: mx.array, temperature: float) -> mx.array:
    """``a_k(T) = sum_j mass_bias[j, k] / T**j`` ``[n_clusters]``."""
    powers = mx.array([temperature ** -j for j in range(mass_bias.shape[0])], mx.float32)
    return powers @ mass_bias


def _tail_log_mass(head, scores: mx.array, probes: mx.array, temperature: float) -> mx.array:
    """Estimated log mass (in units of logit / T) of every cluster, ``-inf`` at the probes."""
    if head.mass_bias is None:
        raise ValueError(
            "this FlashHead has no mass_bias: full-vocabulary sampling needs assets "
            "converted with calibration (fit_mass_bias)"
        )
    log_mass = scores.astype(mx.float32) / temperature + mass_offsets(head.mass_bias, temperature)
    return mx.put_along_axis(log_mass, probes.astype(mx.int32), mx.array(-mx.inf), axis=-1)


def sampling_logits(head, h: mx.array, temperature: float, key: Optional[mx.array] = None):
    """One draw's combined categorical: token ids and logits (at temperature 1) ``[M, K]``.

    ``K = (n_probes + 1) * cluster_size``: the candidates, then the tokens of one non-probed
    cluster drawn in proportion to its estimated mass. Sampling ``softmax(logits)`` over these
    slots draws from the full-vocabulary sampler.
    """
    h = h.reshape(-1, h.shape[-1])
    scores = head.cluster_scores(h)
    probes = head.probe(h, scores)
    tail = _tail_log_mass(head, scores, probes, temperature)
    tail_cluster = mx.random.categorical(tail, key=key)
    clusters = mx.concatenate([probes, tail_cluster[:, None].astype(probes.dtype)], axis=-1)
    tokens, logits = head.cluster_logits(h, clusters)
    logits = logits.astype(mx.float32) / temperature
    n_candidates = head.n_probes * head.cluster_size
    tail_logits = logits[:, n_candidates:]
    tail_logits = tail_logits - mx.logsumexp(tail_logits, axis=-1, keepdims=True)
    tail_logits = tail_logits + mx.logsumexp(tail, axis=-1, keepdims=True)
    return tokens, mx.concatenate([logits[:, :n_candidates], tail_logits], axis=-1)


def sample(head, h: mx.array, temperature: float, key: Optional[mx.array] = None) -> mx.array:
    """Draw one token per hidden state ``[..., d]`` from the full vocabulary at ``temperature``."""
    cluster_key, token_key = (None, None) if key is None else mx.random.split(key)
    tokens, logits = sampling_logits(head, h, temperature, cluster_key)
    choice = mx.random.categorical(logits, key=token_key)
    return mx.take_along_axis(tokens, choice[:, None], axis=-1).reshape(h.shape[:-1])


def sampler_distribution(head, h: mx.array, temperature: float) -> mx.array:
    """The exact distribution ``[..., V]`` that :func:`sample` draws from (dense cost)."""
    lead = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1])
    scores = head.cluster_scores(h)
    probes = head.probe(h, scores)
    tail = _tail_log_mass(head, scores, probes, temperature)
    all_clusters = mx.broadcast_to(mx.arange(head.n_clusters), tail.shape)
    _, logits = head.cluster_logits(h, all_clusters)
    logits = logits.astype(mx.float32).reshape(*tail.shape, head.cluster_size) / temperature
    cluster_lse = mx.logsumexp(logits, axis=-1)
    log_weight = mx.where(mx.isinf(tail), 0.0, tail - cluster_lse)  # 0 at the probes
    logits = (logits + log_weight[..., None]).reshape(h.shape[0], -1)
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.exp(mx.take(log_probs, head.inverse, axis=-1)).reshape(*lead, head.vocab_size)


def total_variation(p: mx.array, q: mx.array) -> mx.array:
    """Total variation distance ``0.5 * sum |p - q|`` over the last axis."""
    return 0.5 * mx.abs(p - q).sum(axis=-1)
