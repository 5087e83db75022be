"""Find the classification head of an mlx-lm model and read its rows."""

import mlx.core as mx
import mlx.nn as nn


def language_model(model: nn.Module) -> nn.Module:
    """The text model that owns the head (the language model inside multimodal wrappers)."""
    return getattr(model, "language_model", model)


def is_tied(model: nn.Module) -> bool:
    """Whether the head is the token embedding table (``embed_tokens.as_linear``)."""
    lm = language_model(model)
    if "lm_head" in lm.children():
        return False
    args = getattr(lm, "args", None)
    return bool(getattr(lm, "tie_word_embeddings", getattr(args, "tie_word_embeddings", True)))


def head_module(model: nn.Module) -> nn.Module:
    """The module whose rows are the head: ``lm_head`` or the tied ``embed_tokens``."""
    lm = language_model(model)
    if not is_tied(model):
        return lm.lm_head
    inner = getattr(lm, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        raise ValueError(
            f"Unsupported architecture {getattr(lm, 'model_type', type(lm).__name__)!r}: "
            "no lm_head and no model.embed_tokens"
        )
    return inner.embed_tokens


def head_rows(module: nn.Module) -> mx.array:
    """The head's rows ``[V, d]`` as float32, dequantized when the module is quantized."""
    if hasattr(module, "scales"):
        return mx.dequantize(
            module.weight,
            module.scales,
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=getattr(module, "mode", "affine"),
        ).astype(mx.float32)
    return module.weight.astype(mx.float32)


def final_hidden_states(model: nn.Module, tokens: mx.array, cache=None) -> mx.array:
    """The hidden states the head reads (after the final norm) for ``tokens`` ``[B, L]``."""
    return language_model(model).model(tokens, cache=cache)
