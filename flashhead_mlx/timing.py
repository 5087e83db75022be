"""Timing calls against each other: runs alternated between them after a warm-up run each, and
their medians (``bench``, ``doctor`` and the kernels' self-test)."""

import importlib
import statistics
import time
from typing import Callable, Dict, Sequence

import mlx.core as mx

# The stream mlx-lm's generate functions (and so FlashHead's) evaluate on.
GENERATION_STREAM = importlib.import_module("mlx_lm.generate").generation_stream


def time_calls(fn: Callable, inputs: Sequence, clock: Callable[[], float] = time.perf_counter
               ) -> float:
    """Milliseconds per call of ``fn`` over ``inputs``, each call evaluated before the next, by
    ``clock`` (seconds)."""
    start = clock()
    for x in inputs:
        mx.eval(fn(x))
    return 1000 * (clock() - start) / len(inputs)


def alternate(calls: Dict[str, tuple], runs: int,
              clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median :func:`time_calls` of each ``name -> (fn, inputs)``, the runs alternating between
    them after one warm-up run each."""
    times = alternated_runs(
        {name: lambda f=fn, x=inputs: time_calls(f, x, clock)
         for name, (fn, inputs) in calls.items()},
        runs,
    )
    return {name: statistics.median(t) for name, t in times.items()}


def settle() -> None:
    """Wait for the work queued on the default and the generation streams, and empty MLX's
    buffer cache. mlx-lm's ``generate_step`` evaluates one step past the last token it yields,
    asynchronously: a call that ends a generator leaves that step running, and the next call
    timed would count it; and a call would otherwise start with the buffers the one before it
    left (another model's sizes)."""
    mx.synchronize(GENERATION_STREAM)
    mx.synchronize()
    mx.clear_cache()


def turn_order(items: Sequence, turn: int) -> Sequence:
    """``items`` in the order of alternation turn ``turn``: reversed on even turns, as given on
    odd ones, so that no item always follows the same one."""
    return items[:: 1 if turn % 2 else -1]


def alternated_runs(runs_of: Dict[str, Callable[[], object]], runs: int) -> Dict[str, list]:
    """The results of ``runs`` calls of each ``name -> fn``, the runs alternating between them
    after one warm-up call each, in the given order and then in reverse by turns (so no fn
    always follows the same one); each call starts once the work of the one before has ended
    (:func:`settle`)."""
    results = {name: [] for name in runs_of}
    for run in range(runs + 1):
        for name, fn in turn_order(list(runs_of.items()), run):
            settle()
            result = fn()
            if run:
                results[name].append(result)
    return results
