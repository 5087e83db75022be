"""Plain messages for a full disk or a folder that cannot be written.

The commands that write a folder check, before the work, that the folder takes a file and, where
the size of what they write is known, that the disk has room for it; the errors of the writes
themselves are mapped to one line too (:func:`storage_error`): an ``OSError``'s ``errno``, and
MLX's writers, which raise a ``RuntimeError`` without one (``[write] Unable to write N bytes to
file.``), by what the folder is then found to be.
"""

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

# errno of a write that failed for want of space or permission -> what it means.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "it is on a read-only file system",
    errno.EACCES: "no permission to write there",
    errno.EPERM: "no permission to write there",
}
# MLX's messages when it cannot create or write a file (mlx/io).
MLX_WRITE_ERROR = re.compile(r"\[(write|save\w*)\] (Unable to write|File|Failed to open)")
# Less free space than this after a failed write: the disk is what ran out.
FULL_BELOW = 64 << 20


class StorageError(ValueError):
    """A folder that cannot be written: full, read-only or not ours; a one-line message."""


def size_text(n_bytes: int) -> str:
    """``n_bytes`` as ``"1.2 GiB"``, ``"340.0 MiB"``, ..."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n_bytes >= 1 << shift:
            return f"{n_bytes / (1 << shift):.1f} {unit}"
    return f"{n_bytes} bytes"


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system of ``folder``."""
    return shutil.disk_usage(folder).free


def storage_error(error: BaseException, folder: Path) -> Optional[StorageError]:
    """The plain error for ``error``, raised while writing into ``folder``, or ``None`` when it
    is not a failure to write (which is then raised as it is)."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        where = folder  # the folder asked for, not a hidden one being written inside it
        if error.filename and folder.resolve() not in Path(error.filename).resolve().parents:
            where = Path(error.filename).parent  # another place: a cache, say
        reason = WRITE_ERRNOS[error.errno]
    elif isinstance(error, RuntimeError) and MLX_WRITE_ERROR.search(str(error)):
        where = folder
        if not os.access(folder, os.W_OK):
            reason = "it cannot be written (read-only, or no permission)"
        elif free_bytes(folder) < FULL_BELOW:
            reason = "no space left on the device"
        else:
            reason = f"a write failed ({error})"
    else:
        return None
    if reason == WRITE_ERRNOS[errno.ENOSPC] or "quota" in reason:
        reason += f" ({size_text(free_bytes(where))} free)" if where.exists() else ""
        advice = "free some space, or write elsewhere"
    else:
        advice = "write elsewhere"
    return StorageError(f"cannot write into {where}: {reason}; {advice}")


@contextlib.contextmanager
def plain_write_errors(folder: Path) -> Iterator[None]:
    """Within this block, a failure to write (:func:`storage_error`) is raised as its plain
    :class:`StorageError` about ``folder``; any other error as it is."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        plain = storage_error(error, folder)
        if plain is None:
            raise
        raise plain from error


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and make sure a file can be created in it; a
    :class:`StorageError` if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        plain = storage_error(error, folder)
        if plain is None:
            raise
        raise plain from error


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """A :class:`StorageError` unless ``folder``'s file system has ``needed`` bytes free for
    ``what``."""
    free = free_bytes(folder)
    if free < needed:
        raise StorageError(
            f"{what} needs about {size_text(needed)} in {folder}, which has {size_text(free)} "
            "free: free some space, or write elsewhere"
        )
