"""The scripts in ``examples/`` run on a tiny converted model (so they never rot), and print what
the library gives for the same calls."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm import batch_generate, generate

from conftest import make_tiny_model
from flashhead_mlx import load
from flashhead_mlx.pipeline import convert

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny untied model as a FlashHead folder, with a chat template."""
    folder = tmp_path_factory.mktemp("examples")
    out = convert(str(make_tiny_model(folder / "untied", tied=False)), str(folder / "flash"), calibration_tokens=256)
    config_path = out / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return out


def run_example(name: str, *args: str, stdin: str = "") -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], input=stdin, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_app_streams_with_flashhead_then_dense(converted):
    stdout = run_example("app.py", "--model", str(converted), "--prompt", "It is a truth", "--max-tokens", "8")
    match = re.fullmatch(
        r"== FlashHead ==\n(.*)\n\(([\d.]+) tokens/s\)\n== dense ==\n(.*)\n\(([\d.]+) tokens/s\)\n", stdout, re.S
    )
    assert match, stdout
    flash, tokenizer = load(str(converted))
    dense, _ = load(str(converted), flashhead=False)
    assert match.group(1) == generate(flash, tokenizer, "It is a truth", max_tokens=8)
    assert match.group(3) == generate(dense, tokenizer, "It is a truth", max_tokens=8)


def test_chat_answers_each_piped_line_with_the_conversation_so_far(converted):
    lines = ["Hello there", "How are you?"]
    stdout = run_example("chat.py", "--model", str(converted), "--max-tokens", "6",
                         stdin=f"{lines[0]}\n\n{lines[1]}\n")
    model, tokenizer = load(str(converted))
    messages, expected = [], ""
    for line in lines:
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = generate(model, tokenizer, prompt, max_tokens=6)
        messages.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert stdout == expected


def test_batch_prints_every_prompt_completion(converted):
    prompts = ["It is a truth", "Once upon a time", "The sea"]
    args = [arg for p in prompts for arg in ("--prompt", p)]
    stdout = run_example("batch.py", "--model", str(converted), "--max-tokens", "6", *args)
    model, tokenizer = load(str(converted))
    tokens = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
              for p in prompts]
    texts = batch_generate(model, tokenizer, tokens, max_tokens=6).texts
    assert stdout.splitlines() == [f"{p!r} -> {t!r}" for p, t in zip(prompts, texts)]


def test_benchmark_reports_both_heads_and_their_ratio(converted):
    stdout = run_example("benchmark.py", "--model", str(converted), "--max-tokens", "8", "--runs", "1")
    match = re.fullmatch(
        r"dense head: ([\d.]+) tokens/s\nFlashHead:  ([\d.]+) tokens/s\nspeedup:    ([\d.]+)x\n", stdout
    )
    assert match, stdout
    dense, flash, speedup = map(float, match.groups())
    assert dense > 0 and flash > 0
    assert speedup == pytest.approx(flash / dense, rel=0.02, abs=0.01)
