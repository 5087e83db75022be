"""GGUF import: synthetic GGUFs written with llama.cpp's conventions, and the real models."""

import json
import math

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import AUSTEN_DIR, TINY_TEXT, gguf_path, make_tiny_model
from mlx.utils import tree_flatten
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler

from flashhead_mlx.gguf import affine_from_blocks, build_tokenizer, import_gguf
from flashhead_mlx.gguf_file import GGUFError, GGUFFile

Q = gguf.GGMLQuantizationType
ARCHITECTURE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
                "phi3": "phi3", "qwen3_5": "qwen35", "smollm3": "smollm3", "granite": "granite",
                "olmo2": "olmo2", "olmo3": "olmo2", "gemma4_text": "gemma4"}
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
SAMPLES = [
    "It is a truth universally acknowledged.",
    "  Spaces,\ttabs\nand 1234 digits; a wife?",
    "Ünïcödé — “quotes” and emoji 🙂!",
]
TOKENS = mx.array([[5, 17, 300, 2, 999, 42, 7, 123, 64, 65, 511, 0, 8, 9, 10, 11, 12, 13]])
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

def llama_cpp_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama q/k rows."""
    return (
        rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def add_byte_level_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir, vocab_size: int) -> None:
    """The tiny model's byte-level BPE as llama.cpp writes it, padded to ``vocab_size``."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {added["content"] for added in spec["added_tokens"]}
    types = [3 if t in specials else 1 for t in tokens]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [5] * (vocab_size - len(types))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.eos_token_id", vocab["<eos>"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", vocab["<eos>"])
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_string("tokenizer.chat_template", CHAT_TEMPLATE)


# Gemma 4's rotary settings: a quarter of each full-attention head rotated ("proportional").
GEMMA4_ROPE = {
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                       "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "partial_rotary_factor": 1.0, "rope_theta": 1e4},
}
# Tiny configs of the architectures where make_tiny_model's default is not enough.
TINY_CONFIGS = {
    # llama.cpp fixes Gemma 3's layer pattern at 5 sliding + 1 global; a short window and
    # distinct rope bases make both kinds of layer matter.
    "gemma3_text": dict(
        num_hidden_layers=6, sliding_window_pattern=6, sliding_window=8, rope_theta=1e6
    ),
    # Half of each head rotated, with LongRoPE factors (a context 2x the original).
    "phi3": dict(
        partial_rotary_factor=0.5,
        original_max_position_embeddings=256,
        rope_scaling={"type": "longrope", "long_factor": [1.0, 1.5, 2.5, 4.0],
                      "short_factor": [1.0, 1.1, 1.2, 1.3]},
    ),
    # A layer without rotary embeddings (llama.cpp fixes them at every fourth).
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=4),
    "granite": dict(logits_scaling=8.0, embedding_multiplier=2.0, attention_multiplier=0.2,
                    residual_multiplier=0.5, attention_bias=False, mlp_bias=False),
    "olmo3": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    # Gemma 4 as its small models: per-layer inputs, the last layer reusing an earlier one's keys
    # and values (and a double-wide MLP), wider full-attention heads with a quarter rotated.
    "gemma4_text": dict(
        num_hidden_layers=4, global_head_dim=32, num_kv_shared_layers=1, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=1000,
        use_double_wide_mlp=True, final_logit_softcapping=30.0,
        rope_parameters=GEMMA4_ROPE,
    ),
    # Gemma 4 as its large dense model: full-attention layers whose keys are their values, with
    # their own kv head count (per layer in the file), no per-layer inputs.
    "gemma4_text/k_eq_v": dict(
        num_hidden_layers=2, global_head_dim=32, num_kv_shared_layers=0, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], attention_k_eq_v=True,
        num_global_key_value_heads=1, hidden_size_per_layer_input=0, use_double_wide_mlp=False,
        final_logit_softcapping=30.0,
        rope_parameters=GEMMA4_ROPE,
    ),
    # One linear-attention layer (4 value heads on 2 key heads: llama.cpp reorders them) and one
    # full-attention layer.
    "qwen3_5": dict(
        full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        rope_parameters={"type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]},
    ),
}


