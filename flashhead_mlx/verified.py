"""Verified decoding: FlashHead's tokens checked by the dense head, a block at a time.

The body's hidden states do not depend on the head, so a block of ``K`` tokens decoded with the
FlashHead can be checked afterwards by one dense head pass over their ``K`` stored hidden
states. Greedy: at the first position whose dense argmax differs from FlashHead's token, the
tokens before it and the dense token are kept, the caches are rolled back to just after it, and
decoding continues from there. Sampling: the same, a position's token being kept or replaced by
speculative sampling's rule (:mod:`flashhead_mlx.acceptance`), so that every token follows
mlx-lm's sampler on the dense logits. Nothing unverified is yielded, and the log-probabilities
yielded are the dense ones of the verify pass.

Caches: ``KVCache`` and ``QuantizedKVCache`` are trimmed. A ``RotatingKVCache`` overwrites its
oldest slot in place once full, so before a block's steps overwrite slots, evaluated copies of
those slots are saved (at most ``K - 1`` per layer) and written back on rollback. An
``ArraysCache`` (the recurrent states of hybrid models: qwen3_5, lfm2, mamba, ...) has no trim,
but the models rebind its entries at each step (``cache[i] = ...``) rather than write into them:
a block keeps references to each step's entries and a rollback puts back those of the last step
kept, with the sequence's recent-token history (:mod:`flashhead_mlx.recent`). A ``CacheList``
is rolled back cache by cache. Other caches (``ChunkedKVCache``, ...): a ``ValueError``.
"""

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)

from .acceptance import (
    accept,
    proposal_kind,
    sampler_logits,
    sampler_settings,
    tail_distribution,
    xtc_coins,
)
from .decode import in_context, settings_context
from .head import FlashHead
from .kernels import best_token
from .model_head import final_hidden_states
from .patch import flash_head, is_patched
from .recent import CACHE_ATTRIBUTE, quantize_kv_cache, reading, track
from .sample_utils import Sampler
from .sampling import sample

MLX_GENERATE = importlib.import_module("mlx_lm.generate")  # ``mlx_lm.generate`` is a function
DEFAULT_BLOCK = 8
# ``K`` fixed, or ``(low, high)``: adaptive, from ``high``, halved after a rollback and doubled
# after a block without one, within ``[low, high]`` (:func:`next_block`).
Blocks = Union[int, Tuple[int, int]]
CACHES = (KVCache, QuantizedKVCache, RotatingKVCache, ArraysCache)


@dataclass
class Verification:
    """A FlashHead's verified decoding: the ``block`` (K, :data:`Blocks`) and ``mode``
    (``"greedy"`` or ``"sampling"``) of its latest verified generation, the verified ``tokens``
    yielded and ``rollbacks`` (blocks cut at a corrected token) of the generations at that K
    (since K last changed), and the model's ``default`` K (``None``: unverified by default)."""

    block: Blocks = DEFAULT_BLOCK
    tokens: int = 0
    rollbacks: int = 0
    mode: str = "greedy"
    default: Optional[Blocks] = None

    def describe(self) -> str:
        """E.g. ``verified greedy (K=8, 12.5 rollbacks per 1000 tokens)`` (``K=4-32``:
        adaptive)."""
        rate = 1000 * self.rollbacks / self.tokens if self.tokens else 0.0
        return (
            f"verified {self.mode} (K={block_label(self.block)}, {rate:.1f} rollbacks per 1000 "
            "tokens)"
        )


def block_range(block: Blocks) -> Tuple[int, int]:
    """The smallest and largest K of ``block`` (:data:`Blocks`), checked: ``1 <= low <=
    high``."""
    low, high = (block, block) if isinstance(block, int) else tuple(block)
    if not 1 <= low <= high:
        raise ValueError(f"the verified block must be K >= 1 or (low, high), 1 <= low <= high, "
                         f"got {block!r}")
    return low, high


