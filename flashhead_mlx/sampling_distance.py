"""The exact distribution of a token sampled through mlx-lm's sampler from FlashHead's logits.

With sampling, a decode step hands mlx-lm's sampler the candidates' exact logits and those of one
non-probed cluster ``k``, drawn with probability ``q_k``, shifted by ``-T log q_k``
(:mod:`flashhead_mlx.sampling`). mlx-lm's sampler applies ``apply_top_p`` to the log-probs (a
threshold on the ``T = 1`` probabilities) and samples ``softmax(x / T)``. The sampled token
follows ``sum_k q_k p_k``, ``p_k`` the sampler's distribution on draw ``k``:
:func:`expected_distribution` computes it for every ``k`` at once, in float64 (no Monte Carlo).
Without top-p it equals :func:`flashhead_mlx.sampling.sampler_distribution`.
"""

from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_top_p

from .sampling import _tail_log_probs

# One position's draws: the candidates' token ids and logits ``[n]``, then for each non-probed
# cluster k that can be drawn its token ids and shifted logits ``[K, s]`` and ``q_k`` ``[K]``.
Draws = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def sampler_draws(head, h: mx.array, temperature: float) -> List[Draws]:
    """The :data:`Draws` of each hidden state ``[N, d]`` at ``temperature``."""
    scores = head.cluster_scores(h)
    probes = head.probe(h, scores)
    log_q = _tail_log_probs(head, scores, probes, temperature)
    logits = head.slot_logits(h).reshape(h.shape[0], head.n_clusters, head.cluster_size)
    mx.eval(log_q, logits, probes)
    logits, log_q = np.array(logits, np.float64), np.array(log_q, np.float64)
    tokens = np.array(head.order).reshape(head.n_clusters, head.cluster_size)
    draws = []
    for row, probed in enumerate(np.array(probes)):
        tail = np.isfinite(log_q[row])
        draws.append(
            (
                tokens[probed].ravel(),
                logits[row, probed].ravel(),
                tokens[tail],
                logits[row, tail] - temperature * log_q[row, tail, None],
                np.exp(log_q[row, tail]),
            )
        )
    return draws


def dense_draws(tokens: np.ndarray, logits: np.ndarray) -> Draws:
    """The dense head as :data:`Draws`: every token a candidate, nothing to draw."""
    return tokens, logits.astype(np.float64), np.zeros((0, 0), int), np.zeros((0, 0)), np.zeros(0)


def top_p_thresholds(kept: np.ndarray, tail: np.ndarray, top_p: float) -> np.ndarray:
    """For each drawn cluster ``k``, the smallest weight ``apply_top_p`` keeps ``[K]``.

    ``kept``: the candidates' weights ``exp(z - c)``, descending ``[n]``; ``tail``: each cluster's
    weights ``exp(z - T log q_k - c)`` ``[K, s]``. mlx-lm keeps, in descending order, every token
    whose preceding mass is below ``top_p`` times the total: found here by merging the ``s`` tail
    tokens into the sorted candidates instead of sorting ``n + s`` values per cluster.
    """
    n, n_clusters = kept.size, tail.shape[0]
    tail = -np.sort(-tail, axis=1)
    ascending = kept[::-1]
    kept_cum = np.concatenate([[0.0], np.cumsum(kept)])
    tail_cum = np.concatenate([np.zeros((n_clusters, 1)), np.cumsum(tail, axis=1)], axis=1)
    limit = top_p * (kept_cum[-1] + tail_cum[:, -1])

    # Candidates at or above each tail token (a candidate goes first on a tie).
    above = n - np.searchsorted(ascending, tail, side="left")
    # Tail token i is preceded by the tail tokens before it and the candidates above it.
    n_tail = (tail_cum[:, :-1] + kept_cum[above] < limit[:, None]).sum(axis=1)
    # Candidate j below exactly m tail tokens (j in [lo_m, hi_m)) is preceded by
    # kept_cum[j] + tail_cum[m]: the last such j under the limit, for each m.
    lo = np.concatenate([np.zeros((n_clusters, 1), np.int64), above], axis=1)
    hi = np.concatenate([above, np.full((n_clusters, 1), n)], axis=1)
    last = np.searchsorted(kept_cum[:-1], limit[:, None] - tail_cum, side="left") - 1
    last = np.minimum(last, hi - 1)
    last = np.where(last >= lo, last, -1).max(axis=1)

    kept_threshold = np.where(last >= 0, kept[np.maximum(last, 0)], np.inf)
    padded = np.concatenate([tail, np.full((n_clusters, 1), np.inf)], axis=1)
    tail_threshold = padded[np.arange(n_clusters), np.where(n_tail > 0, n_tail - 1, -1)]
    return np.minimum(kept_threshold, tail_threshold)


