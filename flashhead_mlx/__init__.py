"""FlashHead for MLX: a training-free two-stage retrieval head for language models."""

__version__ = "0.1.0"
