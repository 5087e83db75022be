"""FlashHead for MLX: a training-free two-stage retrieval head for language models.

``load``, ``generate``, ``stream_generate``, ``batch_generate``, ``make_sampler`` and
``make_logits_processors`` mirror mlx-lm's (``from flashhead_mlx import ...`` in place of
``from mlx_lm import ...``): FlashHead's decode route, which tells the head each step's settings.
"""

from ._version import __version__
from .decode import decoding
from .generation import (
    BatchGenerator,
    batch_generate,
    generate,
    generate_step,
    speculative_generate_step,
    stream_generate,
)
from .head import FlashHead
from .loading import load
from .patch import flash_head, patch, unpatch
from .sample_utils import make_logits_processors, make_sampler

__all__ = [
    "BatchGenerator",
    "FlashHead",
    "batch_generate",
    "decoding",
    "flash_head",
    "generate",
    "generate_step",
    "load",
    "make_logits_processors",
    "make_sampler",
    "patch",
    "speculative_generate_step",
    "stream_generate",
    "unpatch",
]
