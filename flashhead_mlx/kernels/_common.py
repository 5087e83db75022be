"""Helpers that the kernels share: loading their sources, choosing the path, and the ranking
key both paths use."""

import contextlib
import contextvars
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import mlx.core as mx

# metal/ at the top of the repository, installed as the package ``flashhead_mlx.metal``.
METAL_DIR = Path(importlib.util.find_spec("flashhead_mlx.metal").submodule_search_locations[0])
# Each kernel's body in a ``metal/*.metal`` file starts at this line with its name after it.
BODY = re.compile(r"^// ---- kernel (\w+) ----\n", re.M)
# The scoring kernels' threadgroups: 4 SIMD groups of 32 threads, each scoring ROWS = 4 rows
# (metal/_common.metal).
SCORE_THREADS = 128
ROWS = 4
ROWS_PER_THREADGROUP = ROWS * SCORE_THREADS // 32
# Packed formats the kernels read (MLX's affine 2-, 4- and 8-bit; None: float rows).
KERNEL_BITS = (None, 2, 4, 8)


# The path of a kernel_path() block, or None outside one.
_PATH: contextvars.ContextVar = contextvars.ContextVar("flashhead_kernel_path", default=None)
# The record of the enclosing recording() block, or None outside one.
_RAN: contextvars.ContextVar = contextvars.ContextVar("flashhead_kernels_ran", default=None)


def forced_path() -> Optional[str]:
    """The path forced, ``"metal"`` or ``"mlx"``: by the enclosing :func:`kernel_path` block,
    else by ``FLASHHEAD_KERNELS``; ``None`` when neither forces one."""
    path = _PATH.get()
    if path:
        return path
    choice = os.environ.get("FLASHHEAD_KERNELS", "").lower()
    if choice not in ("", "metal", "mlx"):
        raise ValueError(f"FLASHHEAD_KERNELS must be 'metal' or 'mlx', got {choice!r}")
    return choice or None


@contextlib.contextmanager
def kernel_path(path: Optional[str]) -> Iterator[None]:
    """Within this block the kernels take ``path``, ``"metal"`` or ``"mlx"`` (before
    ``FLASHHEAD_KERNELS``, and without FlashHead's self-test); ``None`` changes nothing."""
    if path not in (None, "metal", "mlx"):
        raise ValueError(f"the kernel path must be 'metal' or 'mlx', got {path!r}")
    token = _PATH.set(path) if path else None
    try:
        yield
    finally:
        if token is not None:
            _PATH.reset(token)


def use_metal() -> bool:
    """Whether to run the Metal kernels: the :func:`forced_path` (a :func:`kernel_path` block,
    where FlashHead's self-test puts its choice, :mod:`flashhead_mlx.kernels.selftest`; else
    ``FLASHHEAD_KERNELS=metal`` or ``mlx``), else the kernels when Metal is available."""
    path = forced_path()
    return path == "metal" if path else mx.metal.is_available()


@contextlib.contextmanager
def recording() -> Iterator[Dict[str, str]]:
    """Within this block, what the FlashHead's calls ran, in the dict it yields (each call
    overwrites its entries): ``"centroid_topk"`` and ``"cluster_argmax"``, the implementation
    each stage ran (``"metal"`` or ``"mlx"``, after the first-use self-test's decision);
    ``"batch_path"``, the path of a decode step or of stage 2
    (:data:`~flashhead_mlx.kernels.BATCH_PATHS`; ``"dense"`` with no stage recorded: the
    decode step's dense switch, the dense head's logits)."""
    ran: Dict[str, str] = {}
    token = _RAN.set(ran)
    try:
        yield ran
    finally:
        _RAN.reset(token)


def record(name: str, value: str) -> None:
    """Note ``name = value`` in the enclosing :func:`recording` block's record, if any."""
    ran = _RAN.get()
    if ran is not None:
        ran[name] = value


@lru_cache
def kernel_sources(name: str) -> Tuple[str, Dict[str, str]]:
    """The header (the shared helpers, then the file's own) of ``metal/<name>.metal`` and its
    kernels' bodies by kernel name."""
    header, *bodies = BODY.split((METAL_DIR / f"{name}.metal").read_text())
    return (METAL_DIR / "_common.metal").read_text() + header, dict(zip(bodies[::2], bodies[1::2]))


def metal_kernel(file: str, name: str, input_names: Sequence[str], output_names: Sequence[str]):
    """Kernel ``name`` of ``metal/<file>.metal``, made by the current ``mx.fast.metal_kernel``,
    which the tests replace with the CPU emulator."""
    return _make_kernel(mx.fast.metal_kernel, file, name, tuple(input_names), tuple(output_names))


@lru_cache
def _make_kernel(factory, file: str, name: str, input_names: Tuple[str, ...],
                 output_names: Tuple[str, ...]):
    header, bodies = kernel_sources(file)
    return factory(name=name, input_names=list(input_names), output_names=list(output_names),
                   source=bodies[name], header=header)


def kernel_rows(d: int, dtype: mx.Dtype, bits) -> bool:
    """Whether the scoring kernels read rows of ``d`` values stored as ``dtype`` (float rows,
    ``bits`` None) or packed with ``bits``: a lane reads 16 bytes of a float row at a time."""
    return bits in KERNEL_BITS and (bits is not None or d * dtype.size % 16 == 0)


def threads_for(count: int, most: int) -> int:
    """Threads per threadgroup for ``count`` work items: ``count`` rounded up to whole SIMD groups
    of 32, at most ``most``."""
    return min(most, max(32, -(-count // 32) * 32))


@lru_cache
def placeholder(dtype: mx.Dtype) -> mx.array:
    """The scales and biases passed with float rows, which the kernels do not read."""
    return mx.zeros((1,), dtype=dtype)


def order_key(x: mx.array) -> mx.array:
    """The bits of float32 ``x`` as uint32 that sort like the floats (-0 just below +0), as the
    kernels' ``order_key``: with an id it makes an exact ranking, ties to the lowest id."""
    # Negative floats get their 31 low bits flipped, then the sign bit flips: the same key as
    # ``~bits`` for negatives and ``bits | 0x80000000`` otherwise, in cheaper element-wise ops.
    bits = x.astype(mx.float32).view(mx.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(mx.uint32) ^ 0x80000000
