"""``flashhead-mlx tune``: the smallest ``n_probes`` that meets a top-1 containment target on a
text, stored as the folder's default.

One pass over the text's dense logits gives the rank of the cluster holding each position's dense
argmax (:func:`flashhead_mlx.metrics.dense_pass`); containment with ``p`` probes is the share of
ranks below ``p``, which grows with ``p``, so a binary search over ``p`` finds the smallest that
meets the target. The sampling mass offsets are refitted for it on the same text, and both are
written into the folder (:func:`flashhead_mlx.assets.set_n_probes`).
"""

import argparse
from pathlib import Path
from typing import Optional

from .arguments import add_text_arguments
from .assets import set_n_probes
from .calibration import TUNING_TEXT, text_hidden_states
from .containment import TARGET_CONTAINMENT, TUNING_TOKENS, smallest_n_probes
from .metrics import dense_pass, evenly, format_rows, head_row, load_head, probing
from .pipeline import MASS_FIT_POSITIONS
from .sampling import fit_mass_bias


def tune(
    model: str,
    text: Optional[str] = None,
    target: float = TARGET_CONTAINMENT,
    max_tokens: int = TUNING_TOKENS,
) -> dict:
    """Store in the FlashHead folder ``model`` the smallest ``n_probes`` whose top-1 containment on
    the file ``text`` (default: the built-in text) is at least ``target``; print the before and
    after table. Returns ``{"before": row, "after": row}`` (rows as ``flashhead-mlx eval``'s)."""
    if not 0 < target <= 1:
        raise ValueError(f"the target containment must be in (0, 1], got {target}")
    text_path = Path(text) if text else TUNING_TEXT
    if not text_path.is_file():
        raise ValueError(f"{text_path} is not a file")
    if not Path(model).is_dir():
        raise ValueError(f"{model} is not a local folder (tune writes into it)")
    lm, tokenizer, head = load_head(model)
    hidden = text_hidden_states(lm, tokenizer, text_path.read_text(), max_tokens)
    stats = dense_pass(head, hidden)
    before = head.n_probes
    after = smallest_n_probes(stats["top1_ranks"], target, head.n_clusters)
    rows = {"before": head_row(head, hidden, stats, before)}
    rows["after"] = head_row(head, hidden, stats, after) if after != before else rows["before"]
    print(f"{model} on {text_path} ({hidden.shape[0]} positions), target top-1 {target:g}:")
    print(format_rows(list(rows.values()), labels=list(rows)))
    if after == before:
        print(f"n_probes stays {before}: nothing written")
    else:
        with probing(head, after):
            mass_bias = fit_mass_bias(head, evenly(hidden, MASS_FIT_POSITIONS))
        set_n_probes(model, after, mass_bias)
        print(f"n_probes {before} -> {after}: written to {model} (mass_bias refitted for it)")
    return rows


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashhead-mlx tune",
        description="Store the smallest n_probes that meets a top-1 containment target on a text.",
    )
    parser.add_argument("--model", required=True, help="A converted FlashHead folder.")
    add_text_arguments(parser)
    parser.set_defaults(max_tokens=TUNING_TOKENS)
    parser.add_argument(
        "--target-containment",
        type=float,
        default=TARGET_CONTAINMENT,
        help="Share of positions whose dense argmax must be a candidate.",
    )
    return parser


def main() -> None:
    parser = setup_arg_parser()
    args = parser.parse_args()
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2")
    try:
        tune(args.model, args.text, args.target_containment, args.max_tokens)
    except ValueError as error:
        raise SystemExit(f"flashhead-mlx tune: error: {error}")


if __name__ == "__main__":
    main()
