"""FlashHead for MLX: a training-free two-stage retrieval head for language models."""

__version__ = "0.1.0"

from .decode import decoding
from .head import FlashHead
from .loading import load
from .patch import flash_head, patch, unpatch

__all__ = ["FlashHead", "decoding", "flash_head", "load", "patch", "unpatch"]
