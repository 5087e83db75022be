"""Full-vocabulary sampling with a FlashHead: every token can be drawn.

At temperature ``T`` the probed clusters' tokens (the candidates) get their exact logits. Every
other cluster ``k`` gets an estimated log mass ``s_k / T + a_k(T)`` from its stage-1 score
``s_k``, with offsets ``a_k(T) = mass_bias[0, k] + mass_bias[1, k] / T`` fitted on calibration
hidden states (:func:`fit_mass_bias`). A draw picks one non-probed cluster ``k`` with probability
``q_k`` proportional to its estimated mass, scores its rows exactly, and samples the combined
categorical of the candidates (weights ``exp(z / T)``) and the drawn cluster's tokens (weights
``exp(z / T) / q_k``, an importance-weighted, unbiased estimate of the whole tail). So the tail's
total weight is right on average whatever the estimates, and only the cluster draw uses them.
"""

from typing import Optional, Sequence, Tuple

import mlx.core as mx

# Temperatures the mass offsets are fitted at: with ``e = exp(z - max z)`` computed once, their
# ``exp((z - max z) / T)`` are ``e ** 2``, ``e`` and ``sqrt(e)``, far cheaper than new exps.
FIT_TEMPERATURES = (0.5, 1.0, 2.0)
POWERS = {2.0: mx.square, 1.0: lambda e: e, 0.5: mx.sqrt}


def _power(e: mx.array, exponent: float) -> mx.array:
    """``e ** exponent``, by :data:`POWERS` when it has the exponent."""
    return POWERS[exponent](e) if exponent in POWERS else e**exponent


def mass_offsets(mass_bias: mx.array, temperature) -> mx.array:
    """``a_k(T) = sum_j mass_bias[j, k] / T**j`` ``[..., n_clusters]`` (``T`` a float or an
    array ``[M, 1]``)."""
    return sum(mass_bias[j] * temperature**-j for j in range(mass_bias.shape[0]))


def _tail_log_probs(head, scores: mx.array, probes: mx.array, temperature) -> mx.array:
    """``log q_k``: how likely each non-probed cluster is to be drawn; ``-inf`` at the probes."""
    if head.mass_bias is None:
        raise ValueError(
            "this FlashHead has no mass_bias: full-vocabulary sampling needs assets "
            "converted with calibration (fit_mass_bias)"
        )
    log_mass = scores.astype(mx.float32) / temperature + mass_offsets(head.mass_bias, temperature)
    log_mass = mx.put_along_axis(log_mass, probes.astype(mx.int32), mx.array(-mx.inf), axis=-1)
    total = mx.logsumexp(log_mass, axis=-1, keepdims=True)
    return log_mass - mx.where(mx.isinf(total), 0.0, total)  # all -inf when every cluster is probed


def _greedy_rows(temperature) -> Tuple[mx.array, mx.array]:
    """Which rows are greedy (temperature ``<= 0``), and the temperatures with those set to 1."""
    greedy = mx.array(temperature) <= 0
    return greedy, mx.where(greedy, 1.0, temperature)


