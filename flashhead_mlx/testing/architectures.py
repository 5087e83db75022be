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
    "sliding_window_pattern": 2,
    "query_pre_attn_scalar": HIDDEN // 4,
    "num_kv_shared_layers": 0,
    "vocab_size_per_layer_input": VOCAB_SIZE,
    "hidden_size_per_layer_input": 8,
}

SLIDING = ["sliding_attention", "full_attention"]
ROPE_YARN = {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512,
             "mscale": 1.0, "mscale_all_dim": 0.0, "beta_fast": 32, "beta_slow": 1}
ROPE_MINISTRAL = {"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
                  "original_max_position_embeddings": 512}
# Per-architecture entries, where the generated config does not build a working tiny model.
OVERRIDES = {
    "Klear": dict(mlp_only_layers=[0], decoder_sparse_step=1),
    "afm7": dict(num_layers=2, num_kv_reuse_layers=1),
    "afmoe": dict(layer_types=SLIDING, num_dense_layers=1, mup_enabled=False),
    "bailing_moe_linear": dict(layer_group_size=2, group_norm_size=1, first_k_dense_replace=0),
    "cohere2": dict(sliding_window_pattern=2),
    "dbrx": dict(
        ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2),
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
    ),
    "exaone4": dict(rope_scaling=None, sliding_window_pattern="LG"),
    "exaone_moe": dict(layer_types=SLIDING, is_moe_layer=[False, True]),
    "gear": dict(layer_types=SLIDING, final_logit_softcapping=30.0),
    "glm4_moe": dict(rope_scaling=None, partial_rotary_factor=0.5),
    "glm_moe_dsa": dict(index_head_dim=16, index_n_heads=2, index_topk=4, moe_layer_freq=1,
                        topk_method="noaux_tc", scoring_func="sigmoid",
                        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "gptj": dict(rotary_dim=8),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], embedding_multiplier=2.0,
                             attention_multiplier=0.25, logits_scaling=8.0,
                             residual_multiplier=0.5, mamba_n_heads=4, mamba_d_head=32,
                             mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4),
    "granite": dict(logits_scaling=8.0, embedding_multiplier=2.0, attention_multiplier=0.25,
                    residual_multiplier=0.5),
    "granitemoe": dict(logits_scaling=8.0, embedding_multiplier=2.0, attention_multiplier=0.25,
                       residual_multiplier=0.5),
    "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1,
                  expert_layer_period=2, mamba_expand=2, mamba_dt_rank=8),
    "kimi_linear": dict(linear_attn_config=dict(kda_layers=[1], full_attn_layers=[2],
                                                head_dim=16, num_heads=4, short_conv_kernel_size=4)),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "llama4_text": dict(no_rope_layers=[1, 0], intermediate_size_mlp=128, use_qk_norm=False,
                        tie_word_embeddings=False),
    "longcat_flash": dict(attention_method="MLA", zero_expert_type="identity", zero_expert_num=1,
                          mla_scale_q_lora=True, mla_scale_kv_lora=True),
    "mamba2": dict(num_heads=8, head_dim=16, time_step_limit=(0.0, float("inf")),
                   time_step_rank=8, n_groups=1),
    "mimo_v2_flash": dict(hybrid_layer_pattern=[0, 1], moe_layer_freq=[0, 1],
                          topk_method="noaux_tc", scoring_func="sigmoid", swa_num_attention_heads=4,
                          swa_num_key_value_heads=2, swa_head_dim=16, swa_v_head_dim=16,
                          partial_rotary_factor=1),
    "minicpm": dict(dim_model_base=32, scale_depth=1.4, scale_emb=2.0, tie_word_embeddings=False),
    "nemotron": dict(hidden_act="relu2", partial_rotary_factor=0.5),
    "nemotron_h": dict(hybrid_override_pattern=["M", "*"], mamba_num_heads=4, mamba_head_dim=16,
                       n_groups=1, ssm_state_size=16),
    "olmo3": dict(layer_types=SLIDING),
    "openelm": dict(num_transformer_layers=2, num_query_heads=[4, 4], num_kv_heads=[2, 2],
                    ffn_multipliers=[1.0, 1.0], ffn_dim_divisor=8, model_dim=HIDDEN),
    "phixtral": dict(rotary_dim=8, num_experts_per_tok=2),
    "plamo": dict(n_shared_head=2),
    "qwen3_moe": dict(mlp_only_layers=[], decoder_sparse_step=1),
    "qwen3_next": dict(mlp_only_layers=[], decoder_sparse_step=1, full_attention_interval=2),
    "qwen3_5": dict(full_attention_interval=2),
    "qwen3_5_moe": dict(full_attention_interval=2, mlp_only_layers=[], decoder_sparse_step=1),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], logits_soft_cap=30.0,
                            lru_width=HIDDEN, embeddings_scale_by_sqrt_dim=True),
    "spark2_5": dict(rope_parameters={
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        "full_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    }, layer_types=SLIDING),
    "step3p5": dict(num_attention_groups=2, moe_num_experts=4, moe_top_k=2),
    "baichuan_m1": dict(sliding_window_layers=[0], conv_window=2, tie_word_embeddings=False),
    "deepseek_v2": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                        topk_method="greedy", rope_scaling=ROPE_YARN),
    "gemma3n": dict(layer_types=SLIDING, activation_sparsity_pattern=[0.0, 0.0],
                    altup_num_inputs=2, altup_coef_clip=120.0, altup_correct_scale=True,
                    altup_active_idx=0, laurel_rank=8, final_logit_softcapping=30.0,
                    rope_local_base_freq=10000.0, num_kv_shared_layers=0),
    "hunyuan": dict(cla_share_factor=2, use_cla=False, num_shared_expert=1,
                    use_mixed_mlp_moe=True, rope_scaling={"alpha": 1.0, "factor": 1.0,
                                                          "type": "dynamic"}),
    "kimi_k3": dict(linear_attn_config=dict(kda_layers=[1], full_attn_layers=[2], head_dim=16,
                                            num_heads=4, short_conv_kernel_size=4)),
    "lfm2": dict(layer_types=["conv", "full_attention"], block_dim=HIDDEN, block_ff_dim=128,
                 block_multiple_of=16, block_ffn_dim_multiplier=1.0,
                 block_auto_adjust_ff_dim=False),
    "longcat_flash_ngram": dict(attention_method="MLA", zero_expert_type="identity",
                                zero_expert_num=1, mla_scale_q_lora=True, mla_scale_kv_lora=True),
    "minicpm3": dict(dim_model_base=32, scale_depth=1.4, scale_emb=2.0,
                     rope_scaling={"original_max_position_embeddings": 512}),
    "ministral3": dict(rope_parameters=ROPE_MINISTRAL),
    "mistral4": dict(rope_parameters=ROPE_MINISTRAL),
    "qwen": dict(kv_channels=16, intermediate_size=4 * HIDDEN),
    "muse_spark": dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                       layer_rope_theta=[10000.0, 0], layer_types=SLIDING,
                       mlp_layer_types=["sparse", "sparse"], num_shared_experts=0,
                       output_multiplier=1.0, moe_hidden_size=32),
    "mellum": dict(layer_types=SLIDING, rope_parameters={
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        "full_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    }),
    "llama4": dict(rope_scaling=None, attention_chunk_size=64, interleave_moe_layer_step=1,
                   num_experts_per_tok=1, num_hidden_layers=4,
                   intermediate_size_mlp=128, use_qk_norm=False, no_rope_layers=[1, 0]),
    "nemotron-nas": dict(block_configs=[{
        "attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
        "ffn": {"ffn_mult": 2.0, "no_op": False, "replace_with_linear": False},
    }] * 2),
}
# Multimodal wrappers: the text architecture whose tiny config is their ``text_config``.
WRAPPED = {
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "mistral3": "ministral3",
    "pixtral": "llama",
    "qwen3_vl_moe": "qwen3_moe",
    "lfm2-vl": "lfm2",
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


def _filled(config: dict, args_class) -> dict:
    """``config`` with a value for each required field of ``args_class`` it lacks."""
    for field in dataclasses.fields(args_class):
        missing = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if missing and field.name not in config:
            value = _default(field)
            if value is not None:
                config[field.name] = value
    return config


def _text_args(module):
    """The dataclass of a wrapper's ``text_config`` defined in its own file, if any."""
    for name in ("TextModelArgs", "TextArgs", "TextConfig"):
        if dataclasses.is_dataclass(getattr(module, name, None)):
            return getattr(module, name)
    return None


def tiny_config(name: str) -> dict:
    """The tiny config of the ``mlx_lm.models`` file ``name``: :data:`COMMON`, a value for
    every other required field of its ``ModelArgs`` (and of its ``text_config``), then
    :data:`OVERRIDES`."""
    module = importlib.import_module(f"mlx_lm.models.{name}")
    config = _filled({"model_type": name, **COMMON}, module.ModelArgs)
    if "text_config" in {f.name for f in dataclasses.fields(module.ModelArgs)}:
        if name in WRAPPED:
            text = tiny_config(WRAPPED[name])
        else:
            text = {"model_type": name, **COMMON}
            if _text_args(module) is not None:
                text = _filled(text, _text_args(module))
            text.update(OVERRIDES.get(name, {}))
        config["text_config"] = text
    config.update(OVERRIDES.get(name, {}))
    return config


def build(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of ``name`` (float32; its :func:`tiny_config` with ``overrides``),
    its parameters evaluated."""
    module = importlib.import_module(f"mlx_lm.models.{name}")
    config = {**tiny_config(name), **overrides}
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


# The tested architectures: the head and post-head transform the probe must find in each tiny
# model (flashhead_mlx.probe.HeadProbe.describe), as read in mlx-lm's model files. Granite's
# ``x / 8`` is found as ``x * 0.125``, its equal bit for bit.
TESTED = {
    "afm7": "model.embedding.as_linear, no transform",
    "afmoe": "model.embed_tokens.as_linear, no transform",
    "apertus": "model.embed_tokens.as_linear, no transform",
    "baichuan_m1": "lm_head, no transform",
    "bailing_hybrid": "model.word_embeddings.as_linear, no transform",
    "bailing_moe": "model.word_embeddings.as_linear, no transform",
    "bailing_moe_linear": "model.word_embeddings.as_linear, no transform",
    "bailing_moe_v3": "model.word_embeddings.as_linear, no transform",
    "cohere": "model.embed_tokens.as_linear, x * 0.0625",
    "cohere2": "model.embed_tokens.as_linear, x * 0.0625",
    "dbrx": "lm_head, no transform",
    "deepseek": "lm_head, no transform",
    "deepseek_v2": "lm_head, no transform",
    "deepseek_v3": "lm_head, no transform",
    "deepseek_v32": "lm_head, no transform",
    "deepseek_v41": "lm_head, no transform",
    "dots1": "model.embed_tokens.as_linear, no transform",
    "ernie4_5": "model.embed_tokens.as_linear, no transform",
    "ernie4_5_moe": "model.embed_tokens.as_linear, no transform",
    "exaone": "transformer.wte.as_linear, no transform",
    "exaone4": "model.embed_tokens.as_linear, no transform",
    "exaone_moe": "model.embed_tokens.as_linear, no transform",
    "falcon_h1": "model.embed_tokens.as_linear, x * 0.00690534",
    "gear": "model.embed_tokens.as_linear, softcap tanh(x / 30) * 30",
    "gemma": "model.embed_tokens.as_linear, no transform",
    "gemma2": "model.embed_tokens.as_linear, softcap tanh(x / 30) * 30",
    "gemma3": "language_model.lm_head, no transform",
    "gemma3_text": "lm_head, no transform",
    "gemma3n": "model.language_model.embed_tokens.as_linear, softcap tanh(x / 30) * 30",
    "gemma4": "language_model.model.embed_tokens.as_linear, softcap tanh(x / 30) * 30",
    "gemma4_text": "model.embed_tokens.as_linear, softcap tanh(x / 30) * 30",
    "glm": "model.embed_tokens.as_linear, no transform",
    "glm4": "lm_head, no transform",
    "glm4_moe": "lm_head, no transform",
    "glm4_moe_lite": "lm_head, no transform",
    "glm_moe_dsa": "lm_head, no transform",
    "gpt2": "model.wte.as_linear, no transform",
    "gpt_bigcode": "transformer.wte.as_linear, no transform",
    "gpt_neox": "model.embed_out, no transform",
    "gpt_oss": "lm_head, no transform",
    "granite": "model.embed_tokens.as_linear, x * 0.125",
    "granitemoe": "model.embed_tokens.as_linear, x * 0.125",
    "granitemoehybrid": "model.embed_tokens.as_linear, x * 0.125",
    "helium": "model.embed_tokens.as_linear, no transform",
    "hunyuan": "model.embed_tokens.as_linear, no transform",
    "hunyuan_v1_dense": "model.embed_tokens.as_linear, no transform",
    "internlm2": "model.tok_embeddings.as_linear, no transform",
    "internlm3": "model.embed_tokens.as_linear, no transform",
    "iquestloopcoder": "model.embed_tokens.as_linear, no transform",
    "jamba": "model.embed_tokens.as_linear, no transform",
    "kimi_k25": "language_model.lm_head, no transform",
    "kimi_k3": "language_model.model.embed_tokens.as_linear, no transform",
    "kimi_linear": "model.embed_tokens.as_linear, no transform",
    "kimi_vl": "language_model.lm_head, no transform",
    "Klear": "lm_head, no transform",
    "laguna": "model.embed_tokens.as_linear, no transform",
    "lfm2": "model.embed_tokens.as_linear, no transform",
    "lfm2-vl": "language_model.model.embed_tokens.as_linear, no transform",
    "lfm2_moe": "model.embed_tokens.as_linear, no transform",
    "lille-130m": "transformer.tok_embeddings.as_linear, no transform",
    "llama": "model.embed_tokens.as_linear, no transform",
    "llama4": "language_model.lm_head, no transform",
    "llama4_text": "output, no transform",
    "longcat_flash": "lm_head, no transform",
    "longcat_flash_ngram": "lm_head, no transform",
    "mamba": "backbone.embeddings.as_linear, no transform",
    "mamba2": "backbone.embeddings.as_linear, no transform",
    "mellum": "model.embed_tokens.as_linear, no transform",
    "mimo": "model.embed_tokens.as_linear, no transform",
    "mimo_v2_flash": "lm_head, no transform",
    "minicpm": "lm_head, no transform",
    "minicpm3": "model.embed_tokens.as_linear, no transform",
    "minimax": "model.embed_tokens.as_linear, no transform",
    "minimax_m3_vl": "language_model.model.embed_tokens.as_linear, no transform",
    "ministral3": "model.embed_tokens.as_linear, no transform",
    "mistral3": "language_model.model.embed_tokens.as_linear, no transform",
    "mistral4": "model.embed_tokens.as_linear, no transform",
    "mixtral": "model.embed_tokens.as_linear, no transform",
    "nanbeige": "model.embed_tokens.as_linear, no transform",
    "nanochat": "lm_head, softcap tanh(x / 15) * 15",
    "nemotron": "model.embed_tokens.as_linear, no transform",
    "nemotron-nas": "model.embed_tokens.as_linear, no transform",
    "nemotron_h": "lm_head, no transform",
    "olmo2": "model.embed_tokens.as_linear, no transform",
    "olmo3": "model.embed_tokens.as_linear, no transform",
    "olmo_hybrid": "model.embed_tokens.as_linear, no transform",
    "olmoe": "model.embed_tokens.as_linear, no transform",
    "openelm": "transformer.token_embeddings.as_linear, no transform",
    "phi3": "model.embed_tokens.as_linear, no transform",
    "pixtral": "language_model.lm_head, no transform",
    "plamo": "lm_head, no transform",
    "plamo2": "model.embed_tokens.as_linear, no transform",
    "plamo3": "model.embed_tokens.as_linear, no transform",
    "qwen": "lm_head, no transform",
    "qwen2": "model.embed_tokens.as_linear, no transform",
    "qwen2_moe": "lm_head, no transform",
    "qwen2_vl": "language_model.model.embed_tokens.as_linear, no transform",
    "qwen3": "model.embed_tokens.as_linear, no transform",
    "qwen3_5": "language_model.model.embed_tokens.as_linear, no transform",
    "qwen3_5_moe": "language_model.model.embed_tokens.as_linear, no transform",
    "qwen3_moe": "model.embed_tokens.as_linear, no transform",
    "qwen3_next": "model.embed_tokens.as_linear, no transform",
    "qwen3_vl": "language_model.model.embed_tokens.as_linear, no transform",
    "qwen3_vl_moe": "language_model.model.embed_tokens.as_linear, no transform",
    "recurrent_gemma": "lm_head, softcap tanh(x / 30) * 30",
    "rwkv7": "model.embeddings.as_linear, no transform",
    "smollm3": "model.embed_tokens.as_linear, no transform",
    "solar_open": "lm_head, no transform",
    "spark2_5": "model.embedding.as_linear, no transform",
    "stablelm": "lm_head, no transform",
    "starcoder2": "model.embed_tokens.as_linear, no transform",
    "step3p5": "lm_head, no transform",
    "telechat3": "model.embed_tokens.as_linear, no transform",
    "youtu_llm": "model.embed_tokens.as_linear, no transform",
}
# Architectures FlashHead refuses: name -> (what the probe's reason says, a regular expression;
# why, in words).
BIAS = ("has a bias", "the head has a bias")
WEIGHT = (r"computed from model.embed_tokens.weight \(h @ weight.T\)",
          "the head is h @ embed_tokens.weight.T, no module call")
REFUSED = {
    "gptj": BIAS,
    "phi": BIAS,
    "phimoe": BIAS,
    "phixtral": BIAS,
    "seed_oss": WEIGHT,
    "talkie": ("no module's output reaches the logits",
               "the head is h @ lm_head.T with lm_head an array, no module call"),
    "muse_glimmer": ("cannot reproduce exactly", "x * m, then a softcap: two transforms"),
}
# Configurations of tested architectures that FlashHead refuses: name -> (overrides, reason).
REFUSED_VARIANTS = {
    "minicpm": (dict(tie_word_embeddings=True), WEIGHT),
    "llama4_text": (dict(tie_word_embeddings=True), WEIGHT),
}
# Architectures without a tiny model in the matrix, and why.
SKIPPED = {
    "olmo": "needs the ai2-olmo package (its model file exits without it)",
    "bitnet": "BitLinear layers run a Metal-only kernel (no CPU path to test on)",
    "prism_hadamard_qwen35": "its weights must come with a Hadamard rotation pack",
    "muse_spark": "its MoE layers run a Metal-only kernel (no CPU path to test on)",
    "phi3small": (
        "its tiny model's forward pass aborted the test process in MLX's CPU LayerNorm after "
        "other models had run (not investigated); alone, the probe refuses it: x / 8, then its "
        "dummy tokens set to -inf, is no transform FlashHead knows"
    ),
}


README_BEGIN = "<!-- architectures: written by scripts/architectures.py, do not edit -->"
README_END = "<!-- end of architectures -->"


def _names(names) -> str:
    return ", ".join(f"`{n}`" for n in sorted(names, key=str.lower))


def readme_section() -> str:
    """The README's list of architectures, from the matrix above."""
    transforms = {}
    for name, describe in TESTED.items():
        transform = describe.split(", ", 1)[1]
        kind = transform.split(" ")[0] if transform != "no transform" else None
        if kind is not None:
            transforms.setdefault("a softcap" if kind == "softcap" else "a scale", []).append(name)
    applied = "; ".join(f"{kind}: {_names(names)}" for kind, names in sorted(transforms.items()))
    return "\n".join([
        README_BEGIN,
        f"Tested on a tiny random model of each ({len(TESTED)} of mlx-lm "
        f"{mlx_lm.__version__}'s model files): {_names(TESTED)}.",
        "",
        f"The head's post-head transform, applied by the FlashHead itself: {applied}.",
        "",
        f"Refused, with the reason: {_names(REFUSED)}, and "
        + " and ".join(f"`{n}` with {', '.join(f'{k}={v}' for k, v in o.items())}"
                       for n, (o, _) in sorted(REFUSED_VARIANTS.items()))
        + f". Not tested: {_names(SKIPPED)}. Each architecture's head, transform or reason: "
        "[docs/architectures.md](docs/architectures.md).",
        README_END,
    ])


def matrix_page() -> str:
    """docs/architectures.md: the whole matrix."""
    rows = []
    for name, describe in sorted(TESTED.items(), key=lambda kv: kv[0].lower()):
        head, transform = describe.split(", ", 1)
        rows.append(f"| `{name}` | `{head}` | {transform} | tested |")
    for name, (_, why) in sorted(REFUSED.items()):
        rows.append(f"| `{name}` | | | refused: {why} |")
    for name, (overrides, (_, why)) in sorted(REFUSED_VARIANTS.items()):
        setting = ", ".join(f"{k}={v}" for k, v in overrides.items())
        rows.append(f"| `{name}` ({setting}) | | | refused: {why} |")
    for name, reason in sorted(SKIPPED.items()):
        rows.append(f"| `{name}` | | | not tested: {reason} |")
    return "\n".join([
        "# Architectures",
        "",
        "Written by `scripts/architectures.py` from `flashhead_mlx/testing/architectures.py`, the",
        "matrix `tests/test_architectures.py` runs; do not edit. FlashHead finds each model's",
        "head by probing (`flashhead_mlx.probe`): the head module, and what the model does to its",
        "output before returning it, which the FlashHead then applies itself. A tested",
        "architecture's tiny random model is probed, patched with every cluster probed (its exact",
        "path and greedy decoding equal dense bit for bit) and with few (every other logit",
        "`-inf`, sampling well defined), then unpatched (its weights restored bit for bit).",
        "",
        f"mlx-lm {mlx_lm.__version__}.",
        "",
        "| architecture | head | post-head transform | result |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
