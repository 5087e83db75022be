"""Speculative sampling against mlx-lm's sampler: a FlashHead proposal checked by the dense head.

At a position, a token ``x`` drawn from a proposal ``q`` is kept with probability
``min(1, p(x) / q(x))``, else replaced by a draw from ``normalize(max(0, p - q))``: the kept or
replaced token follows the target ``p`` exactly, whatever ``q`` (Leviathan et al., Chen et al.,
2023). The target is mlx-lm's sampler on the dense log-probabilities (:func:`sampler_logits`),
and verified decoding (:mod:`flashhead_mlx.verified`) proposes with one of two ``q``:

- ``"tail"``: FlashHead's full-vocabulary sampler (:func:`flashhead_mlx.sampling.sample`), whose
  exact distribution (:func:`flashhead_mlx.sampling.tail_marginal`) follows from the dense slot
  logits and the stage-1 scores the draw used. Temperature-only samplers without logits
  processors, on a head with ``mass_bias``.
- ``"candidates"``: mlx-lm's sampler on FlashHead's candidates (and the processors' biased
  tokens) alone, its logits kept from the draw. Any sampler settings and processors.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, apply_xtc

from .decode import sampler_temperature
from .sample_utils import Sampler
from .sampling import tail_marginal


def sampler_settings(sampler) -> Optional[Sampler]:
    """The settings of a sampler for verified decoding: ``None`` for greedy (temperature ``0``),
    the :class:`~flashhead_mlx.sample_utils.Sampler` itself when it samples; a ``ValueError``
    for any other sampler (its transforms cannot be read)."""
    temperature = sampler_temperature(sampler)
    if temperature == 0:
        return None
    if not isinstance(sampler, Sampler):
        raise ValueError(
            f"FlashHead's verified sampling needs the sampler's settings, and {sampler!r} "
            "does not carry them: make it with flashhead_mlx.make_sampler (or pass "
            "flashhead_verify=0 to sample unverified)"
        )
    return sampler


def proposal_kind(head, settings: Sampler, processors: Optional[list]) -> str:
    """``"tail"`` (FlashHead's full-vocabulary sampler) for a temperature-only sampler without
    processors on a head with ``mass_bias``, else ``"candidates"`` (see the module's text)."""
    temperature_only = not (
        0 < settings.top_p < 1 or settings.min_p or settings.xtc_probability or settings.top_k
    )
    tail = temperature_only and not processors and head.mass_bias is not None
    return "tail" if tail else "candidates"


def sampler_logits(settings: Sampler, logprobs: mx.array, xtc: mx.array) -> mx.array:
    """The logits ``[n, V]`` whose softmax mlx-lm's sampler of ``settings`` samples from, given
    log-probabilities ``[n, V]``: top-p, min-p, XTC where ``xtc`` ``[n, 1]`` is true (the coin
    mlx-lm tosses at each call, tossed once per position for both heads), top-k, temperature."""
    if 0 < settings.top_p < 1:
        logprobs = apply_top_p(logprobs, settings.top_p)
    if settings.min_p:
        logprobs = apply_min_p(logprobs, settings.min_p, settings.min_tokens_to_keep)
    if settings.xtc_probability > 0:
        excluded = apply_xtc(  # probability 1: always applied, the coin is ours
            logprobs, 1.0, settings.xtc_threshold, list(settings.xtc_special_tokens)
        )
        logprobs = mx.where(xtc, excluded, logprobs)
    if settings.top_k > 0:
        logprobs = apply_top_k(logprobs, settings.top_k)
    return logprobs * (1.0 / settings.temperature)


def tail_distribution(head, logprobs: mx.array, scores: mx.array, temperature: float) -> mx.array:
    """The ``"tail"`` proposal's probabilities ``[n, V]``: the distribution of FlashHead's
    full-vocabulary sampler at ``temperature`` that drew with the stage-1 ``scores``
    ``[n, n_clusters]``, given the dense log-probabilities ``[n, V]``."""
    order = head.order
    slots = mx.where(order >= 0, mx.take(logprobs, mx.maximum(order, 0), axis=-1), -mx.inf)
    return tail_marginal(head, slots, scores, temperature)


def xtc_coins(settings: Sampler, n: int) -> mx.array:
    """Whether XTC applies at each of ``n`` positions ``[n, 1]``, as mlx-lm's coin decides it."""
    return mx.random.uniform(shape=(n, 1)) <= settings.xtc_probability


def accept(p: mx.array, q: mx.array, proposed: mx.array) -> mx.array:
    """The token ``[n]`` speculative sampling keeps at each position: ``proposed[i]`` (drawn
    from ``q``) with probability ``min(1, p / q)``, else a draw from ``normalize(max(0, p -
    q))``. ``p`` and ``q``: probabilities ``[n, V]``, or ``[1, V]`` shared by all positions."""
    rows, n = p.shape[0], proposed.size
    p_x = mx.take_along_axis(p, proposed.reshape(rows, -1), axis=-1).reshape(-1)
    q_x = mx.take_along_axis(q, proposed.reshape(rows, -1), axis=-1).reshape(-1)
    kept = mx.random.uniform(shape=(n,)) * q_x < p_x
    residual = mx.maximum(p - q, 0.0)
    # All zero only where p == q up to rounding, where nothing is rejected: then p itself.
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p)
    replaced = mx.random.categorical(mx.log(residual), num_samples=n // rows).reshape(-1)
    return mx.where(kept, proposed.reshape(-1), replaced.astype(proposed.dtype))
