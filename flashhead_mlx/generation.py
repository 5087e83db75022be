"""Generation with a FlashHead: mlx-lm's generate functions, each decode step told its settings.

:func:`generate_step`, :func:`speculative_generate_step`, :func:`stream_generate`,
:func:`generate`, :func:`batch_generate` and :class:`BatchGenerator` take mlx-lm's arguments,
return what mlx-lm's return and run mlx-lm's own code. They set the decode context
(:func:`flashhead_mlx.decode.in_context`) from the sampler's ``temperature`` and the logits
processors' ``biased_tokens`` around each step of mlx-lm's loops only, never across a ``yield``:
the caller's own model calls between two steps get the exact dense logits. ``generate``,
``stream_generate`` and ``batch_generate`` are mlx-lm's functions run with ours in place of the
functions they call (:func:`with_globals`), so nothing of mlx-lm is patched.

``generate_step`` (and so ``stream_generate`` and ``generate``) takes ``flashhead_verify=K``:
greedy or sampled decoding verified by the dense head ``K`` tokens at a time
(:func:`flashhead_mlx.verified.verified_generate_step`), also the default of a model loaded
with ``load(..., flashhead={"verify": K})``. The other functions do not verify: they raise a
``ValueError`` for a model whose default is verified.
"""

import importlib
import types
from typing import Any, Callable, Generator, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchResponse, GenerationResponse
from mlx_lm.tokenizer_utils import TokenizerWrapper
from transformers import PreTrainedTokenizer

from .decode import DecodeContext, batch_context, in_context, make_context, settings_context
from .recent import quantize_kv_cache
from .verified import Blocks, verified_generate_step, verify_block

MLX_GENERATE = importlib.import_module("mlx_lm.generate")  # ``mlx_lm.generate`` is a function
generation_stream = MLX_GENERATE.generation_stream
DEFAULT_QUANTIZED_KV_START = MLX_GENERATE.DEFAULT_QUANTIZED_KV_START


def with_globals(fn: Callable, **names) -> Callable:
    """A copy of the module-level function ``fn`` that sees ``names`` in place of its module's
    globals of those names (the module itself is left as it is)."""
    copy = types.FunctionType(
        fn.__code__, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def unverified(model: nn.Module, what: str) -> None:
    """A ``ValueError`` when ``model``'s default is verified decoding, which ``what`` lacks."""
    if verify_block(model):
        raise ValueError(
            f"FlashHead's verified decoding does not run with {what}: load the model without "
            "the verify option (or call flashhead_mlx.verified.set_verification(model, None))"
        )


def in_steps(steps: Iterator, context: Optional[DecodeContext]) -> Generator:
    """The items of ``steps``, each computed with ``context`` set; it is unset while the caller
    holds an item. Closing this generator closes ``steps``."""
    try:
        while True:
            with in_context(context):
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        steps.close()


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    stream=generation_stream,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    max_kv_size: Optional[int] = None,
    prompt_cache: Optional[Any] = None,
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    input_embeddings: Optional[mx.array] = None,
    flashhead_verify: Optional[Blocks] = None,
) -> Generator[Tuple[mx.array, mx.array], None, None]:
    """``mlx_lm.generate_step``: a generator of ``(token, logprobs)``, each step told the
    sampler's temperature and the processors' biased tokens. Takes mlx-lm's arguments, plus
    ``flashhead_verify`` (int or ``(low, high)``, optional): verify decoding (greedy or
    sampled) with the dense head, this many tokens at a time (``0``: unverified; ``(low,
    high)``: adaptive, :func:`flashhead_mlx.verified.next_block`). Default: the model's
    (``load``'s ``verify`` option)."""
    options = dict(
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        max_kv_size=max_kv_size,
        prompt_cache=prompt_cache,
        prefill_step_size=prefill_step_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        prompt_progress_callback=prompt_progress_callback,
    )
    block = verify_block(model, flashhead_verify)
    if block:
        if input_embeddings is not None:
            raise ValueError("FlashHead's verified decoding does not take input_embeddings")
        return verified_generate_step(prompt, model, stream, block=block, **options)
    run = with_globals(MLX_GENERATE.generate_step, maybe_quantize_kv_cache=quantize_kv_cache)
    steps = run(prompt, model, stream, input_embeddings=input_embeddings, **options)
    return in_steps(steps, settings_context([sampler], [logits_processors]))


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    draft_model: nn.Module,
    stream=generation_stream,
    *,
    num_draft_tokens: int = 2,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    prompt_cache: Optional[Any] = None,
    prefill_step_size: int = 512,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
) -> Generator[Tuple[mx.array, mx.array, bool], None, None]:
    """``mlx_lm.generate.speculative_generate_step``: a generator of ``(token, logprobs,
    from_draft)``, each step (drafts and verification) told the sampler's temperature and the
    processors' biased tokens. Takes mlx-lm's arguments; a ``ValueError`` for a model whose
    default is verified decoding (:func:`unverified`)."""
    unverified(model, "a draft model")
    run = with_globals(
        MLX_GENERATE.speculative_generate_step, maybe_quantize_kv_cache=quantize_kv_cache
    )
    steps = run(
        prompt,
        model,
        draft_model,
        stream,
        num_draft_tokens=num_draft_tokens,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prompt_cache=prompt_cache,
        prefill_step_size=prefill_step_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )
    return in_steps(steps, settings_context([sampler], [logits_processors]))


