"""Generate text with mlx-lm's ``generate`` command through FlashHead's decode route.

``flashhead-mlx generate`` takes every flag of ``mlx_lm.generate`` plus ``--flashhead/--no-flashhead``,
``--n-probes``, ``--flashhead-draft`` and ``--flashhead-verify [K]`` (decoding verified by
the dense head, K tokens at a time): it runs mlx-lm's own ``main`` with its parser, loader,
``make_sampler`` and ``generate`` replaced by ours (:mod:`flashhead_mlx.generation`).

The module is not named ``generate``: ``flashhead_mlx.generate`` is the function, and importing a
submodule of that name would rebind it (the trap of ``mlx_lm.generate``).
"""

import argparse

from .generation import MLX_GENERATE, generate, with_globals
from .mlx_lm_commands import Loader, add_flashhead_arguments, add_verify_argument
from .sample_utils import make_sampler


def setup_arg_parser() -> argparse.ArgumentParser:
    """mlx-lm's ``generate`` parser, plus the FlashHead flags."""
    parser = MLX_GENERATE.setup_arg_parser()
    parser.prog = "flashhead-mlx generate"
    parser.description = "Generate text with mlx-lm, the model's head replaced by its FlashHead."
    return add_verify_argument(add_flashhead_arguments(parser))


def main() -> None:
    parser = setup_arg_parser()
    args = parser.parse_args()
    loader = Loader(args)
    run = with_globals(
        MLX_GENERATE.main,
        setup_arg_parser=lambda: parser,
        load=loader,
        make_sampler=make_sampler,
        generate=generate,
    )
    try:
        run()
    except ValueError as error:
        raise SystemExit(f"flashhead-mlx generate: error: {error}")
    if args.verbose:
        print(*loader.heads.values(), sep="\n")


if __name__ == "__main__":
    main()
