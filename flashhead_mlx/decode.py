"""When a FlashHead scores sparsely: in decode steps, and nowhere else.

A FlashHead returns the exact dense logits by default, so every scoring path (``mlx_lm.perplexity``,
``mlx_lm.evaluate``, a user's own forward pass) is unchanged whatever the sequence length. It
scores only the probed clusters in a decode step, which it learns of in one of two ways:

- explicitly (the primary route): :mod:`flashhead_mlx.generation`'s ``generate``,
  ``stream_generate``, ``batch_generate`` and ``BatchGenerator`` set the decode context around each
  step of mlx-lm's loops (:func:`in_context`), as :func:`decoding` does for a custom loop;
- as a fallback, for mlx-lm's own functions called directly: the model was called from one of
  mlx-lm's decode loops (``generate_step``, ``speculative_generate_step``, the
  ``BatchGenerator``'s steps), found among the callers' frames, whose sampler and logits
  processors it reads. The fallback never raises: whatever it cannot read (a renamed mlx-lm
  function or variable) gives the exact dense logits, with a warning once.

A step's settings come from attributes first (:mod:`flashhead_mlx.sample_utils`): a sampler's
``temperature`` (``0``: greedy) and a processor's ``biased_tokens`` (scored exactly whatever the
probes); else from mlx-lm's own samplers and processors. A sampler or processor whose settings
cannot be read makes the step dense (what mlx-lm computes without FlashHead), with a warning once.
"""

import contextvars
import functools
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Optional, Sequence

import mlx.core as mx


@dataclass(frozen=True)
class DecodeContext:
    """What a FlashHead needs to know at a decode step.

    ``temperatures``: the sampling temperature of each row (``0.0`` for greedy), or one for all
    rows; ``None`` when not given (the head then returns the candidates' logits only).
    ``extra_tokens``: token ids whose exact logits are always returned.
    ``histories``: in a batch, each row's tokens before the step's inputs (mlx-lm's batch's
    ``tokens``: the tokens in each row's cache, no padding), whose last ones the row scores
    exactly at greedy steps (:mod:`flashhead_mlx.recent`); ``None`` elsewhere.
    ``processors``: whether a row may have logits processors (penalties that push its recent
    tokens down); ``False`` only where the rows' settings were read and have none.
    """

    temperatures: Optional[tuple] = None
    extra_tokens: tuple = ()
    processors: bool = True
    histories: Optional[Sequence[Sequence[int]]] = field(default=None, compare=False, repr=False)


def make_context(
    temperatures: Optional[Sequence[float]] = None, extra_tokens: Iterable[int] = ()
) -> DecodeContext:
    """A :class:`DecodeContext` with its fields normalised (float temperatures, sorted ids)."""
    if temperatures is not None:
        temperatures = tuple(float(t) for t in temperatures)
    return DecodeContext(temperatures, tuple(sorted(set(extra_tokens))))


# Not set: the fallback looks for mlx-lm's decode loops. Set: a DecodeContext, or None (dense).
_UNSET = object()
_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("flashhead_decode", default=_UNSET)


@contextmanager
def in_context(context: Optional[DecodeContext]) -> Iterator[None]:
    """Within this block FlashHeads use ``context``: a decode step's, or ``None`` for the exact
    dense logits, whatever the callers (the fallback is not consulted)."""
    token = _CONTEXT.set(context)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def decoding(temperatures: Optional[Sequence[float]] = None, extra_tokens: Iterable[int] = ()):
    """Within this block, FlashHeads score sparsely (decode steps).

    Args:
        temperatures (sequence of float, optional): the sampling temperature of each row, or a
            single one for all rows; ``0`` is greedy. Default: ``None`` (candidates only).
        extra_tokens (iterable of int): token ids whose exact logits are always returned.
    """
    return in_context(make_context(temperatures, extra_tokens))


def decode_context() -> Optional[DecodeContext]:
    """The current :class:`DecodeContext`: that of the enclosing :func:`in_context` block, else of
    the mlx-lm decode loop that called the model; ``None`` elsewhere (exact scoring)."""
    context = _CONTEXT.get()
    return context if context is not _UNSET else _fallback_context(sys._getframe(1))


