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
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
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
GEMMA3_LAYER_TENSOR_NAMES = {
    **LAYER_TENSOR_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

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


def model_config(reader: GGUFFile, architecture: str) -> dict:
    """The mlx-lm ``config.json`` of the model, from the GGUF hyperparameters."""

    def hparam(name, default=None, kind="int"):
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

    tensor_names = {tensor.name for tensor in reader.tensors}
    hidden_size = hparam("embedding_length")
    n_heads = hparam("attention.head_count")
    if n_heads > hidden_size and f"{architecture}.attention.key_length" not in reader.fields:
        raise GGUFError(
            f"{reader.path}: {architecture}.attention.head_count is {n_heads}, more than "
            f"{architecture}.embedding_length {hidden_size}, and no "
            f"{architecture}.attention.key_length gives the head dimension"
        )
    head_dim = hparam("attention.key_length", hidden_size // n_heads)
    config = {
        "model_type": ARCHITECTURES[architecture],
        "vocab_size": int(tensor_shape(reader, "token_embd.weight")[0]),
        "hidden_size": hidden_size,
        "num_hidden_layers": hparam("block_count"),
        "intermediate_size": hparam("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": hparam("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": hparam("attention.layer_norm_rms_epsilon", kind="number"),
        "rope_theta": hparam("rope.freq_base", 10000.0, kind="number"),
        "max_position_embeddings": hparam("context_length"),
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
            "factor": hparam("rope.scaling.factor", kind="number"),
        }
    elif scaling != "none":
        raise GGUFError(
            f"{reader.path}: rope scaling {brief(scaling)} ({architecture}.rope.scaling.type) is not "
            "supported (none and linear are)"
        )
    if architecture == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    if architecture == "gemma3":
        # Fixed in llama.cpp's gemma3 graph rather than stored in the file; the 27B model
        # (62 layers) scales queries by hidden_size / n_heads instead of head_dim.
        config["query_pre_attn_scalar"] = (
            hidden_size // n_heads if config["num_hidden_layers"] == 62 else head_dim
        )
        config["sliding_window"] = hparam("attention.sliding_window")
        config["sliding_window_pattern"] = 6
        config["rope_local_base_freq"] = 10000.0
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


def tensor_shape(reader: GGUFFile, name: str) -> tuple[int, ...]:
    """The ``(rows, columns)`` shape of a GGUF tensor (GGUF lists dimensions innermost first)."""
    for tensor in reader.tensors:
        if tensor.name == name:
            return tuple(int(n) for n in reversed(tensor.shape))
    raise GGUFError(f"{reader.path}: tensor {name!r} is missing")


def check_tensors(reader: GGUFFile, architecture: str, config: dict) -> None:
    """A :class:`GGUFError` unless the tensors are exactly the parameters, in name and shape, of
    the mlx-lm model ``config`` makes (built lazily, nothing allocated, once the layer count and
    the hidden size are known to be the tensors')."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    names = {}
    for tensor in reader.tensors:
        try:
            names[mlx_name(tensor.name, architecture)] = tensor
        except GGUFError as error:
            raise GGUFError(f"{reader.path}: {error}") from None
    blocks = [tensor.name for tensor in reader.tensors if tensor.name.startswith("blk.")]
    layers = {int(name.split(".")[1]) for name in blocks}
    n_layers = config["num_hidden_layers"]
    if layers != set(range(n_layers)):
        raise GGUFError(
            f"{reader.path}: {architecture}.block_count is {n_layers}, but the tensors are of "
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
    shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in names.items()}
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
    if parts[0] == "blk" and len(parts) == 4 and parts[1].isascii() and parts[1].isdigit():
        names = GEMMA3_LAYER_TENSOR_NAMES if architecture == "gemma3" else LAYER_TENSOR_NAMES
        if parts[2] in names:
            return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    elif len(parts) == 2 and parts[0] in GLOBAL_TENSOR_NAMES:
        return f"{GLOBAL_TENSOR_NAMES[parts[0]]}.{parts[1]}"
    raise GGUFError(
        f"tensor {gguf_name!r} is not one the GGUF import reads in a {architecture} model"
    )


def unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows for interleaved rotary embeddings."""
    shape = rows.shape
    rows = rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
    return rows.swapaxes(1, 2).reshape(shape)


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
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    quantization = {}
    for tensor in tqdm(reader.tensors, desc="Importing GGUF tensors", leave=False):
        module, suffix = mlx_name(tensor.name, architecture).rsplit(".", 1)
        kind = tensor.name.split(".")[-2]
        bits = QUANTIZED_BITS.get(tensor.tensor_type)
        if keep_quantized and bits is not None and suffix == "weight":
            arrays = dict(zip(("weight", "scales", "biases"), affine_from_blocks(tensor)))
            quantization[module] = {"group_size": GROUP_SIZE, "bits": bits}
        else:
            arrays = {suffix: dequantize(tensor)}
            if architecture == "gemma3" and kind.endswith("norm"):
                # llama.cpp stores Gemma's RMSNorm weights as 1 + w; mlx-lm adds the 1 itself.
                arrays[suffix] = arrays[suffix] - 1
        if architecture == "llama" and kind in heads:
            arrays = {k: unpermute_rows(v, heads[kind]) for k, v in arrays.items()}
        for key, array in arrays.items():
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
        merges = metadata(reader, "tokenizer.ggml.merges", [], kind="strings")
        merges = [tuple(m.split(" ", 1)) for m in merges]
        if any(len(merge) != 2 for merge in merges):
            raise GGUFError(
                f"{reader.path}: metadata tokenizer.ggml.merges holds a merge without a space"
            )
        tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in BYTE_LEVEL_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()
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
            "supported; supported: 'gpt2' (byte-level BPE), 'llama' (sentencepiece BPE)"
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
