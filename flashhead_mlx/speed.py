"""Decode speed measured side by side: the head as a decode step calls it, decode-step inputs
from the built-in text, and greedy ``stream_generate`` runs alternated between models (what
``bench`` and ``doctor`` time)."""

import statistics
import time
from typing import Callable, Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn

from .calibration import TUNING_TEXT
from .decode import decoding
from .generation import stream_generate
from .model_head import final_hidden_states, head_module, is_tied
from .patch import flash_head
from .timing import alternated_runs
from .verified import Blocks, Verification

# Different hidden states the head is timed on, in turn.
N_INPUTS = 64
BATCH_SIZES = (1, 4)


def decode_step(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """The model's head as a decode step calls it (``lm_head`` or ``embed_tokens.as_linear``)."""
    module = head_module(model)
    head = module.as_linear if is_tied(model) else module

    def step(h: mx.array) -> mx.array:
        with decoding():
            return head(h)

    return step


def hidden_inputs(model, tokenizer, batch_size: int, n: int = N_INPUTS) -> List[mx.array]:
    """``n`` different decode-step inputs ``[batch_size, 1, d]``: hidden states of the built-in
    text."""
    tokens = mx.array(tokenizer.encode(TUNING_TEXT.read_text())[: n * batch_size])
    hidden = final_hidden_states(model, tokens[None])[0]
    mx.eval(hidden)
    return [hidden[i * batch_size : (i + 1) * batch_size, None] for i in range(n)]


def generation_run(
    model: nn.Module, tokenizer, prompt, max_tokens: int, block: Blocks,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, float]:
    """One greedy ``stream_generate``, verified ``block`` tokens at a time (``0``: unverified;
    ``(low, high)``: adaptive), timed as a whole call by ``clock`` (seconds): ``tokens``
    generated, ``prompt_tokens``, ``prefill_s`` (from the call to the end of the prefill: the
    last ``prompt_progress_callback`` before the first token, which mlx-lm's ``generate_step``
    and verified decoding both make once the cache of every prompt token but the last is
    evaluated), ``total_s`` (from the call to its last response) and ``rollbacks`` (``0``
    unverified)."""
    counts = Verification(block)
    if block:
        flash_head(model).verification = counts
    start = clock()
    prefilled = [0.0]

    def progress(done: int, total: int) -> None:
        if done < total:
            prefilled[0] = clock() - start

    try:
        for response in stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens, flashhead_verify=block,
            prompt_progress_callback=progress,
        ):
            pass
        total_s = clock() - start
    finally:
        if block:
            flash_head(model).verification = None
    return {"tokens": response.generation_tokens, "prompt_tokens": response.prompt_tokens,
            "prefill_s": prefilled[0], "total_s": total_s, "rollbacks": counts.rollbacks}


def decode_speed(
    models: Dict[str, Tuple[nn.Module, Blocks]], tokenizer, prompt, max_tokens: int, runs: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Median decode and prompt tokens/s of greedy ``stream_generate`` per ``name -> (model,
    K)`` (``K``: verified ``K`` tokens at a time, ``0``: unverified), the tokens generated and
    the rollbacks per 1000 tokens, runs alternated after one warm-up run each.

    Every model's rates come from whole calls (:func:`generation_run`), the same way: decode
    tokens/s is the tokens generated over the call's time after the prefill (the first token's
    step, the last prompt token's, included), prompt tokens/s the prompt's tokens but the last
    over the prefill. ``stream_generate``'s own rates start at the first token yielded, which
    verified decoding yields only after its first block has been decoded and checked: they would
    leave that block out (and all of a single-block call) and flatter large K."""
    results = alternated_runs(
        {
            name: lambda m=model, b=block: generation_run(
                m, tokenizer, prompt, max_tokens, b, clock
            )
            for name, (model, block) in models.items()
        },
        runs,
    )
    speeds = {}
    for name, calls in results.items():
        decode = [c["tokens"] / (c["total_s"] - c["prefill_s"]) for c in calls]
        speeds[name] = {
            "decode_tok_s": statistics.median(decode),
            "prompt_tok_s": statistics.median(
                (c["prompt_tokens"] - 1) / c["prefill_s"] for c in calls
            ),
            "tokens": statistics.median(c["tokens"] for c in calls),
            "decode_runs": decode,
            "rollbacks_per_1000_tokens": 1000 * sum(c["rollbacks"] for c in calls)
            / sum(c["tokens"] for c in calls),
        }
    return speeds
