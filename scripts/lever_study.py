"""Structural levers for FlashHead's remaining misses, measured on a split of the suite (issue 12,
part 4; docs/clustering.md, "Levers"): per-token adaptive probes, an always-scored shortlist, the
context's recent tokens scored per row, each at an equal mean scored fraction.

    python scripts/lever_study.py --model DIR [--split dev] [--max-tokens 2048] [--states DIR]
        [--curve OUT.png]

Per domain, every position's stage-1 rank of the dense argmax's cluster, its context (the window
or the prompt and reply so far) and its best stage-1 scores are measured once; each lever is read
off them. A position is contained when its argmax's cluster is probed, or the argmax is in the
shortlist or among the last ``R`` context tokens. Scored rows per position: the centroids, the
probed clusters' rows, the shortlist and the recent tokens (a fixed ``R``: a kernel reads them).
"""

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np

from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.calibration import CALIBRATION_TEXT, text_contexts, text_hidden_states
from flashhead_mlx.calibration_mix import (
    CALIBRATION_CODE,
    CALIBRATION_REPLIES,
    CALIBRATION_REPLY_TOKENS,
    TUNING_REPLY_TOKENS,
    calibration_prompts,
    reply_states,
)
from flashhead_mlx.clustering import scored_fraction
from flashhead_mlx.containment import MAX_SCORED_FRACTION, dense_targets, token_clusters
from flashhead_mlx.kernels import cluster_rank
from flashhead_mlx.metrics import containment_curve, load_head
from flashhead_mlx.recent import RECENT_TOKENS
from flashhead_mlx.report import pyplot
from flashhead_mlx.suite import (
    CHAT,
    REPLY_BATCH,
    chat_prompt_tokens,
    dense_replies,
    model_fingerprint,
    read_prompts,
    read_text,
    suite_files,
)

TOP_SCORES = 2048  # the best stage-1 scores kept per position (adaptive probes read them)
RECENT = (32, 64, 128, 256)
SHORTLIST = (128, 256, 512, 1024)


def domain_states(model, tokenizer, domain: str, files, fingerprint, max_tokens: int):
    """Up to ``max_tokens`` positions of a suite domain: their hidden states and last
    ``max(RECENT)`` context tokens, as tuning and eval read them (the chat domain: the dense
    replies to the first :data:`REPLY_BATCH` prompts, tuning's first batch, whose replies are
    cached)."""
    if domain == CHAT:
        prompts = read_prompts(files)[:REPLY_BATCH]
        return reply_states(model, tokenizer, prompts, max_tokens, TUNING_REPLY_TOKENS,
                            fingerprint, recent=max(RECENT))
    text = read_text(files)
    return (text_hidden_states(model, tokenizer, text, max_tokens),
            text_contexts(tokenizer, text, max_tokens, max(RECENT)))


def measure(head, hidden: mx.array, contexts: mx.array) -> dict:
    """Per position: the argmax's stage-1 rank, the argmax, the distance back to its last
    occurrence among the ``contexts`` tokens (0: the position's own input; a large number when
    absent) and the best stage-1 scores."""
    owner = token_clusters(head.order, head.cluster_size)
    ranks, targets, tops = [], [], []
    for chunk, _, target in dense_targets(head, hidden):
        scores = head.cluster_scores(chunk)
        ranks.append(np.array(cluster_rank(scores, owner[target])))
        tops.append(np.array(mx.topk(scores, min(TOP_SCORES, head.n_clusters), axis=-1)))
        targets.append(np.array(target))
    targets = np.concatenate(targets)
    seen = (np.array(contexts) == targets[:, None])[:, ::-1]  # most recent first
    tops = np.sort(np.concatenate(tops), axis=-1)[:, ::-1]
    return {
        "ranks": np.concatenate(ranks),
        "targets": targets,
        "back": np.where(seen.any(axis=1), seen.argmax(axis=1), 1 << 30),
        "tops": tops.astype(np.float32),
    }


def shortlist(tokenizer, model, fingerprint, size: int) -> np.ndarray:
    """The ``size`` most frequent tokens of the calibration mix's texts (the novel, the code and
    the cached calibration replies), special tokens first: what a conversion can build."""
    counts = Counter()
    for path in (CALIBRATION_TEXT, CALIBRATION_CODE):
        counts.update(tokenizer.encode(path.read_text(), add_special_tokens=False))
    if getattr(tokenizer, "chat_template", None):
        prompts = calibration_prompts(0)[:CALIBRATION_REPLIES]
        replies, _ = dense_replies(model, tokenizer, prompts, fingerprint, CALIBRATION_REPLY_TOKENS)
        for prompt, reply in zip(prompts, replies):
            counts.update(chat_prompt_tokens(tokenizer, prompt) + list(reply))
    special = list(tokenizer.eos_token_ids) if hasattr(tokenizer, "eos_token_ids") else []
    ranked = special + [t for t, _ in counts.most_common() if t not in special]
    return np.array(ranked[:size])


