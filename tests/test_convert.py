"""The convert command: folder format, atomic writes, CLI, hub ids, and a real GGUF model."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from conftest import gguf_path, run_cli
from flashhead_mlx.clustering import CLUSTER_SIZE
from flashhead_mlx import pipeline
from flashhead_mlx.pipeline import convert
from flashhead_mlx.model_head import final_hidden_states
from flashhead_mlx import decoding, load

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7]])


def leftovers(folder: Path) -> list:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def assets_file(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["flashhead"]["assets_file"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("convert") / "tiny-flashhead"
    return convert(str(tiny_llama), str(out), calibration_tokens=256)


def test_output_is_an_mlx_lm_folder_with_flashhead_assets(converted, tiny_llama):
    source, _ = mlx_lm.load(str(tiny_llama))
    plain, _ = load(str(converted), flashhead=False)
    np.testing.assert_allclose(np.array(plain(TOKENS)), np.array(source(TOKENS)), rtol=1e-5, atol=1e-5)
    config = json.loads((converted / "config.json").read_text())
    section = config["flashhead"]
    assert section["cluster_size"] == CLUSTER_SIZE
    assert section["n_clusters"] == -(-1000 // CLUSTER_SIZE)
    assert 1 <= section["n_probes"] <= section["n_clusters"]
    assert (converted / section["assets_file"]).is_file()
    assert "model_file" not in config and not list(converted.glob("*.py"))  # no remote code


def test_existing_output_needs_force(converted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    with pytest.raises(ValueError, match="--force"):
        convert(str(converted), str(out), calibration_tokens=256)
    convert(str(converted), str(out), calibration_tokens=256, force=True)
    assert [p.name for p in out.glob("flashhead*")] == [assets_file(out)]  # one assets file
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("flashhead")) == sorted(
        p.name for p in converted.iterdir() if not p.name.startswith("flashhead")
    )
    assert leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "cluster_head", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny_llama), str(tmp_path / "out"), calibration_tokens=256)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_and_bad_input(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", "--model", str(tiny_llama), "--output", str(out),
                     "--calibration-tokens", "256", "--n-probes", "5", "--model-file")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["flashhead"]["n_probes"] == 5
    assert config["model_file"] == "flashhead_model.py"
    assert (out / "flashhead_model.py").is_file() and (out / "flashhead_format.py").is_file()
    assert "--trust-remote-code" in (out / "README.md").read_text()
    missing = run_cli("convert", "--model", str(tmp_path / "missing.gguf"), "--output", str(tmp_path / "x"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    no_folder = run_cli("convert", "--model", str(tmp_path / "no" / "folder"), "--output", str(tmp_path / "z"))
    assert no_folder.returncode != 0 and "does not exist" in no_folder.stderr
    too_many = run_cli("convert", "--model", str(tiny_llama), "--output", str(tmp_path / "y"),
                       "--calibration-tokens", "256", "--n-probes", "100000")
    assert too_many.returncode != 0 and "--n-probes" in too_many.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hub_repo_id_through_the_hub_cache(tiny_llama, tmp_path):
    """A hub id resolves through huggingface_hub (here from a local cache, offline)."""
    snapshot = tmp_path / "hub" / "models--local--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama, snapshot)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "out"
    result = run_cli("convert", "--model", "local/tiny", "--output", str(out), "--calibration-tokens", "256",
                     env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert (out / assets_file(out)).is_file()


@pytest.mark.slow
def test_convert_smollm2_gguf(tmp_path):
    source = gguf_path("smollm2")
    out = tmp_path / "smollm2-flashhead"
    # The calibration mix at 2048 positions (4 replies); --n-probes skips the development suite's
    # tuning, which tests/test_calibration.py covers.
    result = run_cli(
        "convert", "--model", str(source), "--output", str(out), "--calibration-tokens", "2048",
        "--n-probes", "286",
    )
    assert result.returncode == 0, result.stderr
    dense, tokenizer = load(str(out), flashhead=False)
    model, _ = load(str(out))
    prompt = mx.array([tokenizer.encode("Emma Woodhouse, handsome, clever, and rich, with a comfortable home")])
    tokens = mx.array([[*prompt[0].tolist(), *mx.argmax(dense(prompt)[0], axis=-1).tolist()]])
    dense_argmax = np.array(mx.argmax(dense(tokens), axis=-1))[0]
    head = model.model.embed_tokens.as_linear
    hidden = final_hidden_states(model, tokens)
    contained = 0
    for position in range(tokens.shape[1]):
        with decoding():
            step = np.array(head(hidden[:, position : position + 1]))[0, 0]
        if np.isfinite(step[dense_argmax[position]]):
            contained += 1
            assert int(np.argmax(step)) == dense_argmax[position]
    assert contained >= 0.9 * tokens.shape[1]