def block_label(block: Blocks) -> str:
    """``"8"`` for a fixed K, ``"4-32"`` for an adaptive one (what :func:`parse_block` reads)."""
    low, high = block_range(block)
    return str(low) if low == high else f"{low}-{high}"


def parse_block(text: str) -> Blocks:
    """``"8"`` -> ``8``, ``"4-32"`` -> ``(4, 32)`` (the command lines' ``K``)."""
    try:
        values = [int(value) for value in text.split("-")]
        block = values[0] if len(values) == 1 else tuple(values)
        block_range(block)
    except (ValueError, TypeError):
        raise ValueError(f"expected K >= 1 or LOW-HIGH like 4-32, got {text!r}") from None
    return block


def next_block(k: int, corrected: bool, low: int, high: int) -> int:
    """Adaptive K: the next block's size after a block of ``k`` positions, halved when the
    block was cut at a corrected token, else doubled, within ``[low, high]``."""
    return max(low, k // 2) if corrected else min(high, 2 * k)


def set_verification(model: nn.Module, block: Optional[Blocks] = DEFAULT_BLOCK) -> None:
    """Make verified decoding the default of ``model``'s FlashHead, ``block`` tokens per dense
    check (:data:`Blocks`; ``None`` or ``0``: off), for :mod:`flashhead_mlx.generation`'s
    functions."""
    if block:
        block_range(block)
    flash_head(model).verification = Verification(block, default=block) if block else None


def verify_block(model: nn.Module, flashhead_verify: Optional[Blocks] = None) -> Optional[Blocks]:
    """The block size of a generation call: ``flashhead_verify`` when given (``0``: off), else
    the default of ``model``'s FlashHead (:func:`set_verification`); ``None``: unverified."""
    if flashhead_verify is not None:
        if flashhead_verify != 0:
            block_range(flashhead_verify)
            flash_head(model)  # a clear error for a model without one
        return flashhead_verify or None
    verification = flash_head(model).verification if is_patched(model) else None
    return None if verification is None else verification.default


@dataclass
class RotatingCheckpoint:
    """What undoing the next single-token updates of a ``RotatingKVCache`` needs: its offset,
    each update's ``(index before, slot written)``, and copies of the slots it overwrites."""

    offset: int
    writes: List[Tuple[int, int]]
    slots: List[int]
    keys: mx.array
    values: mx.array


def checkpoint(cache: RotatingKVCache, steps: int) -> RotatingCheckpoint:
    """Save what the next ``steps`` single-token updates of ``cache`` overwrite (its buffer is at
    most ``max_size`` long, as after any single-token update)."""
    writes, index = [], cache._idx
    for _ in range(steps):
        slot = cache.keep if index == cache.max_size else index
        writes.append((index, slot))
        index = slot + 1
    slots = sorted({slot for _, slot in writes if slot < cache.keys.shape[2]})
    positions = mx.array(slots, mx.int32)
    keys, values = (mx.take(a, positions, axis=2) for a in (cache.keys, cache.values))
    mx.eval(keys, values)  # evaluated now: the updates then overwrite the buffer in place
    return RotatingCheckpoint(cache.offset, writes, slots, keys, values)


def rewind(cache: RotatingKVCache, saved: RotatingCheckpoint, n: int) -> None:
    """Undo the last ``n`` of the updates ``saved`` was made for (all of them were made)."""
    if n == 0:
        return
    undone = saved.writes[len(saved.writes) - n :]
    for slot in {slot for _, slot in undone} & set(saved.slots):
        i = saved.slots.index(slot)
        cache.keys[..., slot : slot + 1, :] = saved.keys[..., i : i + 1, :]
        cache.values[..., slot : slot + 1, :] = saved.values[..., i : i + 1, :]
    cache.offset = saved.offset + len(saved.writes) - n
    cache._idx = undone[0][0]


def layers(cache: List[Any]) -> List[Any]:
    """The caches of ``cache``'s layers, each ``CacheList`` replaced by its caches."""
    return [c for entry in cache for c in (
        layers(entry.caches) if isinstance(entry, CacheList) else [entry]
    )]


@dataclass
class Checkpoints:
    """What rolling back a block's steps needs: the checkpoint of each ``RotatingKVCache`` (by
    its index in :func:`layers`), taken after the first step, and after each step the entries
    of every ``ArraysCache`` and the sequence's recent-token history (references: the models
    rebind these, never write into them)."""

    rotating: Dict[int, RotatingCheckpoint] = field(default_factory=dict)
    steps: List[Tuple[List[List[Any]], Any]] = field(default_factory=list)


def record(cache: List[Any], saved: Checkpoints) -> None:
    """Keep the ``ArraysCache`` entries and the recent-token history of ``cache`` after a
    step."""
    arrays = [list(c.cache) for c in layers(cache) if isinstance(c, ArraysCache)]
    saved.steps.append((arrays, getattr(cache[0], CACHE_ATTRIBUTE, None)))


def roll_back(cache: List[Any], saved: Checkpoints, n: int, removed: int = 0) -> None:
    """Remove the last ``n`` entries of every layer's cache, ``removed`` of the entries of the
    steps ``saved`` was recorded in having been removed already."""
    arrays = []
    for layer, c in enumerate(layers(cache)):
        if isinstance(c, RotatingKVCache):
            rewind(c, saved.rotating[layer], removed + n)
        elif isinstance(c, ArraysCache):
            arrays.append(c)
        elif n:
            c.trim(n)
    if n:
        entries, history = saved.steps[len(saved.steps) - removed - n - 1]
        for c, kept in zip(arrays, entries):
            c.cache = list(kept)
        if history is not None:
            setattr(cache[0], CACHE_ATTRIBUTE, history)


def block_size(
    block: int, cache: List[Any], remaining: int, kv_bits: Optional[int], quantized_kv_start: int
) -> int:
    """The tokens of the next block: at most ``block`` and the ``remaining`` ones (``-1``: no
    limit); a rotating cache's updates after the first must hit distinct slots; and a cache
    that dense decoding would quantize within the block ends the block there, so that the
    quantization happens at the offset where dense decoding does it."""
    k = block if remaining < 0 else min(block, remaining)
    for c in layers(cache):
        if isinstance(c, RotatingKVCache):
            k = min(k, c.max_size - c.keep + 1)
        elif kv_bits is not None and hasattr(c, "to_quantized") and c.offset < quantized_kv_start:
            k = min(k, quantized_kv_start - c.offset)
    return max(k, 1)


def process(processors: Optional[list], tokens: Optional[mx.array], logits: mx.array) -> mx.array:
    """``logits`` through the logits processors, which see the ``tokens`` so far."""
    for processor in processors or ():
        logits = processor(tokens, logits)
    return logits


def body_states(model: nn.Module, head: FlashHead, tokens: mx.array, cache: List[Any]):
    """The hidden states of ``tokens`` ``[1, L]`` (the body alone) and the sequence's recent
    tokens after them, tracked on ``cache`` as a FlashHead forward pass tracks them
    (:mod:`flashhead_mlx.recent`; ``None`` when the head scores none)."""
    recent = track(cache, tokens, head.recent_tokens) if head.recent_tokens else None
    return final_hidden_states(model, tokens, cache), recent


def log_softmax(logits: mx.array) -> mx.array:
    """mlx-lm's log-probabilities: ``logits - logsumexp(logits)`` over the vocabulary."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def near_tie_margin(top: mx.array) -> mx.array:
    """How close ``[k]`` a logit must come to its row's largest, ``top`` ``[k]``, to risk the
    same log-probability. mlx-lm's greedy token is the argmax of ``logits - c``, ``c`` the
    row's ``logsumexp``, which lies between ``top`` and ``top + log V`` (float32 ``V`` below
    ``2**31``: under 22.5). A logit near ``top`` minus ``c`` is a number below 23 in magnitude,
    and two numbers round to the same float32 only if they lie within its spacing, at most
    ``2**-23`` of their magnitude: a logit further than ``2**-23 * 23`` below ``top`` stays
    below it once ``c`` is subtracted. The margin is ``2**-22 * (2 |top| + 23)``, which also
    covers the rounding of ``c`` itself."""
    return 2.0**-22 * (2 * mx.abs(top) + 23)


def near_ties(slots: mx.array) -> mx.array:
    """Whether ``[k]`` another logit of each row ``[k, slots]`` lies within
    :func:`near_tie_margin` of the row's largest (a near-tie, or an exact one)."""
    top = slots.max(axis=-1)
    return (slots >= (top - near_tie_margin(top))[:, None]).sum(axis=-1) > 1