# Warnings already given in this process, by kind.
_warned: set = set()


def warn_once(kind: str, message: str) -> None:
    """``warnings.warn(message)`` the first time a warning of ``kind`` comes up in this process."""
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, stacklevel=3)


# What the settings readers and the fallback know of mlx-lm (tests/test_mlx_lm_contract.py
# checks each name against the installed mlx-lm).
# mlx_lm.sample_utils: make_sampler's sampler closes over its temperature.
SAMPLER_CLOSURE = ("make_sampler.<locals>.sampler", "temp")
# make_logits_processors' logit-bias processor closes over the biased token ids.
LOGIT_BIAS_CLOSURE = ("make_logits_processors.<locals>.logit_bias_processor", "indices")
# Its penalty processors only lower logits: no token needs scoring exactly.
PENALTY_PROCESSORS = (
    "make_repetition_penalty.<locals>.repetition_penalty_processor",
    "make_presence_penalty.<locals>.presence_penalty_processor",
    "make_frequency_penalty.<locals>.frequency_penalty_processor",
)
# The locals of generate_step and speculative_generate_step that hold a step's settings.
LOOP_LOCALS = ("sampler", "logits_processors")
# The attributes of a GenerationBatch or PromptProcessingBatch that hold its rows' settings and
# their tokens.
BATCH_ATTRIBUTES = ("uids", "samplers", "fallback_sampler", "logits_processors", "tokens")


def _closure(fn, qualname: str) -> dict:
    """The closure variables of ``fn`` when it is mlx-lm's function ``qualname``, else ``{}``."""
    if (
        getattr(fn, "__qualname__", None) != qualname
        or not getattr(fn, "__module__", "").startswith("mlx_lm.")
        or fn.__closure__ is None
    ):
        return {}
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))


def _mlx_lm_temperature(sampler) -> Optional[float]:
    """The temperature of mlx-lm's ``greedy_sampler`` (0) or of a ``make_sampler`` sampler."""
    sample_utils = sys.modules.get("mlx_lm.sample_utils")
    if sampler is getattr(sample_utils, "greedy_sampler", None):
        return 0.0
    name, variable = SAMPLER_CLOSURE
    return _closure(sampler, name).get(variable)


def sampler_temperature(sampler) -> Optional[float]:
    """The sampling temperature of ``sampler`` (``0``: greedy, also for ``None``): its
    ``temperature`` attribute, else that of mlx-lm's ``greedy_sampler`` or ``make_sampler``;
    ``None``, with a warning once, when it cannot be read."""
    if sampler is None:
        return 0.0
    temperature = getattr(sampler, "temperature", None)
    if temperature is None:
        temperature = _mlx_lm_temperature(sampler)
    if temperature is None:
        warn_once(
            "sampler",
            f"FlashHead cannot read the temperature of the sampler {sampler!r}: decode steps "
            "with it get the dense logits (make it with flashhead_mlx.make_sampler, or give it "
            "a `temperature` attribute, 0 for greedy)",
        )
    return temperature


def _mlx_lm_biased_tokens(processor) -> Optional[tuple]:
    """The token ids biased by one of mlx-lm's logits processors (none for its penalties)."""
    if getattr(processor, "__qualname__", None) in PENALTY_PROCESSORS:
        return ()
    name, variable = LOGIT_BIAS_CLOSURE
    indices = _closure(processor, name).get(variable)
    return None if indices is None else tuple(indices.tolist())


def biased_tokens(processor) -> Optional[tuple]:
    """The token ids whose logits ``processor`` may raise: its ``biased_tokens`` attribute, else
    read from mlx-lm's logit-bias processor (none for its penalties); ``None``, with a warning
    once, when they cannot be read."""
    tokens = getattr(processor, "biased_tokens", None)
    if tokens is None:
        tokens = _mlx_lm_biased_tokens(processor)
    if tokens is None:
        warn_once(
            "processor",
            f"FlashHead cannot tell which tokens the logits processor {processor!r} raises: "
            "decode steps with it get the dense logits (make it with "
            "flashhead_mlx.make_logits_processors, or give it a `biased_tokens` attribute)",
        )
    return tokens


