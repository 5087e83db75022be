"""Import a llama.cpp GGUF file as an mlx-lm model folder.

The folder holds ``config.json``, ``model.safetensors`` and a Hugging Face tokenizer built from
the GGUF's own metadata, so ``mlx_lm.load(folder)`` returns a working ``(model, tokenizer)``.

Tensors are dequantized with the ``gguf`` package to ``dtype``. With ``keep_quantized``, Q4_0,
Q4_1 and Q8_0 tensors instead map losslessly onto MLX's affine quantization (group size 32); that
suits Metal, while on the CPU MLX's quantized matmuls are far slower than float32 BLAS.

Nothing is written unless the file makes a model: every metadata value read has its type checked,
the hyperparameters are checked against the tensors (shapes, layer count) and the tensors against
the parameters of the mlx-lm model they make, and every weight must be finite. A file that does
not ends in a :class:`~flashhead_mlx.gguf_file.GGUFError`, one line naming the file and the
problem (the supported architectures are listed in docs/cli.md, under ``convert``).
"""

import json
from collections import Counter
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from .gguf_file import GGUFError, GGUFFile, brief

# GGUF architecture -> mlx-lm model_type (docs/cli.md, under ``convert``, lists them for users).
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "qwen35": "qwen3_5",
    "smollm3": "smollm3",
    "granite": "granite",
    "olmo2": "olmo2",
    "gemma4": "gemma4_text",
}
# Architectures whose q/k rows llama.cpp reorders for its interleaved rotary embeddings.
ROPE_PERMUTED = ("llama", "smollm3", "granite")
SUPPORTED_LIST = "docs/cli.md, under convert"
# Hyperparameters are counts of at most this (a corrupt value is caught before a model is built).
MAX_HPARAM = 1 << 31

GROUP_SIZE = 32
QUANTIZED_BITS = {
    gguf.GGMLQuantizationType.Q4_0: 4,
    gguf.GGMLQuantizationType.Q4_1: 4,
    gguf.GGMLQuantizationType.Q8_0: 8,
}