def greedy_check(order: mx.array, slots: mx.array) -> mx.array:
    """The dense greedy token ``[k]`` at each row of logits ``[k, slots]`` in a head's cluster
    order (``order``: the token of each slot, -1 at padding): mlx-lm's argmax of the
    log-probabilities, ties to the lowest token id.

    Subtracting ``logsumexp`` (the same number for every logit of a row) keeps the logits'
    order except where two come within a rounding of each other: so where a row's largest logit
    is the only one within :func:`near_tie_margin` of itself, its token is the dense token.
    Only where another logit comes that close (:func:`near_ties`) are the rows'
    log-probabilities computed (an exponential per slot, the check's largest cost on a CPU) and
    searched as the dense decode step searches its own."""
    near = near_ties(slots).any()
    token = order[mx.argmax(slots, axis=-1)]
    mx.eval(token, near)
    return best_token(order, log_softmax(slots)) if near.item() else token


class GreedyProposal:
    """Greedy verified decoding: FlashHead's argmax, checked against the dense argmax."""

    def __init__(self, head: FlashHead, sampler: Callable, processors: Optional[list]):
        self.head, self.sampler, self.processors = head, sampler, processors
        self.context = settings_context([sampler], [processors])

    def start(self, k: int) -> None:
        """A block of ``k`` positions begins."""

    def draw(self, h: mx.array, tokens: Optional[mx.array]) -> mx.array:
        """FlashHead's token ``[1]`` at the hidden state ``h`` ``[1, 1, d]`` (the processors see
        ``tokens``). Without processors, the stage-2 kernel's greedy token (with the recent
        tokens'): no ``[1, V]`` logits to scatter, normalise and search."""
        if not self.processors:
            return self.head.greedy_step(h[:, -1:, :]).reshape(-1)
        with in_context(self.context):
            logits = self.head(h)[:, -1, :]
        return self.sampler(log_softmax(process(self.processors, tokens, logits)))

    def check(self, logprobs: mx.array, proposed: mx.array, slots: mx.array) -> mx.array:
        """The token ``[k]`` dense decoding takes at each position of the block, given its dense
        log-probabilities ``[k, V]``, FlashHead's tokens ``[k]`` and the dense logits in the
        head's cluster order ``[k, slots]``. Without processors, :func:`greedy_check` on the
        latter: the token-order log-probabilities are then only gathered if a caller reads
        them."""
        if not self.processors:
            return greedy_check(self.head.order, slots)
        return self.sampler(logprobs)


