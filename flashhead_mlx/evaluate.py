"""``flashhead-mlx eval``: how closely a FlashHead follows its dense head on texts (the
metrics: :mod:`flashhead_mlx.metrics`): a text, several, the frozen suite (``--suite``,
:mod:`flashhead_mlx.suite`) or the model's own replies to prompts (``--chat``); one row per text
or domain and an overall row."""

import argparse
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .arguments import add_text_arguments
from .calibration import TUNING_TEXT, text_contexts, text_hidden_states
from .clustering import scored_fraction
from .head import FlashHead
from .loading import download
from .metrics import (
    containment_curve,
    default_n_probes,
    evaluate,
    format_rows,
    load_head,
    pool_rows,
    pool_stats,
)
from .patch import flash_head
from .recent import RECENT_TOKENS
from .report import device_description, pyplot
from .suite import (
    CHAT,
    SPLITS,
    chat_contexts,
    chat_hidden_states,
    dense_replies,
    model_fingerprint,
    read_prompts,
    read_text,
    suite_files,
)

def plot(rows: List[dict], stats: dict, head: FlashHead, path: str, title: str) -> None:
    """Containment and candidate mass against the scored fraction, the measured rows marked."""
    plt = pyplot()
    last = min(head.n_clusters, 2 * max(row["n_probes"] for row in rows))
    probes = np.arange(1, last + 1)
    shape = (head.n_clusters, head.cluster_size)
    scored = 100 * scored_fraction(*shape, probes, head.vocab_size, head.recent_tokens)
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


# Positions measured per text when --max-tokens is not given (the suite and chat: all).
TEXT_TOKENS = 4096
# Sampling-distance positions per text when --tv-positions is not given (several texts: none).
TV_POSITIONS = 128


def text_sources(texts: Sequence[str]) -> List[Tuple[str, List[Path]]]:
    """One ``(name, [file])`` per file of ``texts`` (files, or folders of files)."""
    sources = []
    for text in texts:
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise ValueError(f"{path} has no files")
            sources += [(str(f), [f]) for f in files]
        elif path.is_file():
            sources.append((str(path), [path]))
        else:
            raise ValueError(f"{path} is not a file or a folder")
    return sources