def sampling_logits(
    head,
    h: mx.array,
    temperature,
    key: Optional[mx.array] = None,
    scores: Optional[mx.array] = None,
    slots: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """Token ids and logits ``[M, (n_probes + 1) * cluster_size]`` of one draw's categorical.

    The candidates, then the tokens of one non-probed cluster ``k`` drawn with probability
    ``q_k``; the logits are already divided by ``temperature`` (a float, or an array ``[M, 1]``
    of per-row temperatures where ``0`` marks a greedy row: its drawn cluster gets ``-inf``).
    Sampling ``softmax(logits)`` draws from the full-vocabulary sampler. ``scores``: the
    stage-1 scores ``[M, n_clusters]`` of ``h`` when already computed; ``slots``: the logits of
    every slot (:meth:`~flashhead_mlx.head.FlashHead.slot_logits` of ``h``), which the clusters'
    logits are then taken from instead of scored.
    """
    h = h.reshape(-1, h.shape[-1])
    greedy, temperature = _greedy_rows(temperature)
    scores = head.cluster_scores(h) if scores is None else scores
    probes = head.probe(h, scores)
    tail_log_probs = _tail_log_probs(head, scores, probes, temperature)
    drawn = mx.random.categorical(tail_log_probs, key=key)[:, None]
    clusters = mx.concatenate([probes, drawn.astype(probes.dtype)], axis=-1)
    slots = None if slots is None else slots.reshape(h.shape[0], -1)
    tokens, logits = head.cluster_logits(h, clusters, slots)
    logits = logits.astype(mx.float32) / temperature
    n_candidates = head.n_probes * head.cluster_size
    drawn_log_prob = mx.take_along_axis(tail_log_probs, drawn, axis=-1)
    # With every cluster probed there is no tail: its weight is zero, never exp(+inf).
    no_tail = mx.isinf(drawn_log_prob) | greedy
    tail = mx.where(no_tail, -mx.inf, logits[:, n_candidates:] - drawn_log_prob)
    return tokens, mx.concatenate([logits[:, :n_candidates], tail], axis=-1)


def sample(
    head,
    h: mx.array,
    temperature: float,
    key: Optional[mx.array] = None,
    scores: Optional[mx.array] = None,
) -> mx.array:
    """Draw one token per hidden state ``[..., d]`` from the full vocabulary at ``temperature``
    (``scores``: as :func:`sampling_logits`)."""
    cluster_key, token_key = (None, None) if key is None else mx.random.split(key)
    tokens, logits = sampling_logits(head, h, temperature, cluster_key, scores)
    choice = mx.random.categorical(logits, key=token_key)
    return mx.take_along_axis(tokens, choice[:, None], axis=-1).reshape(h.shape[:-1])


def full_vocabulary_logits(
    head, h: mx.array, temperature, key: Optional[mx.array] = None,
    slots: Optional[mx.array] = None,
) -> mx.array:
    """Logits ``[..., V]`` that mlx-lm's sampler at ``temperature`` turns into one sampler draw.

    ``-inf`` outside the candidates and the drawn cluster; a new cluster is drawn at every call.
    ``temperature`` is a float or per-row ``[M, 1]`` (``0``: greedy, candidates only);
    ``slots``: as :func:`sampling_logits`.
    """
    tokens, logits = sampling_logits(head, h, temperature, key, slots=slots)
    full = head.scatter(tokens, logits * _greedy_rows(temperature)[1])
    return full.reshape(*h.shape[:-1], head.vocab_size)


def sampler_distribution(head, h: mx.array, temperature: float) -> mx.array:
    """The exact distribution ``[..., V]`` that :func:`sample` draws from (at dense cost)."""
    flat = h.reshape(-1, h.shape[-1])
    probs = tail_marginal(head, head.slot_logits(flat), head.cluster_scores(flat), temperature)
    return probs.reshape(*h.shape[:-1], head.vocab_size)


def tail_marginal(head, logits: mx.array, scores: mx.array, temperature: float) -> mx.array:
    """The distribution ``[M, V]`` that :func:`sample` draws from, given the logits of every
    slot ``[M, n_clusters * cluster_size]`` (in cluster order, ``-inf`` at padding; a shift per
    row changes nothing) and the stage-1 ``scores`` ``[M, n_clusters]`` it draws with.

    A token of a non-probed cluster ``k`` is drawn with probability ``exp(z / T) / (Z_c + Z_k /
    q_k)`` and a candidate with ``exp(z / T) * sum_k q_k / (Z_c + Z_k / q_k)``, where ``Z_c`` and
    ``Z_k`` are the exact masses of the candidates and of cluster ``k``.
    """
    probes = head.probe(None, scores)
    tail_log_probs = _tail_log_probs(head, scores, probes, temperature)
    probed = mx.isinf(tail_log_probs)
    logits = logits.astype(mx.float32) / temperature
    logits = logits.reshape(*scores.shape, head.cluster_size)
    cluster_mass = mx.logsumexp(logits, axis=-1)
    candidate_mass = mx.logsumexp(mx.where(probed, cluster_mass, -mx.inf), axis=-1, keepdims=True)
    denominator = mx.logaddexp(candidate_mass, cluster_mass - tail_log_probs)
    candidate_factor = mx.where(
        probed.all(axis=-1, keepdims=True),
        -candidate_mass,
        mx.logsumexp(tail_log_probs - denominator, axis=-1, keepdims=True),
    )
    log_weight = mx.where(probed, candidate_factor, -denominator)
    log_probs = (logits + log_weight[..., None]).reshape(scores.shape[0], -1)
    return mx.exp(head.token_order(log_probs))


def fit_mass_bias(
    head,
    hidden_states: mx.array,
    temperatures: Sequence[float] = FIT_TEMPERATURES,
    chunk_size: int = 256,
) -> mx.array:
    """Fit the per-cluster mass offsets ``[2, n_clusters]`` on calibration hidden states.

    At each temperature, ``a_k(T)`` is the mean over the positions where cluster ``k`` is not
    probed (all positions if it always is) of ``logsumexp(z_k / T) - s_k / T``; the two
    coefficients of ``a_k(T) = c0 + c1 / T`` are then fitted by least squares.
    """
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    n_temps, n_clusters = len(temperatures), head.n_clusters
    tail_sum = mx.zeros((n_temps, n_clusters))
    all_sum = mx.zeros((n_temps, n_clusters))
    tail_count = mx.zeros((n_clusters,))
    for start in range(0, hidden_states.shape[0], chunk_size):
        h = hidden_states[start : start + chunk_size]
        scores = head.cluster_scores(h).astype(mx.float32)
        probes = head.probe(h, scores).astype(mx.int32)
        tail = mx.put_along_axis(mx.ones(scores.shape, mx.bool_), probes, mx.array(False), axis=-1)
        logits = head.slot_logits(h).astype(mx.float32).reshape(*scores.shape, head.cluster_size)
        peak = logits.max(axis=-1)
        e = mx.exp(logits - peak[..., None])
        gaps = mx.stack([
            (peak - scores) / t + mx.log(_power(e, 1 / t).sum(axis=-1))
            for t in temperatures
        ])
        tail_sum = tail_sum + mx.where(tail, gaps, 0.0).sum(axis=1)
        all_sum = all_sum + gaps.sum(axis=1)
        tail_count = tail_count + tail.sum(axis=0)
        mx.eval(tail_sum, all_sum, tail_count)
    offsets = mx.where(
        tail_count > 0, tail_sum / mx.maximum(tail_count, 1), all_sum / hidden_states.shape[0]
    )
    design = mx.array([[1.0, 1.0 / t] for t in temperatures])
    return mx.linalg.pinv(design, stream=mx.cpu) @ offsets


def total_variation(p: mx.array, q: mx.array) -> mx.array:
    """Total variation distance ``0.5 * sum |p - q|`` over the last axis."""
    return 0.5 * mx.abs(p - q).sum(axis=-1)