class SampledProposal:
    """Verified sampling (:mod:`flashhead_mlx.acceptance`): FlashHead draws from a proposal
    whose exact probabilities the block keeps (the stage-1 scores of a ``"tail"`` draw, the
    logits of a ``"candidates"`` one); the check keeps each token or replaces it so that the
    kept token follows mlx-lm's sampler on the dense logits. ``draw`` also takes several
    positions' hidden states ``[m, 1, d]`` at once (one per row)."""

    def __init__(self, head: FlashHead, settings: Sampler, processors: Optional[list]):
        self.head, self.settings, self.processors = head, settings, processors
        self.kind = proposal_kind(head, settings, processors)
        self.context = settings_context([None], [processors])  # candidates, biased tokens
        self.start(0)

    def start(self, k: int) -> None:
        self.drawn: List[mx.array] = []  # each draw's stage-1 scores or sampler logits
        self.xtc = xtc_coins(self.settings, k)  # one coin per position, for both heads

    def draw(self, h: mx.array, tokens: Optional[mx.array]) -> mx.array:
        if self.kind == "tail":
            h = h[:, -1, :]
            scores = self.head.cluster_scores(h)
            self.drawn.append(scores)
            return sample(self.head, h, self.settings.temperature, scores=scores)
        with in_context(self.context):
            logits = self.head(h)[:, -1, :]
        logprobs = log_softmax(process(self.processors, tokens, logits))
        done = sum(d.shape[0] for d in self.drawn)
        xtc = self.xtc[done : done + logprobs.shape[0]]
        self.drawn.append(sampler_logits(self.settings, logprobs, xtc))
        return mx.random.categorical(self.drawn[-1])

    def distributions(self, logprobs: mx.array) -> Tuple[mx.array, mx.array]:
        """The target ``p`` and the proposal ``q`` ``[k, V]`` at the block's positions, given
        their dense log-probabilities ``[k, V]``."""
        p = mx.softmax(sampler_logits(self.settings, logprobs, self.xtc), axis=-1)
        drawn = mx.concatenate(self.drawn)
        if self.kind == "tail":
            return p, tail_distribution(self.head, logprobs, drawn, self.settings.temperature)
        return p, mx.softmax(drawn, axis=-1)

    def check(self, logprobs: mx.array, proposed: mx.array, slots: mx.array) -> mx.array:
        return accept(*self.distributions(logprobs), proposed)


