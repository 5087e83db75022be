"""``flashhead-mlx tune``: the smallest ``n_probes`` that meets a top-1 containment target on
every domain of the development suite within a cap on the scored fraction (or on a text), stored
as the folder's default.

One pass over the text's dense logits gives the rank of the cluster holding each position's dense
argmax (:func:`flashhead_mlx.metrics.dense_pass`), 0 where the argmax is among the position's
recent tokens, which the head scores exactly at greedy steps whatever the probes
(:mod:`flashhead_mlx.recent`); containment with ``p`` probes is the share of ranks below ``p``,
which grows with ``p``, so a binary search over ``p`` finds the smallest that meets the target;
over the suite's domains the largest of these is kept, so that every domain meets it, unless it
scores more of the vocabulary than the cap allows (the recent tokens counted as scored): then the
cap is kept (:func:`flashhead_mlx.containment.suite_n_probes`). The sampling mass offsets are
refitted for it on the same positions, and both are written into the folder
(:func:`flashhead_mlx.assets.set_n_probes`).
"""

import argparse
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .arguments import add_text_arguments
from .assets import reclaim_leftovers, set_n_probes
from .calibration import text_contexts, text_hidden_states
from .calibration_mix import dev_suite_states
from .containment import (
    MAX_SCORED_FRACTION,
    TARGET_CONTAINMENT,
    TUNING_TOKENS,
    suite_n_probes,
)
from .durable import kill_point
from .metrics import dense_pass, evenly, format_rows, head_row, load_head, pool_rows, probing
from .pipeline import MASS_FIT_POSITIONS
from .sampling import fit_mass_bias
from .storage import plain_write_errors
from .suite import model_fingerprint


def tune(
    model: str,
    text: Optional[str] = None,
    target: float = TARGET_CONTAINMENT,
    max_tokens: Optional[int] = None,
    max_scored_fraction: float = MAX_SCORED_FRACTION,
) -> dict:
    """Store in the FlashHead folder ``model`` the smallest ``n_probes`` whose top-1 containment is
    at least ``target`` on every domain of the development suite (``max_tokens`` positions each,
    default :data:`~flashhead_mlx.calibration_mix.TUNING_DOMAIN_TOKENS`) but scoring at most
    ``max_scored_fraction`` of the vocabulary, or on the file ``text`` (default
    :data:`~flashhead_mlx.containment.TUNING_TOKENS` positions, no cap), a position counting as
    contained where its dense argmax is among its recent tokens too (the head's
    ``recent_tokens``, scored at greedy steps); print the before and after table. Returns
    ``{"before": row, "after": row, "domains": {name: {"before": row, "after": row}}}`` (rows as
    ``flashhead-mlx eval``'s; the first two over all positions)."""
    if not 0 < target <= 1:
        raise ValueError(f"the target containment must be in (0, 1], got {target}")
    if max_scored_fraction <= 0:
        raise ValueError(f"the scored fraction cap must be positive, got {max_scored_fraction}")
    if text is not None and not Path(text).is_file():
        raise ValueError(f"{text} is not a file")
    if not Path(model).is_dir():
        raise ValueError(f"{model} is not a local folder (tune writes into it)")
    with plain_write_errors(Path(model)):  # a full disk, a read-only folder, ...: one line
        reclaim_leftovers(model)
        lm, tokenizer, head = load_head(model)
        recent = head.recent_tokens
        if text is None:
            fingerprint = model_fingerprint(Path(model))
            states = dev_suite_states(lm, tokenizer, fingerprint, max_tokens, recent)
        else:
            content, limit = Path(text).read_text(), max_tokens or TUNING_TOKENS
            states = {
                Path(text).name: (
                    text_hidden_states(lm, tokenizer, content, limit),
                    text_contexts(tokenizer, content, limit, recent),
                )
            }
        stats = {name: dense_pass(head, *positions) for name, positions in states.items()}
        kill_point("tuning")
        before = head.n_probes
        ranks = {name: s["top1_ranks"] for name, s in stats.items()}
        cap = max_scored_fraction if text is None else None
        after, line = suite_n_probes(head, ranks, target, cap)
        domains = {
            name: {
                key: head_row(head, hidden, stats[name], p, contexts)
                for key, p in (("before", before), ("after", after))
            }
            for name, (hidden, contexts) in states.items()
        }
        before_row, after_row = pool_rows([[d["before"], d["after"]] for d in domains.values()])
        where = "the development suite" if text is None else text
        print(f"{model} on {where}, target top-1 {target:g} on every domain:")
        labels = [f"{name} {key}" for name in domains for key in ("before", "after")]
        rows = [row for d in domains.values() for row in d.values()] + [before_row, after_row]
        print(format_rows(rows, labels=labels + ["overall before", "overall after"]))
        print(line)
        if after == before:
            print(f"n_probes stays {before}: nothing written")
        else:
            hidden = mx.concatenate([hidden for hidden, _ in states.values()])
            with probing(head, after):
                mass_bias = fit_mass_bias(head, evenly(hidden, MASS_FIT_POSITIONS))
            set_n_probes(model, after, mass_bias)
            print(f"n_probes {before} -> {after}: written to {model} (mass_bias refitted for it)")
        return {"before": before_row, "after": after_row, "domains": domains}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashhead-mlx tune",
        description="Store the smallest n_probes that meets a top-1 containment target on every "
        "domain of the development suite within a cap on the scored fraction (or on a text).",
    )
    parser.add_argument("--model", required=True, help="A converted FlashHead folder.")
    add_text_arguments(parser, default="the development suite")
    parser.set_defaults(max_tokens=None)
    parser.add_argument(
        "--target-containment",
        type=float,
        default=TARGET_CONTAINMENT,
        help="Share of positions whose dense argmax must be a candidate.",
    )
    parser.add_argument(
        "--max-scored-fraction",
        type=float,
        default=MAX_SCORED_FRACTION,
        help="Most of the vocabulary the tuned n_probes may score on the development suite "
        "(centroids included, so 2 never binds). Not used with --text.",
    )
    return parser


def main() -> None:
    parser = setup_arg_parser()
    args = parser.parse_args()
    if args.max_tokens is not None and args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2")
    try:
        tune(
            args.model,
            args.text,
            args.target_containment,
            args.max_tokens,
            args.max_scored_fraction,
        )
    except ValueError as error:  # the plain errors, a full disk or a read-only folder too
        raise SystemExit(f"flashhead-mlx tune: error: {error}")


if __name__ == "__main__":
    main()
