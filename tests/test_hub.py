"""The hub stand-in (tests/hub.py) selects files exactly as huggingface_hub's own
``snapshot_download`` does, and lays them out as its cache does."""

import os
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import _snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
from huggingface_hub.hf_api import RepoFile
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

from hub import LocalHub, snapshot_files

FILES = [
    "config.json", "model.safetensors", "model-00001-of-00002.safetensors",
    "flashhead-0123456789abcdef.safetensors", ".flashhead-x1y2.safetensors", "flashhead_model.py",
    "tokenizer.json", "README.md", ".gitattributes", "sub/extra.json", "sub/deeper/notes.txt",
    "chat_template.jinja", "Config.JSON",
]
PATTERNS = [
    (None, None),
    (DEFAULT_ALLOW_PATTERNS, None),
    (["flashhead-0123456789abcdef.safetensors"], None),
    ([*DEFAULT_ALLOW_PATTERNS, "flashhead-*.safetensors"], None),
    ("*.json", None),
    (["sub/"], None),
    (None, [".*", "*.md"]),
    (["*.safetensors"], ["model-*"]),
    (["*.JSON"], None),
]


@pytest.fixture
def repo(tmp_path) -> Path:
    folder = tmp_path / "repo"
    for name in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    return folder


def real_selection(monkeypatch, tmp_path, allow, ignore) -> list:
    """The files huggingface_hub's real snapshot_download fetches from a repo of FILES (its
    tree listing and per-file download stood in for)."""
    fetched = []

    def list_repo_tree(self, repo_id, **kwargs):
        return [RepoFile(path=name, size=len(name), oid="0" * 40) for name in FILES]

    def hf_hub_download(repo_id, filename, **kwargs):
        fetched.append(filename)
        return filename

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", list_repo_tree)
    monkeypatch.setattr(_snapshot_download, "hf_hub_download", hf_hub_download)
    huggingface_hub.snapshot_download(
        "org/repo", revision="a" * 40, cache_dir=tmp_path / "real", allow_patterns=allow,
        ignore_patterns=ignore, max_workers=1,
    )
    return sorted(fetched)


@pytest.mark.parametrize("allow, ignore", PATTERNS)
def test_the_stand_in_selects_as_huggingface_hub(repo, tmp_path, monkeypatch, allow, ignore):
    expected = real_selection(monkeypatch, tmp_path, allow, ignore)
    hub = LocalHub(tmp_path / "cache")
    hub.add("org/repo", repo)
    path = hub.snapshot_download("org/repo", allow_patterns=allow, ignore_patterns=ignore)
    assert snapshot_files(path) == expected
    if allow == DEFAULT_ALLOW_PATTERNS:  # what plain mlx-lm downloads: never the assets
        assert "flashhead-0123456789abcdef.safetensors" not in expected
        assert "sub/extra.json" in expected and "config.json" in expected


def test_cache_layout_and_offline(repo, tmp_path):
    hub = LocalHub(tmp_path / "cache")
    commit = hub.add("org/repo", repo)
    path = Path(hub.snapshot_download("org/repo", allow_patterns=["*.json"]))
    storage = tmp_path / "cache" / "models--org--repo"
    assert path == storage / "snapshots" / commit
    assert (storage / "refs" / "main").read_text() == commit
    link = path / "sub" / "extra.json"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve().parent == storage / "blobs" and link.read_text() == "sub/extra.json"
    hub.offline = True
    assert hub.snapshot_download("org/repo", allow_patterns=["*.json"]) == str(path)
    with pytest.raises(IncompleteSnapshotError):
        hub.snapshot_download("org/repo", revision=commit, allow_patterns=["*.md"])
    with pytest.raises(LocalEntryNotFoundError):
        hub.snapshot_download("org/other")
