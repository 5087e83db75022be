"""A FlashHead model's forward pass returns the head's own logits at decode steps.

The model's forward pass applies its post-head transform (a softcap, a scale) to whatever the
head returns, and a transform of FlashHead's ``-inf`` need not stay ``-inf`` (``tanh(-inf) * c =
-c``). So within the forward pass of a model carrying :class:`HeadOutputModel`, the FlashHead
returns the dense head module's own output (which the model transforms as it always did, and
which nothing evaluates at a decode step) and, at a decode step, sets aside its sparse logits,
transform applied; the forward pass then returns those of the head's last call in place of the
model's. Earlier calls of the head module are the body's own uses of a tied embedding
(gemma4_text's ``embed_tokens.as_linear``), which get the dense output.
"""

import contextvars
from contextlib import contextmanager
from typing import Iterator, List, Optional

import mlx.core as mx

_OUTPUTS: contextvars.ContextVar = contextvars.ContextVar("flashhead_outputs", default=None)


def head_outputs() -> Optional[List[mx.array]]:
    """The list the FlashHead appends its decode-step logits to within a FlashHead model's
    forward pass, or ``None`` outside one."""
    return _OUTPUTS.get()


@contextmanager
def collecting() -> Iterator[List[mx.array]]:
    """Within this block the FlashHead's decode-step logits are appended to the list yielded."""
    outputs: List[mx.array] = []
    token = _OUTPUTS.set(outputs)
    try:
        yield outputs
    finally:
        _OUTPUTS.reset(token)


class HeadOutputModel:
    """Mixed into the class of the model a FlashHead is installed on: a decode step returns the
    logits of the head's last call (transform applied by the head) in place of the model's."""

    def __call__(self, *args, **kwargs):
        with collecting() as outputs:
            result = super().__call__(*args, **kwargs)
        return outputs[-1] if outputs else result
