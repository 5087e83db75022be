"""The BLAS that MLX's CPU matmuls run with on Linux (flashhead_mlx/blas.py).

``test_fresh_machine`` is also CI's fresh-machine step: a tiny conversion with the system OpenBLAS
ignored (``FLASHHEAD_OPENBLAS=0``) and an empty ``HOME`` must run on the OpenBLAS that the
project's own install brought: the process that runs MLX's matmuls has the wheel's OpenBLAS
mapped, and without preloading it has none (the speed ratio is in docs/setup.md: a timed
assertion here would fail on a loaded machine)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import run_cli
from flashhead_mlx import blas

LINUX_X86 = sys.platform.startswith("linux") and platform.machine() == "x86_64"
needs_wheel = pytest.mark.skipif(
    not LINUX_X86, reason="the cpu extra brings an OpenBLAS on Linux x86_64 only"
)

# The shared libraries mapped in a process that ran a float32 matmul, under the BLAS that
# reexec_with_openblas picks.
MAPPED_AFTER_MATMUL = """
import sys
from flashhead_mlx.blas import reexec_with_openblas
reexec_with_openblas(sys.argv)
import mlx.core as mx
a = mx.random.normal((256, 256))
mx.eval(a @ a)
print(open("/proc/self/maps").read())
"""


def mapped_libraries(env: dict, tmp_path) -> set:
    script = tmp_path / "mapped.py"
    script.write_text(MAPPED_AFTER_MATMUL)
    run = subprocess.run(
        [sys.executable, str(script)], env={**os.environ, **env},
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return {os.path.realpath(line.split()[-1]) for line in run.stdout.splitlines() if ".so" in line}


@needs_wheel
def test_the_wheel_comes_first_and_the_switch_ignores_the_system(monkeypatch):
    monkeypatch.delenv("FLASHHEAD_OPENBLAS", raising=False)
    library, env, notes = blas.choose_openblas()
    assert library == blas.wheel_openblas() is not None, notes
    assert env["LD_PRELOAD"].split(":")[0] == str(library)
    assert str(blas.LINK_DIR) in env["LD_LIBRARY_PATH"].split(":")

    monkeypatch.setattr(blas, "wheel_openblas", lambda: None)
    assert blas.choose_openblas()[0] == blas.system_openblas()
    monkeypatch.setenv("FLASHHEAD_OPENBLAS", "0")
    assert blas.choose_openblas()[0] is None
    monkeypatch.setenv("FLASHHEAD_OPENBLAS", "none")
    monkeypatch.setattr(blas, "wheel_openblas", lambda: pytest.fail("none preloads nothing"))
    assert blas.choose_openblas()[0] is None


@needs_wheel
def test_a_wheel_library_that_does_not_load_is_passed_over(monkeypatch, tmp_path):
    broken = tmp_path / "libopenblas.so.0"
    broken.write_bytes(b"not a library")
    monkeypatch.setattr(blas, "wheel_openblas", lambda: broken)
    monkeypatch.setenv("FLASHHEAD_OPENBLAS", "0")
    library, _, notes = blas.choose_openblas()
    assert library is None and "does not load" in notes[0]


@needs_wheel
def test_fresh_machine(tiny_llama, tmp_path):
    fresh = {"FLASHHEAD_OPENBLAS": "0", "HOME": str(tmp_path / "home"), "LD_PRELOAD": "", "LD_LIBRARY_PATH": ""}
    out = tmp_path / "out"
    result = run_cli("convert", "--model", str(tiny_llama), "--output", str(out),
                     "--calibration-tokens", "256", "--n-probes", "5", env=fresh)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["flashhead"]["assets_file"]
    blas_lines = [line for line in result.stderr.splitlines() if "BLAS:" in line]
    assert blas_lines == [f"[INFO] BLAS: OpenBLAS from the {blas.WHEEL} wheel, preloaded for MLX's CPU matmuls"]

    wheel = str(blas.wheel_openblas().resolve())
    assert wheel in mapped_libraries(fresh, tmp_path)
    # numpy's own OpenBLAS (scipy_openblas: prefixed names) may be mapped; no cblas_* one is.
    plain = mapped_libraries({**fresh, "FLASHHEAD_OPENBLAS": "none"}, tmp_path)
    assert not [p for p in plain if "libopenblas" in p and "scipy_openblas" not in p], plain


def test_an_mlx_folder_beside_a_script_does_not_hide_the_wheels(tmp_path):
    """``mlx`` is a namespace package: a folder named ``mlx`` beside a script joins it, first.
    The Fortran runtime is still found in the ``mlx-cpu`` wheel."""
    if not blas.fortran_runtime_dirs():
        pytest.skip("no mlx-cpu wheel with a libgfortran here (not Linux x86_64)")
    (tmp_path / "mlx" / "0.32.4").mkdir(parents=True)
    script = tmp_path / "script.py"
    script.write_text("import mlx.core\nfrom flashhead_mlx import blas\n"
                      "print(len(list(mlx.__path__)), blas.fortran_runtime_dirs())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         check=True, env=dict(os.environ, FLASHHEAD_OPENBLAS="none")).stdout
    folders, dirs = out.split(" ", 1)
    assert int(folders) == 2 and "mlx_cpu.libs" in dirs
