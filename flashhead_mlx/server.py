"""Serve FlashHead models with mlx-lm's OpenAI-compatible HTTP server.

``flashhead-mlx server`` runs ``mlx_lm.server``'s own ``main`` with its loader swapped for ours,
the FlashHead flags added to its parser (``--flashhead/--no-flashhead``, ``--n-probes``,
``--flashhead-draft``, ``--flashhead-verify [K]``), and FlashHead's decode route in place of
mlx-lm's (``BatchGenerator``, ``stream_generate``, ``make_sampler``, ``make_logits_processors``):
every request, batched or not, tells the head its sampling settings. Each model it loads logs a
``Head: ...`` line.

A request for a model that cannot be found gets its 404 before it is queued
(:class:`ResponseGenerator`): mlx-lm's own server drops the model it serves first, and loads it
again for the next request. The listen backlog holds 128 connections (:class:`HTTPServer`), not 5.

Verified decoding does not batch: with ``--flashhead-verify`` the model is not batchable
(:class:`ModelProvider`), so mlx-lm's server serves its requests one at a time through
``stream_generate``, each verified.
"""

import argparse
import functools
import importlib
import types

from .generation import BatchGenerator, stream_generate
from .loading import download
from .mlx_lm_commands import Loader, add_flashhead_arguments, add_verify_argument, patched
from .sample_utils import make_logits_processors, make_sampler
from .verified import verify_block

MLX_SERVER = importlib.import_module("mlx_lm.server")


class HTTPServer(MLX_SERVER.ThreadingHTTPServer):
    """mlx-lm's HTTP server with a listen backlog for many clients. The standard library's 5
    overflows when 16 clients connect at once while the accepting thread waits for the CPU: the
    kernel drops the handshakes it has no room for, and those clients wait for its retries (1, 3,
    7, ... s) or, after 31 s of them, are reset."""

    request_queue_size = 128


class ResponseGenerator(MLX_SERVER.ResponseGenerator):
    """mlx-lm's, refusing a request for a model that cannot be found before it is queued (mlx-lm
    answers 404). mlx-lm's generation thread would first drain its batch and drop the model it
    serves, so that the next request loads it again; a model found here is fetched here, not
    while the batch waits."""

    def __init__(self, *args, **kwargs):
        self.found = set()  # the models found by name so far
        super().__init__(*args, **kwargs)

    def generate(self, request, generation_args, progress_callback=None):
        provider = self.model_provider
        name = generation_args.model.model
        path = provider._model_map.get(name, name)
        if path not in (provider.cli_args.model, *self.found):
            download(path)
            self.found.add(path)
        return super().generate(request, generation_args, progress_callback)


class ModelProvider(MLX_SERVER.ModelProvider):
    """mlx-lm's model provider; a model whose default is verified decoding is not batchable,
    so that the server serves its requests one at a time (``stream_generate``, verified)."""

    def _load(self, *args, **kwargs) -> None:
        super()._load(*args, **kwargs)
        self.is_batchable = self.is_batchable and not verify_block(self.model)


def main() -> None:
    loader = Loader()

    class ArgumentParser(argparse.ArgumentParser):
        """The parser ``mlx_lm.server.main`` builds, with the FlashHead flags; the parsed
        arguments go to the loader too."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prog = "flashhead-mlx server"
            self.description = "Serve a model with mlx-lm's HTTP server, with its FlashHead."
            add_verify_argument(add_flashhead_arguments(self))

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
    classes = dict(
        ModelProvider=ModelProvider,
        ResponseGenerator=ResponseGenerator,
        _run_http_server=functools.partial(MLX_SERVER._run_http_server, server_class=HTTPServer),
    )
    with patched(MLX_SERVER, argparse=shim, load=loader, **classes, **route):
        MLX_SERVER.main()


if __name__ == "__main__":
    main()
