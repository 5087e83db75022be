"""Loading FlashHead models: ``flashhead_mlx.load``; plain ``mlx_lm.load`` of a default folder
(dense, no remote code) and of the remote-code variant (through its model file, with and without
``flashhead_mlx`` importable); both from the hub (a local stand-in, tests/hub.py); on-the-fly
clustering."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import make_clusters

from flashhead_mlx import decoding, flash_head, load
from flashhead_mlx import loading
from flashhead_mlx.assets import MODEL_FILE, make_assets
from flashhead_mlx.flashhead_model import install_fallback
from flashhead_mlx.model_head import head_module, head_rows
from flashhead_mlx.pipeline import convert
from flashhead_mlx.patch import FlashEmbedding, is_patched
from flashhead_mlx.probe import probe_head
from flashhead_mlx.testing.architectures import build
from hub import LocalHub, snapshot_files

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7]])


@pytest.fixture(scope="module")
def converted(tiny_converted) -> Path:
    return tiny_converted


@pytest.fixture(scope="module")
def remote_code(tmp_path_factory, tiny_llama) -> Path:
    """The remote-code variant (``convert --model-file``)."""
    out = tmp_path_factory.mktemp("load") / "tiny-model-file"
    return convert(str(tiny_llama), str(out), calibration_tokens=256, n_probes=8, model_file=True)


@pytest.fixture
def hub(tmp_path, monkeypatch, converted, remote_code) -> LocalHub:
    """The hub stand-in, serving both variants, where mlx-lm and flashhead-mlx look it up."""
    hub = LocalHub(tmp_path / "hub-cache")
    hub.add("org/tiny-flashhead", converted)
    hub.add("org/tiny-model-file", remote_code)
    hub.install(monkeypatch.setattr)
    return hub


def assets_file(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["flashhead"]["assets_file"]


@pytest.fixture(scope="module")
def dense(converted):
    return load(str(converted), flashhead=False)[0]


def assert_decode_step_matches_dense(model, dense):
    """A decode step: exact dense logits at 0 < n < V candidates, -inf elsewhere."""
    with decoding():
        step = np.array(model(TOKENS[:, :1]))[0, 0]
    reference = np.array(dense(TOKENS[:, :1]))[0, 0]
    finite = np.isfinite(step)
    assert 0 < finite.sum() < step.size
    np.testing.assert_allclose(step[finite], reference[finite], rtol=1e-4, atol=1e-4)


def test_load_returns_what_mlx_lm_load_returns(converted, dense):
    model, tokenizer, config = load(str(converted), return_config=True)
    assert is_patched(model) and not is_patched(dense)
    assert config["flashhead"]["n_probes"] == flash_head(model).n_probes
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(dense(TOKENS)))
    assert_decode_step_matches_dense(model, dense)
    assert isinstance(mlx_lm.generate(model, tokenizer, "It is a truth", max_tokens=4), str)


def test_n_probes_override(converted):
    assert flash_head(load(str(converted), n_probes=2)[0]).n_probes == 2
    assert flash_head(load(str(converted), flashhead={"n_probes": 3})[0]).n_probes == 3
    with pytest.raises(ValueError, match="unknown flashhead options"):
        load(str(converted), flashhead={"probes": 3})


def test_flashhead_disable(converted, monkeypatch):
    monkeypatch.setenv("FLASHHEAD_DISABLE", "1")
    assert not is_patched(load(str(converted))[0])


def test_a_converted_folder_needs_no_remote_code(converted):
    config = json.loads((converted / "config.json").read_text())
    assert "model_file" not in config and not list(converted.glob("*.py"))


BLOCK_FLASHHEAD_MLX = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "flashhead_mlx" or name.startswith("flashhead_mlx."):
            raise ImportError("flashhead_mlx is blocked")

sys.meta_path.insert(0, Block())
"""

DENSE_SCRIPT = BLOCK_FLASHHEAD_MLX + """
import json
import mlx.core as mx
import mlx_lm
import numpy as np

folder, source = sys.argv[1], sys.argv[2]
model, tokenizer = mlx_lm.load(folder)
reference, _ = mlx_lm.load(source)
tokens = mx.array([[5, 17, 42, 99, 3, 250, 7]])
print(json.dumps({
    "head": type(model.model.embed_tokens).__name__,
    "error": float(np.abs(np.array(model(tokens)) - np.array(reference(tokens))).max()),
    "text": mlx_lm.generate(model, tokenizer, "It is a truth", max_tokens=4),
    "same_text": mlx_lm.generate(model, tokenizer, "It is a truth", max_tokens=4)
    == mlx_lm.generate(reference, tokenizer, "It is a truth", max_tokens=4),
    "flashhead_mlx_loaded": any(m.startswith("flashhead_mlx") for m in sys.modules),
}))
"""


