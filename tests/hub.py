"""A local stand-in for ``huggingface_hub.snapshot_download``: local folders served as hub repos.

``LocalHub(cache_dir)`` holds repos (``add(repo_id, folder)``, one commit each) and downloads
them into the hub's cache layout, ``<cache_dir>/models--ORG--NAME/snapshots/<commit>/<file>``,
each file a relative link into ``blobs/`` and ``refs/<branch>`` naming the commit, as
huggingface_hub does. Files are selected with huggingface_hub's own ``filter_repo_objects``
(``allow_patterns`` / ``ignore_patterns``). Offline (``hub.offline`` or ``local_files_only``),
a cached snapshot is returned only when it holds every requested file, else huggingface_hub's
``LocalEntryNotFoundError`` / ``IncompleteSnapshotError``. ``install()`` puts it where mlx-lm
and flashhead-mlx look the function up; it imports no flashhead_mlx module.
"""

import hashlib
import os
from pathlib import Path

# Where snapshot_download is looked up: huggingface_hub's attribute (flashhead-mlx and the
# model file call it from there) and the name mlx-lm's utils imported.
PATCH_POINTS = (("huggingface_hub", "snapshot_download"), ("mlx_lm.utils", "snapshot_download"))


class LocalHub:
    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.repos = {}  # repo id -> (commit, {path in repo: local file})
        self.calls = []  # (repo_id, revision, allow_patterns, ignore_patterns, files fetched)
        self.offline = False

    def add(self, repo_id: str, folder: Path) -> str:
        """Serve the files of ``folder`` (hidden ones too) as ``repo_id``; returns the commit."""
        files = {
            p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()
        }
        commit = hashlib.sha1()
        for name, path in files.items():
            commit.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        self.repos[repo_id] = (commit.hexdigest(), files)
        return commit.hexdigest()

    def storage(self, repo_id: str, cache_dir=None) -> Path:
        return Path(cache_dir or self.cache_dir) / ("models--" + repo_id.replace("/", "--"))

    def selected(self, repo_id: str, allow_patterns=None, ignore_patterns=None) -> list:
        """The files of ``repo_id`` that the patterns select, as huggingface_hub selects them."""
        from huggingface_hub.utils import filter_repo_objects

        files = self.repos[repo_id][1]
        return list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))

    def snapshot_download(
        self,
        repo_id: str,
        *,
        revision=None,
        cache_dir=None,
        allow_patterns=None,
        ignore_patterns=None,
        local_files_only=False,
        **kwargs,
    ) -> str:
        from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

        revision = revision or "main"
        storage = self.storage(repo_id, cache_dir)
        if self.offline or local_files_only:
            ref = storage / "refs" / revision
            commit = ref.read_text() if ref.is_file() else revision
            snapshot = storage / "snapshots" / commit
            if not snapshot.is_dir():
                raise LocalEntryNotFoundError(
                    "Cannot find an appropriate cached snapshot folder for the specified revision "
                    "on the local disk and outgoing traffic has been disabled."
                )
            if repo_id in self.repos:
                wanted = self.selected(repo_id, allow_patterns, ignore_patterns)
                missing = [name for name in wanted if not (snapshot / name).exists()]
                if missing:
                    raise IncompleteSnapshotError(
                        f"The cached snapshot for '{repo_id}' is incomplete: {missing} missing",
                        snapshot_path=str(snapshot),
                    )
            self.calls.append((repo_id, revision, allow_patterns, ignore_patterns, []))
            return str(snapshot)
        if repo_id not in self.repos:
            raise LookupError(f"{repo_id} is not a repo of this stand-in")
        commit, files = self.repos[repo_id]
        if revision not in ("main", commit):
            raise LookupError(f"{repo_id} has no revision {revision!r}")
        snapshot = storage / "snapshots" / commit
        fetched = self.selected(repo_id, allow_patterns, ignore_patterns)
        for name in fetched:
            data = files[name].read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        snapshot.mkdir(parents=True, exist_ok=True)
        if revision != commit:
            (storage / "refs").mkdir(exist_ok=True)
            (storage / "refs" / revision).write_text(commit)
        self.calls.append((repo_id, revision, allow_patterns, ignore_patterns, fetched))
        return str(snapshot)

    def install(self, setattr_=setattr) -> None:
        """Put :meth:`snapshot_download` at :data:`PATCH_POINTS` (``setattr_``: pytest's
        ``monkeypatch.setattr`` to undo it after the test)."""
        import importlib

        for module, name in PATCH_POINTS:
            setattr_(importlib.import_module(module), name, self.snapshot_download)


def snapshot_files(path) -> list:
    """The files of a snapshot folder, sorted."""
    path = Path(path)
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())

