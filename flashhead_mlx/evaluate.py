"""``flashhead-mlx eval``: how closely a FlashHead follows its dense head on a text.

Teacher forcing, no generation: the model runs once over windows of the text (at prompt-processing
speed), and every metric, for every ``n_probes``, is computed on those hidden states against the
exact dense logits:

- ``top1_containment`` / ``top5_containment``: shares of positions whose dense argmax (all of the
  dense top 5) is among the candidates;
- ``greedy_agreement``: share of positions where ``FlashHead.greedy`` returns the dense argmax
  (it differs from top-1 containment only through ties and padding, so a bug shows);
- ``candidate_mass``: the dense softmax mass inside the candidates, averaged over positions;
- ``sampling_tv_t1`` / ``sampling_tv_t07_p09``: the total variation distance between the
  distribution of a token sampled through mlx-lm's sampler from FlashHead's logits and from the
  dense logits (T = 1; T = 0.7 with top_p = 0.9), exact at each position
  (:mod:`flashhead_mlx.sampling_distance`), averaged over a subsample of the text's second half.
  The means are printed to the leading digit of their standard error (the JSON keeps them whole,
  with the standard errors). The sampling mass offsets
  (``mass_bias``) depend on ``n_probes``: the folder's serve its own ``n_probes``, and are refitted
  on the text's first half for any other.

Stage 1 scores against float32 copies of the stored (4-bit) centroids: the values
``mx.quantized_matmul`` reads, summed in another order, and 20x faster on a CPU.
"""

import argparse
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .assets import load_assets
from .calibration import calibration_hidden_states
from .clustering import scored_fraction
from .containment import cluster_ranks, token_clusters
from .head import FlashHead
from .loading import download, load
from .patch import apply_flashhead, flash_head
from .report import device_description, pyplot, table
from .sampling import fit_mass_bias, sampler_distribution, total_variation
from .sampling_distance import dense_draws, expected_distribution, sampler_draws

# The default text of eval and tune: the first chapters of Northanger Abbey (public domain), a
# novel the conversion does not calibrate on.
DEFAULT_TEXT = Path(__file__).parent / "data" / "tuning.txt"
# n_probes measured by default, as multiples of the folder's.
DEFAULT_PROBE_FACTORS = (0.5, 1.0, 2.0)
# The sampling settings measured: JSON key -> (temperature, top_p).
SAMPLING_SETTINGS = {"sampling_tv_t1": (1.0, None), "sampling_tv_t07_p09": (0.7, 0.9)}
# Positions of the text's first half that mass_bias is refitted on, for other n_probes.
REFIT_POSITIONS = 256


def load_head(model_path: str) -> Tuple[object, object, FlashHead]:
    """The model (with its FlashHead installed), its tokenizer and the FlashHead, whose stage-1
    centroids are float32 copies of the stored ones (see the module's docstring)."""
    folder = download(model_path)
    model, tokenizer = load(str(folder), flashhead=False)
    assets = load_assets(folder, model)
    if assets["centroid_bits"] is not None:
        centroids = mx.dequantize(
            assets["centroids"],
            assets["centroid_scales"],
            assets["centroid_biases"],
            group_size=assets["centroid_group_size"],
            bits=assets["centroid_bits"],
        )
        assets = {**assets, "centroids": centroids, "centroid_bits": None}
    apply_flashhead(model, assets)
    return model, tokenizer, flash_head(model)


def text_hidden_states(
    model, tokenizer, text: str, max_tokens: int, seq_len: int = 512
) -> mx.array:
    """Hidden states ``[N, d]`` of up to ``max_tokens`` positions of ``text`` (all of it when
    shorter), in windows of ``seq_len`` tokens spread over the text."""
    n_text = len(tokenizer.encode(text, add_special_tokens=False))
    n_tokens = min(max_tokens, n_text)
    if n_tokens < 2:
        raise ValueError(f"the text has {n_text} tokens: at least 2 are needed")
    return calibration_hidden_states(
        model, tokenizer, text, n_tokens=n_tokens, seq_len=min(seq_len, n_tokens)
    )