def stream_generate(
    model: nn.Module,
    tokenizer: Union[PreTrainedTokenizer, TokenizerWrapper],
    prompt: Union[str, mx.array, List[int]],
    max_tokens: int = 256,
    draft_model: Optional[nn.Module] = None,
    stream=generation_stream,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """``mlx_lm.stream_generate`` (speculative with ``draft_model``) over :func:`generate_step`
    and :func:`speculative_generate_step`: yields mlx-lm's ``GenerationResponse``.
    ``flashhead_verify=K`` verifies decoding (:func:`generate_step`)."""
    run = with_globals(
        MLX_GENERATE.stream_generate,
        generate_step=generate_step,
        speculative_generate_step=speculative_generate_step,
    )
    return run(model, tokenizer, prompt, max_tokens, draft_model, stream, **kwargs)


def generate(
    model: nn.Module,
    tokenizer: Union[PreTrainedTokenizer, TokenizerWrapper],
    prompt: Union[str, List[int]],
    verbose: bool = False,
    **kwargs,
) -> str:
    """``mlx_lm.generate`` over :func:`stream_generate`: the complete response."""
    run = with_globals(MLX_GENERATE.generate, stream_generate=stream_generate)
    return run(model, tokenizer, prompt, verbose, **kwargs)


class PromptBatch(MLX_GENERATE.PromptProcessingBatch):
    """mlx-lm's prompt-processing batch: prefill gets the cheap sparse pass (its logits are never
    read), and the rows leaving for generation are told their settings at their first step."""

    def prompt(self, tokens: List[List[int]]):
        with in_context(make_context()):
            return super().prompt(tokens)

    def generate(self, tokens: List[List[int]]):
        with in_context(batch_context(self)):
            return super().generate(tokens)


class DecodeBatch(MLX_GENERATE.GenerationBatch):
    """mlx-lm's generation batch: each step is told the settings of the rows in it then."""

    def next(self):
        with in_context(batch_context(self)):
            return super().next()


class BatchGenerator(MLX_GENERATE.BatchGenerator):
    """``mlx_lm.generate.BatchGenerator`` (continuous batching; takes mlx-lm's arguments) whose
    prompt and generation batches are a :class:`PromptBatch` and a :class:`DecodeBatch`.

    mlx-lm keeps one of each for the generator's life: new rows are merged into them and finished
    rows filtered out, so each model call is told the sampler and processors of exactly the rows
    it scores, in their order, each row at its own temperature, and each row's tokens so far
    (its recent tokens, :mod:`flashhead_mlx.recent`): a greedy row decodes as its prompt alone.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_tokens: int = 128,
        stop_tokens: Optional[Sequence[Sequence[int]]] = None,
        sampler: Optional[Callable[[mx.array], mx.array]] = None,
        logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
        completion_batch_size: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 2048,
        max_kv_size: Optional[int] = None,
        stream=None,
    ):
        super().__init__(
            model,
            max_tokens=max_tokens,
            stop_tokens=stop_tokens,
            sampler=sampler,
            logits_processors=logits_processors,
            completion_batch_size=completion_batch_size,
            prefill_batch_size=prefill_batch_size,
            prefill_step_size=prefill_step_size,
            max_kv_size=max_kv_size,
            stream=stream,
        )
        unverified(model, "batches (BatchGenerator, batch_generate)")
        self._prompt_batch = PromptBatch.empty(
            self.model, self.sampler, prefill_step_size=prefill_step_size
        )
        self._generation_batch = DecodeBatch.empty(self.model, self.sampler)


def batch_generate(
    model,
    tokenizer: Union[PreTrainedTokenizer, TokenizerWrapper],
    prompts: List[List[int]],
    prompt_caches: Optional[List[List[Any]]] = None,
    max_tokens: Union[int, List[int]] = 128,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    **kwargs,
) -> BatchResponse:
    """``mlx_lm.batch_generate`` run by :class:`BatchGenerator`: mlx-lm's ``BatchResponse``."""
    run = with_globals(MLX_GENERATE.batch_generate, BatchGenerator=BatchGenerator)
    return run(
        model,
        tokenizer,
        prompts,
        prompt_caches,
        max_tokens,
        verbose,
        return_prompt_caches,
        return_token_ids,
        return_logprobs,
        **kwargs,
    )
