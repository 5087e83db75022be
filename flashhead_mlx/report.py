"""What the measurement commands print: tables, and the device and kernels a figure comes from."""

import os
from typing import Sequence

import mlx.core as mx

from .blas import blas_name


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded to line up in a terminal (the first to the left)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        first, *rest = (str(c) for c in cells)
        padded = [first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])]
        return "| " + " | ".join(padded) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(row) for row in rows]
    )


def device_description() -> str:
    """The MLX device and what it is, e.g. ``cpu (AMD EPYC, x86_64, 2 cores, system OpenBLAS)``."""
    device = mx.default_device()
    info = mx.device_info()
    name = f"{info.get('device_name', 'unknown')}, {info.get('architecture', '?')}"
    if device.type == mx.cpu:
        return f"cpu ({name}, {os.cpu_count()} cores, {blas_name()})"
    backend = "Metal" if mx.metal.is_available() else "CUDA" if mx.cuda.is_available() else "GPU"
    return f"gpu ({backend}: {name})"


def pyplot():
    """``matplotlib.pyplot`` drawing to files (the Agg backend), or a clear error without it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ValueError("--plot needs matplotlib: pip install 'flashhead-mlx[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