def run(
    model: str,
    text: Union[str, Sequence[str], None] = None,
    max_tokens: Optional[int] = None,
    n_probes: Optional[Sequence[int]] = None,
    tv_positions: Optional[int] = None,
    plot_path: Optional[str] = None,
    suite: Optional[str] = None,
    chat: Optional[str] = None,
    recent_tokens: Optional[int] = None,
) -> dict:
    """Evaluate the FlashHead folder ``model`` on texts, each measured on its own: the files (or
    folders of files) ``text`` (default: the built-in text, unless ``suite`` or ``chat`` is
    given), the suite's ``suite`` split (``dev``, ``held-out`` or ``all``: one text per domain)
    and the model's own dense replies to the prompts of the file ``chat``. Returns the JSON
    object ``eval --json`` writes: ``domains`` (each text's rows) and ``results`` (the overall
    rows: :func:`flashhead_mlx.metrics.pool_rows`).

    ``max_tokens``: positions per text (default :data:`TEXT_TOKENS`; the suite's and chat's: all);
    ``tv_positions``: sampling-distance positions per text (default :data:`TV_POSITIONS` for a
    single text, else 0); ``recent_tokens``: the head's (default
    :data:`~flashhead_mlx.recent.RECENT_TOKENS`): top-1 containment and greedy agreement count a
    position whose dense argmax is among its last ``recent_tokens`` context tokens (the
    preceding tokens of its window, or the prompt and the reply so far), which the head scores
    exactly at greedy steps.
    """
    texts = [text] if isinstance(text, str) else list(text or [])
    if suite is not None and texts:
        raise ValueError("--suite and --text cannot be combined")
    if not (texts or suite or chat):
        texts = [str(TUNING_TEXT)]
    sources = [(name, files, False) for name, files in text_sources(texts)]
    if suite is not None:
        sources += [(d, files, d == CHAT) for d, files in suite_files(suite).items()]
    if chat is not None:
        if not Path(chat).is_file():
            raise ValueError(f"{chat} is not a file")
        sources.append((f"chat: {chat}", [Path(chat)], True))
    if tv_positions is None:
        tv_positions = TV_POSITIONS if len(sources) == 1 else 0
    lm, tokenizer, _ = load_head(model, recent_tokens)
    replies = {}
    for name, files, is_chat in sources:  # first: generation takes the FlashHead off and back
        if is_chat:
            prompts = read_prompts(files)
            fingerprint = model_fingerprint(download(model))
            replies[name] = (prompts, *dense_replies(lm, tokenizer, prompts, fingerprint))
    head = flash_head(lm)
    probes = n_probes or default_n_probes(head.n_probes, head.n_clusters)
    domains, stats = [], []
    recent = head.recent_tokens
    for name, files, is_chat in sources:
        if is_chat:
            hidden = chat_hidden_states(lm, tokenizer, *replies[name], max_tokens)
            contexts = chat_contexts(tokenizer, *replies[name], recent, max_tokens)
        else:
            limit = max_tokens or (None if suite is not None else TEXT_TOKENS)
            text = read_text(files)
            hidden = text_hidden_states(lm, tokenizer, text, limit)
            contexts = text_contexts(tokenizer, text, limit, recent)
        rows, text_stats = evaluate(head, hidden, probes, tv_positions, contexts)
        stats.append(text_stats)
        files = [str(f) for f in files]
        domains.append({"name": name, "files": files, "tokens": hidden.shape[0], "results": rows})
    total = sum(d["tokens"] for d in domains)
    overall = pool_rows([d["results"] for d in domains])
    names = [*texts, suite and f"suite ({suite})", chat and f"chat: {chat}"]
    description = ", ".join(filter(None, names))
    if plot_path:
        title = f"{Path(model).name} on {Path(description).name}, {total} positions"
        plot(overall, pool_stats(stats), head, plot_path, title)
    return {
        "model": model,
        "text": description,
        "tokens": total,
        "device": device_description(),
        "recent_tokens": recent,
        "results": overall,
        "domains": domains,
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
        description="Measure a FlashHead against its dense head on texts (teacher forcing): "
        "one row per text or suite domain, and an overall row.",
    )
    parser.add_argument("--model", required=True, help="A converted FlashHead folder or repo.")
    add_text_arguments(parser, several=True)
    parser.set_defaults(max_tokens=None)
    parser.add_argument(
        "--suite",
        nargs="?",
        const="held-out",
        choices=[*SPLITS, "all"],
        default=None,
        help="Run the frozen evaluation suite's split (default held-out): one row per domain "
        "(docs/suite.md).",
    )
    parser.add_argument(
        "--chat",
        default=None,
        metavar="PROMPTS_FILE",
        help="Measure on the model's own dense greedy replies (through its chat template) to the "
        "prompts of this file, one per line.",
    )
    parser.add_argument(
        "--n-probes",
        type=probe_list,
        default=None,
        help="Comma-separated n_probes to measure (default: the model's, half and twice it).",
    )
    parser.add_argument(
        "--recent-tokens",
        type=int,
        default=None,
        help="Tokens of each position's context the head scores exactly at greedy steps, counted "
        f"by top-1 and greedy (default: {RECENT_TOKENS}, as generate's; 0: none).",
    )
    parser.add_argument(
        "--tv-positions",
        type=int,
        default=None,
        help=f"Positions of each text's second half the sampling distances are averaged over "
        f"(0: skip them; default {TV_POSITIONS} for a single text, else 0).",
    )
    parser.add_argument("--json", default=None, help="Write the results to this JSON file.")
    parser.add_argument("--plot", default=None, help="Draw containment and mass to this PNG.")
    return parser


def main() -> None:
    parser = setup_arg_parser()
    args = parser.parse_args()
    if (args.max_tokens is not None and args.max_tokens < 2) or (args.tv_positions or 0) < 0:
        parser.error("--max-tokens must be at least 2 and --tv-positions at least 0")
    if (args.recent_tokens or 0) < 0:
        parser.error("--recent-tokens must be at least 0")
    try:
        if args.plot:
            pyplot()  # fail now, not after the measurements
        result = run(
            args.model,
            args.text,
            args.max_tokens,
            args.n_probes,
            args.tv_positions,
            args.plot,
            suite=args.suite,
            chat=args.chat,
            recent_tokens=args.recent_tokens,
        )
    except ValueError as error:
        raise SystemExit(f"flashhead-mlx eval: error: {error}")
    print(
        f"{result['model']} on {result['text']}: {result['tokens']} positions, "
        f"{result['device']}"
    )
    rows, labels = [], []
    domains = result["domains"]
    for domain in domains if len(domains) > 1 else []:
        rows += domain["results"]
        labels += [f"{domain['name']} ({domain['tokens']})"] * len(domain["results"])
    rows += result["results"]
    labels += [f"overall ({result['tokens']})" if len(domains) > 1 else ""] * len(result["results"])
    print(format_rows(rows, labels if len(domains) > 1 else None))
    print("Containment: share of positions [Wilson 95% interval].")
    recent = result["recent_tokens"]
    if recent:
        print(
            f"Top-1 and greedy count the {recent} recent tokens each row scores exactly at greedy "
            "steps (the scored share includes them); top-5, mass and TV do not (sampling steps "
            "score none)."
        )
    if "sampling_tv_t1" in rows[0]:
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
