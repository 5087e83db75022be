"""What a model does to its head's output before returning it: an elementwise, increasing
transform that FlashHead applies itself (the model's own copy would turn the ``-inf`` of the
tokens FlashHead does not score into finite numbers: ``tanh(-inf) * c = -c``)."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

KINDS = ("softcap", "multiply", "divide")


@dataclass(frozen=True)
class Transform:
    """``kind`` with constant ``value``: ``"softcap"`` ``tanh(x / c) * c`` (gemma2, gemma3n,
    gemma4), ``"multiply"`` ``x * c`` (Cohere's ``logit_scale``), ``"divide"`` ``x / c``
    (Granite's ``logits_scaling``); the operations in the models' own order, so that a FlashHead
    applying it gives the model's logits bit for bit."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown logit transform {self.kind!r} (known: {', '.join(KINDS)})")
        if not self.value > 0:
            raise ValueError(f"the {self.kind} constant must be > 0, got {self.value}")

    def __call__(self, logits: mx.array) -> mx.array:
        c = self.value
        if self.kind == "softcap":
            return mx.tanh(logits / c) * c
        return logits * c if self.kind == "multiply" else logits / c

    def __str__(self) -> str:
        if self.kind == "softcap":
            return f"softcap tanh(x / {self.value:g}) * {self.value:g}"
        return f"x {'*' if self.kind == 'multiply' else '/'} {self.value:g}"


def apply(transform: Optional[Transform], logits: mx.array) -> mx.array:
    """``transform(logits)``, or ``logits`` when there is none."""
    return logits if transform is None else transform(logits)


def softcap(value: Optional[float]) -> Optional[Transform]:
    """The softcap ``tanh(x / value) * value``, or ``None`` when ``value`` is ``None``."""
    return None if value is None else Transform("softcap", value)
