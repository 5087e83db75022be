"""Stage 1 per centroid format on this machine (:func:`flashhead_mlx.bench.stage1_calls`):
the packed 4-bit centroids (MLX's quantized matmul), float32 centroids (a plain matmul) and the
packed ones dequantized at every call, at B = 1, 4 and 16, alternated, medians; for the stage-1
shapes of Gemma-3-270M (16384 clusters x 640) and SmolLM2-135M (3072 x 576), from a converted
folder's assets when given, else random arrays of those shapes.

    python scripts/stage1_formats.py [--folders gemma3-flashhead smollm2-flashhead] [--runs 5]
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.bench import stage1_calls
from flashhead_mlx.flashhead_format import assets_section, read_assets, read_config
from flashhead_mlx.report import table
from flashhead_mlx.timing import alternate

# (name, n_clusters, hidden size) of the random stage-1 arrays.
SHAPES = (("Gemma-3-270M", 16384, 640), ("SmolLM2-135M", 3072, 576))
BATCH_SIZES = (1, 4, 16)
# Different hidden states per timed run.
INPUTS = 8


def random_arrays(n_clusters: int, d: int) -> tuple:
    """Random 4-bit centroids (group size 64) and cluster bias: the arguments of
    :func:`stage1_calls` before the inputs."""
    rows = 0.1 * mx.random.normal((n_clusters, d), key=mx.random.key(1))
    packed, scales, biases = mx.quantize(rows, 64, 4)
    return packed, scales, biases, mx.random.normal((n_clusters,), key=mx.random.key(2)), 64, 4


def folder_arrays(folder: str) -> tuple:
    """A converted folder's stage-1 arrays, as :func:`random_arrays` returns them."""
    section = assets_section(Path(folder), read_config(Path(folder)))
    arrays = read_assets(Path(folder), section)
    return (arrays["centroids"], arrays.get("centroid_scales"), arrays.get("centroid_biases"),
            arrays["cluster_bias"], section["centroid_group_size"], section["centroid_bits"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", nargs="*", default=(), help="Converted FlashHead folders.")
    parser.add_argument("--runs", type=int, default=5, help="Timed runs of each format.")
    args = parser.parse_args()
    reexec_with_openblas([__file__, *sys.argv[1:]])
    cases = {Path(f).name: folder_arrays(f) for f in args.folders} or {
        name: random_arrays(n, d) for name, n, d in SHAPES
    }
    for name, arrays in cases.items():
        d = arrays[0].shape[1] * (32 // arrays[5] if arrays[5] else 1)
        results = {}
        for b in BATCH_SIZES:
            inputs = [mx.random.normal((b, d), key=mx.random.key(10 + i)) for i in range(INPUTS)]
            results[b] = alternate(stage1_calls(*arrays, inputs), args.runs)
        formats = list(results[1])
        rows = [[f"B = {b}", *(f"{ms[f] / ms['float32']:.2f}" for f in formats)]
                for b, ms in results.items()]
        print(f"{name}: {arrays[0].shape[0]} clusters x {d}; stage 1 ms / float32 ms, medians of "
              f"{args.runs} alternated runs")
        print(table(["", *formats], rows) + "\n")


if __name__ == "__main__":
    main()