def hugging_face(name: str, value: np.ndarray, model_type: str) -> tuple[str, np.ndarray]:
    """The Hugging Face checkpoint's name and value of an mlx-lm parameter (what mlx-lm's
    ``sanitize`` did on loading it, undone)."""
    if model_type == "qwen3_5":
        name = name.removeprefix("language_model.")
        if "conv1d" in name:
            value = value.transpose(0, 2, 1)  # mlx-lm [C, K, 1], Hugging Face [C, 1, K]
        shifted = (".input_layernorm.weight", ".post_attention_layernorm.weight",
                   "model.norm.weight", ".q_norm.weight", ".k_norm.weight")
        if name.endswith(shifted):
            value = value - 1  # Qwen3.5 scales by 1 + w; mlx-lm adds the 1 on loading
    return name, value


def reorder_v_heads(array: np.ndarray, axis: int, key_heads: int, head_size: int) -> np.ndarray:
    """llama.cpp's reordering of linear-attention value heads along ``axis``, from grouped by
    key head to tiled (convert_hf_to_gguf.py's ``_reorder_v_heads``)."""
    array = np.moveaxis(array, axis, 0)
    shape = array.shape
    array = array.reshape(key_heads, -1, head_size, *shape[1:]).swapaxes(0, 1).reshape(shape)
    return np.moveaxis(array, 0, axis)


def llama_cpp(name: str, value: np.ndarray, arch: str, config: dict) -> tuple[str, np.ndarray]:
    """What llama.cpp's convert_hf_to_gguf.py does to a Hugging Face tensor before its name is
    mapped: (the name it maps, the value it writes)."""
    if arch == "gemma4" and name.endswith("layer_scalar"):
        name += ".weight"
    if arch == "gemma3" and name.endswith("norm.weight"):
        value = value + 1
    if arch in ("llama", "smollm3", "granite") and name.endswith("q_proj.weight"):
        value = llama_cpp_permute(value, config["num_attention_heads"])
    if arch in ("llama", "smollm3", "granite") and name.endswith("k_proj.weight"):
        value = llama_cpp_permute(value, config["num_key_value_heads"])
    if arch == "qwen35" and "linear_attn." in name:
        k_heads, k_size = config["linear_num_key_heads"], config["linear_key_head_dim"]
        v_size, qk = config["linear_value_head_dim"], 2 * k_heads * k_size
        if ".in_proj_qkv." in name:
            value = np.concatenate([value[:qk], reorder_v_heads(value[qk:], 0, k_heads, v_size)])
        elif ".in_proj_z." in name:
            value = reorder_v_heads(value, 0, k_heads, v_size)
        elif ".in_proj_a." in name or ".in_proj_b." in name or name.endswith(("A_log", "dt_bias")):
            value = reorder_v_heads(value, 0, k_heads, 1)
        elif ".conv1d." in name:
            value = value.squeeze()
            value = np.concatenate([value[:qk], reorder_v_heads(value[qk:], 0, k_heads, v_size)])
        elif ".out_proj." in name:
            value = reorder_v_heads(value, 1, k_heads, v_size)
    if arch == "qwen35":
        if name.endswith(".A_log"):
            value = -np.exp(value)
        elif name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            value = value + 1
    return name, value


