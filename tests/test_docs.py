"""docs/cli.md documents every flag of every subcommand, each in the subcommand's section."""

import argparse
import importlib
import re
from pathlib import Path

import pytest

from flashhead_mlx.cli import MODULES, SUBCOMMANDS
from flashhead_mlx.generation import MLX_GENERATE
from flashhead_mlx.mlx_lm_commands import add_flashhead_arguments

CLI_DOC = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
# generate and server are mlx-lm's commands: the page documents the flags they add.
SECTIONS = {"generate": "generate and server", "server": "generate and server"}


def flags(parser: argparse.ArgumentParser) -> set:
    return {flag for action in parser._actions for flag in action.option_strings} - {"-h", "--help"}


def added_flags(subcommand: str) -> set:
    """The flags of ``subcommand``; for generate and server, those they add to mlx-lm's."""
    if subcommand == "generate":
        command = importlib.import_module("flashhead_mlx.generate_command")
        return flags(command.setup_arg_parser()) - flags(MLX_GENERATE.setup_arg_parser())
    if subcommand == "server":
        return flags(add_flashhead_arguments(argparse.ArgumentParser()))
    module = MODULES.get(subcommand, subcommand.replace("-", "_"))
    return flags(importlib.import_module(f"flashhead_mlx.{module}").setup_arg_parser())


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_flag_is_documented(subcommand):
    heading = f"\n## {SECTIONS.get(subcommand, subcommand)}\n"
    assert heading in CLI_DOC, f"docs/cli.md has no section {heading.strip()!r}"
    section = CLI_DOC.split(heading)[1].split("\n## ")[0]
    missing = [
        flag for flag in sorted(added_flags(subcommand))
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", section)
    ]
    assert not missing, f"docs/cli.md, section {subcommand}: undocumented flags {missing}"
