"""``flashhead-mlx import-assets``: a clustering in the vLLM layout, made here from our own
conversion, imported back (the round trip), and a clear error, with nothing written, for each
mismatch."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import TINY_TEXT, make_tiny_model
from flashhead_mlx import flash_head, load
from flashhead_mlx.pipeline import convert
from flashhead_mlx.import_assets import CACHE_FILE, META_FILE, clustering_files, import_assets
from flashhead_mlx.assets import MODEL_FILES
from flashhead_mlx.model_head import final_hidden_states

VOCAB, HIDDEN, CLUSTER_SIZE = 1024, 64, 16
N_CLUSTERS = VOCAB // CLUSTER_SIZE
N_PROBES = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple:
    """A tiny untied model whose vocabulary makes equal clusters, and its conversion."""
    root = tmp_path_factory.mktemp("import")
    source = make_tiny_model(root / "tiny", tied=False, vocab_size=VOCAB, hidden_size=HIDDEN)
    # Explicit probes: tuning's 12% cap, the 128 recent tokens included, leaves one probe for a
    # vocabulary this small.
    converted = convert(
        str(source), str(root / "tiny-flashhead"), calibration_tokens=256, n_probes=N_PROBES
    )
    return source, converted


def assets_path(folder: Path) -> Path:
    return folder / json.loads((folder / "config.json").read_text())["flashhead"]["assets_file"]


def export_vllm(converted: Path, out: Path, **changes) -> Path:
    """The clustering of ``converted`` in the vLLM layout: every token's cluster, the clusters'
    mean rows as centroids ``(1, 1, hidden, n_clusters)``; ``changes`` edit the arrays/config."""
    order = load_file(str(assets_path(converted)))["order"]
    weight = load_file(str(converted / "model.safetensors"))["lm_head.weight"]
    assignments = np.empty(VOCAB, dtype=np.int64)
    assignments[order] = np.arange(order.size) // CLUSTER_SIZE
    centroids = np.stack([weight[assignments == k].mean(0) for k in range(N_CLUSTERS)], axis=1)
    arrays = {"centroids": centroids[None, None], "cluster_assignments": assignments}
    config = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "n_clusters": N_CLUSTERS, "format": "safetensors"}
    for key, value in changes.items():
        (arrays if key in arrays else config)[key] = value
    out.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(out / CACHE_FILE))
    (out / META_FILE).write_text(json.dumps(config))
    return out


def dequantized(assets: dict) -> np.ndarray:
    """The stage-1 probes of saved assets (4-bit, group size 64), as floats."""
    arrays = [mx.array(assets[k]) for k in ("centroids", "centroid_scales", "centroid_biases")]
    return np.array(mx.dequantize(*arrays, group_size=64, bits=4))


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_round_trip_reproduces_the_conversion(models, tmp_path):
    source, converted = models
    exported = export_vllm(converted, tmp_path / "published")
    target = tmp_path / "model"
    shutil.copytree(source, target)
    imported = import_assets(str(target), str(exported), n_probes=N_PROBES, calibration_tokens=256)
    assert imported == target

    ours, theirs = load_file(str(assets_path(converted))), load_file(str(assets_path(target)))
    np.testing.assert_array_equal(theirs["order"], ours["order"])
    for k in range(N_CLUSTERS):  # the same membership, cluster by cluster
        assert set(theirs["order"][k * CLUSTER_SIZE:(k + 1) * CLUSTER_SIZE]) == set(
            np.flatnonzero(load_file(str(exported / CACHE_FILE))["cluster_assignments"] == k))
    # Same clusters and calibration as the conversion: its probes and mass offsets, up to float
    # rounding (a 4-bit probe entry may land one quantization step away).
    assert set(theirs) == set(ours)
    step = float(ours["centroid_scales"].max())
    np.testing.assert_allclose(dequantized(theirs), dequantized(ours), rtol=0, atol=1.01 * step)
    for name in ("cluster_bias", "mass_bias"):
        np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-3, atol=1e-4, err_msg=name)

    config = json.loads((target / "config.json").read_text())
    section = config["flashhead"]
    assert (section["n_clusters"], section["cluster_size"]) == (N_CLUSTERS, CLUSTER_SIZE)
    assert section["imported_from"] == "published" and section["source"] == "model"
    assert "model_file" not in config and not list(target.glob("*.py"))  # no remote code
    assert "imported from `published`" in (target / "README.md").read_text()
    assert [p.name for p in target.iterdir() if p.name.startswith(".")] == []

    # The head's greedy token is the dense argmax wherever that token's cluster is probed.
    model, tokenizer = load(str(target))
    head = flash_head(model)
    tokens = mx.array([tokenizer.encode(TINY_TEXT)[:96]])
    hidden = final_hidden_states(model, tokens)[0]
    weight = mlx_lm.load(str(source))[0].lm_head.weight
    dense = np.array(mx.argmax(hidden @ weight.T, axis=-1))
    owner = np.empty(VOCAB, dtype=np.int64)
    owner[theirs["order"]] = np.arange(VOCAB) // CLUSTER_SIZE
    probed = np.array(head.probe(hidden))
    contained = np.array([owner[t] in p for t, p in zip(dense, probed)])
    assert contained.sum() >= 10
    np.testing.assert_array_equal(np.array(head.greedy(hidden))[contained], dense[contained])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": VOCAB + 1}, f"vocab_size is {VOCAB + 1}, but the model's head has {VOCAB} \\(rows\\)"),
        ({"hidden_size": 32}, f"hidden_size is 32, but the model's head has {HIDDEN} \\(columns\\)"),
        ({"n_clusters": 60}, "1024 tokens cannot make 60 clusters of equal size"),
        ({"centroids": np.zeros((HIDDEN, N_CLUSTERS + 1), np.float32)},
         f"centroids has shape \\({HIDDEN}, {N_CLUSTERS + 1}\\), expected \\({HIDDEN}, {N_CLUSTERS}\\)"),
        ({"cluster_assignments": np.arange(VOCAB - 1)}, f"cluster_assignments has shape \\({VOCAB - 1},\\)"),
        ({"cluster_assignments": np.arange(VOCAB) % N_CLUSTERS + 1}, "range over \\[1, 64\\], outside the 64 clusters"),
        ({"cluster_assignments": np.minimum(np.arange(VOCAB) // 15, N_CLUSTERS - 1)},
         "cluster 0 has 15 tokens, not 16 .* clusters of equal size"),
        ({"cluster_assignments": np.zeros(VOCAB, np.float32)}, "cluster_assignments are float32, not integers"),
    ],
)
def test_mismatches_are_refused_and_nothing_is_written(models, tmp_path, changes, message):
    source, converted = models
    exported = export_vllm(converted, tmp_path / "published", **changes)
    target = tmp_path / "model"
    shutil.copytree(source, target)
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        import_assets(str(target), str(exported), calibration_tokens=256)
    assert snapshot(target) == before


def test_missing_files_and_existing_assets(models, tmp_path):
    source, converted = models
    exported = export_vllm(converted, tmp_path / "published")
    (exported / META_FILE).unlink()
    with pytest.raises(ValueError, match=f"{META_FILE} is missing"):
        import_assets(str(source), str(exported))
    before = snapshot(converted)
    with pytest.raises(ValueError, match="already has FlashHead assets; pass --force"):
        import_assets(str(converted), str(export_vllm(converted, tmp_path / "again")))
    assert snapshot(converted) == before


def test_force_replaces_the_assets_atomically(models, tmp_path):
    """Importing into a FlashHead folder (--force, here the remote-code variant): a new assets
    file named in config.json, the old one removed, the folder loads."""
    source, converted = models
    exported = export_vllm(converted, tmp_path / "published")
    target = tmp_path / "model"
    shutil.copytree(converted, target)
    old = assets_path(converted).name
    n_probes = json.loads((converted / "config.json").read_text())["flashhead"]["n_probes"] + 1
    import_assets(str(target), str(exported), n_probes=n_probes, calibration_tokens=256, force=True,
                  model_file=True)
    config = json.loads((target / "config.json").read_text())
    new = config["flashhead"]["assets_file"]
    assert new != old and not (target / old).exists()
    assert sorted(p.name for p in target.glob("*flashhead*")) == sorted([new, *MODEL_FILES])
    assert config["model_file"] == "flashhead_model.py" and config["flashhead"]["n_probes"] == n_probes
    assert [p.name for p in target.iterdir() if p.name.startswith(".")] == []
    assert flash_head(load(str(target))[0]).n_probes == n_probes


def test_the_clustering_is_found_from_its_file_or_its_model_folder(models, tmp_path):
    _, converted = models
    exported = export_vllm(converted, tmp_path / "vllm-model" / "flash_head_assets")
    (tmp_path / "vllm-model" / "config.json").write_text(json.dumps({"flash_head_cache_dir": "flash_head_assets"}))
    expected = (exported / CACHE_FILE, exported / META_FILE)
    assert clustering_files(exported) == expected
    assert clustering_files(exported / CACHE_FILE) == expected
    assert clustering_files(tmp_path / "vllm-model") == expected


def test_cli_error(models, tmp_path):
    source, converted = models
    labels = np.minimum(np.arange(VOCAB) // 15, N_CLUSTERS - 1)
    exported = export_vllm(converted, tmp_path / "published", cluster_assignments=labels)
    result = subprocess.run(
        [sys.executable, "-m", "flashhead_mlx.cli", "import-assets", "--model", str(source),
         "--assets", str(exported)],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "flashhead-mlx import-assets: error:" in result.stderr
    assert "FlashHead needs clusters of equal size" in result.stderr
