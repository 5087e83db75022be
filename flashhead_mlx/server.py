"""Serve FlashHead models with mlx-lm's OpenAI-compatible HTTP server.

``flashhead-mlx server`` runs ``mlx_lm.server``'s own ``main`` with its loader swapped for ours,
the FlashHead flags added to its parser (``--flashhead/--no-flashhead``, ``--n-probes``,
``--flashhead-draft``), and FlashHead's decode route in place of mlx-lm's (``BatchGenerator``,
``stream_generate``, ``make_sampler``, ``make_logits_processors``): every request, batched or not,
tells the head its sampling settings. Each model it loads logs a ``Head: ...`` line.
"""

import argparse
import importlib
import types

from .generation import BatchGenerator, stream_generate
from .mlx_lm_commands import Loader, add_flashhead_arguments, patched
from .sample_utils import make_logits_processors, make_sampler

MLX_SERVER = importlib.import_module("mlx_lm.server")


def main() -> None:
    loader = Loader()

    class ArgumentParser(argparse.ArgumentParser):
        """The parser ``mlx_lm.server.main`` builds, with the FlashHead flags; the parsed
        arguments go to the loader too."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prog = "flashhead-mlx server"
            self.description = "Serve a model with mlx-lm's HTTP server, with its FlashHead."
            add_flashhead_arguments(self)

        def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
            loader.args = super().parse_args(args, namespace)
            return loader.args

    # ``mlx_lm.server.main`` builds its parser inside: it gets ours through its ``argparse``.
    shim = types.SimpleNamespace(**{**vars(argparse), "ArgumentParser": ArgumentParser})
    route = dict(
        BatchGenerator=BatchGenerator,
        stream_generate=stream_generate,
        make_sampler=make_sampler,
        make_logits_processors=make_logits_processors,
    )
    with patched(MLX_SERVER, argparse=shim, load=loader, **route):
        MLX_SERVER.main()


if __name__ == "__main__":
    main()