GLOBAL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "per_layer_token_embd": "model.embed_tokens_per_layer",
    "per_layer_model_proj": "model.per_layer_model_projection",
    "per_layer_proj_norm": "model.per_layer_projection_norm",
}
LAYER_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GEMMA_LAYER_TENSOR_NAMES = {
    **LAYER_TENSOR_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Per architecture where it differs: a layer tensor's kind (``blk.N.KIND.weight``) -> its mlx-lm
# module, or a tensor's whole name after ``blk.N.`` -> its mlx-lm parameter.
ARCHITECTURE_LAYER_NAMES = {
    "gemma3": GEMMA_LAYER_TENSOR_NAMES,
    "gemma4": {
        **GEMMA_LAYER_TENSOR_NAMES,
        "inp_gate": "per_layer_input_gate",
        "proj": "per_layer_projection",
        "post_norm": "post_per_layer_input_norm",
        "layer_output_scale.weight": "layer_scalar",
    },
    "phi3": {**LAYER_TENSOR_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "olmo2": {
        **{k: v for k, v in LAYER_TENSOR_NAMES.items() if k not in ("attn_norm", "ffn_norm")},
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "qwen35": {
        **{k: v for k, v in LAYER_TENSOR_NAMES.items() if k != "ffn_norm"},
        "post_attention_norm": "post_attention_layernorm",
        "attn_qkv": "linear_attn.in_proj_qkv",
        "attn_gate": "linear_attn.in_proj_z",
        "ssm_alpha": "linear_attn.in_proj_a",
        "ssm_beta": "linear_attn.in_proj_b",
        "ssm_conv1d": "linear_attn.conv1d",
        "ssm_norm": "linear_attn.norm",
        "ssm_out": "linear_attn.out_proj",
        "ssm_a": "linear_attn.A_log",
        "ssm_dt.bias": "linear_attn.dt_bias",
    },
}
# Where an architecture's mlx-lm model keeps the text model's parameters.
PREFIXES = {"qwen35": "language_model."}
# Tensors read into config.json rather than weights.
CONFIG_TENSORS = {
    "phi3": ("rope_factors_long.weight", "rope_factors_short.weight"),
    "gemma4": ("rope_freqs.weight",),
}
# Hyperparameters that an architecture may store per layer (a list).
PER_LAYER_HPARAMS = {"gemma4": ("feed_forward_length", "attention.head_count_kv")}
# Qwen3.5's tensors whose rows are value heads, which llama.cpp reorders: kind -> whether they
# follow the query and key rows (the fused projection and its convolution's channels), and
# whether a row is one element of a head (else one head).
QWEN35_VALUE_ROWS = {
    "attn_qkv": (True, True),
    "ssm_conv1d": (True, True),
    "attn_gate": (False, True),
    "ssm_alpha": (False, False),
    "ssm_beta": (False, False),
    "ssm_a": (False, False),
    "ssm_dt": (False, False),
}
# Tensors whose columns llama.cpp reorders, which quantized blocks cannot follow: dequantized
# even with ``keep_quantized``.
COLUMN_TRANSFORMED = {"qwen35": ("ssm_out",)}

SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# llama.cpp token types (tokenizer.ggml.token_type).
CONTROL_TOKEN = 3
USER_DEFINED_TOKEN = 4

# Pre-tokenizer splits of byte-level BPE vocabularies, by `tokenizer.ggml.pre`.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_SPLITS = {
    "default": [GPT2_SPLIT],
    "gpt2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "llama3": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
}


def import_gguf(
    gguf_path: str | Path,
    output_dir: str | Path,
    dtype: str = "float32",
    keep_quantized: bool = False,
) -> Path:
    """Write the GGUF model at ``gguf_path`` as an mlx-lm folder ``output_dir`` (created).

    Args:
        dtype: float type of the weights (and of the quantization scales and biases).
        keep_quantized: keep Q4_0/Q4_1/Q8_0 tensors quantized (MLX affine, group size 32)
            instead of dequantizing them. Default: ``False``.
    """
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    float_type = getattr(mx, dtype, None)
    if not isinstance(float_type, mx.Dtype) or not mx.issubdtype(float_type, mx.floating):
        raise ValueError(f"dtype must be a float type such as 'float32', got {dtype!r}")
    reader = GGUFFile(gguf_path)
    architecture = metadata(reader, "general.architecture", kind="str")
    if architecture is None:
        raise GGUFError(
            f"{gguf_path} has no general.architecture: not a model file (a vocabulary or an "
            "adapter?)"
        )
    if architecture not in ARCHITECTURES:
        raise GGUFError(
            f"{gguf_path}: GGUF architecture {brief(architecture)} is not supported; the GGUF import "
            f"reads {', '.join(sorted(ARCHITECTURES))} ({SUPPORTED_LIST}); convert the model "
            "from its Hugging Face repo or an mlx-lm folder instead"
        )
    check_tensor_types(reader)
    config = model_config(reader, architecture)
    check_tensors(reader, architecture, config)
    weights, quantization = convert_tensors(
        reader, architecture, config, float_type, keep_quantized
    )
    if quantization:
        config["quantization"] = quantization
    output_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(output_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (output_dir / "config.json").write_text(json.dumps(config, indent=4))
    save_tokenizer(reader, output_dir)
    return output_dir


# What a metadata value may be: a check and its name in messages.
KINDS = {
    "int": (lambda v: type(v) is int, "an integer"),
    "number": (lambda v: type(v) in (int, float), "a number"),
    "bool": (lambda v: type(v) is bool, "a boolean"),
    "str": (lambda v: type(v) is str, "a string"),
    "strings": (lambda v: type(v) is list and all(type(x) is str for x in v), "a list of strings"),
    "ints": (lambda v: type(v) is list and all(type(x) is int for x in v), "a list of integers"),
    "bools": (lambda v: type(v) is list and all(type(x) is bool for x in v), "a list of booleans"),
    "numbers": (
        lambda v: type(v) is list and all(type(x) in (int, float) for x in v),
        "a list of numbers",
    ),
}


def metadata(reader: GGUFFile, key: str, default=None, kind: str = None):
    """The value of the metadata ``key`` (a scalar, a string or a list), or ``default``; with
    ``kind`` (a key of :data:`KINDS`) a :class:`GGUFError` unless it is of that kind."""
    value = reader.fields.get(key, default)
    if kind is not None and value is not None and not KINDS[kind][0](value):
        shown = f"a list of {len(value)} items" if isinstance(value, list) else brief(value)
        raise GGUFError(f"{reader.path}: metadata {key} is {shown}, not {KINDS[kind][1]}")
    return value


def token_id(reader: GGUFFile, key: str, n_tokens: int):
    """The token id in the metadata ``key`` (``None`` if absent), checked to be a token."""
    value = metadata(reader, key, kind="int")
    if value is not None and not 0 <= value < n_tokens:
        raise GGUFError(
            f"{reader.path}: metadata {key} is {value}, not a token id (0 to {n_tokens - 1})"
        )
    return value


def dequantizable(tensor_type: gguf.GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants`` dequantizes ``tensor_type``."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    try:
        with np.errstate(all="ignore"):
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), tensor_type)
    except NotImplementedError:
        return False
    return True


def check_tensor_types(reader: GGUFFile) -> None:
    """A :class:`GGUFError` naming the first tensor whose type cannot be dequantized."""
    for tensor in reader.tensors:
        if not dequantizable(tensor.tensor_type):
            supported = [t.name for t in gguf.GGMLQuantizationType if dequantizable(t)]
            raise GGUFError(
                f"{reader.path}: tensor {tensor.name} is of type {tensor.tensor_type.name}, which "
                f"the GGUF import cannot dequantize (it reads {', '.join(supported)}); "
                "requantize the model to one of them (llama.cpp's llama-quantize)"
            )


def hparam(reader: GGUFFile, architecture: str, name: str, default=None, kind: str = "int"):
    """The hyperparameter ``{architecture}.{name}``, or ``default``: a positive scalar of
    ``kind``, else a :class:`GGUFError` (missing, per layer, of another kind, out of range)."""
    key = f"{architecture}.{name}"
    value = reader.fields.get(key, default)
    if value is None:
        raise GGUFError(f"{reader.path}: metadata {key} is missing")
    if isinstance(value, list):
        raise GGUFError(f"{reader.path}: per-layer {key} is not supported")
    value = metadata(reader, key, default, kind=kind)
    if not 0 < value < MAX_HPARAM or value != value:
        raise GGUFError(f"{reader.path}: metadata {key} is {brief(value)}, out of range")
    # Floats are stored as float32: keep the decimal value they were written from.
    return float(f"{value:.7g}") if isinstance(value, float) else value


def layer_hparams(reader: GGUFFile, architecture: str, name: str, default=None) -> list:
    """A hyperparameter :data:`PER_LAYER_HPARAMS` allows per layer: its values, one per layer
    (or the one value of all layers), each a positive integer."""
    key = f"{architecture}.{name}"
    if not isinstance(reader.fields.get(key), list):
        return [hparam(reader, architecture, name, default)]
    values = metadata(reader, key, kind="ints")
    if not values or not all(0 < v < MAX_HPARAM for v in values):
        raise GGUFError(f"{reader.path}: metadata {key} is {brief(values)}, out of range")
    return values


def mtp_layers(reader: GGUFFile, architecture: str) -> int:
    """How many of the file's last blocks are multi-token-prediction layers
    (``nextn_predict_layers``), which mlx-lm's model does not run: they are not imported."""
    key = f"{architecture}.nextn_predict_layers"
    value = metadata(reader, key, 0, kind="int")
    if not 0 <= value < hparam(reader, architecture, "block_count"):
        raise GGUFError(f"{reader.path}: metadata {key} is {value}, not fewer than its blocks")
    return value


def model_config(reader: GGUFFile, architecture: str) -> dict:
    """The mlx-lm ``config.json`` of the model, from the GGUF hyperparameters."""

    def get(name, default=None, kind="int"):
        if name in PER_LAYER_HPARAMS.get(architecture, ()):  # the first layer's (gemma4_config)
            return layer_hparams(reader, architecture, name, default)[0]
        return hparam(reader, architecture, name, default, kind)

    tensor_names = {tensor.name for tensor in reader.tensors}
    hidden_size = get("embedding_length")
    n_heads = get("attention.head_count")
    if n_heads > hidden_size and f"{architecture}.attention.key_length" not in reader.fields:
        raise GGUFError(
            f"{reader.path}: {architecture}.attention.head_count is {n_heads}, more than "
            f"{architecture}.embedding_length {hidden_size}, and no "
            f"{architecture}.attention.key_length gives the head dimension"
        )
    head_dim = get("attention.key_length", hidden_size // n_heads or None)
    config = {
        "model_type": ARCHITECTURES[architecture],
        "vocab_size": int(tensor_shape(reader, "token_embd.weight")[0]),
        "hidden_size": hidden_size,
        "num_hidden_layers": get("block_count") - mtp_layers(reader, architecture),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind="number"),
        "rope_theta": get("rope.freq_base", 10000.0, kind="number"),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise GGUFError(
            f"{reader.path}: {architecture}.attention.head_count {n_heads} is not a multiple of "
            f"{architecture}.attention.head_count_kv {config['num_key_value_heads']}"
        )
    scaling = metadata(reader, f"{architecture}.rope.scaling.type", "none", kind="str")
    if scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": get("rope.scaling.factor", kind="number"),
        }
    elif scaling != "none":
        raise GGUFError(
            f"{reader.path}: rope scaling {brief(scaling)} ({architecture}.rope.scaling.type) is not "
            "supported (none and linear are)"
        )
    if architecture in ROPE_PERMUTED:
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    if architecture == "gemma3":
        # Fixed in llama.cpp's gemma3 graph rather than stored in the file; the 27B model
        # (62 layers) scales queries by hidden_size / n_heads instead of head_dim.
        config["query_pre_attn_scalar"] = (
            hidden_size // n_heads if config["num_hidden_layers"] == 62 else head_dim
        )
        config["sliding_window"] = get("attention.sliding_window")
        config["sliding_window_pattern"] = 6
        config["rope_local_base_freq"] = 10000.0
    if architecture == "granite":
        config.update(granite_multipliers(config, get))
    if architecture == "olmo2":
        config.update(olmo_layers(reader, config))
    if architecture == "phi3":
        config.update(phi3_rope(reader, config, get("rope.dimension_count", head_dim)))
    if architecture == "qwen35":
        config.update(qwen35_config(reader, config, get))
    if architecture == "gemma4":
        config.update(gemma4_config(reader, config, get))
    vocab_size = config["vocab_size"]
    n_tokens = len(vocabulary(reader))
    if n_tokens > vocab_size:
        raise GGUFError(
            f"{reader.path}: its vocabulary has {n_tokens} tokens, more than the {vocab_size} rows "
            "of token_embd.weight"
        )
    eos_ids = {token_id(reader, f"tokenizer.ggml.{k}_token_id", vocab_size) for k in ("eos", "eot")}
    eos_ids -= {None}
    if eos_ids:
        config["eos_token_id"] = sorted(eos_ids) if len(eos_ids) > 1 else eos_ids.pop()
    bos_id = token_id(reader, "tokenizer.ggml.bos_token_id", vocab_size)
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    return config


def granite_multipliers(config: dict, get) -> dict:
    """Granite's multipliers, which llama.cpp stores as scales (each absent one at the value
    that leaves the computation as llama's: queries by 1 / sqrt(head size), the rest by 1)."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return {
        "attention_multiplier": get("attention.scale", head_dim**-0.5, kind="number"),
        "embedding_multiplier": get("embedding_scale", 1.0, kind="number"),
        "residual_multiplier": get("residual_scale", 1.0, kind="number"),
        "logits_scaling": get("logit_scale", 1.0, kind="number"),
    }


def olmo_layers(reader: GGUFFile, config: dict) -> dict:
    """OLMo 3's sliding-window layers: llama.cpp writes OLMo 2 and 3 as ``olmo2``, OLMo 3 with
    ``attention.sliding_window`` and the per-layer ``attention.sliding_window_pattern``."""
    pattern = metadata(reader, "olmo2.attention.sliding_window_pattern", kind="bools")
    if pattern is None:
        return {}
    if len(pattern) != config["num_hidden_layers"]:
        raise GGUFError(
            f"{reader.path}: metadata olmo2.attention.sliding_window_pattern has {len(pattern)} "
            f"items, for {config['num_hidden_layers']} layers"
        )
    return {
        "model_type": "olmo3",
        "sliding_window": hparam(reader, "olmo2", "attention.sliding_window"),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in pattern],
    }


def gemma4_config(reader: GGUFFile, config: dict, get) -> dict:
    """Gemma 4's layers: sliding-window and full-attention layers (``sliding_window_pattern``)
    with their own head sizes, key/value head counts (per layer) and rotary settings, the last
    ``shared_kv_layers`` reusing earlier layers' keys and values (and, with
    ``feed_forward_length`` per layer, a double-wide MLP), per-layer input embeddings, and the
    full-attention layers' partial rotation, which llama.cpp stores as the frequency factors
    ``rope_freqs`` (1 for each rotated pair, 1e30 for the others)."""
    n_layers = config["num_hidden_layers"]
    pattern = metadata(reader, "gemma4.attention.sliding_window_pattern", kind="bools")
    kv_heads = layer_hparams(reader, "gemma4", "attention.head_count_kv")
    ffn = layer_hparams(reader, "gemma4", "feed_forward_length")
    if pattern is None or any(len(v) not in (1, n_layers) for v in (pattern, kv_heads, ffn)):
        raise GGUFError(
            f"{reader.path}: metadata gemma4.attention.sliding_window_pattern, "
            "attention.head_count_kv and feed_forward_length must be given for its "
            f"{n_layers} layers"
        )
    pattern = pattern * n_layers if len(pattern) == 1 else pattern
    by_kind = {s: {kv_heads[i % len(kv_heads)] for i in range(n_layers) if pattern[i] == s}
               for s in (True, False)}
    if any(len(counts) > 1 for counts in by_kind.values()):
        raise GGUFError(f"{reader.path}: gemma4 layers of one kind have different kv head counts")
    shared = metadata(reader, "gemma4.attention.shared_kv_layers", 0, kind="int")
    per_layer_size = metadata(reader, "gemma4.embedding_length_per_layer_input", 0, kind="int")
    if not (0 <= shared < n_layers and 0 <= per_layer_size < MAX_HPARAM):
        raise GGUFError(
            f"{reader.path}: metadata gemma4.attention.shared_kv_layers {shared} or "
            f"embedding_length_per_layer_input {per_layer_size} is out of range"
        )
    head_dim, global_head_dim = get("attention.key_length_swa"), get("attention.key_length")
    freqs = dequantize(tensor_named(reader, CONFIG_TENSORS["gemma4"][0]))
    if freqs.shape != (global_head_dim // 2,) or not np.isin(freqs, np.float32([1, 1e30])).all():
        raise GGUFError(
            f"{reader.path}: rope_freqs is not {global_head_dim // 2} factors of 1 or 1e30"
        )
    names = {tensor.name for tensor in reader.tensors}
    full = [i for i in range(n_layers) if not pattern[i]]
    return {
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "num_key_value_heads": min(by_kind[True] or by_kind[False]),
        "num_global_key_value_heads": min(by_kind[False] or by_kind[True]),
        "attention_k_eq_v": bool(full) and f"blk.{full[0]}.attn_v.weight" not in names,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in pattern],
        "sliding_window": get("attention.sliding_window"),
        "num_kv_shared_layers": shared,
        "intermediate_size": ffn[0],
        "use_double_wide_mlp": len(set(ffn)) > 1,
        "hidden_size_per_layer_input": per_layer_size,
        "vocab_size_per_layer_input": (
            tensor_shape(reader, "per_layer_token_embd.weight")[0] if per_layer_size else
            config["vocab_size"]
        ),
        "final_logit_softcapping": get("final_logit_softcapping", kind="number"),
        "rope_parameters": {
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 2 * int((freqs == 1.0).sum()) / global_head_dim,
                "rope_theta": config["rope_theta"],
            },
            "sliding_attention": {
                "rope_type": "default",
                "partial_rotary_factor": get("rope.dimension_count_swa", head_dim) / head_dim,
                "rope_theta": get("rope.freq_base_swa", 10000.0, kind="number"),
            },
        },
    }


def phi3_rope(reader: GGUFFile, config: dict, rope_dims: int) -> dict:
    """Phi-3's rotary settings: the rotated share of each head (``rope.dimension_count``) and,
    for the long-context models, the LongRoPE factors llama.cpp stores as the tensors
    ``rope_factors_long`` and ``rope_factors_short``."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope = {"partial_rotary_factor": rope_dims / head_dim}
    names = {tensor.name for tensor in reader.tensors}
    if CONFIG_TENSORS["phi3"][0] in names:
        long, short = (dequantize(tensor_named(reader, n)) for n in CONFIG_TENSORS["phi3"])
        if long.shape != (rope_dims // 2,) or short.shape != long.shape:
            raise GGUFError(
                f"{reader.path}: rope_factors_long and rope_factors_short have shapes "
                f"{long.shape} and {short.shape}, not ({rope_dims // 2},)"
            )
        rope["rope_scaling"] = {
            "type": "longrope",
            "long_factor": [float(f) for f in long],
            "short_factor": [float(f) for f in short],
        }
        rope["original_max_position_embeddings"] = hparam(
            reader, "phi3", "rope.scaling.original_context_length"
        )
    return rope


def qwen35_config(reader: GGUFFile, config: dict, get) -> dict:
    """Qwen3.5's linear-attention (gated delta net) and rotary settings: llama.cpp's ``ssm``
    keys name them as for Mamba (``group_count`` the key heads, ``time_step_rank`` the value
    heads, ``state_size`` the key head size, ``inner_size`` all value heads' size)."""
    value_heads = get("ssm.time_step_rank")
    inner_size = get("ssm.inner_size")
    if inner_size % value_heads:
        raise GGUFError(
            f"{reader.path}: qwen35.ssm.inner_size {inner_size} is not a multiple of "
            f"qwen35.ssm.time_step_rank {value_heads}"
        )
    sections = metadata(reader, "qwen35.rope.dimension_sections", [], kind="ints")
    rope = {
        "type": "default",
        "rope_theta": config["rope_theta"],
        "partial_rotary_factor": get("rope.dimension_count") / config["head_dim"],
    }
    if sections:
        rope["mrope_section"] = sections[:3]
    return {
        "linear_num_key_heads": get("ssm.group_count"),
        "linear_num_value_heads": value_heads,
        "linear_key_head_dim": get("ssm.state_size"),
        "linear_value_head_dim": inner_size // value_heads,
        "linear_conv_kernel_dim": get("ssm.conv_kernel"),
        "full_attention_interval": get("full_attention_interval"),
        "rope_parameters": rope,
    }


def tensor_named(reader: GGUFFile, name: str):
    """The GGUF tensor ``name``; a :class:`GGUFError` if the file has none."""
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise GGUFError(f"{reader.path}: tensor {name!r} is missing")


def tensor_shape(reader: GGUFFile, name: str) -> tuple[int, ...]:
    """The ``(rows, columns)`` shape of a GGUF tensor (GGUF lists dimensions innermost first)."""
    return tuple(int(n) for n in reversed(tensor_named(reader, name).shape))


def tensor_kind(gguf_name: str) -> str:
    """What a tensor is, e.g. ``attn_q`` for ``blk.3.attn_q.weight``, ``output_norm`` for
    ``output_norm.weight``."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def parameter_tensors(reader: GGUFFile, architecture: str, n_layers: int) -> list:
    """The tensors that become the model's parameters: all but those read into the config
    (:data:`CONFIG_TENSORS`) and the blocks from ``n_layers`` on (multi-token prediction)."""
    skipped = CONFIG_TENSORS.get(architecture, ())
    return [
        tensor for tensor in reader.tensors
        if tensor.name not in skipped
        and not (tensor.name.startswith("blk.") and layer_index(tensor.name) >= n_layers)
    ]


def layer_index(gguf_name: str) -> int:
    """The layer of a ``blk.N.`` tensor (``-1`` where ``N`` is not a number)."""
    index = gguf_name.split(".")[1]
    return int(index) if index.isascii() and index.isdigit() else -1


def parameter_shape(tensor, architecture: str) -> tuple[int, ...]:
    """The shape of the mlx-lm parameter the tensor becomes (:func:`value_transform`)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if architecture == "qwen35" and tensor_kind(tensor.name) == "ssm_conv1d":
        return (*shape, 1)
    return shape


def check_tensors(reader: GGUFFile, architecture: str, config: dict) -> None:
    """A :class:`GGUFError` unless the tensors are exactly the parameters, in name and shape, of
    the mlx-lm model ``config`` makes (built lazily, nothing allocated, once the layer count and
    the hidden size are known to be the tensors')."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    n_layers = config["num_hidden_layers"]
    n_blocks = n_layers + mtp_layers(reader, architecture)
    names = {}
    for tensor in parameter_tensors(reader, architecture, n_layers):
        try:
            names[mlx_name(tensor.name, architecture)] = tensor
        except GGUFError as error:
            raise GGUFError(f"{reader.path}: {error}") from None
    blocks = [tensor.name for tensor in reader.tensors if tensor.name.startswith("blk.")]
    layers = {layer_index(name) for name in blocks}
    if layers != set(range(n_blocks)):
        raise GGUFError(
            f"{reader.path}: {architecture}.block_count is {n_blocks}, but the tensors are of "
            f"{len(layers)} layers (blk.{min(layers, default=0)} to blk.{max(layers, default=0)})"
        )
    hidden_size = tensor_shape(reader, "token_embd.weight")[-1]
    if hidden_size != config["hidden_size"]:
        raise GGUFError(
            f"{reader.path}: {architecture}.embedding_length is {config['hidden_size']}, but "
            f"token_embd.weight has rows of {hidden_size}"
        )
    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
    except Exception as error:  # whatever mlx-lm's model makes of impossible hyperparameters
        raise GGUFError(
            f"{reader.path}: its hyperparameters make no {config['model_type']} model "
            f"({type(error).__name__}: {error})".replace("\n", " ")
        ) from error
    expected = {name: tuple(array.shape) for name, array in tree_flatten(model.parameters())}
    shapes = {name: parameter_shape(t, architecture) for name, t in names.items()}
    if hasattr(model, "sanitize"):  # as mlx-lm's loader does (a tied head drops lm_head)
        kept = model.sanitize({name: mx.zeros(shape) for name, shape in shapes.items()})
        expected = {name: tuple(array.shape) for name, array in tree_flatten(model.parameters())}
        names = {name: names[name] for name in kept if name in names}
    for name, tensor in names.items():
        shape = shapes[name]
        if name not in expected:
            raise GGUFError(
                f"{reader.path}: tensor {tensor.name} is not a parameter of the "
                f"{config['model_type']} model its metadata describes"
            )
        if shape != expected[name]:
            raise GGUFError(
                f"{reader.path}: tensor {tensor.name} has shape {shape}, but the model its "
                f"metadata describes has {expected[name]} there"
            )
    missing = sorted(set(expected) - set(names))
    if missing:
        raise GGUFError(
            f"{reader.path}: the model its metadata describes has {len(missing)} parameters that "
            f"no tensor holds, the first {missing[0]}"
        )


def mlx_name(gguf_name: str, architecture: str) -> str:
    """The mlx-lm parameter path of a GGUF tensor, e.g. ``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``."""
    parts = gguf_name.split(".")
    prefix = PREFIXES.get(architecture, "")
    if parts[0] == "blk" and len(parts) in (3, 4) and layer_index(gguf_name) >= 0:
        names = ARCHITECTURE_LAYER_NAMES.get(architecture, LAYER_TENSOR_NAMES)
        layer, rest = f"{prefix}model.layers.{parts[1]}", ".".join(parts[2:])
        if rest in names:  # a parameter named in full (qwen35's ssm_a)
            return f"{layer}.{names[rest]}"
        if len(parts) == 4 and parts[2] in names:
            return f"{layer}.{names[parts[2]]}.{parts[3]}"
    elif len(parts) == 2 and parts[0] in GLOBAL_TENSOR_NAMES:
        return f"{prefix}{GLOBAL_TENSOR_NAMES[parts[0]]}.{parts[1]}"
    raise GGUFError(
        f"tensor {gguf_name!r} is not one the GGUF import reads in a {architecture} model"
    )


def unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows for interleaved rotary embeddings."""
    shape = rows.shape
    rows = rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
    return rows.swapaxes(1, 2).reshape(shape)


def untile_v_heads(rows: np.ndarray, key_heads: int, head_size: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Qwen3.5's linear-attention value heads (rows of
    ``head_size``): stored tiled (for key heads 0, 1: ``K0 K1 K0 K1``), back to grouped by key
    head (``K0 K0 K1 K1``), as mlx-lm repeats the key heads."""
    shape = rows.shape
    rows = rows.reshape(-1, key_heads, head_size, *shape[1:])
    return rows.swapaxes(0, 1).reshape(shape)


def row_transform(rows: np.ndarray, kind: str, architecture: str, config: dict) -> np.ndarray:
    """Undo llama.cpp's reordering of a tensor's rows (also of quantized rows)."""
    if architecture in ROPE_PERMUTED and kind in ("attn_q", "attn_k"):
        heads = config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"]
        return unpermute_rows(rows, heads)
    if architecture == "qwen35" and kind in QWEN35_VALUE_ROWS:
        after_qk, per_element = QWEN35_VALUE_ROWS[kind]
        start = 2 * config["linear_key_head_dim"] * config["linear_num_key_heads"] * after_qk
        head_size = config["linear_value_head_dim"] if per_element else 1
        values = untile_v_heads(rows[start:], config["linear_num_key_heads"], head_size)
        return np.concatenate([rows[:start], values])
    return rows


def value_transform(array: np.ndarray, kind: str, architecture: str, config: dict) -> np.ndarray:
    """Undo what llama.cpp's converter does to a tensor's values (dequantized)."""
    if architecture == "gemma3" and kind.endswith("norm"):
        # llama.cpp stores Gemma's RMSNorm weights as 1 + w; mlx-lm adds the 1 itself.
        return array - 1
    if architecture == "qwen35" and kind == "ssm_a":
        with np.errstate(all="ignore"):  # a positive value is reported as not finite
            return np.log(-array)  # stored as -exp(A_log)
    if architecture == "qwen35" and kind == "ssm_conv1d":
        return array[..., None]  # mlx-lm's depthwise Conv1d weight is [channels, kernel, 1]
    if architecture == "qwen35" and kind == "ssm_out":
        heads, size = config["linear_num_key_heads"], config["linear_value_head_dim"]
        return untile_v_heads(array.T, heads, size).T  # its columns are value heads
    return array



def affine_from_blocks(tensor) -> tuple[np.ndarray, ...]:
    """MLX affine ``(weight, scales, biases)`` of a Q4_0/Q4_1/Q8_0 tensor, exactly: each block of
    32 values becomes one quantization group."""
    tensor_type = tensor.tensor_type
    blocks = np.asarray(tensor.data)
    rows = blocks.shape[0]
    blocks = blocks.reshape(rows, -1, gguf.GGML_QUANT_SIZES[tensor_type][1])
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if tensor_type == gguf.GGMLQuantizationType.Q8_0:
        values = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        biases = -128 * scales
        packed = values
    else:
        if tensor_type == gguf.GGMLQuantizationType.Q4_1:
            biases = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            nibbles = blocks[..., 4:]
        else:
            biases = -8 * scales
            nibbles = blocks[..., 2:]
        # A block stores value i in the low nibble of byte i and value i + 16 in its high
        # nibble; MLX packs consecutive values, the first in the low bits.
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
        packed = values[..., 0::2] | (values[..., 1::2] << 4)
    weight = np.ascontiguousarray(packed).reshape(rows, -1).view(np.uint32)
    return weight, scales, biases


def convert_tensors(
    reader: GGUFFile,
    architecture: str,
    config: dict,
    float_type: mx.Dtype,
    keep_quantized: bool,
) -> tuple[dict[str, mx.array], dict]:
    """The mlx-lm weights of the model, and its ``quantization`` config (empty if none)."""
    weights = {}
    quantization = {}
    tensors = parameter_tensors(reader, architecture, config["num_hidden_layers"])
    for tensor in tqdm(tensors, desc="Importing GGUF tensors", leave=False):
        module, suffix = mlx_name(tensor.name, architecture).rsplit(".", 1)
        kind = tensor_kind(tensor.name)
        bits = QUANTIZED_BITS.get(tensor.tensor_type)
        blocks_kept = kind not in COLUMN_TRANSFORMED.get(architecture, ())
        if keep_quantized and bits is not None and suffix == "weight" and blocks_kept:
            arrays = dict(zip(("weight", "scales", "biases"), affine_from_blocks(tensor)))
            quantization[module] = {"group_size": GROUP_SIZE, "bits": bits}
        else:
            arrays = {suffix: value_transform(dequantize(tensor), kind, architecture, config)}
        for key, array in arrays.items():
            array = row_transform(array, kind, architecture, config)
            if array.dtype != np.uint32 and not np.isfinite(array).all():
                raise GGUFError(
                    f"{reader.path}: tensor {tensor.name} holds values that are not finite (NaN or "
                    "infinite): the file is corrupt"
                )
            array = mx.array(array)
            if array.dtype != mx.uint32:
                array = array.astype(float_type)
            weights[f"{module}.{key}"] = array
    if not quantization:
        return weights, {}
    default_bits = Counter(q["bits"] for q in quantization.values()).most_common(1)[0][0]
    overrides = {path: q for path, q in quantization.items() if q["bits"] != default_bits}
    return weights, {"group_size": GROUP_SIZE, "bits": default_bits, **overrides}


def dequantize(tensor) -> np.ndarray:
    """The float32 values of a GGUF tensor, ``[rows, columns]`` (its type checked by
    :func:`check_tensor_types`)."""
    with np.errstate(all="ignore"):  # corrupt blocks are reported as values that are not finite
        return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)


def bpe_merges(tokens: list[str], ranks: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    best-ranked token first (higher rank is better)."""
    ids = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, rank in zip(tokens, ranks):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        merges.extend((rank, l, r) for l, r in pairs if l in ids and r in ids)
    # Ties between splits of the same token: the longer left piece first.
    merges.sort(key=lambda m: (-m[0], -len(m[1])))
    return [(l, r) for _, l, r in merges]


def file_merges(reader: GGUFFile) -> list[tuple[str, str]]:
    """The BPE merges of ``tokenizer.ggml.merges``: ``"left right"``, split at the first space
    after the first character (a left piece may start with one)."""
    merges = metadata(reader, "tokenizer.ggml.merges", [], kind="strings")
    split = [(m[: m.find(" ", 1)], m[m.find(" ", 1) + 1 :]) for m in merges if m.find(" ", 1) > 0]
    if len(split) != len(merges):
        raise GGUFError(
            f"{reader.path}: metadata tokenizer.ggml.merges holds a merge without a space"
        )
    return split


def build_tokenizer(reader: GGUFFile) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's vocabulary."""
    tokenizer_model = metadata(reader, "tokenizer.ggml.model", kind="str")
    tokens = vocabulary(reader)
    token_types = metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens), kind="ints")
    if len(token_types) != len(tokens):
        raise GGUFError(
            f"{reader.path}: metadata tokenizer.ggml.token_type has {len(token_types)} items, "
            f"for {len(tokens)} tokens"
        )
    if tokenizer_model == "gpt2":
        pre = metadata(reader, "tokenizer.ggml.pre", "default", kind="str")
        if pre not in BYTE_LEVEL_SPLITS:
            raise GGUFError(
                f"{reader.path}: byte-level pre-tokenizer {brief(pre)} (tokenizer.ggml.pre) is not "
                f"supported; supported: {', '.join(sorted(BYTE_LEVEL_SPLITS))}"
            )
        tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, file_merges(reader)))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in BYTE_LEVEL_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()
    elif tokenizer_model == "gemma4":
        # BPE over the text itself, spaces as "\u2581" (no byte-level mapping, no prefix space),
        # a byte that no token holds as its <0xXX> token.
        vocab = {t: i for i, t in enumerate(tokens)}
        tokenizer = Tokenizer(models.BPE(vocab, file_merges(reader), byte_fallback=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="never", split=False
        )
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    elif tokenizer_model == "llama":
        # Sentencepiece BPE. Tokens made only of spaces are stored with real spaces.
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        if metadata(reader, "general.architecture") == "gemma3":
            # Gemma's scores do not follow its merge order; the vocabulary order does.
            ranks = [-i for i in range(len(tokens))]
        else:
            ranks = metadata(reader, "tokenizer.ggml.scores", kind="numbers")
            if ranks is None or len(ranks) != len(tokens):
                raise GGUFError(
                    f"{reader.path}: metadata tokenizer.ggml.scores is missing or not one score "
                    "per token"
                )
        unk_id = token_id(reader, "tokenizer.ggml.unknown_token_id", len(tokens)) or 0
        tokenizer = Tokenizer(
            models.BPE(
                {t: i for i, t in enumerate(tokens)},
                bpe_merges(tokens, ranks),
                unk_token=tokens[unk_id],
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        add_prefix = metadata(reader, "tokenizer.ggml.add_space_prefix", True, kind="bool")
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False
        )
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            + [decoders.Strip(" ", 1, 0)] * add_prefix
        )
    else:
        raise GGUFError(
            f"{reader.path}: tokenizer {brief(tokenizer_model)} (tokenizer.ggml.model) is not "
            "supported; supported: 'gpt2' (byte-level BPE), 'llama' (sentencepiece BPE), 'gemma4' "
            "(BPE on the text)"
        )
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, token_types)
            if kind == CONTROL_TOKEN
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types)
            if kind == USER_DEFINED_TOKEN
        ]
    )
    return tokenizer


