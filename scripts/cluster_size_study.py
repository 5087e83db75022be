"""Cluster size 16 or 32 (issue 15 part 4; docs/clustering.md, "Cluster size: 16 or 32"): top-1
containment at equal scored fractions, and the bytes each size reads per step at an equal
containment, from two conversions of one model and their ``lever_study.py --states`` folders.

    python scripts/cluster_size_study.py --small DIR16 --small-states S16 --large DIR32
        --large-states S32 [--caps 0.10,0.11,0.12] [--stage-times]

A position counts as contained when its dense argmax's cluster is probed or the argmax is among
the row's last ``RECENT_TOKENS`` context tokens (as the decode scores them). Bytes per step:
4-bit centroids (``centroid_bits``), the probed rows and the recent rows, for a float32, bf16
and 4-bit head. ``--stage-times`` also times both heads' stages side by side on this machine
(alternated medians; :func:`flashhead_mlx.bench.stage_calls`), the large one at the probes that
reach the small one's containment.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.clustering import most_probes, scored_fraction
from flashhead_mlx.metrics import containment_curve, wilson_interval
from flashhead_mlx.recent import RECENT_TOKENS

# Bytes per head element: float32, bf16, and MLX's 4-bit with a bf16 scale and bias per 64.
HEAD_BYTES = {"float32": 4.0, "bf16": 2.0, "4-bit": 0.5 + 4 / 64}


def layout(folder: Path) -> dict:
    """The folder's ``flashhead`` config section (clusters, probes, vocabulary, centroid bits)."""
    return json.loads((folder / "config.json").read_text())["flashhead"]


def counted_ranks(states: Path) -> np.ndarray:
    """Every position's stage-1 rank over the domains of a ``--states`` folder, 0 where the
    argmax is among the recent tokens (contained at any probe count)."""
    domains = [np.load(path) for path in sorted(states.glob("*.npz"))]
    return np.concatenate([np.where(d["back"] < RECENT_TOKENS, 0, d["ranks"]) for d in domains])


def contained(ranks: np.ndarray, probes: int) -> tuple:
    """(contained positions, positions) at ``probes`` probes."""
    return int((ranks < probes).sum()), ranks.size


def step_bytes(section: dict, probes: int, head_bytes: float) -> float:
    """Bytes per decode step and hidden dimension: centroids, probed rows and recent rows."""
    centroids = section["n_clusters"] * (section["centroid_bits"] / 8 + 4 / 64)
    return centroids + (probes * section["cluster_size"] + RECENT_TOKENS) * head_bytes


def percent(hits: int, total: int) -> str:
    low, high = wilson_interval(hits, total)
    return f"{100 * hits / total:.2f} [{100 * low:.2f}, {100 * high:.2f}]"


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("small", "large"):
        parser.add_argument(f"--{name}", type=Path, required=True, help="a FlashHead folder")
        parser.add_argument(f"--{name}-states", type=Path, required=True, help="its states")
    parser.add_argument("--caps", default="0.10,0.11,0.12", help="scored fractions")
    parser.add_argument("--stage-times", action="store_true", help="time both heads' stages")
    args = parser.parse_args()
    sizes = {"small": layout(args.small), "large": layout(args.large)}
    states = {"small": counted_ranks(args.small_states), "large": counted_ranks(args.large_states)}
    names = " | ".join(f"clusters of {s['cluster_size']}" for s in sizes.values())
    print(f"| scored | {names} |")
    print("|---|---|---|")
    for cap in (float(c) for c in args.caps.split(",")):
        cells = []
        for name, s in sizes.items():
            p = most_probes(cap, s["n_clusters"], s["cluster_size"], s["vocab_size"], RECENT_TOKENS)
            cells.append(f"{p} probes: {percent(*contained(states[name], p))}")
        print(f"| {100 * cap:g}% | " + " | ".join(cells) + " |")
    small, large = sizes["small"], sizes["large"]
    hits, total = contained(states["small"], small["n_probes"])
    curve = containment_curve(states["large"], large["n_clusters"])  # at 1 ... n_clusters probes
    probes = int(np.argmax(curve >= hits / total)) + 1
    share = scored_fraction(
        large["n_clusters"], large["cluster_size"], probes, large["vocab_size"], RECENT_TOKENS
    )
    print(f"\nclusters of {large['cluster_size']} reach the {100 * hits / total:.2f}% of "
          f"{small['n_probes']} probes of {small['cluster_size']} at {probes} probes "
          f"({100 * share:.1f}% scored)")
    for kind, head_bytes in HEAD_BYTES.items():
        ratio = step_bytes(large, probes, head_bytes) / step_bytes(
            small, small["n_probes"], head_bytes
        )
        print(f"bytes per step, large / small, {kind} head: {ratio:.2f}")
    if args.stage_times:
        print_stage_times(args.small, args.large, probes)


def print_stage_times(small: Path, large: Path, probes: int, runs: int = 7) -> None:
    """Both heads' decode step and stages, alternated, at B = 1 and 4 (``large`` at ``probes``)."""
    from flashhead_mlx import flash_head, load
    from flashhead_mlx.bench import stage_calls
    from flashhead_mlx.speed import BATCH_SIZES, decode_step, hidden_inputs
    from flashhead_mlx.timing import alternate

    models = {"small": load(str(small))[0], "large": load(str(large))[0]}
    tokenizer = load(str(small))[1]
    flash_head(models["large"]).n_probes = probes
    for batch_size in BATCH_SIZES:
        inputs = hidden_inputs(models["small"], tokenizer, batch_size)
        calls, keys = {}, ["head step"]
        for name, model in models.items():
            calls[f"{name} head step"] = (decode_step(model), inputs)
            for stage, call in stage_calls(flash_head(model), inputs).items():
                calls[f"{name} {stage}"] = call
                keys += [stage] if name == "small" else []
        times = alternate(calls, runs)
        print(f"\nB = {batch_size}: ms small, large, large / small")
        for key in keys:
            a, b = times[f"small {key}"], times[f"large {key}"]
            print(f"| {key} | {a:.3f} | {b:.3f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
