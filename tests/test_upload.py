"""The model card and the hub upload, without a network: the card's content, the files sent,
the hub calls (through a stand-in for ``HfApi``), and the errors that leave the folder intact."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flashhead_mlx
from conftest import make_tiny_model
from flashhead_mlx import upload as upload_module
from flashhead_mlx.pipeline import convert
from flashhead_mlx.model_card import render_folder_card
from flashhead_mlx import convert as convert_command
from flashhead_mlx.hub import UploadError, repo_id, upload

SOURCE = "local/Tiny-Llama"
VOCAB, CLUSTER_SIZE, N_PROBES = 1000, 16, 3
N_CLUSTERS = math.ceil(VOCAB / CLUSTER_SIZE)


def eval_json(path: Path, n_probes=(2, N_PROBES, 8), n_clusters=N_CLUSTERS) -> Path:
    """An eval JSON in issue 5's format, with distinct made-up figures for every row."""
    rows = [
        {
            "n_probes": p,
            "n_clusters": n_clusters,
            "cluster_size": CLUSTER_SIZE,
            "scored_fraction": (n_clusters + p * CLUSTER_SIZE) / VOCAB,
            "top1_containment": 0.9 + p / 1000 + 1.3e-5,
            "top5_containment": 0.8 + p / 1000 + 2.7e-5,
            "greedy_agreement": 0.9 + p / 1000 - 1.1e-5,
            "candidate_mass": 0.7 + p / 500,
            "sampling_tv_t1": 0.01 * p + 1.2e-5,
            "sampling_tv_t07_p09": 0.02 * p + 3.4e-5,
        }
        for p in n_probes
    ]
    path.write_text(json.dumps({"model": "/some/where", "text": "/data/emma.txt", "tokens": 4096, "results": rows}))
    return path


BENCH = {
    "head_dense_ms": 1.2345,
    "head_flash_ms": 0.4321,
    "head_speedup": 2.857,
    "decode_dense_tok_s": 20.61,
    "decode_flash_tok_s": 22.04,
    "decode_speedup": 1.069,
    "bytes_per_token_dense": 3 * 2**20,
    "bytes_per_token_flash": 1.5 * 2**20,
    "ceiling_speedup": 2.0,
    "share_of_ceiling": 0.5345,
    "resident_dense_bytes": 100 * 2**20,
    "resident_flash_bytes": 101 * 2**20,
    "device": "cpu (test machine)",
    "kernels": "mlx",
}


def no_token_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), **extra}


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "flashhead_mlx.cli", *args], capture_output=True, text=True, env=env
    )


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny model converted from the hub id ``SOURCE`` (an offline hub cache whose card has a
    license), with eval and bench figures in its card."""
    root = tmp_path_factory.mktemp("upload")
    snapshot_dir = root / "hub" / "models--local--Tiny-Llama" / "snapshots" / ("0" * 40)
    make_tiny_model(snapshot_dir, tied=False, vocab_size=VOCAB)
    (snapshot_dir / "README.md").write_text("---\nlicense: mit\ntags:\n- llama\n---\n# Tiny\n")
    (snapshot_dir.parents[1] / "refs").mkdir()
    (snapshot_dir.parents[1] / "refs" / "main").write_text("0" * 40)
    (root / "bench.json").write_text(json.dumps(BENCH))
    out = root / "Tiny-Llama-flashhead"
    env = no_token_env(root, HF_HUB_CACHE=str(root / "hub"), HF_HUB_OFFLINE="1")
    result = run_cli("convert", "--model", SOURCE, "--output", str(out), "--calibration-tokens", "256",
                     "--n-probes", str(N_PROBES), "--eval-json", str(eval_json(root / "eval.json")),
                     "--bench-json", str(root / "bench.json"), env=env)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def copy(folder, tmp_path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records every call and the bytes of each file
    of a commit; ``fail`` makes ``create_commit`` raise it."""

    calls: list = []
    fail = None

    def __init__(self, token=None, **kwargs):
        FakeHub.calls.append(("HfApi", {"token": token, **kwargs}))

    def create_repo(self, **kwargs):
        FakeHub.calls.append(("create_repo", kwargs))

    def create_commit(self, operations, **kwargs):
        if FakeHub.fail is not None:
            raise FakeHub.fail
        files = {}
        for op in operations:
            with op.as_file() as f:
                files[op.path_in_repo] = f.read()
        FakeHub.calls.append(("create_commit", {**kwargs, "files": files}))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls, FakeHub.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHub


