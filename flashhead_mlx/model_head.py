"""Find the classification head of an mlx-lm model and read its rows."""

import mlx.core as mx
import mlx.nn as nn

from .probe import Spy, get_module, probe_head, set_module
from .recent import untracked


def language_model(model: nn.Module) -> nn.Module:
    """The text model inside multimodal wrappers (``language_model``), else ``model``."""
    return getattr(model, "language_model", model)


def is_tied(model: nn.Module) -> bool:
    """Whether the head is an embedding table's ``as_linear`` (found by probing)."""
    return probe_head(model).tied


def head_module(model: nn.Module) -> nn.Module:
    """The module whose rows are the head: ``lm_head``, a tied ``embed_tokens``, ... (found by
    :func:`flashhead_mlx.probe.probe_head`)."""
    return get_module(model, probe_head(model).path)


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
    """The hidden states the head reads for ``tokens`` ``[B, L]``: the body's output (after
    the final norm), or, where the model changes it before the head (minicpm scales it), the
    head's input recorded in a forward pass, whose logits are never computed."""
    probe = probe_head(model)
    if probe.body_is_model:
        return language_model(model).model(tokens, cache=cache)
    module = get_module(model, probe.path)
    spy = Spy(module, probe.tied)
    set_module(model, probe.path, spy)
    try:
        with untracked():
            model(tokens, cache=cache)
    finally:
        set_module(model, probe.path, module)
    return spy.inputs[-1]
