"""Shared fixtures: tiny random mlx-lm models and the real GGUF files."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

AUSTEN_DIR = Path(__file__).resolve().parents[1] / "flashhead_mlx" / "data"
SHARED_AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
GGUF_DIR = Path(
    os.environ.get("FLASHHEAD_GGUF_DIR", Path.home() / ".cache" / "flashhead-mlx" / "gguf")
)
GGUF_FILES = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}

TINY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession "
    "of a good fortune, must be in want of a wife. "
) * 20


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    """``flashhead-mlx *args`` in a new process (the environment plus ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "flashhead_mlx.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def gguf_path(name: str) -> Path:
    """Path of a real GGUF model, or skip the test with the command that fetches it."""
    path = GGUF_DIR / GGUF_FILES[name]
    if not path.exists():
        pytest.skip(
            f"{path} is absent: run ../shared/models/fetch_models.sh "
            "(or set FLASHHEAD_GGUF_DIR) to run the real-model tests"
        )
    return path


def make_tokenizer(path: Path, vocab_size: int) -> None:
    """Train a small byte-level BPE tokenizer and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 400),
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def make_tiny_model(
    path: Path,
    model_type: str = "llama",
    vocab_size: int = 1000,
    hidden_size: int = 64,
    tied: bool = True,
    quantize: bool = False,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a tiny random mlx-lm model folder (float32) that ``mlx_lm.load`` reads.

    ``config_overrides`` replace entries of the default ``config.json``."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    config = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 512,
    }
    if model_type in ("gemma3_text", "gemma3", "gemma2"):
        config.update(query_pre_attn_scalar=hidden_size // 4, sliding_window=64)
    if model_type in ("gemma3_text", "gemma3"):
        config.update(sliding_window_pattern=2)
    config.update(config_overrides)
    wrapped = model_type == "gemma3"  # the multimodal wrapper around a gemma3_text model
    if wrapped:
        config["model_type"] = "gemma3_text"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    model, config = load_model(path, lazy=False, strict=False)
    if quantize:
        model, config = quantize_model(model, config, group_size=32, bits=4)
    if wrapped:
        weights = {f"language_model.{k}": v for k, v in tree_flatten(model.parameters())}
        mx.save_safetensors(str(path / "model.safetensors"), weights)
        config = {"model_type": "gemma3", "vocab_size": vocab_size, "text_config": config}
    else:
        save_model(path, model, donate_model=False)
    save_config(config, path / "config.json")
    make_tokenizer(path, vocab_size)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random llama with a tied head and a vocabulary that is not a multiple of 16."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_converted(tiny_llama, tmp_path_factory) -> Path:
    """``tiny_llama`` converted (256 calibration tokens), once per session: not to be changed."""
    from flashhead_mlx.pipeline import convert

    out = tmp_path_factory.mktemp("converted") / "tiny-flashhead"
    return convert(str(tiny_llama), str(out), calibration_tokens=256)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported from its GGUF as a float32 mlx-lm folder (once per session)."""
    from flashhead_mlx.gguf import import_gguf

    return import_gguf(gguf_path("smollm2"), tmp_path_factory.mktemp("gguf") / "smollm2")


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> Path:
    """Gemma-3-270M imported from its GGUF as a float32 mlx-lm folder (once per session)."""
    from flashhead_mlx.gguf import import_gguf

    return import_gguf(gguf_path("gemma3"), tmp_path_factory.mktemp("gguf") / "gemma3")


def make_clusters(weight, cluster_size: int = 16, seed: int = 0) -> dict:
    """A stand-in for ``clustering.cluster_head``: random balanced clusters, padding slots
    (-1) scattered at random, centroids the mean of each cluster's rows, small random biases."""
    import numpy as np

    weight = np.asarray(weight, dtype=np.float32)
    vocab_size = weight.shape[0]
    n_clusters = -(-vocab_size // cluster_size)
    rng = np.random.default_rng(seed)
    order = np.full(n_clusters * cluster_size, -1, dtype=np.int32)
    order[rng.permutation(order.size)[:vocab_size]] = rng.permutation(vocab_size)
    slots = order.reshape(n_clusters, cluster_size)
    rows = np.where((slots >= 0)[..., None], weight[np.maximum(slots, 0)], 0.0)
    centroids = rows.sum(1) / (slots >= 0).sum(1, keepdims=True)
    return {
        "order": order,
        "centroids": centroids.astype(np.float32),
        "cluster_bias": rng.normal(0, 0.01, n_clusters).astype(np.float32),
    }


def assert_batch_matches_single_rows(head, h, paths) -> None:
    """``head``'s candidates and greedy tokens for the rows ``h`` ``[M, d]`` on each batch path of
    ``paths``, against single-row calls (which take the per-row path) row by row.

    The tolerance of a different matmul shape (float32 sums in another order): the same candidate
    tokens, each logit within ``1e-5 * sum_i |h_i w_i| + 1e-5``, and the same greedy token unless
    the batch's token is within twice that of the single row's best logit (a near-tie)."""
    import numpy as np

    from flashhead_mlx.kernels import best_token

    singles = [head.candidates(h[row : row + 1]) for row in range(h.shape[0])]
    one_greedy = [int(best_token(*single)[0]) for single in singles]
    singles = [tuple(np.array(a)[0] for a in single) for single in singles]
    try:
        for path in paths:
            head.batch_path = path
            tokens, logits = (np.array(a) for a in head.candidates(h))
            greedy = np.array(head.greedy(h))
            for row, (one_tokens, one_logits) in enumerate(singles):
                np.testing.assert_array_equal(tokens[row], one_tokens)
                real = one_tokens >= 0
                rows = np.array(head.embed(mx.array(one_tokens[real])).astype(mx.float32))
                tol = 1e-5 * np.abs(rows) @ np.abs(np.array(h[row].astype(mx.float32))) + 1e-5
                assert np.all(np.isneginf(logits[row][~real]))
                assert np.all(np.abs(logits[row][real] - one_logits[real]) <= tol), path
                if greedy[row] != one_greedy[row]:
                    at = np.flatnonzero(one_tokens == greedy[row])[0]
                    assert one_logits.max() - one_logits[at] <= 2 * tol.max(), path
    finally:
        head.batch_path = None


@contextlib.contextmanager
def broken_kernels():
    """The CPU emulator (:func:`flashhead_mlx.testing.metal_emulator.emulate`, yielding its
    launches), with every kernel's source ending in an ``#error``: no kernel compiles."""
    from flashhead_mlx.testing.metal_emulator import emulate

    with emulate() as launches, pytest.MonkeyPatch.context() as mp:
        factory = mx.fast.metal_kernel
        mp.setattr(mx.fast, "metal_kernel", lambda **kw: factory(
            **{**kw, "source": kw["source"] + "\n#error forced by the test\n"}))
        yield launches