def test_card_front_matter_and_how_it_was_made(folder):
    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "mlx"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == SOURCE
    assert meta["license"] == "mit"  # kept from the source's card
    assert {"mlx", "flashhead", "llama"} <= set(meta["tags"])
    section = json.loads((folder / "config.json").read_text())["flashhead"]
    assert (section["n_clusters"], section["cluster_size"], section["n_probes"]) == (N_CLUSTERS, CLUSTER_SIZE, N_PROBES)
    assert section["source"] == SOURCE and section["flashhead_mlx_version"] == flashhead_mlx.__version__
    assert "# Tiny-Llama-flashhead\n" in card
    assert f"[{SOURCE}](https://huggingface.co/{SOURCE})" in card
    assert f"| clusters | {N_CLUSTERS} clusters of {CLUSTER_SIZE} tokens (vocabulary {VOCAB}, hidden size 64) |" in card
    scored = 100 * (N_CLUSTERS + N_PROBES * CLUSTER_SIZE) / VOCAB
    assert f"| `n_probes` | {N_PROBES} ({scored:.1f}% of the vocabulary scored per token) |" in card
    assert "| stage-1 centroids | 4-bit (group size 64) |" in card
    assert f"| flashhead-mlx | {flashhead_mlx.__version__} |" in card
    assert "flashhead-mlx generate --model Tiny-Llama-flashhead " in card
    assert 'model, tokenizer = load("Tiny-Llama-flashhead")' in card
    assert "from flashhead_mlx import load" in card
    assert 'mlx_lm.generate --model Tiny-Llama-flashhead --prompt "hello"' in card  # dense, no remote code
    assert "--trust-remote-code" not in card and "with its dense head" in card


def test_card_measurements_come_from_the_json_files(folder):
    card = (folder / "README.md").read_text()
    rows = json.loads(eval_json(folder.parent / "again.json").read_text())["results"]
    for row in rows:
        figures = [f"{100 * row[k]:.2f}%" for k in ("top1_containment", "top5_containment", "greedy_agreement")]
        figures += [f"{row['sampling_tv_t1']:.4f}", f"{row['sampling_tv_t07_p09']:.4f}"]
        line = next(l for l in card.splitlines() if l.startswith(f"| {row['n_probes']} ") or
                    l.startswith(f"| **{row['n_probes']}** "))
        assert all(figure in line for figure in figures), (line, figures)
    default = next(r for r in rows if r["n_probes"] == N_PROBES)
    assert f"| **{N_PROBES}** (default) |" in card
    assert f"at {100 * default['top1_containment']:.2f}% of the positions" in card
    assert "4096 tokens of `emma.txt`" in card
    assert f"{BENCH['head_dense_ms']:.3f} ms | {BENCH['head_flash_ms']:.3f} ms | {BENCH['head_speedup']:.2f}x" in card
    assert f"{BENCH['decode_dense_tok_s']:.1f} tok/s | {BENCH['decode_flash_tok_s']:.1f} tok/s" in card
    assert "cpu (test machine) (kernels: mlx)" in card
    assert "| 3.0 MiB | 1.5 MiB | at most 2.00x (measured: 53% of it) |" in card


def test_card_without_measurements_has_none(tiny_llama, tmp_path):
    out = convert(str(tiny_llama), str(tmp_path / "plain-flashhead"), calibration_tokens=256)
    card = (out / "README.md").read_text()
    assert "base_model" not in front_matter(card)  # a local source: no hub model to link
    assert "`llama`" in card  # the source folder's name
    for word in ("measured", "containment", "tok/s", "MiB"):
        assert word not in card


