"""Tuning objectives compared on the development split of the suite (issue 12, part 3): the
``n_probes`` each objective picks for a FlashHead folder, and every dev domain's top-1 containment
with it (docs/clustering.md, "Tuning on the development suite").

    python scripts/tuning_objectives.py --model DIR [--max-tokens 2048] [--states DIR]

Each domain's stage-1 target ranks are measured once, the head's recent tokens counted
(:func:`flashhead_mlx.containment.target_ranks`), so every objective is read off the same
containment curves. ``--states`` caches the dev hidden states and recent tokens
(``dev_<domain>.npz``): a second run, or another folder of the same model, reuses them.
"""

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx
import numpy as np

from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.calibration_mix import TUNING_DOMAIN_TOKENS, dev_suite_states
from flashhead_mlx.clustering import most_probes, scored_fraction
from flashhead_mlx.containment import TARGET_CONTAINMENT, target_ranks
from flashhead_mlx.metrics import load_head
from flashhead_mlx.suite import model_fingerprint

# A guess at what users of a small instruct model decode: mostly its own chat replies.
USAGE = {
    "chat": 0.4, "code": 0.15, "technical": 0.1, "math": 0.1, "english": 0.1,
    "verse-dialogue": 0.1, "non-english": 0.05,
}


def dev_states(
    model, tokenizer, folder: Path, max_tokens: int, cache: Optional[Path], recent: int
) -> dict:
    """The dev suite's hidden states and recent tokens by domain, read from ``cache`` when it
    holds them."""
    if cache is not None and list(cache.glob("dev_*.npz")):
        stored = {p.stem[4:]: np.load(p) for p in sorted(cache.glob("dev_*.npz"))}
        return {d: (mx.array(s["hidden"]), mx.array(s["contexts"])) for d, s in stored.items()}
    states = dev_suite_states(model, tokenizer, model_fingerprint(folder), max_tokens, recent)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for domain, (hidden, contexts) in states.items():
            arrays = {"hidden": np.array(hidden), "contexts": np.array(contexts)}
            np.savez(cache / f"dev_{domain}.npz", **arrays)
    return states


def first_meeting(ok: np.ndarray) -> int:
    """The smallest probe count (1-based) where ``ok`` holds, or the largest when it never does."""
    return int(np.argmax(ok)) + 1 if ok.any() else ok.size


def objectives(head, target: float) -> Dict[str, Callable[[dict], int]]:
    """Each objective: the probes it picks from the domains' containment curves."""
    cap = {
        f: most_probes(f, head.n_clusters, head.cluster_size, head.vocab_size, head.recent_tokens)
        for f in (0.10, 0.12, 0.15)
    }
    every = lambda c: first_meeting(np.min(list(c.values()), axis=0) >= target)  # noqa: E731
    return {
        f"min over domains >= {target:g}": every,
        **{
            f"min over domains, capped at {100 * f:g}% scored": lambda c, p=p: min(every(c), p)
            for f, p in cap.items()
        },
        f"mean over positions (equal domains) >= {target:g}": lambda c: first_meeting(
            np.mean(list(c.values()), axis=0) >= target
        ),
        f"usage-weighted mean >= {target:g}": lambda c: first_meeting(
            sum(USAGE.get(d, 0) * curve for d, curve in c.items()) / sum(
                USAGE.get(d, 0) for d in c
            ) >= target
        ),
        f"{target:g} on every domain but 0.99 on non-english": lambda c: first_meeting(
            np.min([curve >= (0.99 if d == "non-english" else target) for d, curve in c.items()], axis=0)
        ),
        "0.99 on every domain": lambda c: first_meeting(np.min(list(c.values()), axis=0) >= 0.99),
    }


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A converted FlashHead folder.")
    parser.add_argument("--max-tokens", type=int, default=TUNING_DOMAIN_TOKENS)
    parser.add_argument("--states", type=Path, default=None, help="Cache of dev hidden states.")
    parser.add_argument("--target", type=float, default=TARGET_CONTAINMENT)
    args = parser.parse_args()
    model, tokenizer, head = load_head(args.model)
    recent = head.recent_tokens
    states = dev_states(model, tokenizer, Path(args.model), args.max_tokens, args.states, recent)
    ranks = {domain: target_ranks(head, *positions) for domain, positions in states.items()}
    probes = np.arange(1, head.n_clusters + 1)
    curves = {d: np.searchsorted(np.sort(r), probes) / r.size for d, r in ranks.items()}
    positions = ", ".join(f"{d} {r.size}" for d, r in ranks.items())
    print(f"{args.model}: dev positions {positions}; folder n_probes {head.n_probes}; "
          f"{recent} recent tokens counted\n")
    print(f"| objective | n_probes | scored | {' | '.join(curves)} | min | pooled |")
    print("|---|---:|---:|" + "---:|" * (len(curves) + 2))
    for name, pick in objectives(head, args.target).items():
        p = pick(curves)
        shares = [curve[p - 1] for curve in curves.values()]
        pooled = np.mean(np.concatenate(list(ranks.values())) < p)
        scored = scored_fraction(head.n_clusters, head.cluster_size, p, head.vocab_size, recent)
        cells = " | ".join(f"{100 * s:.2f}" for s in [*shares, min(shares), pooled])
        print(f"| {name} | {p} | {100 * scored:.1f}% | {cells} |")


if __name__ == "__main__":
    main()