def settings_context(samplers: Sequence, processors: Sequence) -> Optional[DecodeContext]:
    """The decode context of rows with these samplers and lists of logits processors (one of
    each per row); ``None`` (the dense logits) when a setting cannot be read."""
    temperatures = [sampler_temperature(s) for s in samplers]
    tokens = [biased_tokens(p) for row in processors for p in row or ()]
    if None in temperatures or None in tokens:
        return None
    context = make_context(temperatures, [t for row in tokens for t in row])
    return replace(context, processors=any(processors))


def batch_context(batch) -> Optional[DecodeContext]:
    """The decode context of the rows of mlx-lm's ``GenerationBatch`` or
    ``PromptProcessingBatch`` at a decode step: each row's sampler (the batch's fallback when it
    has none), logits processors and tokens in its cache (the batch's ``tokens``, read as they
    are when the model is called)."""
    rows = len(batch.uids)
    samplers = [batch.fallback_sampler if s is None else s for s in batch.samplers or [None] * rows]
    context = settings_context(samplers, batch.logits_processors or [()] * rows)
    return context and replace(context, histories=batch.tokens)


def _loop_context(local: dict) -> Optional[DecodeContext]:
    """Decode settings of a ``generate_step`` or ``speculative_generate_step`` frame."""
    sampler, processors = (local[name] for name in LOOP_LOCALS)
    return settings_context([sampler], [processors])


# mlx-lm's decode loops (paths in ``mlx_lm.generate``), each with the reader of its frame's
# settings. ``PromptProcessingBatch.prompt`` (batched prefill) is there too: its logits are never
# read, so it gets the cheap sparse pass instead of the dense one.
MLX_LM_LOOPS = {
    "generate_step": _loop_context,
    "speculative_generate_step": _loop_context,
    "GenerationBatch._step": lambda local: batch_context(local["self"]),
    "PromptProcessingBatch.prompt": lambda local: make_context(),
}


def resolve(module, path: str):
    """The object at the dotted ``path`` in ``module``, or ``None`` when a name is missing."""
    return functools.reduce(lambda obj, name: getattr(obj, name, None), path.split("."), module)


def _loop_readers(generate) -> dict:
    """The code objects of mlx-lm's decode loops in the module ``generate``, with their readers;
    missing loops are left out, with a warning once."""
    readers, missing = {}, []
    for path, reader in MLX_LM_LOOPS.items():
        code = getattr(resolve(generate, path), "__code__", None)
        if code is None:
            missing.append(f"mlx_lm.generate.{path}")
        else:
            readers[code] = reader
    if missing:
        warn_once(
            "loops",
            f"FlashHead does not find {', '.join(missing)} in this mlx-lm: those decode loops, "
            "called directly, get the dense logits (flashhead_mlx.generate, stream_generate and "
            "batch_generate do not depend on them)",
        )
    return readers


def _fallback_context(frame, depth: int = 16) -> Optional[DecodeContext]:
    """The decode context of the mlx-lm decode loop among the ``depth`` callers of ``frame``;
    ``None`` (exact scoring) elsewhere and whenever the loop cannot be read. Never raises."""
    generate = sys.modules.get("mlx_lm.generate")
    if generate is None:
        return None
    try:
        readers = _loop_readers(generate)
        for _ in range(depth):
            if frame is None:
                return None
            reader = readers.get(frame.f_code)
            if reader is not None:
                return reader(frame.f_locals)
            frame = frame.f_back
    except Exception as error:  # an mlx-lm that changed: exact scoring, never a failed step
        warn_once(
            "fallback",
            f"FlashHead cannot read the settings of mlx-lm's decode loop ({error!r}): its steps "
            "get the dense logits (flashhead_mlx.generate, stream_generate and batch_generate "
            "do not depend on it)",
        )
    return None


def temperature_array(temperatures: tuple, rows: int) -> mx.array:
    """Per-row temperatures ``[rows, 1]`` from a :class:`DecodeContext`'s temperatures."""
    values = temperatures * rows if len(temperatures) == 1 else temperatures
    if len(values) != rows:
        raise ValueError(f"{len(values)} sampling temperatures for {rows} rows")
    return mx.array(values, mx.float32)[:, None]
