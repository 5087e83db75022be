"""``flashhead-mlx server`` under load, in this process: concurrent clients on loopback, each
sending a bounded number of requests (greedy, streamed, sampled and malformed ones), in rounds,
with MLX's active memory measured in the server's own process after each round.

:func:`serve` runs the server in the main thread (as the command does) and a driver in another;
when the driver is done, a SIGINT ends the server the way Ctrl-C does, and :func:`serve` checks
that it shut down cleanly (no thread of it left); with a deadline, a run that does not finish
fails with every thread's stack instead of hanging. ``tests/test_server_load.py`` runs it on a
tiny model, ``scripts/server_load.py`` on a real one.
"""

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

# The kinds of request a client sends, in turn, and the status each must get.
KINDS = ("greedy", "stream", "sampled", "bad-json", "negative-max-tokens", "unknown-model")
EXPECTED_STATUS = {"bad-json": 400, "negative-max-tokens": 400, "unknown-model": 404}
GREEDY_KINDS = ("greedy", "stream")
# Seconds a server has to stop after its deadline, before the process is ended.
SHUTDOWN_GRACE = 60.0
# Seconds between Ctrl-Cs while a server has not stopped: a SIGINT can be lost (the
# KeyboardInterrupt raised inside code that swallows exceptions, such as a finaliser), which left
# one run of the whole suite waiting in serve_forever with every client done.
INTERRUPT_RESEND = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(url: str, kind: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    """Send one request of ``kind``; its status, text (the streamed chunks joined; the body of an
    error), completion tokens (the response's ``usage``; ``None`` without one) and latency."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    if kind == "sampled":
        body["temperature"] = 0.8
    elif kind == "stream":
        body.update(stream=True, stream_options={"include_usage": True})
    elif kind == "negative-max-tokens":
        body["max_tokens"] = -max_tokens
    elif kind == "unknown-model":
        body["model"] = "no-such-model"
    data = b'{"prompt": "unfinished' if kind == "bad-json" else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/v1/completions", data=data, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    text = tokens = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read().decode()
        if kind == "stream":
            chunks = [line[len("data: ") :] for line in raw.splitlines() if line.startswith("data: ")]
            events = [json.loads(c) for c in chunks if c != "[DONE]"]
            text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
        else:
            events = [json.loads(raw)]
            text = events[0]["choices"][0]["text"]
        tokens = next((e["usage"]["completion_tokens"] for e in events if "usage" in e), None)
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    except (OSError, ValueError, KeyError) as error:  # refused, reset, timed out, garbled
        status, text = None, f"{type(error).__name__}: {error}"
    seconds = time.perf_counter() - start
    return {"kind": kind, "prompt": prompt, "status": status, "text": text, "tokens": tokens,
            "seconds": seconds}


def run_round(
    url: str,
    prompts: Sequence[str],
    clients: int = 16,
    requests_per_client: int = len(KINDS),
    max_tokens: int = 8,
    timeout: float = 120.0,
) -> List[dict]:
    """One round: ``clients`` concurrent clients, client ``c`` sending ``requests_per_client``
    requests one after the other, request ``i`` of kind ``KINDS[(c + i) % len(KINDS)]`` on prompt
    ``prompts[(2 * c + i) % len(prompts)]``: every kind meets every prompt over the clients, also
    when there are as many prompts as kinds (with ``c + i`` for both, each kind would always get
    the same prompt). Returns every request's record (:func:`_request`)."""

    def client(c: int) -> List[dict]:
        return [
            _request(url, KINDS[(c + i) % len(KINDS)], prompts[(2 * c + i) % len(prompts)],
                     max_tokens, timeout)
            for i in range(requests_per_client)
        ]

    with ThreadPoolExecutor(clients) as pool:
        return [record for records in pool.map(client, range(clients)) for record in records]


def wrong(record: dict) -> bool:
    """Whether a request got another status than its kind's (200 for a well-formed one)."""
    return record["status"] != EXPECTED_STATUS.get(record["kind"], 200)


def summary(records: List[dict]) -> dict:
    """Requests, wrong answers, and the p50/p95 latency (seconds) of the well-formed requests."""
    seconds = [r["seconds"] for r in records if r["kind"] not in EXPECTED_STATUS]
    return {
        "requests": len(records),
        "errors": sum(wrong(r) for r in records),
        "p50_s": float(np.percentile(seconds, 50)) if seconds else None,
        "p95_s": float(np.percentile(seconds, 95)) if seconds else None,
    }


def wait_healthy(url: str, timeout: float, stopped: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while not stopped.is_set():
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:  # refused, reset, or no answer within 5 s (a server busy loading)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not answer {url}/health in {timeout:.0f} s")
            time.sleep(0.2)
    raise RuntimeError("the server stopped before it answered")


def thread_stacks() -> str:
    """The Python stack of every thread of this process, each under its thread's name."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame)).rstrip()}"
        for ident, frame in sys._current_frames().items()
    )


def serve(
    model: str,
    flags: Sequence[str],
    drive: Callable[[str], object],
    startup_timeout: float = 120.0,
    deadline: Optional[float] = None,
    stacks_file=None,
):
    """Run ``flashhead-mlx server --model model flags`` on 127.0.0.1 (a free port) in this
    process's main thread, and ``drive(url)`` in another thread once it answers; then end the
    server with a SIGINT (Ctrl-C) and return what ``drive`` returned (or raise what it raised).

    ``deadline`` (seconds, optional) bounds ``drive``: when it has not returned that long after
    the server first answered, the server is ended the same way and a ``TimeoutError`` carries
    every thread's stack as it was then (:func:`thread_stacks`); should the server not stop
    within ``SHUTDOWN_GRACE`` seconds more either, ``faulthandler`` writes the stacks to
    ``stacks_file`` (a file or a file descriptor; default ``sys.stderr``) and ends the process
    with status 1. The start is bounded by ``startup_timeout``.

    Raises ``RuntimeError`` when the server does not shut down cleanly: a thread it started still
    running, or an exception out of its ``main``."""
    from flashhead_mlx import server as server_command

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve runs the server in the main thread (signals go there)")
    url = f"http://127.0.0.1:{free_port()}"
    outcome: Dict[str, object] = {}
    stopped, armed, expired = threading.Event(), threading.Event(), threading.Event()
    interrupted, arming = threading.Lock(), threading.Lock()
    before = set(threading.enumerate())

    def interrupt() -> None:
        """Ctrl-C for the server, again every ``INTERRUPT_RESEND`` seconds until it has stopped
        (one caller at a time)."""
        if not interrupted.acquire(blocking=False):
            return
        while not stopped.is_set():
            os.kill(os.getpid(), signal.SIGINT)
            stopped.wait(INTERRUPT_RESEND)

    def expire() -> None:
        expired.set()
        stacks = thread_stacks()
        message = f"not done {deadline:g} s after the server answered; the threads then:\n"
        outcome.setdefault("error", TimeoutError(message + stacks))
        interrupt()

    watchdog = threading.Timer(deadline or 0, expire)
    watchdog.name, watchdog.daemon = "server-load-watchdog", True

    def driver() -> None:
        try:
            wait_healthy(url, startup_timeout, stopped)
            with arming:
                if deadline is not None and not stopped.is_set():
                    armed.set()
                    watchdog.start()
                    faulthandler.dump_traceback_later(
                        deadline + SHUTDOWN_GRACE, exit=True, file=stacks_file or sys.stderr
                    )
            outcome.setdefault("result", drive(url))
        except BaseException as error:  # handed to the main thread
            outcome.setdefault("error", error)
        finally:
            interrupt()

    thread = threading.Thread(target=driver, name="server-load-driver", daemon=True)
    argv = sys.argv
    sys.argv = ["flashhead-mlx server", "--model", model, "--host", "127.0.0.1",
                "--port", url.rsplit(":", 1)[1], *flags]
    try:
        thread.start()
        server_command.main()
    except KeyboardInterrupt:  # the SIGINT came before mlx-lm's serve_forever caught it
        outcome.setdefault("error", RuntimeError("interrupted before the server was serving"))
    except BaseException as error:
        outcome.setdefault("error", RuntimeError(f"the server failed: {error!r}"))
    finally:
        with arming:
            stopped.set()
            if armed.is_set():
                watchdog.cancel()
                faulthandler.cancel_dump_traceback_later()
        sys.argv = argv
    thread.join(timeout=0 if expired.is_set() else 60)  # past its deadline, the driver may wait
    if "error" in outcome:
        raise outcome["error"]
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
    if left:
        raise RuntimeError(f"the server did not shut down cleanly: threads {left} still run")
    return outcome["result"]


def load_rounds(
    url: str,
    prompts: Sequence[str],
    rounds: int,
    log: Optional[Callable[[str], None]] = None,
    settle: float = 0.5,
    **options,
) -> List[dict]:
    """``rounds`` rounds (:func:`run_round`), each summarised with the server process's MLX
    active memory ``settle`` seconds after its last answer (the generation thread files the
    finished requests' caches after answering): :func:`summary` plus ``active_memory``, and its
    ``records``."""
    results = []
    for index in range(rounds):
        records = run_round(url, prompts, **options)
        time.sleep(settle)
        row = {**summary(records), "active_memory": mx.get_active_memory(), "records": records}
        results.append(row)
        if log is not None:
            log(
                f"round {index + 1}: {row['requests']} requests, {row['errors']} errors, "
                f"p50 {row['p50_s'] * 1000:.0f} ms, p95 {row['p95_s'] * 1000:.0f} ms, "
                f"active memory {row['active_memory'] / 2**20:.1f} MiB"
            )
    return results


def greedy_texts(records: List[dict]) -> Dict[str, set]:
    """The texts of the greedy (and streamed) responses, by prompt."""
    texts: Dict[str, set] = {}
    for r in records:
        if r["kind"] in GREEDY_KINDS and r["status"] == 200:
            texts.setdefault(r["prompt"], set()).add(r["text"])
    return texts
