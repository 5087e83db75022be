"""``flashhead-mlx server`` under load on a tiny model: 16 concurrent clients on loopback, each
sending greedy, streamed, sampled and malformed requests, in rounds
(:mod:`flashhead_mlx.testing.server_load`). Every greedy response equals the dense-head server's
on the same requests, malformed requests get their 4xx and disturb nothing, the server decodes
sparsely, loads its model once, keeps MLX's active memory flat across rounds and shuts down
cleanly on Ctrl-C. Each server run has a deadline past which the test fails with every thread's
stack (:func:`flashhead_mlx.testing.server_load.serve`) instead of hanging."""

import os
import socket
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import mlx_lm
import pytest

from conftest import make_tiny_model
from flashhead_mlx import flash_head, load
from flashhead_mlx import server as server_command
from flashhead_mlx.head import FlashHead
from flashhead_mlx.pipeline import convert
from flashhead_mlx.testing import server_load
from flashhead_mlx.testing.server_load import (
    EXPECTED_STATUS,
    greedy_texts,
    load_rounds,
    run_round,
    serve,
    wrong,
)

PROMPTS = ["It is a truth", "a single man in", "must be in want", "of a good fortune"]
MAX_TOKENS = 8
ROUNDS = 4
# How much MLX's active memory may vary after the first round (which fills the prompt cache):
# the cache holds up to 10 KV caches of 128 KiB here (256 positions), and which are held varies,
# as do the buffers the generation thread has not yet let go when the CPU is scarce (2.4 MiB
# apart, measured with the test niced beside three un-niced jobs on this 2-core machine); one
# leaked KV cache per request would add 6 MiB a round, 12 MiB over the rounds compared.
MEMORY_SLACK = 4 * 2**20
# Seconds a server run may take before the test fails with every thread's stack (a run takes a
# few seconds alone on this project's 2-core machine; 215 s niced beside three un-niced jobs).
DEADLINE = 600.0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple:
    """A tiny untied FlashHead folder and the fewest probes (of a few) with which its FlashHead,
    as a batch row decodes (no recent tokens), continues every prompt as the dense head does,
    checked against mlx-lm's dense generation."""
    folder = tmp_path_factory.mktemp("server-load")
    source = make_tiny_model(folder / "untied", tied=False)
    converted = convert(str(source), str(folder / "flashhead"), calibration_tokens=256, n_probes=4)
    dense, tokenizer = mlx_lm.load(str(converted))
    expected = [mlx_lm.generate(dense, tokenizer, p, max_tokens=MAX_TOKENS) for p in PROMPTS]
    n_clusters = flash_head(load(str(converted))[0]).n_clusters
    for n_probes in (n_clusters // 8, n_clusters // 4, n_clusters // 2, n_clusters):
        sparse, _ = load(str(converted), n_probes=n_probes, flashhead={"recent_tokens": 0})
        texts = [mlx_lm.generate(sparse, tokenizer, p, max_tokens=MAX_TOKENS) for p in PROMPTS]
        if texts == expected:
            return converted, n_probes
    pytest.fail("no n_probes continues the prompts as the dense head")


def spy(monkeypatch, cls, name: str) -> list:
    """Count the calls of ``cls.name``."""
    calls, method = [], getattr(cls, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return method(*args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.fixture
def terminal(capsys):
    """A file descriptor of the terminal's stderr, past pytest's capture: where the stacks go when
    a server that missed its deadline does not stop either (the process then ends)."""
    with capsys.disabled():
        fd = os.dup(2)
    yield fd
    os.close(fd)


def run(folder: Path, flags: list, rounds: int, terminal: int) -> list:
    def drive(url):
        return load_rounds(url, PROMPTS, rounds, log=print, max_tokens=MAX_TOKENS)

    return serve(str(folder), flags, drive, deadline=DEADLINE, stacks_file=terminal)


def test_sixteen_clients(model, monkeypatch, terminal):
    folder, n_probes = model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loads = spy(monkeypatch, server_command.Loader, "__call__")
    sparse_steps = spy(monkeypatch, FlashHead, "decode_logits")

    dense = run(folder, ["--no-flashhead"], 1, terminal)
    assert sparse_steps == [] and len(loads) == 1
    reference = greedy_texts(dense[0]["records"])
    assert set(reference) == set(PROMPTS)
    assert all(len(texts) == 1 for texts in reference.values()), reference

    del loads[:]
    rounds = run(folder, ["--n-probes", str(n_probes)], ROUNDS, terminal)
    for row in rounds:
        records = row["records"]
        assert [r for r in records if wrong(r)] == []
        assert {r["kind"] for r in records} >= set(EXPECTED_STATUS) | {"greedy", "stream", "sampled"}
        assert greedy_texts(records) == reference
        unknown = [r["text"] for r in records if r["kind"] == "unknown-model"]
        assert all("no-such-model does not exist" in text for text in unknown), unknown[:1]
        sampled = [r for r in records if r["kind"] == "sampled"]
        assert sampled and all(isinstance(r["text"], str) for r in sampled)
    assert len(loads) == 1  # the malformed requests (an unknown model) reloaded nothing
    assert len(sparse_steps) >= MAX_TOKENS - 1
    memory = [row["active_memory"] for row in rounds]
    assert max(memory[1:]) - min(memory[1:]) <= MEMORY_SLACK, memory  # after the first, flat


def handshakes(server_class, clients: int = 32) -> int:
    """How many of ``clients`` connections to a ``server_class`` that accepts none (its thread
    busy) complete their handshake, counted until the first that does not (within 0.2 s)."""
    server = server_class(("127.0.0.1", 0), BaseHTTPRequestHandler)
    sockets = []
    try:
        for _ in range(clients):
            try:
                sockets.append(socket.create_connection(server.server_address, timeout=0.2))
            except OSError:
                break
        return len(sockets)
    finally:
        for sock in sockets:
            sock.close()
        server.server_close()


def test_the_listen_backlog_holds_the_clients():
    """mlx-lm's server (the standard library's backlog of 5) leaves most of 32 clients that
    connect while it is busy to the kernel's handshake retries; flashhead-mlx's holds them."""
    assert handshakes(server_command.HTTPServer) == 32
    assert handshakes(server_command.MLX_SERVER.ThreadingHTTPServer) < 16


def test_a_server_that_stops_answering_fails_the_run_with_the_stacks(model, monkeypatch, terminal):
    """A generation thread that stops answering (its decode step held here) ends the run at its
    deadline with a ``TimeoutError`` that shows where each thread was, instead of a hang; the
    server then stops."""
    folder, n_probes = model
    reached, held = threading.Event(), threading.Event()
    decode, stacks = FlashHead.decode_logits, server_load.thread_stacks

    def stuck_decode(self, *args, **kwargs):
        reached.set()
        held.wait(timeout=DEADLINE)
        return decode(self, *args, **kwargs)

    def stacks_once_stuck() -> str:  # the stacks, taken once the step is held, then let go
        reached.wait(timeout=DEADLINE)
        try:
            return stacks()
        finally:
            held.set()

    monkeypatch.setattr(FlashHead, "decode_logits", stuck_decode)
    monkeypatch.setattr(server_load, "thread_stacks", stacks_once_stuck)

    def drive(url):
        return run_round(url, PROMPTS[:1], clients=1, requests_per_client=1, max_tokens=2)

    flags = ["--n-probes", str(n_probes)]
    with pytest.raises(TimeoutError) as error:
        serve(str(folder), flags, drive, deadline=0.5, stacks_file=terminal)
    message = str(error.value)
    assert message.startswith("not done 0.5 s after the server answered; the threads then:\n")
    assert "thread server-load-driver:" in message
    assert "in stuck_decode\n" in message and "in _generate\n" in message
