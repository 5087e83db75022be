"""``flashhead-mlx eval``: how closely a FlashHead follows its dense head on a text (the
metrics: :mod:`flashhead_mlx.metrics`)."""

import argparse
import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .arguments import add_text_arguments
from .calibration import TUNING_TEXT, text_hidden_states
from .clustering import scored_fraction
from .head import FlashHead
from .metrics import containment_curve, default_n_probes, evaluate, format_rows, load_head
from .report import device_description, pyplot

def plot(rows: List[dict], stats: dict, head: FlashHead, path: str, title: str) -> None:
    """Containment and candidate mass against the scored fraction, the measured rows marked."""
    plt = pyplot()
    last = min(head.n_clusters, 2 * max(row["n_probes"] for row in rows))
    probes = np.arange(1, last + 1)
    scored = 100 * scored_fraction(head.n_clusters, head.cluster_size, probes, head.vocab_size)
    curves = {
        "top-1 containment": containment_curve(stats["top1_ranks"], head.n_clusters),
        "top-5 containment": containment_curve(stats["top5_ranks"], head.n_clusters),
        "candidate mass": stats["mass_curve"],
    }
    keys = ("top1_containment", "top5_containment", "candidate_mass")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, curve), key in zip(curves.items(), keys):
        (line,) = ax.plot(scored, np.clip(curve[:last], 1e-4, 1 - 1e-6), label=label)
        ax.plot(
            [100 * r["scored_fraction"] for r in rows],
            [min(r[key], 1 - 1e-6) for r in rows],
            "o",
            color=line.get_color(),
        )
    for row in rows:
        ax.annotate(f"{row['n_probes']}", (100 * row["scored_fraction"], 0.5), fontsize=8)
        ax.axvline(100 * row["scored_fraction"], color="grey", lw=0.5, ls=":")
    ax.set_yscale("logit")
    ticks = [t for t in (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999) if t < 1 - 0.5 / stats["targets"].size]
    ax.set_yticks(ticks, [f"{100 * t:g}%" for t in ticks])
    ax.set_ylim(top=1 - 0.5 / stats["targets"].size)
    ax.set_xlabel("share of the vocabulary scored per token (%)  [dots: n_probes measured]")
    ax.set_ylabel("share of positions / of the softmax mass")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    model: str,
    text: Optional[str] = None,
    max_tokens: int = 4096,
    n_probes: Optional[Sequence[int]] = None,
    tv_positions: int = 128,
    plot_path: Optional[str] = None,
) -> dict:
    """Evaluate the FlashHead folder ``model`` on the file ``text`` (default: the built-in
    text): the JSON object ``eval --json`` writes."""
    text_path = Path(text) if text else TUNING_TEXT
    if not text_path.is_file():
        raise ValueError(f"{text_path} is not a file")
    lm, tokenizer, head = load_head(model)
    hidden = text_hidden_states(lm, tokenizer, text_path.read_text(), max_tokens)
    rows, stats = evaluate(
        head, hidden, n_probes or default_n_probes(head.n_probes, head.n_clusters), tv_positions
    )
    if plot_path:
        plot(
            rows,
            stats,
            head,
            plot_path,
            f"{Path(model).name} on {text_path.name}, " f"{hidden.shape[0]} positions",
        )
    return {
        "model": model,
        "text": str(text_path),
        "tokens": hidden.shape[0],
        "device": device_description(),
        "results": rows,
    }


def probe_list(value: str) -> List[int]:
    """``--n-probes``: comma-separated positive integers."""
    try:
        probes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        probes = []
    if not probes or min(probes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 128,256, got {value!r}")
    return probes


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashhead-mlx eval",
        description="Measure a FlashHead against its dense head on a text (teacher forcing).",
    )
    parser.add_argument("--model", required=True, help="A converted FlashHead folder or repo.")
    add_text_arguments(parser)
    parser.add_argument(
        "--n-probes",
        type=probe_list,
        default=None,
        help="Comma-separated n_probes to measure (default: the model's, half and twice it).",
    )
    parser.add_argument(
        "--tv-positions",
        type=int,
        default=128,
        help="Positions of the text's second half the sampling distances are averaged over "
        "(0: skip them).",
    )
    parser.add_argument("--json", default=None, help="Write the results to this JSON file.")
    parser.add_argument("--plot", default=None, help="Draw containment and mass to this PNG.")
    return parser


def main() -> None:
    parser = setup_arg_parser()
    args = parser.parse_args()
    if args.max_tokens < 2 or args.tv_positions < 0:
        parser.error("--max-tokens must be at least 2 and --tv-positions at least 0")
    try:
        if args.plot:
            pyplot()  # fail now, not after the measurements
        result = run(
            args.model, args.text, args.max_tokens, args.n_probes, args.tv_positions, args.plot
        )
    except ValueError as error:
        raise SystemExit(f"flashhead-mlx eval: error: {error}")
    print(
        f"{result['model']} on {result['text']}: {result['tokens']} positions, "
        f"{result['device']}"
    )
    print(format_rows(result["results"]))
    if args.tv_positions:
        rows = result["results"]
        print(
            f"TV: exact per position, mean over {rows[0]['sampling_positions']} positions of the "
            "text's second half ± its standard error, to the last decimal above it; mass_bias "
            "refit: on the first half."
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.json}")
    if args.plot:
        print(f"Wrote {args.plot}")


if __name__ == "__main__":
    main()
