"""Tiny random models of every mlx-lm text architecture, their configs generated from each
architecture's ``ModelArgs`` fields (tests/test_architectures.py)."""

import dataclasses
import importlib
import pkgutil
import typing

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models

VOCAB_SIZE = 500
HIDDEN = 64

# Values by field name, shared by the architectures that have the field.
COMMON = {
    "vocab_size": VOCAB_SIZE,
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "model_dim", "dim", "hidden_dim"), HIDDEN),
    **dict.fromkeys(
        ("intermediate_size", "ffn_hidden_size", "n_inner", "ff_intermediate_size",
         "intermediate_size_mlp", "block_dim"), 2 * HIDDEN),
    **dict.fromkeys(
        ("moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size",
         "shared_intermediate_size"), 32),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"), 2),
    "head_dim": HIDDEN // 4,
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "num_shared_expert"), 1),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "model_max_length"), 512),
    **dict.fromkeys(("sliding_window", "attention_window_size", "sliding_window_size"), 64),
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    **dict.fromkeys(("conv_kernel", "linear_conv_kernel_dim", "mamba_d_conv", "conv1d_width"), 4),
    "conv_L_cache": 3,
    **dict.fromkeys(("state_size", "mamba_d_state", "ssm_state_size"), 16),
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    **dict.fromkeys(("rope_theta", "rotary_emb_base"), 10000.0),
    **dict.fromkeys(
        ("rms_norm_eps", "layer_norm_epsilon", "norm_eps", "layer_norm_eps", "layernorm_epsilon",
         "norm_epsilon"), 1e-6),
    "tie_word_embeddings": True,
}


def text_architectures() -> list:
    """Every module of ``mlx_lm.models`` that defines a ``Model``, by name."""
    names = []
    for info in pkgutil.iter_modules(mlx_lm.models.__path__):
        try:
            module = importlib.import_module(f"mlx_lm.models.{info.name}")
        except BaseException:  # noqa: BLE001 (a model file may exit when a package is missing)
            names.append(info.name)
            continue
        if hasattr(module, "Model"):
            names.append(info.name)
    return sorted(names)


def _default(field: dataclasses.Field):
    """A value for a required field that :data:`COMMON` does not name, from its type."""
    kind = field.type if not isinstance(field.type, str) else eval(field.type, vars(typing))
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind)
    name = field.name
    if kind is bool:
        return False
    if kind is int:
        return 1 if any(w in name for w in ("period", "step", "every", "factor")) else (
            0 if any(w in name for w in ("offset", "num_dense", "zero")) else 16)
    if kind is float:
        return 1e-6 if "eps" in name else 1.0
    if kind is str:
        return None
    if kind in (list, dict) or origin in (list, dict, tuple):
        return None
    return None


def tiny_config(name: str, **overrides) -> dict:
    """The tiny config of the ``mlx_lm.models`` file ``name``."""
    module = importlib.import_module(f"mlx_lm.models.{name}")
    config = {"model_type": name, **COMMON}
    for field in dataclasses.fields(module.ModelArgs):
        missing = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if missing and field.name not in config:
            value = _default(field)
            if value is not None:
                config[field.name] = value
    config.update(overrides)
    return config


def build(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of ``name`` (float32), its parameters evaluated."""
    module = importlib.import_module(f"mlx_lm.models.{name}")
    config = tiny_config(name, **overrides)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model
