"""What ``flashhead-mlx generate`` and ``flashhead-mlx server`` share: the FlashHead flags added to
mlx-lm's parsers, and the loader they give mlx-lm's commands."""

import argparse
import contextlib
import logging
from types import ModuleType
from typing import Dict, Iterator, Optional

from .loading import load
from .patch import describe_head
from .recent import RECENT_TOKENS
from .verified import DEFAULT_BLOCK, Blocks, parse_block


def add_flashhead_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the FlashHead flags to one of mlx-lm's parsers (in their own group) and return it."""
    group = parser.add_argument_group("FlashHead")
    group.add_argument(
        "--flashhead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Score the model's head with its FlashHead (default); --no-flashhead: the dense head.",
    )
    group.add_argument(
        "--n-probes",
        type=int,
        default=None,
        help="Clusters scored exactly per token (default: the model's).",
    )
    group.add_argument(
        "--recent-tokens",
        type=int,
        default=None,
        help="Tokens of each row's context also scored exactly at greedy steps (default: "
        f"{RECENT_TOKENS}; 0: none).",
    )
    group.add_argument(
        "--flashhead-draft",
        action="store_true",
        help="Give the draft model its FlashHead too (default: it keeps its own dense head).",
    )
    return parser


def block_argument(text: str) -> Blocks:
    """A verified block on a command line: ``8`` (K fixed) or ``4-32`` (adaptive K)."""
    try:
        return parse_block(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_verify_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--flashhead-verify [K]`` (decoding verified by the dense head) and return
    the parser."""
    parser.add_argument(
        "--flashhead-verify",
        type=block_argument,
        nargs="?",
        const=DEFAULT_BLOCK,
        default=None,
        metavar="K",
        help="Verify FlashHead's tokens with the dense head, K at a time (default K: "
        f"{DEFAULT_BLOCK}; LOW-HIGH, e.g. 4-32: adaptive, halved after a rollback, doubled "
        "after a block without one): greedy output is the dense head's, sampled output is "
        "distributed as the dense head's.",
    )
    return parser


class Loader:
    """``mlx_lm.load`` for mlx-lm's commands: the main model gets its FlashHead (``--flashhead``,
    ``--n-probes``), a draft model keeps its own head unless ``--flashhead-draft``.

    mlx-lm loads the main model with ``return_config=True`` and a draft model by its path alone,
    which tells them apart even when both are the same folder. The main model is verified with
    ``--flashhead-verify``. ``heads`` holds a ``Head: ...`` line for each (as of now: verified
    decoding's counts grow as it runs), which is also logged at load.
    """

    def __init__(self, args: Optional[argparse.Namespace] = None):
        self.args = args
        self.models: Dict[str, tuple] = {}

    @property
    def heads(self) -> Dict[str, str]:
        """A ``Head: ...`` line for each model loaded (``Head``, ``Draft head``)."""
        return {label: f"{label}: {describe_head(*model)}" for label, model in self.models.items()}

    def __call__(self, path_or_hf_repo: str, *args, **kwargs):
        draft = not kwargs.get("return_config", False)
        if draft:
            requested = self.args.flashhead_draft
            result = load(path_or_hf_repo, *args, flashhead=requested, **kwargs)
        else:
            requested = self.args.flashhead
            verify = getattr(self.args, "flashhead_verify", None)
            recent = self.args.recent_tokens
            options = {"verify": verify, "recent_tokens": recent}
            options = {name: value for name, value in options.items() if value is not None}
            flashhead = options if requested and options else requested
            n_probes = self.args.n_probes
            result = load(path_or_hf_repo, *args, flashhead=flashhead, n_probes=n_probes, **kwargs)
        label = "Draft head" if draft else "Head"
        self.models[label] = (result[0], requested)
        logging.info(self.heads[label])
        return result


@contextlib.contextmanager
def patched(module: ModuleType, **attributes) -> Iterator[None]:
    """Set attributes of ``module`` for the duration of the block, then restore them."""
    saved = {name: getattr(module, name) for name in attributes}
    try:
        for name, value in attributes.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