def vocabulary(reader: GGUFFile) -> list[str]:
    """The tokens of the GGUF's vocabulary (``tokenizer.ggml.tokens``)."""
    tokens = metadata(reader, "tokenizer.ggml.tokens", kind="strings")
    if not tokens:
        raise GGUFError(f"{reader.path}: metadata tokenizer.ggml.tokens is missing or empty")
    return tokens


def save_tokenizer(reader: GGUFFile, output_dir: Path) -> None:
    """Save the GGUF's tokenizer (special tokens, BOS/EOS behaviour, chat template) in
    Hugging Face format; a :class:`GGUFError` if its metadata makes no tokenizer."""
    try:
        _save_tokenizer(reader, output_dir)
    except (GGUFError, OSError):
        raise
    except Exception as error:  # tokenizers and transformers on metadata they cannot use
        message = f"{type(error).__name__}: {error}".replace("\n", " ")
        raise GGUFError(
            f"{reader.path}: its tokenizer metadata makes no tokenizer ({message})"
        ) from error


def _save_tokenizer(reader: GGUFFile, output_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = build_tokenizer(reader)
    n_tokens = len(vocabulary(reader))
    special = {
        name: tokenizer.id_to_token(special_id)
        for name, key in SPECIAL_TOKEN_KEYS.items()
        if (special_id := token_id(reader, key, n_tokens)) is not None
    }
    add_bos = "bos_token" in special and metadata(
        reader, "tokenizer.ggml.add_bos_token", False, kind="bool"
    )
    add_eos = "eos_token" in special and metadata(
        reader, "tokenizer.ggml.add_eos_token", False, kind="bool"
    )
    if add_bos or add_eos:
        bos, eos = special.get("bos_token"), special.get("eos_token")
        template = " ".join([bos] * add_bos + ["$A"] + [eos] * add_eos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template,
            pair=f"{template} " + template.replace("$A", "$B"),
            special_tokens=[(t, tokenizer.token_to_id(t)) for t in {bos, eos} if t is not None],
        )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        **special,
    )
    chat_template = metadata(reader, "tokenizer.chat_template", kind="str")
    if chat_template is not None:
        hf_tokenizer.chat_template = chat_template
    hf_tokenizer.save_pretrained(output_dir)
