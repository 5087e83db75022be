"""The context's recent tokens, scored exactly at every greedy decode step.

A model often emits a token it has just read or written (a name from the prompt, an identifier in
code, a word of another language), and such tokens are FlashHead's most frequent misses: their
clusters rank low in stage 1 although the token is obvious from the context. So each row also
scores the last :data:`RECENT_TOKENS` tokens of its own context exactly (docs/clustering.md,
"Levers"). Scoring more tokens exactly can only add exact logits: it never changes a token that
FlashHead would pick without it, except to the dense one.

The model learns the tokens from its own inputs: while a FlashHead is installed, the language
model's class has :class:`RecentTokensModel` mixed in, which sets each position's last tokens for
the head during the forward pass. A single sequence keeps its last tokens on its KV cache (so the
prompt's tail, every decoded token and nothing of other sequences). Each position sees the tokens
up to itself only, and a cache trimmed back (speculative decoding's rejected drafts, verified
decoding's rollbacks) drops the trimmed tokens: a sequence's output does not depend on how its
tokens were split into forward passes. Without a cache the inputs themselves are the context.

A batch (``BatchGenerator``, ``batch_generate``, a server's concurrent requests) keeps nothing on
its cache, whose rows mlx-lm merges, filters, extends and pads: each row reads its tokens from
mlx-lm's own record of them, the batch's ``tokens`` (one list per row of the tokens in that row's
cache, which mlx-lm filters, extends and splits with the cache rows, and which holds no padding),
given to the decode step with its settings (:attr:`flashhead_mlx.decode.DecodeContext.histories`).
So a batch row scores the recent tokens its prompt alone would. A row given a prompt cache
without the cache's tokens (``batch_generate``'s ``prompt_caches``) sees only the tokens after it
(mlx-lm's server gives them).

Hybrid models (qwen3_5, lfm2, mamba, ...) keep a single sequence's history on their first cache
entry too, an ``ArraysCache`` without an offset: mlx-lm never trims such a cache (no speculative
decoding, no prompt-cache trim), and FlashHead's verified decoding puts back the
history of the step it rolls back to (:func:`flashhead_mlx.verified.roll_back`).

With ``kv_bits``, mlx-lm replaces a cache that reaches ``quantized_kv_start`` by a new
``QuantizedKVCache``; FlashHead's generate functions quantize through
:func:`quantize_kv_cache`, which moves the history onto the replacement.
"""

import contextvars
import importlib
import inspect
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from .decode import decode_context

MLX_GENERATE = importlib.import_module("mlx_lm.generate")  # ``mlx_lm.generate`` is a function
# Tokens of each row's context scored exactly per decode step (the cost of RECENT_TOKENS rows).
RECENT_TOKENS = 128
# The attribute of a sequence's first cache entry that holds its recent tokens and the cache
# offset after the last of them.
CACHE_ATTRIBUTE = "flashhead_recent_tokens"
# Tokens kept beyond the window, for caches trimmed back by up to this many tokens.
HISTORY_SLACK = 64

_RECENT: contextvars.ContextVar = contextvars.ContextVar("flashhead_recent", default=None)
# Set while a forward pass only reads hidden states: its tokens are not tracked.
_UNTRACKED: contextvars.ContextVar = contextvars.ContextVar("flashhead_untracked", default=False)


def recent_tokens() -> Optional[mx.array]:
    """The recent tokens ``[B, L, R]`` (int32, -1 where a context is shorter) of each position
    of the forward pass in progress, or ``None`` outside one."""
    return _RECENT.get()


@contextmanager
def reading(tokens: Optional[mx.array]) -> Iterator[None]:
    """Within this block the head reads ``tokens`` (``[B, L, R]``) as the positions' recent
    tokens."""
    token = _RECENT.set(tokens)
    try:
        yield
    finally:
        _RECENT.reset(token)


@contextmanager
def untracked() -> Iterator[None]:
    """Within this block forward passes leave their caches' token histories alone (a pass run
    for its hidden states: :func:`flashhead_mlx.model_head.final_hidden_states`)."""
    token = _UNTRACKED.set(True)
    try:
        yield
    finally:
        _UNTRACKED.reset(token)


def windows(sequence: mx.array, length: int, size: int) -> mx.array:
    """For each of the last ``length`` positions of ``sequence`` ``[B, H]``, the ``size``
    tokens up to and including it ``[B, length, size]`` (-1 before the start): causal, so a
    position never sees a later input of the same forward pass."""
    end = sequence.shape[1] - length + 1 + mx.arange(length)[:, None]  # one past each position
    index = end - size + mx.arange(size)
    tokens = mx.take(sequence, mx.maximum(index, 0).reshape(-1), axis=1)
    return mx.where(index >= 0, tokens.reshape(sequence.shape[0], length, size), -1)


def trimmed(history: mx.array, kept: int, end: Optional[int], offset) -> mx.array:
    """``history`` ``[B, H]``, whose last token was at cache offset ``end``, without the tokens
    a cache trim removed since (now at ``offset``: speculative decoding's rejected drafts,
    verified decoding's rollbacks); unchanged where the offsets are unknown or arrays."""
    if not (isinstance(end, int) and isinstance(offset, int)) or offset >= end:
        return history
    removed = min(end - offset, history.shape[1])
    gap = mx.full((history.shape[0], removed), -1, dtype=history.dtype)
    return mx.concatenate([gap, history[:, : history.shape[1] - removed]], axis=1)[:, -kept:]


