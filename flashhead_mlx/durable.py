"""Writing files and folders so that a crash or a kill leaves them as before or as after.

The tools the writers share (docs/format.md, "Writing a folder"): a file is written under a hidden
name, flushed to disk (``fsync``) and renamed over its final name (``os.replace``, atomic); a new
folder is built in a hidden stage folder beside its destination and renamed into place; a folder
rewritten in place is locked (``flock`` on the folder itself, released by the kernel when its
holder dies) so that the next writer may reclaim what a killed one left.

:func:`kill_point` is the test hook at the named stages of the writers (:data:`KILL_POINTS`): the
test suite kills a command there, with ``FLASHHEAD_TEST_KILL_AT=<stage>``.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

# The stages where FLASHHEAD_TEST_KILL_AT=<stage> kills the process (SIGKILL), in the order a
# conversion reaches them.
KILL_POINTS = (
    "calibration",  # the hidden states of one calibration source computed
    "clustering",  # the head's rows clustered, the centroids not yet fitted
    "tuning",  # tune: the suite's dense pass done, nothing written
    "assets-staged",  # the new assets file written under a hidden name
    "assets-named",  # the new assets file under its content-addressed name, config.json not yet
    "config-replaced",  # config.json names the new assets; card and stale files not yet done
    "folder-staged",  # convert: the new folder complete in its stage folder
    "output-moved",  # convert --force: the old output moved into the stage, the new not in place
)
KILL_ENV = "FLASHHEAD_TEST_KILL_AT"
# Suffix of the stage folders of new folders (``.<name>.<random>.partial`` beside ``<name>``).
STAGE_SUFFIX = ".partial"


def kill_point(stage: str) -> None:
    """Kill this process (SIGKILL, no cleanup) when ``FLASHHEAD_TEST_KILL_AT`` is ``stage``."""
    if os.environ.get(KILL_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's (its entries') writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` atomically and durably: a hidden file beside it (with ``path``'s
    permissions, or ``mode``), flushed, renamed over it."""
    path = Path(path)
    fd, stage = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(stage, path.stat().st_mode & 0o777 if path.exists() else mode)
        os.replace(stage, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(stage):
            os.unlink(stage)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself) for the block:
    one writer at a time rewrites a folder in place, and a lock left by a killed writer is gone
    with it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stages(output: Path) -> list:
    prefix = f".{output.name}."
    return [
        p
        for p in output.parent.iterdir()
        if p.name.startswith(prefix) and p.name.endswith(STAGE_SUFFIX) and p.is_dir()
    ]


def reclaim_stages(output: Path) -> None:
    """Remove the stage folders of ``output`` left by killed writers (those still locked belong to
    a running one). A stage holding the previous ``output`` while ``output`` is missing (a kill
    between the two renames of :func:`publish_folder`) gives it back first."""
    if not output.parent.is_dir():
        return
    for stage in _stages(output):
        fd = os.open(stage, os.O_RDONLY)
        try:
            if not _try_lock(fd):
                continue
            previous = stage / "previous"
            if previous.is_dir() and not output.exists():
                os.rename(previous, output)
                print(f"[INFO] Restored {output} from an interrupted replacement")
            shutil.rmtree(stage, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def stage_folder(output: Path) -> Iterator[Path]:
    """A new hidden folder beside ``output`` to build it in (``.<name>.<random>.partial``),
    locked while this process holds it and removed after the block; the stages of killed
    writers are reclaimed first (:func:`reclaim_stages`)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stages(output)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=STAGE_SUFFIX, dir=output.parent))
    fd = os.open(stage, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        os.close(fd)


def publish_folder(folder: Path, output: Path, stage: Path) -> None:
    """Put the finished ``folder`` (inside ``stage``, from :func:`stage_folder`) in place of
    ``output``: its files flushed to disk, then an existing ``output`` moved into ``stage`` and
    ``folder`` renamed to ``output``."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_path(path)
    fsync_path(folder)
    kill_point("folder-staged")
    if output.exists():
        output.rename(stage / "previous")
        kill_point("output-moved")
    folder.rename(output)
    fsync_path(output.parent)
