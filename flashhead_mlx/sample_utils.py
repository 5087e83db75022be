"""mlx-lm's samplers and logits processors, carrying their settings as attributes.

:func:`make_sampler` and :func:`make_logits_processors` take mlx-lm's arguments and return
mlx-lm's own sampler and processors, wrapped so that a FlashHead reads a decode step's settings
from attributes, never from closures: a sampler's ``temperature`` (``0``: greedy) and a
processor's ``biased_tokens`` (token ids whose logits it may raise, which the head then scores
exactly whatever its probes). A custom sampler or processor can carry the same attributes.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
from mlx_lm import sample_utils


@dataclass(frozen=True)
class Sampler:
    """mlx-lm's sampler of these settings (see :func:`make_sampler`): a callable from
    log-probabilities ``[..., V]`` to tokens."""

    temperature: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    xtc_special_tokens: Tuple[int, ...] = ()
    sample: Callable = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        sample = sample_utils.make_sampler(
            self.temperature,
            self.top_p,
            self.min_p,
            self.min_tokens_to_keep,
            top_k=self.top_k,
            xtc_probability=self.xtc_probability,
            xtc_threshold=self.xtc_threshold,
            xtc_special_tokens=list(self.xtc_special_tokens),
        )
        object.__setattr__(self, "sample", sample)

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self.sample(logprobs)


@dataclass(frozen=True)
class LogitsProcessor:
    """One of mlx-lm's logits processors, ``(tokens, logits) -> logits``, with the token ids
    whose logits it may raise (``biased_tokens``; none for the penalties)."""

    process: Callable[[mx.array, mx.array], mx.array]
    biased_tokens: Tuple[int, ...] = ()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        return self.process(tokens, logits)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.1,
    xtc_special_tokens: Optional[List[int]] = None,
) -> Sampler:
    """``mlx_lm.sample_utils.make_sampler``, its settings kept as the sampler's attributes.

    Args:
        temp (float): The temperature for sampling, if 0 the argmax is used. Default: ``0``.
        top_p, min_p, min_tokens_to_keep, top_k, xtc_probability, xtc_threshold,
        xtc_special_tokens: as mlx-lm's ``make_sampler``.

    Returns:
        Sampler: A sampler which takes log-probabilities and returns tokens.
    """
    return Sampler(
        temp,
        top_p,
        min_p,
        min_tokens_to_keep,
        top_k,
        xtc_probability,
        xtc_threshold,
        tuple(xtc_special_tokens or ()),
    )


def make_logits_processors(
    logit_bias: Optional[Dict[int, float]] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: Optional[int] = 20,
    presence_penalty: Optional[float] = None,
    presence_context_size: Optional[int] = 20,
    frequency_penalty: Optional[float] = None,
    frequency_context_size: Optional[int] = 20,
) -> List[LogitsProcessor]:
    """``mlx_lm.sample_utils.make_logits_processors``: the logit bias first, then the penalties,
    each a :class:`LogitsProcessor` (the bias's ``biased_tokens`` are ``logit_bias``'s keys).

    Args: as mlx-lm's ``make_logits_processors``.

    Returns:
        List[LogitsProcessor]: callables which take an array of tokens and an array of logits
        and return the updated logits.
    """
    bias = sample_utils.make_logits_processors(logit_bias)
    penalties = sample_utils.make_logits_processors(
        None,
        repetition_penalty,
        repetition_context_size,
        presence_penalty,
        presence_context_size,
        frequency_penalty,
        frequency_context_size,
    )
    return [LogitsProcessor(p, tuple(int(t) for t in logit_bias)) for p in bias] + [
        LogitsProcessor(p) for p in penalties
    ]