def verify(
    model: nn.Module,
    head: FlashHead,
    cache: List[Any],
    token: mx.array,
    k: int,
    proposal: Union[GreedyProposal, SampledProposal],
    processors: Optional[list],
    tokens: Optional[mx.array],
) -> Tuple[List[int], mx.array, bool, Checkpoints]:
    """One block: ``k`` FlashHead steps from ``token`` (the last one, not yet in the cache),
    then one dense pass over their hidden states.

    Returns the verified tokens (FlashHead's up to the first the check replaced, then its
    replacement), their dense log-probabilities ``[n, V]``, whether a token was replaced, and
    the block's checkpoints (for :func:`roll_back`); the caches hold the entries of
    the tokens before the last verified one.
    """
    hidden, proposed, saved = [], [], Checkpoints()
    proposal.start(k)
    for step in range(k):
        h, recent = body_states(model, head, token[None], cache)
        if step == 0:
            saved.rotating = {i: checkpoint(c, k - 1) for i, c in enumerate(layers(cache))
                              if isinstance(c, RotatingKVCache)}
        record(cache, saved)
        if processors:
            tokens = mx.concatenate([tokens, token])
        with reading(recent):
            token = proposal.draw(h, tokens)
        mx.async_eval(token)
        hidden.append(h)
        proposed.append(token)
    slots = head.slot_logits(mx.concatenate(hidden, axis=1))[0]  # the dense logits, cluster order
    logits = head.token_order(slots)  # FlashHead.exact_logits
    if processors:  # row i sees the tokens up to the one it was computed from
        rows = tokens.size - k + 1
        logits = mx.concatenate(
            [process(processors, tokens[: rows + i], logits[i : i + 1]) for i in range(k)]
        )
    logprobs = log_softmax(logits)
    flash = mx.concatenate(proposed).reshape(-1)
    checked = proposal.check(logprobs, flash, slots).tolist()
    flash = flash.tolist()
    wrong = next((i for i in range(k) if checked[i] != flash[i]), None)
    n = k if wrong is None else wrong + 1
    roll_back(cache, saved, k - n)
    return checked[:n], logprobs[:n], wrong is not None, saved


