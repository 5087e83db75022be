"""Loading FlashHead models: ``flashhead_mlx.load``, plain ``mlx_lm.load`` through the folder's
model file (with and without ``flashhead_mlx`` importable), the hub, and on-the-fly clustering."""

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from flashhead_mlx import decoding, flash_head, load
from flashhead_mlx import loading
from flashhead_mlx.assets import ASSETS_FILE, MODEL_FILE
from flashhead_mlx.pipeline import convert
from flashhead_mlx.patch import FlashEmbedding, is_patched

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7]])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_llama) -> Path:
    return convert(str(tiny_llama), str(tmp_path_factory.mktemp("load") / "tiny"), calibration_tokens=256)


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


def test_load_never_runs_the_folders_code(converted, dense, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(converted, folder)
    (folder / MODEL_FILE).write_text("raise RuntimeError('the folder code ran')\n")
    assert_decode_step_matches_dense(load(str(folder))[0], dense)


def test_plain_mlx_lm_needs_trust_remote_code(converted, dense):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        mlx_lm.load(str(converted))
    model, _ = mlx_lm.load(str(converted), trust_remote_code=True)
    assert isinstance(model.model.embed_tokens, FlashEmbedding)
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(dense(TOKENS)))
    assert_decode_step_matches_dense(model, dense)


FALLBACK_SCRIPT = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "flashhead_mlx" or name.startswith("flashhead_mlx."):
            raise ImportError("flashhead_mlx is blocked")

sys.meta_path.insert(0, Block())
import json
import mlx.core as mx
import mlx_lm
import numpy as np

folder, dense_folder = sys.argv[1], sys.argv[2]
model, tokenizer = mlx_lm.load(folder, trust_remote_code=True)
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
    "flashhead_mlx_loaded": "flashhead_mlx" in sys.modules,
}))
"""


def test_plain_mlx_lm_without_flashhead_mlx_uses_the_fallback(converted, tiny_llama):
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(converted), str(tiny_llama)],
        capture_output=True, text=True, cwd="/",
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["head"] == "FallbackEmbedding" and not report["flashhead_mlx_loaded"]
    assert report["prefill_error"] < 1e-4 and report["step_error"] < 1e-4
    assert 0 < report["candidates"] < report["vocab"]
    assert isinstance(report["text"], str)


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


def test_hub_download_fetches_the_assets(converted, dense, tmp_path, monkeypatch):
    """A hub repo id: the assets are among the files asked of huggingface_hub."""
    import mlx_lm.utils

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        assert repo_id == "mlx-community/tiny-flashhead"
        local = tmp_path / "snapshot"
        local.mkdir(exist_ok=True)
        for path in converted.iterdir():
            if any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copy(path, local / path.name)
        return str(local)

    monkeypatch.setattr(mlx_lm.utils, "snapshot_download", snapshot_download)
    model, _ = load("mlx-community/tiny-flashhead")
    assert (tmp_path / "snapshot" / ASSETS_FILE).is_file()
    assert_decode_step_matches_dense(model, dense)