def test_eval_json_must_fit_the_folder(copy, tmp_path):
    other = eval_json(tmp_path / "other.json", n_clusters=N_CLUSTERS + 1)
    with pytest.raises(ValueError, match=f"{N_CLUSTERS + 1} clusters of {CLUSTER_SIZE}, but the folder has {N_CLUSTERS}"):
        render_folder_card(copy, eval_json=str(other))
    card = render_folder_card(copy, eval_json=str(eval_json(tmp_path / "e.json", n_probes=(5, 7))))
    assert f"The folder's `n_probes` ({N_PROBES}) was not among the measured values" in card
    broken = json.loads((tmp_path / "e.json").read_text())
    del broken["results"][0]["candidate_mass"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="eval JSON row lacks \\['candidate_mass'\\]"):
        render_folder_card(copy, eval_json=str(tmp_path / "broken.json"))
    (tmp_path / "bench.json").write_text(json.dumps({k: v for k, v in BENCH.items() if k != "device"}))
    with pytest.raises(ValueError, match="bench JSON lacks \\['device'\\]"):
        render_folder_card(copy, bench_json=str(tmp_path / "bench.json"))
    with pytest.raises(ValueError, match="cannot read the eval JSON"):
        render_folder_card(copy, eval_json=str(tmp_path / "missing.json"))


def test_upload_sends_the_folder_in_one_commit(copy, hub):
    expected = {p.name for p in copy.iterdir()} | {"sub/keep.txt"}
    before = snapshot(copy)
    junk = [".cache/huggingface/upload/model.safetensors.metadata", "__pycache__/flashhead_model.cpython-311.pyc",
            "sub/__pycache__/x.pyc", "model.safetensors.partial", ".README.md.x1y2", "weights.tmp",
            "flashhead_model.pyc", ".DS_Store", ".flashhead-abc/config.json",
            ".flashhead-x1y2.safetensors", "flashhead-0000000000000000.safetensors"]
    for name in [*junk, "sub/keep.txt"]:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text("x")

    assert upload(str(copy), "org") == "org/Tiny-Llama-flashhead"
    names = [name for name, _ in hub.calls]
    assert names == ["HfApi", "create_repo", "create_commit"]
    assert hub.calls[0][1] == {"token": "hf_test_token"}
    assert hub.calls[1][1] == {"repo_id": "org/Tiny-Llama-flashhead", "repo_type": "model", "exist_ok": True}
    commit = hub.calls[2][1]
    assert commit["repo_id"] == "org/Tiny-Llama-flashhead" and commit["repo_type"] == "model"
    assert set(commit["files"]) == expected
    for name, data in commit["files"].items():
        if name != "README.md":
            assert data == (copy / name).read_bytes(), name
    card = commit["files"]["README.md"].decode()
    assert "# org/Tiny-Llama-flashhead\n" in card
    assert 'mlx_lm.generate --model org/Tiny-Llama-flashhead --prompt "hello"' in card
    old_card = before["README.md"].decode()
    for section in ("## Accuracy (measured)", "## Speed (measured)"):  # kept without new JSON files
        kept = old_card[old_card.index(section):].split("<!-- /flashhead:")[0]
        assert kept in card
    after = snapshot(copy)
    assert after.pop("README.md") == commit["files"]["README.md"]  # the card as uploaded
    assert {k: v for k, v in after.items() if k != "README.md"} == {
        **{k: v for k, v in before.items() if k != "README.md"},
        **{name: b"x" for name in [*junk, "sub/keep.txt"]},
    }


def test_upload_with_new_eval_json_replaces_the_figures(copy, hub, tmp_path):
    new = eval_json(tmp_path / "new.json", n_probes=(N_PROBES, 9))
    upload(str(copy), "org/my-name-flashhead", eval_json=str(new))
    card = hub.calls[2][1]["files"]["README.md"].decode()
    assert "| 9 |" in card and "| 8 |" not in card and "| 2 |" not in card
    assert "## Speed (measured)" in card


