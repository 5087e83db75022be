"""``flashhead-mlx generate``: mlx-lm's generate command, with the FlashHead, end to end."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest

from conftest import make_tiny_model
import flashhead_mlx
from flashhead_mlx import decode, load
from flashhead_mlx.pipeline import convert

PROMPT = "It is a truth"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny untied model (its greedy text depends on the probes) as a FlashHead folder."""
    folder = tmp_path_factory.mktemp("generate")
    source = make_tiny_model(folder / "untied", tied=False)
    return convert(str(source), str(folder / "untied-flashhead"), calibration_tokens=256)


def n_clusters(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["flashhead"]["n_clusters"]


def run_generate(folder: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    """``flashhead-mlx generate`` on ``folder``, 8 tokens of ``PROMPT``."""
    return subprocess.run(
        [sys.executable, "-m", "flashhead_mlx.cli", "generate", "--model", str(folder),
         "--prompt", PROMPT, "--max-tokens", "8", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def generated_text(stdout: str) -> str:
    """The text between mlx-lm's ``==========`` lines."""
    match = re.search(r"^==========\n(.*)\n==========\nPrompt:", stdout, re.DOTALL | re.MULTILINE)
    assert match, stdout
    return match.group(1)


def dense_text(folder: Path) -> str:
    model, tokenizer = load(str(folder), flashhead=False)
    return mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=8)


def test_generate_with_flashhead(converted):
    result = run_generate(converted)
    assert result.returncode == 0, result.stderr
    assert generated_text(result.stdout)
    assert "tokens-per-sec" in result.stdout
    assert re.search(r"^Head: FlashHead \(n_probes=\d+, \d+ clusters of 16, ", result.stdout, re.M)


def test_all_probes_give_the_dense_text(converted):
    result = run_generate(converted, "--n-probes", str(n_clusters(converted)))
    assert result.returncode == 0, result.stderr
    assert f"n_probes={n_clusters(converted)}," in result.stdout
    assert generated_text(result.stdout) == dense_text(converted)


def test_no_flashhead_and_flashhead_disable_are_dense(converted):
    expected = dense_text(converted)
    result = run_generate(converted, "--no-flashhead")
    assert result.returncode == 0, result.stderr
    assert "Head: dense" in result.stdout and "FlashHead (" not in result.stdout
    assert generated_text(result.stdout) == expected
    result = run_generate(converted, env={"FLASHHEAD_DISABLE": "1"})
    assert result.returncode == 0, result.stderr
    assert "Head: dense (FLASHHEAD_DISABLE is set)" in result.stdout
    assert generated_text(result.stdout) == expected


def test_draft_model_keeps_its_dense_head_unless_asked(converted):
    # The same folder as model and draft: the draft is told apart by how mlx-lm loads it.
    all_probes = str(n_clusters(converted))
    result = run_generate(converted, "--draft-model", str(converted), "--n-probes", all_probes)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^Head: FlashHead \(", result.stdout, re.M)
    assert re.search(r"^Draft head: dense$", result.stdout, re.M)
    assert generated_text(result.stdout) == dense_text(converted)
    result = run_generate(converted, "--draft-model", str(converted), "--flashhead-draft")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^Draft head: FlashHead \(", result.stdout, re.M)


def test_quiet_output_is_the_text_alone(converted):
    result = run_generate(converted, "--verbose", "False", "--no-flashhead")
    assert result.returncode == 0, result.stderr
    assert result.stdout == dense_text(converted) + "\n"


def test_help_and_bad_flags(converted):
    result = subprocess.run(
        [sys.executable, "-m", "flashhead_mlx.generate_command", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--max-tokens", "--temp", "--draft-model", "--flashhead", "--no-flashhead",
                 "--n-probes", "--flashhead-draft"):
        assert flag in result.stdout
    bad = run_generate(converted, "--no-such-flag")
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr
    too_many = run_generate(converted, "--n-probes", "100000")
    assert too_many.returncode == 1 and "n_probes must be in" in too_many.stderr


def test_python_api_example_runs(converted):
    example = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"
    result = subprocess.run(
        [sys.executable, str(example), "--model", str(converted), "--max-tokens", "6"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "greedy text identical to dense:" in result.stdout


def test_generate_uses_the_decode_route(converted, monkeypatch, capsys):
    """The command tells the head each step's settings itself: the fallback is never consulted."""
    command = importlib.import_module("flashhead_mlx.generate_command")

    def no_fallback(frame):
        raise AssertionError("a head call consulted the fallback")

    monkeypatch.setattr(decode, "_fallback_context", no_fallback)
    monkeypatch.setattr(sys, "argv", [
        "flashhead-mlx generate", "--model", str(converted), "--prompt", PROMPT,
        "--max-tokens", "8", "--temp", "0.7", "--seed", "1",
    ])
    command.main()
    output = capsys.readouterr().out
    assert generated_text(output) and "Head: FlashHead (" in output