def test_plain_mlx_lm_loads_a_converted_folder_dense(converted, tiny_llama):
    """Plain mlx-lm, in a process where flashhead_mlx cannot be imported, and no remote code:
    the folder is the source model (its ModelArgs ignore the flashhead section)."""
    result = subprocess.run(
        [sys.executable, "-c", DENSE_SCRIPT, str(converted), str(tiny_llama)],
        capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["head"] == "Embedding" and report["error"] == 0.0
    assert report["same_text"] and not report["flashhead_mlx_loaded"]


def test_load_never_runs_the_folders_code(remote_code, dense, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(remote_code, folder)
    (folder / MODEL_FILE).write_text("raise RuntimeError('the folder code ran')\n")
    assert_decode_step_matches_dense(load(str(folder))[0], dense)


def test_plain_mlx_lm_needs_trust_remote_code_for_the_model_file(remote_code, dense):
    assert json.loads((remote_code / "config.json").read_text())["model_file"] == MODEL_FILE
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        mlx_lm.load(str(remote_code))
    model, _ = mlx_lm.load(str(remote_code), trust_remote_code=True)
    assert isinstance(model.model.embed_tokens, FlashEmbedding)
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(dense(TOKENS)))
    assert_decode_step_matches_dense(model, dense)


def test_the_model_file_names_the_mlx_lm_version_it_cannot_use(remote_code, monkeypatch):
    import mlx_lm.utils

    monkeypatch.delattr(mlx_lm.utils, "_get_classes")
    message = f"needs mlx_lm.utils._get_classes, which mlx-lm {mlx_lm.__version__} lacks"
    with pytest.raises(ImportError, match=re.escape(message)):
        mlx_lm.load(str(remote_code), trust_remote_code=True)


FALLBACK_SCRIPT = BLOCK_FLASHHEAD_MLX + """
import json
import mlx.core as mx
import mlx_lm
import numpy as np

from hub import LocalHub, snapshot_files

repo, cache, dense_folder = sys.argv[1], sys.argv[2], sys.argv[3]
hub = LocalHub(cache)
hub.add("org/tiny-model-file", repo)
hub.install()
model, tokenizer = mlx_lm.load("org/tiny-model-file", trust_remote_code=True)
dense, _ = mlx_lm.load(dense_folder)
tokens = mx.array([[5, 17, 42, 99, 3, 250, 7]])
step, reference = np.array(model(tokens[:, :1]))[0, 0], np.array(dense(tokens[:, :1]))[0, 0]
finite = np.isfinite(step)
print(json.dumps({
    "head": type(model.model.embed_tokens).__name__,
    "prefill_error": float(np.abs(np.array(model(tokens)) - np.array(dense(tokens))).max()),
    "candidates": int(finite.sum()),
    "vocab": int(step.size),
    "step_error": float(np.abs(step[finite] - reference[finite]).max()),
    "text": mlx_lm.generate(model, tokenizer, "It is a truth", max_tokens=4),
    "calls": [call[2] for call in hub.calls],
    "flashhead_mlx_loaded": any(m.startswith("flashhead_mlx") for m in sys.modules),
}))
"""


def test_plain_mlx_lm_without_flashhead_mlx_fetches_the_assets_and_uses_the_fallback(
    remote_code, tiny_llama, tmp_path
):
    """The remote-code variant from the hub, flashhead_mlx not importable: the model file
    fetches the assets mlx-lm left out, checks them and installs its pure-MLX FlashHead."""
    tests = str(Path(__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(remote_code), str(tmp_path / "cache"), str(tiny_llama)],
        capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": tests},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["head"] == "FallbackEmbedding" and not report["flashhead_mlx_loaded"]
    assert report["calls"][1:] == [[assets_file(remote_code)]]  # mlx-lm's, then the model file's
    assert report["prefill_error"] < 1e-4 and report["step_error"] < 1e-4
    assert 0 < report["candidates"] < report["vocab"]
    assert isinstance(report["text"], str)


def fallback_model(name: str, n_probes: int):
    """A tiny model of ``name`` from the architecture matrix with the model file's pure-MLX
    fallback installed from the ``head`` entry convert records, and its dense twin."""
    model, dense = build(name), build(name)
    clusters = make_clusters(np.array(head_rows(head_module(model))))
    assets = make_assets(clusters, n_probes)
    section = {
        "n_clusters": len(clusters["centroids"]),
        **{k: assets[k] for k in ("cluster_size", "centroid_bits", "centroid_group_size")},
        "n_probes": n_probes,
        "head": probe_head(model).config(),
    }
    arrays = {k: v for k, v in assets.items() if isinstance(v, mx.array)}
    install_fallback(model, {"flashhead": section}, arrays)
    return model, dense


@pytest.mark.parametrize("name", ["gpt2", "llama4_text"])
def test_fallback_takes_the_probed_head(name):
    """gpt2's head is a tied ``model.wte``, llama4_text's an untied ``output`` beside an
    ``embed_tokens``: no ``lm_head``/``embed_tokens`` lookup finds either."""
    model, dense = fallback_model(name, n_probes=2)
    module = dict(model.named_modules())[probe_head(dense).path]
    assert type(module).__name__ in ("FallbackHead", "FallbackEmbedding")
    tokens = TOKENS[:, :1]
    step, reference = np.array(model(tokens))[0, 0], np.array(dense(tokens))[0, 0]
    finite = np.isfinite(step)
    assert 0 < finite.sum() <= 2 * 16 and np.all(np.isneginf(step[~finite]))
    np.testing.assert_allclose(step[finite], reference[finite], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(dense(TOKENS)))


def test_fallback_keeps_a_softcapped_head_dense():
    with pytest.warns(UserWarning, match="needs flashhead_mlx"):
        model, dense = fallback_model("gemma2", n_probes=2)
    np.testing.assert_array_equal(np.array(model(TOKENS[:, :1])), np.array(dense(TOKENS[:, :1])))


def test_folder_without_assets_loads_dense_or_clusters_once(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "CACHE_DIR", tmp_path / "cache")
    with pytest.warns(UserWarning, match="no FlashHead assets"):
        model, _ = load(str(tiny_llama))
    assert not is_patched(model)
    with pytest.warns(UserWarning, match="clustered the head in"):
        model, _ = load(str(tiny_llama), flashhead={"convert": True})
    assert is_patched(model)

    def no_clustering(*args, **kwargs):
        raise AssertionError("clustered again instead of using the cache")

    monkeypatch.setattr(loading, "cluster_model", no_clustering)
    again, _ = load(str(tiny_llama), flashhead={"convert": True})
    np.testing.assert_array_equal(np.array(flash_head(again).order), np.array(flash_head(model).order))
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")] == []


def test_hub_plain_mlx_lm_downloads_no_assets_and_loads_dense(hub, converted, dense):
    model, _ = mlx_lm.load("org/tiny-flashhead")
    assert not is_patched(model)
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(dense(TOKENS)))
    [(repo, revision, allow, _, fetched)] = hub.calls
    assert allow == mlx_lm.utils.DEFAULT_ALLOW_PATTERNS and assets_file(converted) not in fetched


def test_hub_flashhead_mlx_load_fetches_the_assets(hub, converted, dense):
    model, _ = load("org/tiny-flashhead")
    assert_decode_step_matches_dense(model, dense)
    commit = hub.repos["org/tiny-flashhead"][0]
    assert [call[:3] for call in hub.calls] == [
        ("org/tiny-flashhead", "main", mlx_lm.utils.DEFAULT_ALLOW_PATTERNS),
        ("org/tiny-flashhead", commit, [assets_file(converted)]),
    ]
    uploaded = snapshot_files(converted)
    downloaded = snapshot_files(hub.storage("org/tiny-flashhead") / "snapshots" / commit)
    assert downloaded == sorted(set(uploaded) - {"README.md"})


def test_hub_remote_code_variant_fetches_its_assets(hub, remote_code, dense):
    model, _ = mlx_lm.load("org/tiny-model-file", trust_remote_code=True)
    assert isinstance(model.model.embed_tokens, FlashEmbedding)
    assert_decode_step_matches_dense(model, dense)
    assert hub.calls[1][2] == [assets_file(remote_code)]


def test_hub_remote_code_variant_offline_says_what_is_missing(hub, remote_code):
    import huggingface_hub

    huggingface_hub.snapshot_download("org/tiny-model-file", allow_patterns=mlx_lm.utils.DEFAULT_ALLOW_PATTERNS)
    hub.offline = True
    with pytest.raises(ValueError) as error:
        mlx_lm.load("org/tiny-model-file", trust_remote_code=True)
    message = str(error.value)
    assert message.startswith(f"{assets_file(remote_code)} is missing from ") and "\n" not in message
    assert "could not be fetched from the hub repo org/tiny-model-file" in message