def test_hub_failure_leaves_the_folder_intact(copy, hub, monkeypatch):
    before = snapshot(copy)
    hub.fail = ConnectionError("Connection reset by peer")
    monkeypatch.setattr(sys, "argv", ["flashhead-mlx upload", "--path", str(copy), "--upload-repo", "org/x-flashhead"])
    with pytest.raises(SystemExit) as error:
        upload_module.main()
    message = str(error.value.code)
    assert message.startswith("flashhead-mlx upload: error: uploading")
    assert "ConnectionError: Connection reset by peer" in message and "the folder is unchanged" in message
    assert snapshot(copy) == before


def test_missing_token_and_unreachable_hub_are_clear_errors(copy, tmp_path):
    before = snapshot(copy)
    no_token = run_cli("upload", "--path", str(copy), "--upload-repo", "org", env=no_token_env(tmp_path))
    assert no_token.returncode == 1
    assert "flashhead-mlx upload: error: no Hugging Face token" in no_token.stderr
    assert snapshot(copy) == before
    # A real huggingface_hub call to a closed local port: the network error of this hub version.
    env = no_token_env(tmp_path, HF_TOKEN="hf_fake", HF_ENDPOINT="http://127.0.0.1:9")
    offline = run_cli("upload", "--path", str(copy), "--upload-repo", "org", env=env)
    assert offline.returncode == 1
    assert "flashhead-mlx upload: error: uploading" in offline.stderr
    assert "the folder is unchanged" in offline.stderr
    assert snapshot(copy) == before


def test_upload_refuses_a_folder_without_flashhead(tiny_llama, hub):
    before = snapshot(tiny_llama)
    with pytest.raises(ValueError, match="is not a FlashHead folder"):
        upload(str(tiny_llama), "org/x")
    assert hub.calls == [] and snapshot(tiny_llama) == before


def test_upload_refuses_corrupted_assets(copy, hub):
    path = copy / json.loads((copy / "config.json").read_text())["flashhead"]["assets_file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest"):
        upload(str(copy), "org/x")
    assert hub.calls == []


def test_repo_names(copy):
    config = json.loads((copy / "config.json").read_text())
    assert repo_id("org", config, copy) == "org/Tiny-Llama-flashhead"
    assert repo_id("org/name", config, copy) == "org/name"
    config["flashhead"]["source"] = "mlx-community/Llama-3.2-1B-Instruct-4bit"
    assert repo_id("mlx-community", config, copy) == "mlx-community/Llama-3.2-1B-Instruct-4bit-flashhead"
    config["flashhead"]["source"] = "model-flashhead"  # converted from a FlashHead folder
    assert repo_id("org", config, copy) == "org/model-flashhead"
    for bad in ("a/b/c", "org/", "/name", ""):
        with pytest.raises(ValueError, match="--upload-repo must be ORG/NAME or ORG"):
            repo_id(bad, config, copy)


def test_convert_with_upload_repo(tiny_llama, hub, tmp_path, monkeypatch):
    out = tmp_path / "up"
    argv = ["--model", str(tiny_llama), "--output", str(out), "--calibration-tokens", "256"]
    monkeypatch.setattr(sys, "argv", ["flashhead-mlx convert", *argv, "--upload-repo", "org"])
    convert_command.main()
    assert [name for name, _ in hub.calls] == ["HfApi", "create_repo", "create_commit"]
    assert hub.calls[1][1]["repo_id"] == "org/llama-flashhead"
    assert set(hub.calls[2][1]["files"]) == {p.name for p in out.iterdir()}


def test_convert_checks_the_token_before_converting(tiny_llama, tmp_path):
    result = run_cli("convert", "--model", str(tiny_llama), "--output", str(tmp_path / "out"),
                     "--upload-repo", "org", env=no_token_env(tmp_path))
    assert result.returncode == 1
    assert "flashhead-mlx convert: error: no Hugging Face token" in result.stderr
    assert "Calibrating" not in result.stdout
    assert not (tmp_path / "out").exists()
