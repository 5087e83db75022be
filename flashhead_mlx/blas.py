"""A fast BLAS for MLX on Linux, where its CPU wheel calls the slow reference BLAS it bundles.

MLX's Linux CPU backend calls ``cblas_sgemm`` from the reference BLAS that the ``mlx-cpu`` wheel
ships (~3-7 GFLOP/s on two cores). An OpenBLAS preloaded with ``LD_PRELOAD`` exports the same
symbols and runs float32 matmuls ~30x faster. Preloading only takes effect at process start, so
the command-line tools and the test suite re-execute themselves once with it. The OpenBLAS is,
first found:

1. the ``ngsolve-openblas`` wheel, which the ``cpu`` extra installs on Linux x86_64 (an OpenBLAS
   built for every x86_64 core, exporting plain ``cblas_*`` names; ``scipy-openblas`` prefixes
   its names and cannot stand in). It needs ``libgfortran.so.5``, which a fresh machine lacks:
   the ``mlx-cpu`` wheel's own copy, stored under a hashed name, is linked under that name in
   ``~/.cache/flashhead-mlx/lib``;
2. Debian's ``libopenblas0-pthread``.

``FLASHHEAD_OPENBLAS=0`` ignores the system one (what a machine without it sees: CI checks the
wheel alone this way); ``FLASHHEAD_OPENBLAS=none`` preloads nothing.
"""

import glob
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

WHEEL = "ngsolve-openblas"
SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
LINK_DIR = Path.home() / ".cache" / "flashhead-mlx" / "lib"
REFERENCE = "MLX's bundled reference BLAS"


def _package_files(name: str, pattern: str) -> List[str]:
    """The files matching ``pattern`` (relative to a folder of the installed package ``name``,
    found without importing it), sorted. A namespace package (``mlx``) may have several folders:
    an ``mlx`` folder beside a script is one of them."""
    spec = importlib.util.find_spec(name)
    folders = (spec.submodule_search_locations or []) if spec else []
    found = (f for folder in folders for f in glob.glob(os.path.join(folder, pattern)))
    return sorted(os.path.normpath(f) for f in found)


def wheel_openblas() -> Optional[Path]:
    """The OpenBLAS library of the ``ngsolve-openblas`` wheel, or None if it is not installed."""
    found = _package_files("ngsolve_openblas", "libopenblas*.so*")
    return Path(found[0]) if found else None


def system_openblas() -> Optional[Path]:
    """Debian's OpenBLAS, or None if it is not installed."""
    return next((Path(p) for p in SYSTEM_OPENBLAS if Path(p).exists()), None)


def fortran_runtime_dirs() -> List[str]:
    """Folders to put on ``LD_LIBRARY_PATH`` so that the wheel's OpenBLAS finds
    ``libgfortran.so.5``: a link to the ``mlx-cpu`` wheel's copy, and that wheel's library folder
    (where the copy finds its own dependencies). Empty if that copy is absent."""
    found = _package_files("mlx", "../mlx_cpu.libs/libgfortran-*.so.5*")
    if not found:
        return []
    libs = Path(found[0]).parent
    link = LINK_DIR / "libgfortran.so.5"
    if not link.is_symlink() or os.readlink(link) != found[0]:
        LINK_DIR.mkdir(parents=True, exist_ok=True)
        partial = LINK_DIR / f".libgfortran.so.5.{os.getpid()}"
        partial.unlink(missing_ok=True)
        os.symlink(found[0], partial)
        os.replace(partial, link)
    return [str(LINK_DIR), str(libs)]


def _loads(library: Path, env: Dict[str, str]) -> Optional[str]:
    """None if a process starts with ``library`` preloaded under ``env``, else the loader's error
    (a preloaded library whose dependencies are missing stops every process at start; one that
    is no library is ignored with a message)."""
    check = subprocess.run(
        [sys.executable, "-I", "-S", "-c", ""], env=env, capture_output=True, text=True
    )
    if check.returncode == 0 and not check.stderr.strip():
        return None
    return (check.stderr.strip() or f"exit status {check.returncode}").splitlines()[-1]


def _prepend(variable: str, entries: List[str]) -> str:
    return ":".join([*entries, *filter(None, os.environ.get(variable, "").split(":"))])


def choose_openblas() -> Tuple[Optional[Path], Dict[str, str], List[str]]:
    """The OpenBLAS to preload, the environment to run with it, and why others were passed over."""
    setting = os.environ.get("FLASHHEAD_OPENBLAS", "")
    if not sys.platform.startswith("linux") or setting == "none":
        return None, dict(os.environ), []
    notes = []
    library = wheel_openblas()
    if library is not None:
        try:
            env = dict(os.environ, LD_LIBRARY_PATH=_prepend("LD_LIBRARY_PATH", fortran_runtime_dirs()))
        except OSError as error:
            env = dict(os.environ)
            notes.append(f"cannot link libgfortran.so.5 ({error})")
        env["LD_PRELOAD"] = _prepend("LD_PRELOAD", [str(library)])
        error = _loads(library, env)
        if error is None:
            return library, env, notes
        notes.append(f"the {WHEEL} wheel's OpenBLAS does not load: {error}")
    library = None if setting == "0" else system_openblas()
    if library is not None:
        return library, dict(os.environ, LD_PRELOAD=_prepend("LD_PRELOAD", [str(library)])), notes
    return None, dict(os.environ), notes


def blas_name() -> str:
    """Which BLAS this process runs MLX's CPU matmuls with."""
    if not sys.platform.startswith("linux"):
        return "platform default"
    preloaded = os.environ.get("LD_PRELOAD", "")
    wheel = wheel_openblas()
    if wheel is not None and str(wheel) in preloaded:
        return f"OpenBLAS from the {WHEEL} wheel"
    system = system_openblas()
    if system is not None and str(system) in preloaded:
        return "system OpenBLAS"
    return REFERENCE


def reexec_with_openblas(argv: List[str]) -> None:
    """Re-execute ``python argv`` with a fast OpenBLAS preloaded (Linux), unless it already is;
    say in one line on the standard error which BLAS runs."""
    if not sys.platform.startswith("linux"):
        return
    name = blas_name()
    if name != REFERENCE:
        print(f"[INFO] BLAS: {name}, preloaded for MLX's CPU matmuls", file=sys.stderr)
        return
    library, env, notes = choose_openblas()
    if library is None:
        if os.environ.get("FLASHHEAD_OPENBLAS") == "none":
            print(f"[INFO] BLAS: {REFERENCE} (FLASHHEAD_OPENBLAS=none)", file=sys.stderr)
        else:
            print(
                f"[WARN] BLAS: {REFERENCE}, ~30x slower float32 matmuls"
                f"{': ' + '; '.join(notes) if notes else ''}. "
                f'Install the fast one: pip install "flashhead-mlx[cpu]" (Linux x86_64) '
                "or apt-get install libopenblas0-pthread",
                file=sys.stderr,
            )
        return
    if notes:
        print(f"[WARN] BLAS: {'; '.join(notes)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
