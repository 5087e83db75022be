"""The ``flashhead-mlx`` command: one subcommand per module, as ``mlx_lm`` does."""

import importlib
import sys

from .blas import reexec_with_openblas

SUBCOMMANDS = {
    "convert": "Cluster a model's head and write a FlashHead model folder.",
    "demo": "Convert a model and generate with the dense head and with FlashHead.",
    "generate": "Generate text like mlx_lm.generate, with the model's FlashHead.",
    "server": "Serve a model like mlx_lm.server, with its FlashHead.",
    "upload": "Upload a FlashHead model folder to the Hugging Face Hub.",
    "import-assets": "Make an mlx-lm folder a FlashHead folder from a vLLM FlashHead clustering.",
    "eval": "Measure a FlashHead against its dense head on a text.",
    "tune": "Store the smallest n_probes that meets a containment target on a text.",
    "bench": "Time the dense head and the FlashHead side by side.",
    "doctor": "Report the machine, the kernels' self-test and FlashHead's speed on it.",
}
# Subcommands whose module is named otherwise (``eval`` is a builtin; mlx_lm has ``evaluate``;
# ``flashhead_mlx.generate`` is the function).
MODULES = {"eval": "evaluate", "generate": "generate_command"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: flashhead-mlx <subcommand> [--help] [options]\n\nsubcommands:")
        for name, help_text in SUBCOMMANDS.items():
            print(f"  {name:14s} {help_text}")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] == "--version":
        from ._version import __version__

        print(__version__)
        return
    subcommand = sys.argv[1]
    if subcommand not in SUBCOMMANDS:
        sys.exit(f"flashhead-mlx: unknown subcommand {subcommand!r}; choose from {list(SUBCOMMANDS)}")
    # "import-assets" is import_assets.py; MODULES names the others that differ.
    module = f"flashhead_mlx.{MODULES.get(subcommand, subcommand.replace('-', '_'))}"
    reexec_with_openblas(["-m", "flashhead_mlx.cli", *sys.argv[1:]])
    sys.argv = [f"flashhead-mlx {subcommand}", *sys.argv[2:]]
    importlib.import_module(module).main()


if __name__ == "__main__":
    main()