def margin_probes(tops: np.ndarray, margin: float, low: int, high: int) -> np.ndarray:
    """Probes per position: the clusters within ``margin`` of the best stage-1 score, in
    ``[low, high]``."""
    return np.clip((tops >= tops[:, :1] - margin).sum(axis=1), low, high)


def mass_probes(tops: np.ndarray, mass: float, low: int, high: int, temperature: float = 2.0):
    """Probes per position: the fewest best clusters holding ``mass`` of the softmax of the
    stage-1 scores at ``temperature`` (flat scores take more), in ``[low, high]``."""
    weights = np.exp((tops - tops[:, :1]) / temperature)
    covered = np.cumsum(weights, axis=1) / weights.sum(axis=1, keepdims=True)
    return np.clip((covered < mass).sum(axis=1) + 1, low, high)


def matching(rule, tops: np.ndarray, budget: float, upper: float) -> float:
    """The rule's parameter in ``[0, upper]`` whose mean probe count over ``tops`` is
    ``budget`` (the count grows with the parameter; bisection)."""
    lo, hi = 0.0, upper
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rule(tops, mid).mean() < budget else (lo, mid)
    return lo


def table(head, domains: Dict[str, dict], short: np.ndarray, budgets: List[int]) -> None:
    """Top-1 containment per domain for each lever at equal mean scored rows."""
    v, s, c = head.vocab_size, head.cluster_size, head.n_clusters
    names = list(domains)
    print("| lever | mean scored | " + " | ".join(names) + " | pooled |")
    print("|---|---:|" + "---:|" * (len(names) + 1))

    def row(label, contained: Dict[str, np.ndarray], rows: float) -> None:
        shares = [100 * contained[n].mean() for n in names]
        pooled = 100 * np.concatenate([contained[n] for n in names]).mean()
        cells = " | ".join(f"{x:.2f}" for x in shares)
        print(f"| {label} | {100 * rows / v:.1f}% | {cells} | {pooled:.2f} |")

    for budget in budgets:  # every lever spends the rows of `budget` probes
        rows = c + budget * s
        row(f"{budget} probes", {n: d["ranks"] < budget for n, d in domains.items()}, rows)
        for k in SHORTLIST:
            p = budget - k // s
            if p < 1:
                continue
            listed = {n: np.isin(d["targets"], short[:k]) for n, d in domains.items()}
            hit = {n: (d["ranks"] < p) | listed[n] for n, d in domains.items()}
            row(f"{p} probes + shortlist {k}", hit, c + p * s + k)
        for r in RECENT:
            p = budget - r // s
            if p < 1:
                continue
            hit = {n: (d["ranks"] < p) | (d["back"] < r) for n, d in domains.items()}
            row(f"{p} probes + recent {r}", hit, c + p * s + r)
        for r, k in ((64, 256), (128, 512)):
            p = budget - (r + k) // s
            if p < 1:
                continue
            hit = {
                n: (d["ranks"] < p) | (d["back"] < r) | np.isin(d["targets"], short[:k])
                for n, d in domains.items()
            }
            row(f"{p} probes + recent {r} + shortlist {k}", hit, c + p * s + r + k)
        pooled = np.concatenate([d["tops"] for d in domains.values()])
        p = budget - 128 // s  # the adaptive rules on top of 128 recent tokens
        rules = {
            f"adaptive [{p // 2}, {4 * p}] (margin)": (
                lambda t, m: margin_probes(t, m, p // 2, 4 * p),
                float(pooled[:, 0].max() - pooled[:, -1].min()),
            ),
            f"adaptive [{2 * p // 5}, {TOP_SCORES}] (softmax mass, T = 2)": (
                lambda t, m: mass_probes(t, m, 2 * p // 5, TOP_SCORES),
                1.0,
            ),
        }
        for label, (rule, upper) in rules.items():
            value = matching(rule, pooled, p, upper)
            probes = {n: rule(d["tops"], value) for n, d in domains.items()}
            mean = np.concatenate(list(probes.values())).mean()
            hit = {n: (domains[n]["ranks"] < probes[n]) | (domains[n]["back"] < 128) for n in names}
            row(f"{label} + recent 128", hit, c + mean * s + 128)


def needed(head, domains: Dict[str, dict], target: float = 0.999) -> None:
    """Per domain, the fewest probes (and the scored share) whose containment reaches
    ``target``, alone and with :data:`RECENT_TOKENS` recent tokens: what the target would take."""
    print(f"| domain | probes for {100 * target:g}% | scored | with recent {RECENT_TOKENS}: probes "
          "| scored |")
    print("|---|---:|---:|---:|---:|")
    for name, d in domains.items():
        cells = []
        for recent in (0, RECENT_TOKENS):
            curve = containment(head, d, recent)
            reached = np.flatnonzero(curve >= target)
            p = int(reached[0]) + 1 if reached.size else head.n_clusters
            cells += [str(p), f"{100 * min(scored(head, p, recent), 1):.1f}%"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def containment(head, d: dict, recent: int) -> np.ndarray:
    """Top-1 containment at 1..n_clusters probes, the last ``recent`` context tokens scored (a
    position whose argmax is among them is contained at any probe count)."""
    return containment_curve(np.where(d["back"] < recent, 0, d["ranks"]), head.n_clusters)


def scored(head, probes, recent: int):
    """Share of the vocabulary scored per token with ``probes`` and ``recent`` tokens."""
    return scored_fraction(head.n_clusters, head.cluster_size, probes, head.vocab_size, recent)


def curve_plot(head, domains: Dict[str, dict], path: Path, title: str) -> None:
    """Containment per domain against the share of the vocabulary scored, probes alone (dashed)
    and with the recent tokens (solid), on a logit scale; the 99.9% target and the 12% cap drawn."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    n = max(d["ranks"].size for d in domains.values())
    for name, d in domains.items():
        color = None
        for recent, style in ((RECENT_TOKENS, "-"), (0, "--")):
            probes = np.arange(1, head.n_clusters + 1)
            share = 100 * np.minimum(scored(head, probes, recent), 1)
            curve = np.clip(containment(head, d, recent), 1e-4, 1 - 0.5 / n)
            label = name if recent else None
            (line,) = ax.plot(share, curve, style, color=color, label=label, lw=1.2)
            color = line.get_color()
    ax.axhline(0.999, color="black", lw=0.7, ls=":")
    ax.axvline(100 * MAX_SCORED_FRACTION, color="black", lw=0.7, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("logit")
    ticks = [t for t in (0.9, 0.99, 0.999, 0.9999) if t < 1 - 0.5 / n]
    ax.set_yticks(ticks, [f"{100 * t:g}%" for t in ticks])
    ax.set_yticks([], minor=True)
    ax.set_ylim(0.9, 1 - 0.5 / n)
    low = 100 * scored(head, 1, 0)
    xticks = [x for x in (2, 3, 5, 7, 10, 12, 15, 20, 30, 50, 70, 100) if x > low]
    ax.set_xticks(xticks, [f"{x:g}" for x in xticks])
    ax.set_xticks([], minor=True)
    ax.set_xlim(low, 100)
    ax.set_xlabel(f"% of the vocabulary scored per token (solid: with {RECENT_TOKENS} recent "
                  "tokens; dashed: probes alone)")
    ax.set_ylabel("top-1 containment")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a FlashHead folder")
    parser.add_argument("--split", default="dev", choices=["dev", "held-out"])
    parser.add_argument("--max-tokens", type=int, default=2048, help="positions per domain")
    parser.add_argument("--budgets", default="115,176,268", help="probe budgets, comma-separated")
    parser.add_argument("--states", type=Path, help="cache the per-position measurements here")
    parser.add_argument("--curve", type=Path, help="plot containment per domain to this PNG")
    args = parser.parse_args()
    model, tokenizer, head = load_head(args.model)
    fingerprint = model_fingerprint(Path(args.model))
    domains = {}
    for domain, files in suite_files(args.split).items():
        cached = args.states and args.states / f"{args.split}_{domain}.npz"
        if cached and cached.is_file():
            domains[domain] = dict(np.load(cached))
            continue
        if domain == CHAT and not getattr(tokenizer, "chat_template", None):
            continue
        states = domain_states(model, tokenizer, domain, files, fingerprint, args.max_tokens)
        domains[domain] = measure(head, *states)
        print(f"{domain}: {domains[domain]['ranks'].size} positions", flush=True)
        if cached:
            args.states.mkdir(parents=True, exist_ok=True)
            np.savez(cached, **domains[domain])
    short = shortlist(tokenizer, model, fingerprint, max(SHORTLIST))
    budgets = [int(b) for b in args.budgets.split(",")]
    table(head, domains, short, budgets)
    needed(head, domains)
    if args.curve:
        curve_plot(head, domains, args.curve, f"{Path(args.model).name}, {args.split} split")


if __name__ == "__main__":
    main()
