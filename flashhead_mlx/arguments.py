"""The argparse pieces the ``flashhead-mlx`` commands share."""

import argparse
from typing import Optional


def centroid_bits(text: str) -> Optional[int]:
    """``--centroid-bits``: 4 or 8, or 0 for unquantized centroids (``None``)."""
    if text not in ("4", "8", "0"):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 4, 8, 0)")
    return int(text) or None


def add_assets_arguments(parser: argparse.ArgumentParser) -> None:
    """``--n-probes``, ``--centroid-bits``, ``--calibration-tokens`` and ``--model-file``
    (shared with ``import-assets``)."""
    parser.add_argument(
        "--n-probes",
        type=int,
        default=None,
        help=(
            "Clusters scored exactly per token (default: the fewest with 99.9%% top-1 "
            "containment on every domain of the development suite, at most 12%% of the "
            "vocabulary scored; or on --tuning-text)."
        ),
    )
    parser.add_argument(
        "--centroid-bits",
        type=centroid_bits,
        default=4,
        metavar="{4,8,0}",
        help="Bits of the stage-1 centroids (0: unquantized).",
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=16384,
        help="Tokens of calibration text run through the model.",
    )
    parser.add_argument(
        "--model-file",
        action="store_true",
        help="Add the model file that gives plain mlx-lm the FlashHead with trust_remote_code "
        "(default: none; plain mlx-lm loads the folder dense).",
    )


def add_upload_arguments(parser: argparse.ArgumentParser, required: bool) -> argparse.ArgumentParser:
    """``--upload-repo``, ``--eval-json`` and ``--bench-json`` (shared with ``convert``)."""
    parser.add_argument(
        "--upload-repo",
        required=required,
        default=None,
        help="The Hugging Face repo to upload the model to: ORG/NAME, or ORG for "
        "ORG/<source name>-flashhead.",
    )
    parser.add_argument(
        "--eval-json",
        default=None,
        help="JSON of `flashhead-mlx eval --json`: its figures go in the model card.",
    )
    parser.add_argument(
        "--bench-json",
        default=None,
        help="JSON of `flashhead-mlx bench --json`: its figures go in the model card.",
    )
    return parser


def add_text_arguments(
    parser: argparse.ArgumentParser,
    several: bool = False,
    default: str = "a built-in Austen excerpt",
) -> None:
    """``--text`` and ``--max-tokens`` (shared with ``tune``); ``several``: ``--text`` takes
    several files or folders; ``default`` says what is measured without ``--text``."""
    parser.add_argument(
        "--text",
        default=None,
        nargs="+" if several else None,
        help=f"Text files or folders of them, one row each (default: {default})."
        if several
        else f"A text file (default: {default}).",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=4096, help="Positions of the text to measure."
    )
