"""Regenerate the main rows of docs/clustering.md: top-1 containment of clustering variants
on held-out text.

    python scripts/containment_study.py --model /path/to/mlx-model \
        --eval-text emma.txt persuasion.txt --variants plain data-aware-gap default

Calibration runs on the text shipped with the package (Pride and Prejudice); containment is
measured on the evaluation texts against the dense head's argmax, by the head's own stage 1
with the centroids stored in 4 bits (and in float32, for comparison).
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load

from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.assets import make_assets
from flashhead_mlx.calibration import CALIBRATION_TEXT, calibration_hidden_states
from flashhead_mlx.clustering import (
    balanced_clusters,
    cluster_head,
    cluster_rows,
    data_aware_rows,
    mean_rows,
    slot_order,
)
from flashhead_mlx.containment import target_ranks
from flashhead_mlx.head import FlashHead
from flashhead_mlx.model_head import head_module, head_rows

VARIANTS = ("plain", "mean", "data-aware-gap", "default")


def gap_bias(
    weight: mx.array, order, cluster_size: int, hidden_states: mx.array, means: mx.array
) -> mx.array:
    """Mean over ``hidden_states`` of (largest logit in the cluster - mean logit in the cluster)."""
    rows = cluster_rows(weight, order)
    padding = mx.array((order < 0) * -1e30, dtype=mx.float32)
    total = mx.zeros((means.shape[0],))
    for i in range(0, hidden_states.shape[0], 256):
        h = hidden_states[i : i + 256]
        best = (h @ rows.T + padding).reshape(h.shape[0], -1, cluster_size).max(axis=-1)
        total = total + (best - h @ means.T).sum(axis=0)
        mx.eval(total)
    return total / hidden_states.shape[0]


def build(variant: str, weight: mx.array, cluster_size: int, hidden: mx.array, seed: int) -> dict:
    """The stage-1 index of one variant, in the format of ``cluster_head``."""
    if variant == "default":
        return cluster_head(weight, cluster_size, hidden_states=hidden, seed=seed)
    x = data_aware_rows(weight, hidden) if variant == "data-aware-gap" else weight
    order = slot_order(balanced_clusters(x, cluster_size, seed), cluster_size)
    means = mean_rows(weight, order, cluster_size)
    bias = mx.zeros((means.shape[0],))
    if variant == "plain":
        means = means / mx.linalg.norm(means, axis=1, keepdims=True)
    elif variant == "data-aware-gap":
        bias = gap_bias(weight, order, cluster_size, hidden, means)
    return {"order": mx.array(order), "centroids": means, "cluster_bias": bias}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="mlx-lm model folder")
    parser.add_argument("--eval-text", nargs="+", required=True, help="held-out text files")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=["plain", "data-aware-gap", "default"]
    )
    parser.add_argument("--cluster-size", type=int, nargs="+", default=[16])
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument(
        "--eval-tokens", type=int, default=16384, help="positions per evaluation text"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main():
    reexec_with_openblas([__file__, *sys.argv[1:]])
    args = setup_arg_parser().parse_args()
    model, tokenizer = load(args.model)
    weight = head_rows(head_module(model))
    vocab_size = weight.shape[0]
    hidden = calibration_hidden_states(
        model, tokenizer, CALIBRATION_TEXT.read_text(), args.calibration_tokens
    )
    evals = [
        calibration_hidden_states(model, tokenizer, Path(p).read_text(), args.eval_tokens)
        for p in args.eval_text
    ]
    eval_hidden = mx.concatenate(evals)
    print(f"| variant | s | clusters | 4-bit | c/64 | c/32 | c/16 | <=10% | <=15% | clustering s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cluster_size in args.cluster_size:
        n_clusters = -(-vocab_size // cluster_size)
        budgets = {
            "c/64": n_clusters // 64,
            "c/32": n_clusters // 32,
            "c/16": n_clusters // 16,
            "<=10%": int((0.10 * vocab_size - n_clusters) // cluster_size),
            "<=15%": int((0.15 * vocab_size - n_clusters) // cluster_size),
        }
        for variant in args.variants:
            start = time.perf_counter()
            clusters = build(variant, weight, cluster_size, hidden, args.seed)
            mx.eval(clusters)
            seconds = time.perf_counter() - start
            for quantized in (False, True):
                assets = make_assets(clusters, 1, centroid_bits=4 if quantized else None)
                ranks = target_ranks(FlashHead(assets, weight), eval_hidden)
                cells = [
                    f"{100 * (ranks < p).mean():.2f} "
                    f"({100 * (n_clusters + p * cluster_size) / vocab_size:.1f}%)"
                    for p in budgets.values()
                ]
                bits = "yes" if quantized else "no"
                row = [variant, str(cluster_size), str(n_clusters), bits, *cells, f"{seconds:.0f}"]
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
