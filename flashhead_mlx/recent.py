"""The context's recent tokens, scored exactly at every greedy decode step.

A model often emits a token it has just read or written (a name from the prompt, an identifier in
code, a word of another language), and such tokens are FlashHead's most frequent misses: their
clusters rank low in stage 1 although the token is obvious from the context. So each row also
scores the last :data:`RECENT_TOKENS` tokens of its own context exactly (docs/clustering.md,
"Levers"). Scoring more tokens exactly can only add exact logits: it never changes a token that
FlashHead would pick without it, except to the dense one.

The model learns the tokens from its own inputs: while a FlashHead is installed, the language
model's class has :class:`RecentTokensModel` mixed in, which keeps each sequence's last tokens on
its KV cache (so the prompt's tail, every decoded token and nothing of other sequences) and sets
them for the head during the forward pass. A cache whose rows change (a batch that drops or adds
rows) starts again from the current inputs. Without a cache the inputs themselves are the context.
"""

import contextvars
from contextlib import contextmanager
from typing import Iterator, Optional

import mlx.core as mx

# Tokens of each row's context scored exactly per decode step (the cost of RECENT_TOKENS rows).
RECENT_TOKENS = 128
# The attribute of a sequence's first cache entry that holds its recent tokens.
CACHE_ATTRIBUTE = "flashhead_recent_tokens"

_RECENT: contextvars.ContextVar = contextvars.ContextVar("flashhead_recent", default=None)


def recent_tokens() -> Optional[mx.array]:
    """The recent tokens ``[B, R]`` (int32, -1 where a context is shorter) of the forward pass
    in progress, or ``None`` outside one."""
    return _RECENT.get()


@contextmanager
def reading(tokens: Optional[mx.array]) -> Iterator[None]:
    """Within this block the head reads ``tokens`` (``[B, R]``) as the rows' recent tokens."""
    token = _RECENT.set(tokens)
    try:
        yield
    finally:
        _RECENT.reset(token)


def updated(previous: Optional[mx.array], inputs: mx.array, size: int) -> mx.array:
    """The last ``size`` tokens ``[B, size]`` of ``previous`` followed by ``inputs`` ``[B, L]``;
    ``previous`` is ignored when absent or of other rows. No host synchronisation."""
    inputs = inputs.reshape(-1, inputs.shape[-1]).astype(mx.int32)
    if previous is None or previous.shape[0] != inputs.shape[0] or previous.shape[1] != size:
        previous = mx.full((inputs.shape[0], size), -1, dtype=mx.int32)
    return mx.concatenate([previous, inputs], axis=1)[:, -size:]


def track(cache, inputs: mx.array, size: int) -> mx.array:
    """The recent tokens after ``inputs``, kept on ``cache``'s first entry for the next call."""
    first = cache[0] if cache else None
    tokens = updated(getattr(first, CACHE_ATTRIBUTE, None), inputs, size)
    if first is not None:
        try:
            setattr(first, CACHE_ATTRIBUTE, tokens)
        except AttributeError:  # a cache that takes no attributes: no history across calls
            pass
    return tokens


class RecentTokensModel:
    """Mixed into the language model's class while a FlashHead is installed: each forward pass
    sets its rows' last tokens (:func:`track`, as many as the head's ``recent_tokens``) for the
    head. The mixed class sets ``flashhead_head``, the FlashHead."""

    def __call__(self, inputs: mx.array, cache=None, *args, **kwargs):
        size = type(self).flashhead_head.recent_tokens
        if size == 0 or inputs.ndim == 0 or not mx.issubdtype(inputs.dtype, mx.integer):
            return super().__call__(inputs, cache, *args, **kwargs)
        with reading(track(cache, inputs, size)):
            return super().__call__(inputs, cache, *args, **kwargs)
