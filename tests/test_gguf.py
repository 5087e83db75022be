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
ARCHITECTURE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
SAMPLES = [
    "It is a truth universally acknowledged.",
    "  Spaces,\ttabs\nand 1234 digits; a wife?",
    "Ünïcödé — “quotes” and emoji 🙂!",
]
TOKENS = mx.array([[5, 17, 300, 2, 999, 42, 7, 123, 64, 65, 511, 0, 8, 9, 10, 11, 12, 13]])

# mlx-lm module -> llama.cpp tensor name (llama.cpp's gguf-py tensor mapping).
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_tensor_name(path: str, architecture: str) -> str:
    """llama.cpp's name of an mlx-lm parameter."""
    module, param = path.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        names = GEMMA3_LAYER_NAMES if architecture == "gemma3" else LAYER_NAMES
        return f"blk.{layer}.{names[rest]}.{param}"
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    return f"{names[module]}.{param}"


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


def write_gguf(path, model_dir, model: nn.Module, tensor_type=Q.F32) -> dict:
    """Write ``model`` as llama.cpp would; returns the float32 weights the file really holds
    (after quantization), in mlx-lm's layout."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = ARCHITECTURE[config["model_type"]]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", config["num_hidden_layers"])
    writer.add_uint32(f"{arch}.context_length", config["max_position_embeddings"])
    writer.add_uint32(f"{arch}.embedding_length", config["hidden_size"])
    writer.add_uint32(f"{arch}.feed_forward_length", config["intermediate_size"])
    writer.add_uint32(f"{arch}.attention.head_count", config["num_attention_heads"])
    writer.add_uint32(f"{arch}.attention.head_count_kv", config["num_key_value_heads"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    writer.add_float32(f"{arch}.rope.freq_base", config["rope_theta"])
    if arch in ("qwen3", "gemma3"):
        writer.add_uint32(f"{arch}.attention.key_length", config["head_dim"])
        writer.add_uint32(f"{arch}.attention.value_length", config["head_dim"])
    if arch == "gemma3":
        writer.add_uint32(f"{arch}.attention.sliding_window", config["sliding_window"])
    add_byte_level_tokenizer(writer, model_dir, config["vocab_size"])

    stored = {}
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value, dtype=np.float32)
        kind = gguf_tensor_name(name, arch).split(".")[-2]
        if arch == "gemma3" and kind.endswith("norm"):
            array = array + 1
        if arch == "llama" and kind == "attn_q":
            array = llama_cpp_permute(array, config["num_attention_heads"])
        if arch == "llama" and kind == "attn_k":
            array = llama_cpp_permute(array, config["num_key_value_heads"])
        if tensor_type != Q.F32 and array.ndim == 2:
            data = gguf.quants.quantize(array, tensor_type)
            writer.add_tensor(gguf_tensor_name(name, arch), data, raw_dtype=tensor_type)
            stored[name] = gguf.quants.dequantize(
                gguf.quants.quantize(np.array(value, dtype=np.float32), tensor_type), tensor_type
            )
        else:
            writer.add_tensor(gguf_tensor_name(name, arch), array)
            stored[name] = np.array(value, dtype=np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def randomize_norms(model: nn.Module, seed: int = 1) -> None:
    """Give the norm weights distinct random values, so a swapped or offset norm shows."""
    rng = np.random.default_rng(seed)
    norms = [
        (name, mx.array(rng.normal(0.5, 0.3, value.shape).astype(np.float32)))
        for name, value in tree_flatten(model.parameters())
        if value.ndim == 1 and "norm" in name
    ]
    model.load_weights(norms, strict=False)


def reference_and_import(tmp_path, model_type, tied, tensor_type=Q.F32, keep_quantized=False):
    """(reference model with the weights the GGUF holds, imported model, imported tokenizer)."""
    overrides = {}
    if model_type == "gemma3_text":
        # llama.cpp fixes Gemma 3's layer pattern at 5 sliding + 1 global; a short window
        # and distinct rope bases make both kinds of layer matter.
        overrides = dict(
            num_hidden_layers=6, sliding_window_pattern=6, sliding_window=8, rope_theta=1e6
        )
    model_dir = make_tiny_model(
        tmp_path / "tiny", model_type=model_type, tied=tied, **overrides
    )
    reference, _ = load(str(model_dir))
    randomize_norms(reference)
    stored = write_gguf(tmp_path / "model.gguf", model_dir, reference, tensor_type)
    reference.load_weights([(k, mx.array(v)) for k, v in stored.items()])
    imported_dir = import_gguf(
        tmp_path / "model.gguf", tmp_path / "imported", keep_quantized=keep_quantized
    )
    model, tokenizer = load(str(imported_dir))
    return reference, model, tokenizer


@pytest.mark.parametrize(
    "model_type, tied",
    [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False), ("gemma3_text", True)],
)
def test_import_matches_original_logits(tmp_path, model_type, tied):
    reference, model, tokenizer = reference_and_import(tmp_path, model_type, tied)
    assert mx.allclose(model(TOKENS), reference(TOKENS), atol=1e-4, rtol=1e-4).item()
    config = json.loads((tmp_path / "imported" / "config.json").read_text())
    assert config["model_type"] == model_type
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


def test_sentencepiece_tokenizer_matches_trained_one(tmp_path):
    """A sentencepiece-style vocabulary (no merges in the file, only scores) encodes like the
    BPE tokenizer it came from."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = (AUSTEN_DIR / "calibration.txt").read_text()[:200_000]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, show_progress=False
    )
    trained.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    vocab = trained.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", [-float(i) for i in range(len(tokens))])
    writer.add_array(
        "tokenizer.ggml.token_type",
        [3 if t in ("<unk>", "<s>", "</s>") else 6 if t in byte_tokens else 1 for t in tokens],
    )
    writer.add_uint32("tokenizer.ggml.unknown_token_id", vocab["<unk>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    tokenizer = build_tokenizer(GGUFFile(tmp_path / "spm.gguf"))
    held_out = (AUSTEN_DIR / "calibration.txt").read_text()[300_000:310_000] + " 😀 ∮"
    for line in held_out.splitlines():
        assert tokenizer.encode(line).ids == trained.encode(line).ids
        assert tokenizer.decode(tokenizer.encode(line).ids) == line


def test_unsupported_inputs_raise(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="phi3"):
        import_gguf(tmp_path / "phi.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="float"):
        import_gguf(tmp_path / "phi.gguf", tmp_path / "out", dtype="int8")


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