def expected_distribution(
    draws: Draws, temperature: float, top_p: Optional[float], vocab_size: int
) -> np.ndarray:
    """``sum_k q_k * p_k`` ``[V]`` (float64): the distribution of mlx-lm's sampler over a
    position's :data:`Draws` (the ``q_k`` may be any weights; with nothing to draw, the sampler on
    the candidates alone).

    ``p_k`` is the sampler's distribution (``apply_top_p`` on the log-probs when ``top_p`` is set,
    then ``softmax(x / T)``) over the candidates and the shifted tokens of cluster ``k``.
    """
    cand_tokens, cand_logits, tail_tokens, tail_logits, weights = draws
    if weights.size == 0:  # nothing to draw: one empty draw, taken with certainty
        tail_tokens, tail_logits, weights = np.zeros((1, 0), int), np.zeros((1, 0)), np.ones(1)
    order = np.argsort(-cand_logits, kind="stable")
    cand_tokens, cand_logits = cand_tokens[order], cand_logits[order]
    reference = max(cand_logits[0], tail_logits.max(initial=-np.inf))
    kept, tail = np.exp(cand_logits - reference), np.exp(tail_logits - reference)
    if top_p is None:
        thresholds = np.zeros(len(weights))
    else:
        thresholds = top_p_thresholds(kept, tail, top_p)

    kept_t = np.exp((cand_logits - reference) / temperature)
    tail_t = np.exp((tail_logits - reference) / temperature)
    tail_t = np.where(tail >= thresholds[:, None], tail_t, 0.0)
    n_kept = kept.size - np.searchsorted(kept[::-1], thresholds, side="left")
    mass = np.concatenate([[0.0], np.cumsum(kept_t)])[n_kept] + tail_t.sum(axis=1)
    scale = weights / mass
    # Candidate j gets kept_t[j] * (sum of scale_k over the clusters whose threshold is <= its
    # weight).
    by_threshold = np.argsort(thresholds)
    scale_cum = np.concatenate([[0.0], np.cumsum(scale[by_threshold])])
    reach = np.searchsorted(thresholds[by_threshold], kept, side="right")

    probs = np.zeros(vocab_size)
    real = cand_tokens >= 0
    probs[cand_tokens[real]] = (kept_t * scale_cum[reach])[real]
    real = tail_tokens >= 0
    probs[tail_tokens[real]] = (tail_t * scale[:, None])[real]
    return probs


def dense_distribution(logits: mx.array, temperature: float, top_p: Optional[float]) -> mx.array:
    """mlx-lm's sampler distribution ``[N, V]`` literally: log-probs, ``apply_top_p``,
    ``softmax(x / T)``."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if top_p is not None:
        logprobs = apply_top_p(logprobs, top_p)
    return mx.softmax(logprobs * (1.0 / temperature), axis=-1)


def enumerated_distribution(
    draws: Draws, temperature: float, top_p: Optional[float], vocab_size: int, chunk: int = 128
) -> np.ndarray:
    """:func:`expected_distribution` the literal way, for checks: :func:`dense_distribution` on
    each cluster's ``[candidates + its tokens]`` logits, weighted by ``q_k``."""
    cand_tokens, cand_logits, tail_tokens, tail_logits, weights = draws
    n = cand_logits.size
    cand_sum, probs = np.zeros(n), np.zeros(vocab_size)
    for start in range(0, len(weights), chunk):
        shifted = tail_logits[start : start + chunk]
        cand = np.broadcast_to(cand_logits, (shifted.shape[0], n))
        logits = mx.array(np.concatenate([cand, shifted], axis=1), mx.float32)
        p = np.array(dense_distribution(logits, temperature, top_p), np.float64)
        p *= weights[start : start + chunk, None]
        cand_sum += p[:, :n].sum(axis=0)
        tokens = tail_tokens[start : start + chunk]
        probs[tokens[tokens >= 0]] = p[:, n:][tokens >= 0]
    probs[cand_tokens[cand_tokens >= 0]] = cand_sum[cand_tokens >= 0]
    return probs