def track(cache, inputs: mx.array, size: int) -> mx.array:
    """Each input position's last ``size`` tokens ``[B, L, size]``, from the history kept on
    ``cache``'s first entry (then updated with ``inputs`` ``[B, L]`` for the next call)."""
    first = cache[0] if cache else None
    kept = size + HISTORY_SLACK
    history, end = getattr(first, CACHE_ATTRIBUTE, (None, None))
    offset = getattr(first, "offset", None)
    inputs = inputs.reshape(-1, inputs.shape[-1]).astype(mx.int32)
    if history is None or history.shape != (inputs.shape[0], kept):  # new, or other rows
        history = mx.full((inputs.shape[0], kept), -1, dtype=mx.int32)
    else:
        history = trimmed(history, kept, end, offset)
    sequence = mx.concatenate([history, inputs], axis=1)
    if first is not None:
        end = offset + inputs.shape[1] if isinstance(offset, int) else None
        try:
            setattr(first, CACHE_ATTRIBUTE, (sequence[:, -kept:], end))
        except AttributeError:  # a cache that takes no attributes: no history across calls
            pass
    return windows(sequence, inputs.shape[1], size)


def quantize_kv_cache(prompt_cache, quantized_kv_start: int, kv_group_size: int,
                      kv_bits: Optional[int]) -> None:
    """mlx-lm's ``maybe_quantize_kv_cache`` (``kv_bits``: each cache that reached
    ``quantized_kv_start`` replaced by a new ``QuantizedKVCache``), the sequence's history
    carried over to the first entry's replacement, where it would otherwise restart empty."""
    first = prompt_cache[0] if prompt_cache else None
    history = getattr(first, CACHE_ATTRIBUTE, None)
    MLX_GENERATE.maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits)
    if history is not None and prompt_cache[0] is not first:
        setattr(prompt_cache[0], CACHE_ATTRIBUTE, history)


def batched(cache) -> bool:
    """Whether ``cache`` is a batch's (mlx-lm's ``BatchKVCache`` and kin, whose offsets are
    per-row arrays; a hybrid model's ``ArraysCache`` with per-row padding): mlx-lm merges,
    filters and extends its rows, so its rows' tokens come from the batch
    (:func:`batch_windows`), not from the cache."""
    return any(
        not isinstance(getattr(c, "offset", 0), int) or getattr(c, "left_padding", None) is not None
        for c in cache or ()
    )


def batch_windows(histories: Sequence[Sequence[int]], inputs: mx.array, size: int) -> mx.array:
    """Each input position's last ``size`` tokens ``[B, L, size]`` (-1 where a context is
    shorter) in a batch whose row ``b`` holds the tokens ``histories[b]`` before its inputs
    ``inputs[b]`` (``inputs`` ``[B, L]``; ``size`` > 0)."""
    inputs = inputs.reshape(-1, inputs.shape[-1]).astype(mx.int32)
    before = np.full((len(histories), size), -1, dtype=np.int32)
    for row, history in zip(before, histories):
        tail = history[-size:]
        if len(tail):
            row[size - len(tail) :] = tail
    sequence = mx.concatenate([mx.array(before), inputs], axis=1)
    return windows(sequence, inputs.shape[1], size)


def batch_histories(rows: int) -> Optional[Sequence[Sequence[int]]]:
    """The tokens before this decode step's inputs of each of the ``rows`` rows of a batch
    (:attr:`flashhead_mlx.decode.DecodeContext.histories`), or ``None`` outside a batch's decode
    step."""
    histories = getattr(decode_context(), "histories", None)
    return histories if histories is not None and len(histories) == rows else None


class RecentTokensModel:
    """Mixed into the language model's class while a FlashHead is installed: each forward pass
    sets its rows' last tokens (as many as the head's ``recent_tokens``) for the head: a single
    sequence's from its cache (:func:`track`), a batch's decode step's from the batch
    (:func:`batch_windows`). The mixed class sets ``flashhead_head``, the FlashHead."""

    def __call__(self, inputs: mx.array, *args, **kwargs):
        size = type(self).flashhead_head.recent_tokens
        untracked = (
            _UNTRACKED.get() or inputs is None or not mx.issubdtype(inputs.dtype, mx.integer)
        )
        if size == 0 or untracked:
            return super().__call__(inputs, *args, **kwargs)
        cache = cache_argument(type(self).flashhead_original, inputs, args, kwargs)
        if batched(cache):
            histories = batch_histories(inputs.reshape(-1, inputs.shape[-1]).shape[0])
            if histories is None:  # a batch's prefill, or a loop that gives no rows' tokens
                return super().__call__(inputs, *args, **kwargs)
            tokens = batch_windows(histories, inputs, size)
        else:
            tokens = track(cache, inputs, size)
        with reading(tokens):
            return super().__call__(inputs, *args, **kwargs)


def cache_argument(model_class: type, inputs: mx.array, args: tuple, kwargs: dict):
    """The ``cache`` argument of a call of ``model_class`` (positional or not: minimax's
    second parameter is ``mask``)."""
    if "cache" in kwargs:
        return kwargs["cache"]
    signature = inspect.signature(model_class.__call__)
    return signature.bind_partial(None, inputs, *args).arguments.get("cache")
