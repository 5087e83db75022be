"""``flashhead-mlx server``: mlx-lm's HTTP server with a FlashHead model, over a real socket."""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request
from pathlib import Path

import mlx_lm
import pytest

from conftest import make_tiny_model
from flashhead_mlx import generation, load, sample_utils
from flashhead_mlx import server as server_command
from flashhead_mlx.pipeline import convert

PROMPT = "It is a truth"
STARTUP_SECONDS = 60


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny untied model (its greedy text depends on the probes) as a FlashHead folder."""
    folder = tmp_path_factory.mktemp("server")
    source = make_tiny_model(folder / "untied", tied=False)
    return convert(str(source), str(folder / "untied-flashhead"), calibration_tokens=256)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    """A running ``flashhead-mlx server`` on ``converted``: its base URL and log file."""
    yield from run_server(converted, tmp_path_factory)


@pytest.fixture(scope="module")
def verified_server(converted, tmp_path_factory):
    """The server with a FlashHead of one probe, verified 4 tokens at a time."""
    flags = ["--n-probes", "1", "--flashhead-verify", "4"]
    yield from run_server(converted, tmp_path_factory, *flags)


def run_server(folder: Path, tmp_path_factory, *flags: str):
    """Start ``flashhead-mlx server`` on ``folder`` with ``flags``, yield its base URL and log
    file, stop it."""
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "flashhead_mlx.cli", "server", "--model", str(folder),
             "--host", "127.0.0.1", "--port", str(port), *flags],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                late = time.monotonic() > deadline
                assert not late, f"no answer in {STARTUP_SECONDS} s:\n{log.read_text()}"
                time.sleep(0.5)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_completion_comes_from_the_flashhead(server, converted):
    url, log = server
    reply = post(f"{url}/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    text = reply["choices"][0]["text"]
    assert text
    assert reply["usage"]["completion_tokens"] == 8
    model, tokenizer = load(str(converted))
    assert text == mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=8)  # batched alike
    assert "Head: FlashHead (n_probes=" in log.read_text()


def complete(url: str, prompt: str, max_tokens: int = 12) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return post(f"{url}/v1/completions", body)["choices"][0]["text"]


def test_verified_server_completes_as_the_dense_head(verified_server, converted):
    """With one probe the FlashHead's text differs from the dense head's; verified, the
    server's is the dense one: repeated (the prompt cache), continued, and concurrent."""
    url, log = verified_server
    dense, tokenizer = mlx_lm.load(str(converted))
    model, _ = load(str(converted), n_probes=1)
    expected = mlx_lm.generate(dense, tokenizer, PROMPT, max_tokens=12)
    assert mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=12) != expected
    assert complete(url, PROMPT) == expected
    assert complete(url, PROMPT) == expected  # from the prompt cache the first request left
    longer = PROMPT + expected + " and"
    assert complete(url, longer) == mlx_lm.generate(dense, tokenizer, longer, max_tokens=12)
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda _: complete(url, PROMPT), range(3)))
    assert texts == [expected] * 3
    assert "verified greedy (K=4" in log.read_text()


def test_help_lists_both_flag_sets():
    result = subprocess.run(
        [sys.executable, "-m", "flashhead_mlx.server", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--port", "--draft-model", "--max-tokens", "--no-flashhead", "--n-probes",
                 "--flashhead-draft", "--flashhead-verify"):
        assert flag in result.stdout


def test_the_server_runs_the_decode_route(monkeypatch):
    """While mlx-lm's server runs, its module names are FlashHead's route; after, mlx-lm's."""
    seen = {}
    names = ("BatchGenerator", "stream_generate", "make_sampler", "make_logits_processors")

    def main():
        seen.update({name: getattr(server_command.MLX_SERVER, name) for name in names})

    monkeypatch.setattr(server_command.MLX_SERVER, "main", main)
    before = {name: getattr(server_command.MLX_SERVER, name) for name in names}
    server_command.main()
    assert seen == {
        "BatchGenerator": generation.BatchGenerator,
        "stream_generate": generation.stream_generate,
        "make_sampler": sample_utils.make_sampler,
        "make_logits_processors": sample_utils.make_logits_processors,
    }
    assert {name: getattr(server_command.MLX_SERVER, name) for name in names} == before