def default_n_probes(n_probes: int, n_clusters: int) -> List[int]:
    """A folder's ``n_probes`` and multiples of it (:data:`DEFAULT_PROBE_FACTORS`), each in
    ``[1, n_clusters]``."""
    values = (round(f * n_probes) for f in DEFAULT_PROBE_FACTORS)
    return sorted({min(n_clusters, max(1, p)) for p in values})


@contextmanager
def probing(head: FlashHead, n_probes: int, mass_bias: Optional[mx.array] = None):
    """Within the block, ``head`` probes ``n_probes`` clusters (and samples with ``mass_bias``
    when given)."""
    saved = head.n_probes, head.mass_bias
    head.n_probes = n_probes
    if mass_bias is not None:
        head.mass_bias = mass_bias
    try:
        yield head
    finally:
        head.n_probes, head.mass_bias = saved


def dense_pass(head: FlashHead, hidden: mx.array, chunk_size: int = 256) -> Dict[str, np.ndarray]:
    """What every ``n_probes`` is measured from, in one pass over the dense logits.

    Returns ``targets`` (the dense argmax at each position, ties to the lowest token id),
    ``top1_ranks`` (the :func:`~flashhead_mlx.containment.cluster_ranks` rank of the cluster
    holding the argmax: it is a candidate with ``n_probes`` probes exactly when its rank is below
    ``n_probes``), ``top5_ranks`` (the worst rank of the clusters holding the dense top 5) and
    ``mass_curve`` (``[n_clusters]``: the mean dense softmax mass of the candidates with
    ``n_probes = 1, 2, ...``).
    """
    n_clusters, size = head.n_clusters, head.cluster_size
    order = np.array(head.order)
    owner = np.array(token_clusters(head.order, size))
    n_top = min(5, head.vocab_size)
    targets, top1, top5 = [], [], []
    mass_total = np.zeros(n_clusters)
    buffer = np.empty((min(chunk_size, hidden.shape[0]), order.size), np.float32)
    for start in tqdm(range(0, hidden.shape[0], chunk_size), desc="Dense logits"):
        h = hidden[start : start + chunk_size]
        scores, logits = head.cluster_scores(h), head.slot_logits(h).astype(mx.float32)
        mx.eval(scores, logits)
        ranks, logits = cluster_ranks(np.array(scores)), np.array(logits, copy=False)
        rows = np.arange(h.shape[0])[:, None]
        best = logits.max(axis=1, keepdims=True)
        target = order[logits.argmax(axis=1)]
        tied = np.flatnonzero((logits == best).sum(axis=1) > 1)
        target[tied] = np.where(logits[tied] == best[tied], order, head.vocab_size).min(axis=1)
        targets.append(target)
        top1.append(ranks[rows[:, 0], owner[target]])
        # The dense top 5 lie in the (at most) 5 clusters with the largest logits.
        by_cluster = logits.reshape(h.shape[0], n_clusters, size)
        k = min(n_top, n_clusters)
        best_clusters = np.argpartition(-by_cluster.max(axis=2), k - 1, axis=1)[:, :k]
        inner = by_cluster[rows, best_clusters].reshape(h.shape[0], -1)
        top = np.argpartition(-inner, n_top - 1, axis=1)[:, :n_top]
        top5.append(ranks[rows, best_clusters[rows, top // size]].max(axis=1))
        probs = np.subtract(logits, best, out=buffer[: h.shape[0]])
        np.exp(probs, out=probs)
        mass = probs.reshape(h.shape[0], n_clusters, size).sum(axis=2)
        mass /= mass.sum(axis=1, keepdims=True)
        by_rank = np.empty_like(mass)
        np.put_along_axis(by_rank, ranks, mass, axis=1)
        mass_total += np.cumsum(by_rank, axis=1).sum(axis=0)
    return {
        "targets": np.concatenate(targets),
        "top1_ranks": np.concatenate(top1),
        "top5_ranks": np.concatenate(top5),
        "mass_curve": mass_total / hidden.shape[0],
    }


def containment_curve(ranks: np.ndarray, n_clusters: int) -> np.ndarray:
    """Share of positions whose rank is below ``n_probes``, for ``n_probes = 1 ... n_clusters``."""
    return np.cumsum(np.bincount(ranks, minlength=n_clusters)[:n_clusters]) / ranks.size


def greedy_agreement(
    head: FlashHead, hidden: mx.array, targets: np.ndarray, chunk_size: int = 256
) -> float:
    """Share of positions where ``head.greedy`` returns ``targets``."""
    agree = 0
    for start in range(0, hidden.shape[0], chunk_size):
        greedy = np.array(head.greedy(hidden[start : start + chunk_size]))
        agree += int((greedy == targets[start : start + chunk_size]).sum())
    return agree / hidden.shape[0]


def head_row(head: FlashHead, hidden: mx.array, stats: dict, n_probes: int) -> dict:
    """The containment metrics of ``n_probes`` (from :func:`dense_pass`'s ``stats``)."""
    with probing(head, n_probes):
        greedy = greedy_agreement(head, hidden, stats["targets"])
    return {
        "n_probes": n_probes,
        "n_clusters": head.n_clusters,
        "cluster_size": head.cluster_size,
        "scored_fraction": scored_fraction(
            head.n_clusters, head.cluster_size, n_probes, head.vocab_size
        ),
        "top1_containment": float(np.mean(stats["top1_ranks"] < n_probes)),
        "top5_containment": float(np.mean(stats["top5_ranks"] < n_probes)),
        "greedy_agreement": greedy,
        "candidate_mass": float(stats["mass_curve"][n_probes - 1]),
    }


def dense_probs(head: FlashHead, h: mx.array, temperature: float, top_p) -> np.ndarray:
    """The dense head's sampler distribution ``[N, V]`` through mlx-lm's sampler."""
    order, logits = np.array(head.order), np.array(head.slot_logits(h).astype(mx.float32))
    draws = (dense_draws(order, row) for row in logits)
    return np.stack([expected_distribution(d, temperature, top_p, head.vocab_size) for d in draws])


def flash_probs(head: FlashHead, h: mx.array, temperature: float, top_p) -> np.ndarray:
    """FlashHead's sampler distribution ``[N, V]`` through mlx-lm's sampler, exact."""
    if top_p is None:
        return np.array(sampler_distribution(head, h, temperature))
    draws = sampler_draws(head, h, temperature)
    return np.stack([expected_distribution(d, temperature, top_p, head.vocab_size) for d in draws])


def sampling_distances(
    head: FlashHead, h: mx.array, temperature: float, top_p, dense: Optional[np.ndarray] = None
) -> np.ndarray:
    """The total variation distance ``[N]`` between FlashHead's and the dense head's sampler
    distributions at each hidden state ``h`` ``[N, d]`` (``dense``: :func:`dense_probs`, when
    already computed)."""
    if dense is None:
        dense = dense_probs(head, h, temperature, top_p)
    return np.array(total_variation(flash_probs(head, h, temperature, top_p), dense))


def evenly(hidden: mx.array, n: int) -> mx.array:
    """At most ``n`` rows of ``hidden``, evenly spaced."""
    return hidden[:: max(1, -(-hidden.shape[0] // n))]


def mean_and_stderr(values: np.ndarray) -> Tuple[float, float]:
    """The mean of ``values`` and its standard error (``nan`` from a single value)."""
    stderr = values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else math.nan
    return float(values.mean()), float(stderr)


def decimals(stderr: float, most: int = 6) -> int:
    """Decimals that print a mean to the leading digit of its standard error ``stderr`` (at most
    ``most``; ``most`` for an exact mean, 4 for an unknown error)."""
    if math.isnan(stderr):
        return 4
    if stderr <= 0:
        return most
    return int(min(most, max(0, -math.floor(math.log10(stderr)))))


def add_sampling_distances(
    head: FlashHead, hidden: mx.array, rows: List[dict], tv_positions: int, chunk_size: int = 32
) -> None:
    """Add the sampling distances (:data:`SAMPLING_SETTINGS`) to each row of :func:`head_row`,
    with their standard errors, the positions measured and where ``mass_bias`` came from."""
    half = hidden.shape[0] // 2
    fit, held_out = evenly(hidden[:half], REFIT_POSITIONS), evenly(hidden[half:], tv_positions)
    mass_biases = {}
    for row in rows:
        stored = row["n_probes"] == head.n_probes and head.mass_bias is not None
        with probing(head, row["n_probes"]):
            mass_biases[row["n_probes"]] = head.mass_bias if stored else fit_mass_bias(head, fit)
        row["mass_bias"] = "stored" if stored else "refit"
    distances = {(row["n_probes"], key): [] for row in rows for key in SAMPLING_SETTINGS}
    for start in tqdm(range(0, held_out.shape[0], chunk_size), desc="Sampling distances"):
        h = held_out[start : start + chunk_size]
        for key, (temperature, top_p) in SAMPLING_SETTINGS.items():
            dense = dense_probs(head, h, temperature, top_p)
            for p, mass_bias in mass_biases.items():
                with probing(head, p, mass_bias):
                    tv = sampling_distances(head, h, temperature, top_p, dense)
                distances[p, key].append(tv)
    for row in rows:
        for key in SAMPLING_SETTINGS:
            mean, stderr = mean_and_stderr(np.concatenate(distances[row["n_probes"], key]))
            row[key] = mean
            row[f"{key}_stderr"] = stderr
        row["sampling_positions"] = held_out.shape[0]


def evaluate(
    head: FlashHead, hidden: mx.array, n_probes: Sequence[int], tv_positions: int = 128
) -> Tuple[List[dict], dict]:
    """One row of metrics per ``n_probes`` (the JSON's ``results``) and :func:`dense_pass`'s
    statistics; no sampling distances when ``tv_positions`` is 0."""
    for p in n_probes:
        if not 1 <= p <= head.n_clusters:
            raise ValueError(f"n_probes must be in [1, {head.n_clusters}], got {p}")
    stats = dense_pass(head, hidden)
    rows = [head_row(head, hidden, stats, p) for p in tqdm(n_probes, desc="Greedy tokens")]
    if tv_positions:
        add_sampling_distances(head, hidden, rows, tv_positions)
    return rows, stats


def format_rows(rows: List[dict], labels: Optional[List[str]] = None) -> str:
    """The human table of :func:`evaluate`'s rows (each after its label, when given)."""
    header = ["n_probes", "scored", "top-1", "top-5", "greedy", "cand. mass"]
    sampling = "sampling_tv_t1" in rows[0]
    if sampling:
        header += ["TV T=1", "TV T=0.7 top_p=0.9", "mass_bias"]
    cells = []
    for row in rows:
        cell = [str(row["n_probes"]), f"{100 * row['scored_fraction']:.1f}%"]
        cell += [
            f"{100 * row[key]:.2f}%"
            for key in (
                "top1_containment",
                "top5_containment",
                "greedy_agreement",
                "candidate_mass",
            )
        ]
        if sampling:
            for key in SAMPLING_SETTINGS:
                digits = decimals(row[f"{key}_stderr"])
                cell.append(f"{row[key]:.{digits}f} ± {row[f'{key}_stderr']:.1g}")
            cell.append(row["mass_bias"])
        cells.append(cell)
    if labels:
        return table(["", *header], [[label, *cell] for label, cell in zip(labels, cells)])
    return table(header, cells)


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
    text_path = Path(text) if text else DEFAULT_TEXT
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


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """``--text`` and ``--max-tokens`` (shared with ``tune``)."""
    parser.add_argument(
        "--text", default=None, help="A text file (default: a built-in Austen excerpt)."
    )
    parser.add_argument(
        "--max-tokens", type=int, default=4096, help="Positions of the text to measure."
    )


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
