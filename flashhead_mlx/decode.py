"""When a FlashHead scores sparsely: in decode steps, and nowhere else.

A FlashHead returns the exact dense logits by default, so every scoring path (``mlx_lm.perplexity``,
``mlx_lm.evaluate``, a user's own forward pass) is unchanged whatever the sequence length. It
scores only the probed clusters in a decode step: inside :func:`decoding` (for a custom decode
loop), or when the model was called from one of mlx-lm's decode loops (``generate_step``,
``speculative_generate_step``, the ``BatchGenerator``'s steps), found among the callers' frames,
whatever the import order and without patching mlx-lm. From those frames the head also reads the
sampling temperature of each row (of samplers made by mlx-lm's ``make_sampler``) and the token ids
a ``logit_bias`` processor raises (scored exactly whatever the probes).
"""

import contextvars
import functools
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import mlx.core as mx


@dataclass(frozen=True)
class DecodeContext:
    """What a FlashHead needs to know at a decode step.

    ``temperatures``: the sampling temperature of each row (``0.0`` for greedy), or one for all
    rows; ``None`` when unknown (the head then returns the candidates' logits only).
    ``extra_tokens``: token ids whose exact logits are always returned.
    """

    temperatures: Optional[tuple] = None
    extra_tokens: tuple = ()


def make_context(
    temperatures: Optional[Sequence[float]] = None, extra_tokens: Iterable[int] = ()
) -> DecodeContext:
    """A :class:`DecodeContext` with its fields normalised (float temperatures, sorted ids)."""
    if temperatures is not None:
        temperatures = tuple(float(t) for t in temperatures)
    return DecodeContext(temperatures, tuple(sorted(set(extra_tokens))))


_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("flashhead_decode", default=None)


@contextmanager
def decoding(temperatures: Optional[Sequence[float]] = None, extra_tokens: Iterable[int] = ()):
    """Within this block, FlashHeads score sparsely (decode steps).

    Args:
        temperatures (sequence of float, optional): the sampling temperature of each row, or a
            single one for all rows; ``0`` is greedy. Default: ``None`` (candidates only).
        extra_tokens (iterable of int): token ids whose exact logits are always returned.
    """
    token = _CONTEXT.set(make_context(temperatures, extra_tokens))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def decode_context() -> Optional[DecodeContext]:
    """The current :class:`DecodeContext`: that of the enclosing :func:`decoding` block, or of the
    mlx-lm decode loop that called the model; ``None`` elsewhere (exact scoring)."""
    context = _CONTEXT.get()
    return context if context is not None else _mlx_lm_context(sys._getframe(1))


def _closure(fn, qualname: str) -> dict:
    """The closure variables of ``fn`` when it is the mlx-lm function ``qualname``, else ``{}``."""
    if getattr(fn, "__qualname__", None) != qualname or fn.__closure__ is None:
        return {}
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))


def _temperature(sampler) -> Optional[float]:
    """The temperature of a sampler made by mlx-lm's ``make_sampler`` (greedy: 0), else None."""
    from mlx_lm.sample_utils import greedy_sampler

    if sampler is None or sampler is greedy_sampler:
        return 0.0
    return _closure(sampler, "make_sampler.<locals>.sampler").get("temp")


def _biased_tokens(processors) -> list:
    """The token ids raised by mlx-lm's ``logit_bias`` processors among ``processors``."""
    qualname = "make_logits_processors.<locals>.logit_bias_processor"
    found = [_closure(p, qualname).get("indices") for p in processors or ()]
    return [t for indices in found if indices is not None for t in indices.tolist()]


def _context_of(samplers: list, processors: list) -> DecodeContext:
    """The decode context of rows with these samplers and processor lists."""
    temperatures = [_temperature(s) for s in samplers]
    return make_context(
        None if None in temperatures else temperatures,
        [t for row in processors for t in _biased_tokens(row)],
    )


def _loop_context(local: dict) -> DecodeContext:
    """Decode settings of a ``generate_step`` or ``speculative_generate_step`` frame."""
    return _context_of([local.get("sampler")], [local.get("logits_processors")])


def _batch_context(local: dict) -> DecodeContext:
    """Decode settings of a ``GenerationBatch._step`` frame: one sampler per row."""
    batch = local["self"]
    n = len(batch.uids)
    samplers = [batch.fallback_sampler if s is None else s for s in batch.samplers or [None] * n]
    return _context_of(samplers, batch.logits_processors or [()] * n)


@functools.lru_cache
def _decode_frames(generate) -> dict:
    """The code objects of mlx-lm's decode loops, each with the reader of its settings.

    ``PromptProcessingBatch.prompt`` (batched prefill) is there too: its logits are never read,
    so it gets the cheap sparse pass instead of the dense one.
    """
    return {
        generate.generate_step.__code__: _loop_context,
        generate.speculative_generate_step.__code__: _loop_context,
        generate.GenerationBatch._step.__code__: _batch_context,
        generate.PromptProcessingBatch.prompt.__code__: lambda local: make_context(),
    }


def _mlx_lm_context(frame, depth: int = 16) -> Optional[DecodeContext]:
    """The decode context of the mlx-lm decode loop among the ``depth`` callers of ``frame``."""
    generate = sys.modules.get("mlx_lm.generate")
    if generate is None:
        return None
    readers = _decode_frames(generate)
    for _ in range(depth):
        if frame is None:
            return None
        reader = readers.get(frame.f_code)
        if reader is not None:
            return reader(frame.f_locals)
        frame = frame.f_back
    return None


def temperature_array(temperatures: tuple, rows: int) -> mx.array:
    """Per-row temperatures ``[rows, 1]`` from a :class:`DecodeContext`'s temperatures."""
    values = temperatures * rows if len(temperatures) == 1 else temperatures
    if len(values) != rows:
        raise ValueError(f"{len(values)} sampling temperatures for {rows} rows")
    return mx.array(values, mx.float32)[:, None]