def add_hparams(writer: gguf.GGUFWriter, arch: str, config: dict, n_blocks: int) -> None:
    """The hyperparameters llama.cpp's converter writes for the tiny model's config."""
    writer.add_uint32(f"{arch}.block_count", n_blocks)
    writer.add_uint32(f"{arch}.context_length", config["max_position_embeddings"])
    writer.add_uint32(f"{arch}.embedding_length", config["hidden_size"])
    writer.add_uint32(f"{arch}.attention.head_count", config["num_attention_heads"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    if arch != "gemma4":  # per layer
        writer.add_uint32(f"{arch}.feed_forward_length", config["intermediate_size"])
        writer.add_uint32(f"{arch}.attention.head_count_kv", config["num_key_value_heads"])
    if arch not in ("qwen35", "gemma4"):  # from rope_parameters
        writer.add_float32(f"{arch}.rope.freq_base", config["rope_theta"])
    if arch in ("qwen3", "gemma3", "qwen35"):
        writer.add_uint32(f"{arch}.attention.key_length", config["head_dim"])
        writer.add_uint32(f"{arch}.attention.value_length", config["head_dim"])
    if arch == "gemma3":
        writer.add_uint32(f"{arch}.attention.sliding_window", config["sliding_window"])
    if arch == "olmo2" and "layer_types" in config:
        writer.add_uint32("olmo2.attention.sliding_window", config["sliding_window"])
        writer.add_array("olmo2.attention.sliding_window_pattern",
                         [t == "sliding_attention" for t in config["layer_types"]])
    if arch == "granite":
        writer.add_float32("granite.attention.scale", config["attention_multiplier"])
        writer.add_float32("granite.embedding_scale", config["embedding_multiplier"])
        writer.add_float32("granite.residual_scale", config["residual_multiplier"])
        writer.add_float32("granite.logit_scale", config["logits_scaling"])
    if arch == "phi3":
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        writer.add_uint32("phi3.rope.dimension_count",
                          int(config["partial_rotary_factor"] * config["hidden_size"]) //
                          config["num_attention_heads"])
        writer.add_uint32("phi3.rope.scaling.original_context_length",
                          config["original_max_position_embeddings"])
        writer.add_uint32("phi3.attention.sliding_window", 0)
        scale = config["max_position_embeddings"] / config["original_max_position_embeddings"]
        writer.add_float32("phi3.rope.scaling.attn_factor",
                           math.sqrt(1 + math.log(scale) / math.log(
                               config["original_max_position_embeddings"])))
        assert head_dim * config["partial_rotary_factor"] == 2 * len(
            config["rope_scaling"]["long_factor"])
    if arch == "gemma4":
        add_gemma4_hparams(writer, config, n_blocks)
    if arch == "qwen35":
        rope = config["rope_parameters"]
        writer.add_float32("qwen35.rope.freq_base", rope["rope_theta"])
        writer.add_uint32("qwen35.ssm.conv_kernel", config["linear_conv_kernel_dim"])
        writer.add_uint32("qwen35.ssm.state_size", config["linear_key_head_dim"])
        writer.add_uint32("qwen35.ssm.group_count", config["linear_num_key_heads"])
        writer.add_uint32("qwen35.ssm.time_step_rank", config["linear_num_value_heads"])
        writer.add_uint32("qwen35.ssm.inner_size",
                          config["linear_value_head_dim"] * config["linear_num_value_heads"])
        writer.add_uint32("qwen35.full_attention_interval", config["full_attention_interval"])
        writer.add_uint32("qwen35.rope.dimension_count",
                          int(config["head_dim"] * rope["partial_rotary_factor"]))
        writer.add_array("qwen35.rope.dimension_sections", rope["mrope_section"] + [0])
        if n_blocks > config["num_hidden_layers"]:
            writer.add_uint32("qwen35.nextn_predict_layers", n_blocks - config["num_hidden_layers"])


def add_gemma4_hparams(writer: gguf.GGUFWriter, config: dict, n_blocks: int) -> None:
    """What llama.cpp's Gemma4Model writes beyond the common hyperparameters."""
    swa = [t == "sliding_attention" for t in config["layer_types"]]
    shared_from = n_blocks - config["num_kv_shared_layers"]
    rope = config["rope_parameters"]
    n_ff = config["intermediate_size"]
    if config["use_double_wide_mlp"]:
        writer.add_array("gemma4.feed_forward_length",
                         [n_ff if i < shared_from else 2 * n_ff for i in range(n_blocks)])
    else:
        writer.add_uint32("gemma4.feed_forward_length", n_ff)
    if config.get("num_global_key_value_heads") is not None:
        writer.add_array("gemma4.attention.head_count_kv",
                         [config["num_key_value_heads"] if s else
                          config["num_global_key_value_heads"] for s in swa])
    else:
        writer.add_uint32("gemma4.attention.head_count_kv", config["num_key_value_heads"])
    writer.add_uint32("gemma4.attention.key_length", config["global_head_dim"])
    writer.add_uint32("gemma4.attention.value_length", config["global_head_dim"])
    writer.add_uint32("gemma4.attention.key_length_swa", config["head_dim"])
    writer.add_uint32("gemma4.attention.value_length_swa", config["head_dim"])
    writer.add_float32("gemma4.rope.freq_base", rope["full_attention"]["rope_theta"])
    writer.add_float32("gemma4.rope.freq_base_swa", rope["sliding_attention"]["rope_theta"])
    writer.add_float32("gemma4.final_logit_softcapping", config["final_logit_softcapping"])
    writer.add_uint32("gemma4.attention.sliding_window", config["sliding_window"])
    writer.add_uint32("gemma4.attention.shared_kv_layers", config["num_kv_shared_layers"])
    writer.add_uint32("gemma4.embedding_length_per_layer_input",
                      config["hidden_size_per_layer_input"])
    writer.add_array("gemma4.attention.sliding_window_pattern", swa)
    writer.add_uint32("gemma4.rope.dimension_count", config["global_head_dim"])
    writer.add_uint32("gemma4.rope.dimension_count_swa", int(
        config["head_dim"] * rope["sliding_attention"]["partial_rotary_factor"]))


def gemma4_rope_freqs(config: dict) -> np.ndarray:
    """The full-attention layers' frequency factors llama.cpp writes as ``rope_freqs``."""
    head_dim = config["global_head_dim"]
    rotated = int(head_dim * config["rope_parameters"]["full_attention"]["partial_rotary_factor"]
                  / 2)
    return np.array([1.0] * rotated + [1e30] * (head_dim // 2 - rotated), dtype=np.float32)


def write_gguf(path, model_dir, model: nn.Module, tensor_type=Q.F32, mtp: bool = False) -> dict:
    """Write ``model`` as llama.cpp would: names mapped by gguf-py's own ``TensorNameMap``, values
    transformed as its converter does (with ``mtp``, a copy of the last layer as a
    multi-token-prediction block, which the import must skip); returns the float32 weights the
    file really holds (after quantization), in mlx-lm's layout."""
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    arch = ARCHITECTURE[config["model_type"]]
    n_layers = config["num_hidden_layers"]
    n_blocks = n_layers + mtp
    writer = gguf.GGUFWriter(str(path), arch)
    add_hparams(writer, arch, config, n_blocks)
    add_byte_level_tokenizer(writer, model_dir, config["vocab_size"])
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(model_arch, n_blocks)

    stored, written = {}, []
    for name, value in tree_flatten(model.parameters()):
        hf_name, array = hugging_face(name, np.array(value, dtype=np.float32), config["model_type"])
        hf_name, array = llama_cpp(hf_name, array, arch, config)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        written.append((gguf_name, array))
        stored[name] = np.array(value, dtype=np.float32)
        if tensor_type != Q.F32 and array.ndim == 2 and array.shape[-1] % 32 == 0:
            # Rows reordered at most: the same blocks, in another order (Qwen3.5 reorders
            # columns too: what its blocks hold is not returned).
            stored[name] = None if arch == "qwen35" else gguf.quants.dequantize(
                gguf.quants.quantize(stored[name], tensor_type), tensor_type
            )
    if mtp:
        last = f"blk.{n_layers - 1}."
        written += [(f"blk.{n_layers}." + n.removeprefix(last), a)
                    for n, a in written if n.startswith(last)]
    if arch == "gemma4":
        written.append(("rope_freqs.weight", gemma4_rope_freqs(config)))
    if arch == "phi3":
        for kind in ("long", "short"):
            factors = np.array(config["rope_scaling"][f"{kind}_factor"], dtype=np.float32)
            written.append((f"rope_factors_{kind}.weight", factors))
    for gguf_name, array in written:
        if tensor_type != Q.F32 and array.ndim == 2 and array.shape[-1] % 32 == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, tensor_type),
                              raw_dtype=tensor_type)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def randomize_vectors(model: nn.Module, seed: int = 1) -> None:
    """Give the 1-D parameters (norms, biases, Qwen3.5's A_log and dt_bias) distinct random
    values, so a swapped, offset or reordered one shows."""
    rng = np.random.default_rng(seed)
    vectors = [
        (name, mx.array(rng.normal(0.5, 0.3, value.shape).astype(np.float32)))
        for name, value in tree_flatten(model.parameters())
        if value.ndim == 1
    ]
    model.load_weights(vectors, strict=False)


def reference_and_import(
    tmp_path, model_type, tied, tensor_type=Q.F32, keep_quantized=False, mtp=False
):
    """(reference model with the weights the GGUF holds, imported model, imported tokenizer);
    ``model_type`` an mlx-lm model type, or a key of :data:`TINY_CONFIGS` (``TYPE/VARIANT``)."""
    model_dir = make_tiny_model(
        tmp_path / "tiny", model_type=model_type.split("/")[0], tied=tied,
        **TINY_CONFIGS.get(model_type, {}),
    )
    reference, _ = load(str(model_dir))
    randomize_vectors(reference)
    stored = write_gguf(tmp_path / "model.gguf", model_dir, reference, tensor_type, mtp)
    reference.load_weights([(k, mx.array(v)) for k, v in stored.items()])
    imported_dir = import_gguf(
        tmp_path / "model.gguf", tmp_path / "imported", keep_quantized=keep_quantized
    )
    model, tokenizer = load(str(imported_dir))
    return reference, model, tokenizer


@pytest.mark.parametrize(
    "model_type, tied, mtp",
    [("llama", False, False), ("llama", True, False), ("qwen2", True, False),
     ("qwen3", False, False), ("gemma3_text", True, False), ("phi3", False, False),
     ("phi3", True, False), ("qwen3_5", True, False), ("qwen3_5", False, True),
     ("smollm3", True, False), ("granite", True, False), ("olmo2", False, False),
     ("olmo3", True, False), ("gemma4_text", True, False),
     ("gemma4_text/k_eq_v", False, False)],
)
def test_import_matches_original_logits(tmp_path, model_type, tied, mtp):
    reference, model, tokenizer = reference_and_import(tmp_path, model_type, tied, mtp=mtp)
    assert mx.allclose(model(TOKENS), reference(TOKENS), atol=1e-4, rtol=1e-4).item()
    config = json.loads((tmp_path / "imported" / "config.json").read_text())
    assert config["model_type"] == model_type.split("/")[0]
    assert config["tie_word_embeddings"] == tied
    assert "quantization" not in config


@pytest.mark.parametrize(
    "model_type, tensor_type, keep_quantized",
    [
        ("llama", Q.Q8_0, False),
        ("llama", Q.Q8_0, True),
        ("llama", Q.Q4_0, True),
        ("llama", Q.Q4_1, True),
        ("qwen2", Q.Q5_0, True),
        ("gemma3_text", Q.Q8_0, True),
    ],
)
def test_quantized_import_matches_dequantized_reference(
    tmp_path, model_type, tensor_type, keep_quantized
):
    reference, model, _ = reference_and_import(
        tmp_path, model_type, model_type != "llama", tensor_type, keep_quantized
    )
    # The reference holds gguf's own dequantization of the very blocks in the file.
    assert mx.allclose(model(TOKENS), reference(TOKENS), atol=1e-4, rtol=1e-4).item()
    config = json.loads((tmp_path / "imported" / "config.json").read_text())
    if keep_quantized and tensor_type != Q.Q5_0:
        bits = 8 if tensor_type == Q.Q8_0 else 4
        assert config["quantization"] == {"group_size": 32, "bits": bits}
        assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    else:
        assert "quantization" not in config


def test_qwen35_kept_blocks_match_its_dequantized_import(tmp_path):
    """Qwen3.5's Q8_0 blocks kept quantized give the logits of the same file dequantized (whose
    reading the float32 test checks); its out_proj, whose columns llama.cpp reorders, is
    dequantized either way."""
    model_dir = make_tiny_model(tmp_path / "tiny", model_type="qwen3_5", **TINY_CONFIGS["qwen3_5"])
    source, _ = load(str(model_dir))
    write_gguf(tmp_path / "model.gguf", model_dir, source, Q.Q8_0)
    kept_dir = import_gguf(tmp_path / "model.gguf", tmp_path / "kept", keep_quantized=True)
    kept, _ = load(str(kept_dir))
    plain, _ = load(str(import_gguf(tmp_path / "model.gguf", tmp_path / "plain")))
    assert mx.allclose(kept(TOKENS), plain(TOKENS), atol=1e-4, rtol=1e-4).item()
    linear = kept.language_model.model.layers[0].linear_attn
    assert isinstance(linear.in_proj_qkv, nn.QuantizedLinear)
    assert type(linear.out_proj) is nn.Linear


def test_kept_blocks_equal_mlx_gguf_reader(tmp_path):
    """Q4_0/Q4_1/Q8_0 kept quantized equal what ``mx.load`` reads from the same GGUF."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(tmp_path / "blocks.gguf"), "llama")
    for tensor_type in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        rows = rng.normal(size=(48, 96)).astype(np.float32)
        data = gguf.quants.quantize(rows, tensor_type)
        writer.add_tensor(f"{tensor_type.name}.weight", data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    native = mx.load(str(tmp_path / "blocks.gguf"))
    for tensor in gguf.GGUFReader(tmp_path / "blocks.gguf").tensors:
        weight, scales, biases = affine_from_blocks(tensor)
        prefix = tensor.name.removesuffix(".weight")
        assert np.array_equal(weight, np.array(native[tensor.name]))
        assert np.array_equal(scales, np.array(native[f"{prefix}.scales"]).astype(np.float32))
        assert np.array_equal(biases, np.array(native[f"{prefix}.biases"]).astype(np.float32))
        bits = weight.shape[1] * 32 // 96
        values = mx.dequantize(*map(mx.array, (weight, scales, biases)), group_size=32, bits=bits)
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.allclose(np.array(values), reference, atol=1e-6)


def test_byte_level_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    _, _, tokenizer = reference_and_import(tmp_path, "qwen2", True)
    reference = AutoTokenizer.from_pretrained(str(tmp_path / "tiny"))
    for text in SAMPLES + [TINY_TEXT[:200], "a<eos>b"]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("a<eos>b")[1] == tokenizer.eos_token_id
    assert tokenizer.chat_template == CHAT_TEMPLATE


def trained_bpe(prepend_scheme: str):
    """A byte-fallback BPE tokenizer trained on 200k characters of Austen, spaces as "▁"
    (``prepend_scheme`` of the ``Metaspace`` pre-tokenizer), and its vocabulary in id order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = (AUSTEN_DIR / "calibration.txt").read_text()[:200_000]
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme, split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"] + BYTE_TOKENS, show_progress=False
    )
    trained.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    vocab = trained.get_vocab()
    return trained, sorted(vocab, key=vocab.get)


def write_vocabulary(path, model: str, tokens: list, **arrays) -> None:
    """A GGUF file holding only a vocabulary (``tokenizer.ggml.model`` ``model``) and ``arrays``
    (``tokenizer.ggml.NAME``)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.model", model)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array(
        "tokenizer.ggml.token_type",
        [3 if t in ("<unk>", "<s>", "</s>") else 6 if t in BYTE_TOKENS else 1 for t in tokens],
    )
    for name, values in arrays.items():
        writer.add_array(f"tokenizer.ggml.{name}", values)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", tokens.index("<unk>"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def assert_encodes_like(tokenizer, trained) -> None:
    """``tokenizer`` encodes held-out Austen (and bytes no token holds) as ``trained`` does, and
    decodes it back."""
    held_out = (AUSTEN_DIR / "calibration.txt").read_text()[300_000:310_000] + " 😀 ∮"
    for line in held_out.splitlines():
        assert tokenizer.encode(line).ids == trained.encode(line).ids
        assert tokenizer.decode(tokenizer.encode(line).ids) == line


def test_sentencepiece_tokenizer_matches_trained_one(tmp_path):
    """A sentencepiece-style vocabulary (no merges in the file, only scores) encodes like the
    BPE tokenizer it came from."""
    trained, tokens = trained_bpe("first")
    scores = [-float(i) for i in range(len(tokens))]
    write_vocabulary(tmp_path / "spm.gguf", "llama", tokens, scores=scores)
    assert_encodes_like(build_tokenizer(GGUFFile(tmp_path / "spm.gguf")), trained)


def test_gemma4_tokenizer_matches_trained_one(tmp_path):
    """Gemma 4's vocabulary (``gemma4``: merges in the file, no prefix space) encodes like the
    BPE tokenizer it came from."""
    trained, tokens = trained_bpe("never")
    merges = json.loads(trained.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    write_vocabulary(tmp_path / "gemma4.gguf", "gemma4", tokens, merges=merges)
    assert_encodes_like(build_tokenizer(GGUFFile(tmp_path / "gemma4.gguf")), trained)


def test_unsupported_inputs_raise(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv7")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="rwkv7"):
        import_gguf(tmp_path / "rwkv.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="float"):
        import_gguf(tmp_path / "rwkv.gguf", tmp_path / "out", dtype="int8")


def greedy(model, tokenizer, prompt: str, max_tokens: int = 12) -> tuple[str, list[int]]:
    text = generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0))
    return text, tokenizer.encode(text, add_special_tokens=False)


def perplexity(model, tokenizer, n_tokens: int = 512) -> float:
    """Perplexity on 512 tokens of Austen prose (from Pride and Prejudice, the shipped text)."""
    text = (AUSTEN_DIR / "calibration.txt").read_text()[20_000:40_000]
    tokens = mx.array(tokenizer.encode(text)[: n_tokens + 1])[None]
    logits = model(tokens[:, :-1])
    return math.exp(nn.losses.cross_entropy(logits, tokens[:, 1:]).mean().item())


def assert_plausible_english(text: str, ids: list[int]) -> None:
    letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
    assert letters >= 0.8 * len(text), text
    assert len(set(ids)) >= len(ids) // 2, text


# Perplexity on these 512 tokens, measured: SmolLM2 27.6, Gemma 26.3. Subtle misreadings of the
# file already cross the bounds: SmolLM2 with rope_theta 1e4 gives 34.5, Gemma with a wrong
# sliding-window pattern or window 31.3-31.9, without <bos> 69; q/k left permuted gives 372.
@pytest.mark.slow
def test_smollm2_speaks_english(smollm2_dir):
    model, tokenizer = load(str(smollm2_dir))
    text, ids = greedy(model, tokenizer, "The capital of France is")
    assert "Paris" in text
    assert_plausible_english(text, ids)
    assert perplexity(model, tokenizer) < 32


@pytest.mark.slow
def test_gemma3_speaks_english(gemma3_dir):
    model, tokenizer = load(str(gemma3_dir))
    assert tokenizer.encode("Hi")[0] == tokenizer.bos_token_id  # Gemma wants <bos>
    text, ids = greedy(model, tokenizer, "Once upon a time, there was a")
    assert_plausible_english(text, ids)
    assert perplexity(model, tokenizer) < 30


def assert_same_file(path) -> None:
    """GGUFFile reads what the gguf package's own reader reads: every field, every tensor."""
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.fields == {key: field.contents() for key, field in theirs.fields.items()
                           if not key.startswith("GGUF.")}
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == reference.tensor_type
        assert mine.shape == tuple(int(n) for n in reference.shape)
        assert mine.data.dtype == reference.data.dtype
        np.testing.assert_array_equal(mine.data, reference.data)


def test_gguf_file_reads_what_gguf_reads(tmp_path):
    """Every metadata type, arrays of strings and numbers, plain and quantized tensors, and a
    non-default alignment."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(tmp_path / "all.gguf"), "llama")
    writer.add_uint32("general.alignment", 64)
    for name, add, value in [("u8", writer.add_uint8, 7), ("i8", writer.add_int8, -7),
                             ("u16", writer.add_uint16, 700), ("i16", writer.add_int16, -700),
                             ("i32", writer.add_int32, -70000), ("f32", writer.add_float32, 0.25),
                             ("u64", writer.add_uint64, 2**40), ("i64", writer.add_int64, -2**40),
                             ("f64", writer.add_float64, 1e-300), ("b", writer.add_bool, True),
                             ("s", writer.add_string, "Ünïcödé 🙂")]:
        add(f"test.{name}", value)
    writer.add_array("test.strings", ["a", "", "Ünï", "🙂" * 3])
    writer.add_array("test.floats", [0.5, -1.5, 3.0])
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_tensor("plain", rng.normal(size=(3, 5)).astype(np.float32))
    writer.add_tensor("half", rng.normal(size=(4, 64)).astype(np.float16))
    blocks = gguf.quants.quantize(rng.normal(size=(2, 64)).astype(np.float32), Q.Q4_0)
    writer.add_tensor("q4", blocks, raw_shape=blocks.shape, raw_dtype=Q.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_same_file(tmp_path / "all.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    with pytest.raises(GGUFError, match="bad.gguf is truncated or corrupt: its 16 bytes end"):
        GGUFFile(tmp_path / "bad.gguf")


@pytest.mark.slow
def test_gguf_file_reads_the_real_model_as_gguf_does():
    assert_same_file(gguf_path("smollm2"))