def verified_generate_step(
    prompt: mx.array,
    model: nn.Module,
    stream=MLX_GENERATE.generation_stream,
    *,
    block: Blocks = DEFAULT_BLOCK,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    max_kv_size: Optional[int] = None,
    prompt_cache: Optional[Any] = None,
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = MLX_GENERATE.DEFAULT_QUANTIZED_KV_START,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Generator[Tuple[int, mx.array], None, None]:
    """``mlx_lm.generate_step`` with FlashHead's tokens verified by the dense head, ``block``
    (:data:`Blocks`: fixed or adaptive) at a time: a generator of ``(token, logprobs)``. Greedy
    (a sampler of temperature ``0``): exactly the tokens of greedy dense decoding (up to the
    rounding of a ``block``-row matrix product against a one-row one at near-ties). Sampling (a sampler of
    :func:`flashhead_mlx.make_sampler`; another is a ``ValueError``): tokens distributed exactly
    as mlx-lm's sampler on the dense logits (:mod:`flashhead_mlx.acceptance`). The
    log-probabilities are the dense ones. When the consumer stops (or ``max_tokens`` is
    reached), ``prompt_cache`` holds the prompt and the tokens yielded, as mlx-lm's leaves it,
    so that it can be reused (a chat's next turn, the server's prompt cache).

    Takes ``generate_step``'s arguments (not ``input_embeddings``), plus ``block``.
    """
    settings = sampler_settings(sampler)
    low, high = block_range(block)
    head = flash_head(model)
    verification = head.verification
    if verification is None or verification.block != block:  # the counts restart
        default = None if verification is None else verification.default
        verification = head.verification = Verification(block, default=default)
    if settings is None:
        proposal = GreedyProposal(head, sampler or MLX_GENERATE.greedy_sampler, logits_processors)
    else:
        proposal = SampledProposal(head, settings, logits_processors)
    verification.mode = "greedy" if settings is None else "sampling"
    cache = make_prompt_cache(model, max_kv_size) if prompt_cache is None else prompt_cache
    for c in layers(cache):
        if not isinstance(c, CACHES):
            raise ValueError(
                f"FlashHead's verified decoding cannot roll back a {type(c).__name__} (it "
                "supports KVCache, QuantizedKVCache, RotatingKVCache, ArraysCache and CacheList)"
            )

    def quantize():
        quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)

    progress = prompt_progress_callback or (lambda *_: None)
    total = len(prompt)
    tokens = prompt[:-1] if logits_processors else None
    with mx.stream(stream):
        progress(0, total)
        for start in range(0, total - 1, prefill_step_size):
            end = min(start + prefill_step_size, total - 1)
            body_states(model, head, prompt[start:end][None], cache)
            quantize()
            mx.eval([c.state for c in cache])
            progress(end, total)
            mx.clear_cache()

    def settle(k: int, verified: List[int], saved: Checkpoints, kept: int) -> None:
        """The consumer stops after ``kept`` of the block's ``verified`` tokens: the caches then
        hold the prompt and exactly the tokens yielded, as after ``mlx_lm.generate_step``."""
        with mx.stream(stream):
            if kept == len(verified):
                body_states(model, head, token[None], cache)
                quantize()
            else:
                roll_back(cache, saved, len(verified) - kept - 1, k - len(verified))
            mx.eval([c.state for c in cache])

    token, n = prompt[-1:], 0
    k, target, verified, saved = 0, high, [], Checkpoints()
    while n != max_tokens:
        with mx.stream(stream):
            k = block_size(target, cache, max_tokens - n, kv_bits, quantized_kv_start)
            verified, logprobs, corrected, saved = verify(
                model, head, cache, token, k, proposal, logits_processors, tokens
            )
            quantize()
        if n == 0:
            progress(total, total)
        if logits_processors:
            tokens = mx.concatenate([tokens, token, mx.array(verified[:-1], token.dtype)])
        token = mx.array(verified[-1:], prompt.dtype)
        verification.rollbacks += corrected
        target = next_block(target, corrected, low, high)
        for i, t in enumerate(verified):
            verification.tokens += 1
            try:
                yield t, logprobs[i]
            except GeneratorExit:
                settle(k, verified, saved, i + 1)
                raise
        n += len(verified)
    settle(k, verified, saved, len(verified))
