"""How far FlashHead's full-vocabulary sampler is from the dense softmax, on held-out text.

For a model folder (a converted FlashHead folder, or a plain mlx-lm folder that is clustered
here), prints, per ``n_probes`` and temperature, the mean and 95th percentile of the total
variation distance between the sampler's exact distribution and the dense softmax, and the dense
mass outside the candidates.

    python scripts/sampling_error.py /work/models/smollm2-135m --n-probes 96 192
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np

from flashhead_mlx.assets import load_assets, make_assets
from flashhead_mlx.calibration import calibration_hidden_states
from flashhead_mlx.head import FlashHead
from flashhead_mlx.model_head import head_module, head_rows
from flashhead_mlx.sampling import fit_mass_bias, sampler_distribution, total_variation

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "flashhead_mlx" / "data"
AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"


def measure(
    head: FlashHead,
    calibration: mx.array,
    held_out: mx.array,
    n_probes: list,
    temperatures: list,
    chunk_size: int = 128,
) -> list:
    """Rows ``(n_probes, T, mean TV, p95 TV, dense mass outside the candidates)``.

    ``mass_bias`` is refitted on ``calibration`` for each ``n_probes`` (it depends on which
    clusters are probed).
    """
    rows = []
    for probes in n_probes:
        head.n_probes = probes
        head.mass_bias = fit_mass_bias(head, calibration)
        for temperature in temperatures:
            distances, outside = [], []
            for start in range(0, held_out.shape[0], chunk_size):
                h = held_out[start : start + chunk_size]
                dense = mx.softmax(head.dense_logits(h) / temperature, axis=-1)
                sampler = sampler_distribution(head, h, temperature)
                tokens, _ = head.candidates(h)
                inside = mx.take_along_axis(dense, mx.maximum(tokens, 0), axis=-1)
                inside = mx.where(tokens >= 0, inside, 0)
                distances.append(np.array(total_variation(sampler, dense)))
                outside.append(np.array(1 - inside.sum(-1)))
            distances, outside = np.concatenate(distances), np.concatenate(outside)
            p95 = np.quantile(distances, 0.95)
            rows.append((probes, temperature, distances.mean(), p95, outside.mean()))
    return rows


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="mlx-lm model folder (converted or not)")
    parser.add_argument(
        "--n-probes", type=int, nargs="+", help="default: the folder's, or n_clusters / 16"
    )
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--cluster-size", type=int, default=16)
    parser.add_argument("--centroid-bits", type=int, default=4)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--held-out-text", default=str(AUSTEN / "emma.txt"))
    parser.add_argument("--held-out-tokens", type=int, default=2048)
    return parser


def main():
    args = setup_arg_parser().parse_args()
    model, tokenizer = mlx_lm.load(args.model)
    weight = head_rows(head_module(model))
    calibration_text = (PACKAGE_DATA / "calibration.txt").read_text()
    held_out_text = Path(args.held_out_text).read_text()
    calibration = calibration_hidden_states(
        model, tokenizer, calibration_text, args.calibration_tokens
    )
    held_out = calibration_hidden_states(model, tokenizer, held_out_text, args.held_out_tokens)

    if "flashhead" in json.loads((Path(args.model) / "config.json").read_text()):
        assets = load_assets(args.model, model)
    else:
        from flashhead_mlx.clustering import cluster_head

        clusters = cluster_head(weight, args.cluster_size, hidden_states=calibration)
        n_clusters = clusters["centroids"].shape[0]
        assets = make_assets(clusters, max(1, n_clusters // 16), args.centroid_bits)
    head = FlashHead(assets, weight)
    print(f"{head.vocab_size} tokens, {head.n_clusters} clusters of {head.cluster_size}")
    print("n_probes  scored  T     TV mean  TV p95   dense mass outside candidates")
    for probes, temperature, tv_mean, tv_p95, outside in measure(
        head, calibration, held_out, args.n_probes or [head.n_probes], args.temperatures
    ):
        scored = (head.n_clusters + probes * head.cluster_size) / head.vocab_size
        print(
            f"{probes:8d}  {scored:6.1%}  {temperature:4.2f}  "
            f"{tv_mean:.4f}   {tv_p95:.4f}   {outside:.4f}"
        )


if __name__ == "__main__":
    main()
