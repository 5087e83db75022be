"""Decode speed measured side by side: the head as a decode step calls it, decode-step inputs
from the built-in text, and greedy ``stream_generate`` runs alternated between models (what
``bench`` and ``doctor`` time)."""

import statistics
from typing import Callable, Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse

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
    model: nn.Module, tokenizer, prompt, max_tokens: int, block: Blocks
) -> Tuple[GenerationResponse, int]:
    """One greedy ``stream_generate``, verified ``block`` tokens at a time (``0``: unverified;
    ``(low, high)``: adaptive):
    its last response and its rollbacks (``0`` unverified)."""
    counts = Verification(block)
    if block:
        flash_head(model).verification = counts
    try:
        for response in stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens, flashhead_verify=block
        ):
            pass
    finally:
        if block:
            flash_head(model).verification = None
    return response, counts.rollbacks


def decode_speed(
    models: Dict[str, Tuple[nn.Module, Blocks]], tokenizer, prompt, max_tokens: int, runs: int
) -> dict:
    """Median decode and prompt tokens/s of greedy ``stream_generate`` per ``name -> (model,
    K)`` (``K``: verified ``K`` tokens at a time, ``0``: unverified), the tokens generated and
    the rollbacks per 1000 tokens, runs alternated after one warm-up run each."""
    results = alternated_runs(
        {
            name: lambda m=model, b=block: generation_run(m, tokenizer, prompt, max_tokens, b)
            for name, (model, block) in models.items()
        },
        runs,
    )
    speeds = {}
    for name, runs_ in results.items():
        responses = [r for r, _ in runs_]
        tokens = sum(r.generation_tokens for r in responses)
        speeds[name] = {
            "decode_tok_s": statistics.median(r.generation_tps for r in responses),
            "prompt_tok_s": statistics.median(r.prompt_tps for r in responses),
            "tokens": statistics.median(r.generation_tokens for r in responses),
            "decode_runs": [r.generation_tps for r in responses],
            "rollbacks_per_1000_tokens": 1000 * sum(n for _, n in runs_) / tokens,
        }
    return speeds
