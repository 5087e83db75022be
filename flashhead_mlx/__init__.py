"""FlashHead for MLX: a training-free two-stage retrieval head for language models."""

from ._version import __version__
from .decode import decoding
from .head import FlashHead
from .loading import load
from .patch import flash_head, patch, unpatch

__all__ = ["FlashHead", "decoding", "flash_head", "load", "patch", "unpatch"]
