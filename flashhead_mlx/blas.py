"""Use the system OpenBLAS on Linux, where the MLX CPU wheel bundles a slow reference BLAS.

MLX's Linux CPU backend calls ``cblas_sgemm`` from the reference BLAS it ships (~7 GFLOP/s on
two cores). Debian's OpenBLAS (``apt-get install libopenblas0-pthread``) exports the same
symbols and runs ~30x faster when preloaded. It only takes effect at process start, so the
command-line tools re-execute themselves once with ``LD_PRELOAD`` set. ``FLASHHEAD_OPENBLAS=0``
turns this off.
"""

import os
import sys
from pathlib import Path
from typing import List, Optional

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)


def system_openblas() -> Optional[str]:
    """Path of a system OpenBLAS to preload, or None (not Linux, absent, or disabled)."""
    if not sys.platform.startswith("linux") or os.environ.get("FLASHHEAD_OPENBLAS") == "0":
        return None
    return next((p for p in OPENBLAS_PATHS if Path(p).exists()), None)


def reexec_with_openblas(argv: List[str]) -> None:
    """Re-execute ``argv`` with the system OpenBLAS preloaded, unless it already is."""
    library = system_openblas()
    preloaded = os.environ.get("LD_PRELOAD", "")
    if library is None:
        if sys.platform.startswith("linux") and os.environ.get("FLASHHEAD_OPENBLAS") != "0":
            print(
                "[WARN] MLX's Linux CPU wheel uses a slow reference BLAS: "
                "`apt-get install libopenblas0-pthread` makes float32 matmuls ~30x faster.",
                file=sys.stderr,
            )
        return
    if library in preloaded:
        return
    env = dict(os.environ, LD_PRELOAD=f"{library}:{preloaded}".rstrip(":"))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def blas_name() -> str:
    """Which BLAS this process runs MLX's CPU matmuls with (for benchmark reports)."""
    if not sys.platform.startswith("linux"):
        return "platform default"
    preloaded = os.environ.get("LD_PRELOAD", "")
    return "system OpenBLAS" if "openblas" in preloaded else "MLX's bundled reference BLAS"
