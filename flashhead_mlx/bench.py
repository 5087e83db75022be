"""``flashhead-mlx bench``: the dense head and the FlashHead side by side, in one process.

The folder is loaded twice, with its dense head and with its FlashHead; runs alternate between the
two (one warm-up run each first) and the medians are reported:

- head only: one decode step of the head (inside :func:`flashhead_mlx.decoding`, as in mlx-lm's
  decode loops) at B = 1 and B = 4, over 64 different hidden states of real text in turn, and
  FlashHead's stages on the same inputs: the centroid pass (``cluster_scores``), the selection of
  the ``n_probes`` best clusters (``top_clusters``), the gather and score of their rows
  (``cluster_logits``) and the scatter into full-vocabulary logits;
- end to end: decode and prompt tokens/s of greedy ``flashhead_mlx.stream_generate``, every
  model's from whole calls (:func:`flashhead_mlx.speed.decode_speed`); with
  ``verify_blocks``, also verified greedy decoding (:mod:`flashhead_mlx.verified`) at each K in
  the same alternation: its decode tokens/s, the share of FlashHead's decode gain over dense it
  keeps (``(verified - dense) / (flash - dense)``) and its rollbacks per 1000 tokens;
- batches (``batch_sizes``): per batch size B, the head's decode step ``[B, 1, d]`` in
  head tokens/s (B rows per step) with the dense head and with FlashHead's decode step on each
  batch path (:data:`flashhead_mlx.kernels.BATCH_PATHS`: per-row gathers, the union of the rows'
  clusters, the dense switch) and on the path it chooses, alternated in one run, with the path
  and the kernels the chosen step ran (recorded, not inferred); the break-even: the first B at
  which the dense switch is at least as fast as the union; and greedy batch generation end to
  end (FlashHead's ``BatchGenerator``, what ``batch_generate`` runs), dense vs FlashHead
  alternated, with the batch paths FlashHead's decode steps took;
- the kernels that ran: per stage, the implementation a decode step at B = 1 and B = 4 ran
  (``"metal"`` or ``"mlx"``: after the kernels' first-use self-test for those shapes);
- memory: resident bytes (every parameter; FlashHead's assets are parameters of its head) and the
  bytes of weights one decode step reads at B = 1 (:func:`bytes_per_token`). Their ratio is the
  speedup a bandwidth-bound decode could reach (``ceiling_speedup``); ``share_of_ceiling`` is the
  share of that gain measured: ``(decode_speedup - 1) / (ceiling_speedup - 1)`` (0: no gain,
  1: all of it). Beside them, on paper, the same bytes for the model as a 4-bit body with a
  4-bit or a bf16 head (:func:`mac_configurations`) and their bandwidth-bound speedups;
- stage 1 per centroid format (:func:`stage1_times`): packed, float32 (what a CPU FlashHead
  multiplies), dequantized per call, at B = 1 and 4, alternated;
- the free-head baseline: the same model with a head that costs nothing but writing its logits
  (:class:`FreeHead`), beside dense and FlashHead through ``generate_step``: the prefill (all
  prompt tokens but the last), the first step (the last prompt token, the head and the sampler),
  each timed alone, and the decode steps, the three models' generations advanced in turns of 8
  steps (:func:`step_times`). Per decode token, ``(t_dense - t_flash) /
  (t_dense - t_free)`` is the share of the head's time FlashHead removes; the bytes each head
  reads per step over its time alone (B = 1) is the bandwidth it achieves.
"""

import argparse
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .decode import decoding
from .calibration import TUNING_TEXT
from .generation import BatchGenerator, generate_step, stream_generate
from .head import FlashHead
from .kernels import BATCH_PATHS, cluster_scores, float32_centroids, recording, top_clusters
from .kernels.cluster_argmax import DENSE_PROBE_RATIO
from .loading import load
from .model_head import head_module
from .probe import EMBEDDING_HEADS, probe_head, set_module
from .patch import FlashEmbedding, describe_head, flash_head, is_patched
from .report import device_description, pyplot, table
from .sample_utils import make_sampler
from .speed import BATCH_SIZES, decode_speed, decode_step, hidden_inputs
from .timing import alternate, alternated_runs, settle, turn_order
from .mlx_lm_commands import block_argument
from .verified import Blocks, block_label

# Different hidden states per batch size of the batch table, in turn.
N_BATCH_INPUTS = 16
# Tokens each row of the end-to-end batch generation decodes (`--batch-gen-tokens`).
BATCH_GEN_TOKENS = 16
# Decode steps a model takes in its turn of the free-head baseline's interleaved runs.
DECODE_TURN = 8
# The stages whose implementation a decode step records (flashhead_mlx.kernels.recording).
STAGES = ("centroid_topk", "cluster_argmax")


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of every parameter of ``module`` (frozen ones included)."""
    return sum(array.nbytes for _, array in tree_flatten(module.parameters()))


def row_bytes(module: nn.Module) -> float:
    """Bytes of one row of a head or embedding module (weight, and scales and biases if any)."""
    arrays = (module.get(name) for name in ("weight", "scales", "biases"))
    return sum(a.nbytes for a in arrays if a is not None) / module.weight.shape[0]


def head_bytes_read(model: nn.Module) -> float:
    """Bytes of weights the head reads per decoded token at B = 1: every row (dense), or the
    stage-1 arrays in the format stage 1 multiplies (float32 centroids on the CPU) plus the
    probed clusters' rows and token ids (FlashHead)."""
    if not is_patched(model):
        return parameter_bytes(head_module(model))
    head = flash_head(model)
    stage1 = sum(a.nbytes for a in head.stage1_arguments()[:4] if a is not None)
    rows = head.n_probes * head.cluster_size
    return stage1 + rows * (row_bytes(head) + head.order.itemsize)


def embedding_tables(model: nn.Module) -> List[nn.Module]:
    """The model's embedding tables, each once: the modules a decode step reads one row of per
    token (the token embedding, a tied head's table, position or per-layer embeddings)."""
    tables = {}
    for _, module in model.named_modules():
        if isinstance(module, (*EMBEDDING_HEADS, FlashEmbedding)):
            tables.setdefault(id(module), module)
    return list(tables.values())


def bytes_per_token(model: nn.Module) -> float:
    """Bytes of weights one decode step reads at B = 1: every parameter once, except the
    embedding tables (one row of each is read, :func:`embedding_tables`) and the head found by
    probing (:func:`head_bytes_read`). The logits written (V floats, the same for both heads)
    are not counted."""
    head, tables = head_module(model), embedding_tables(model)
    skipped = sum(parameter_bytes(t) for t in tables)
    if all(t is not head for t in tables):
        skipped += parameter_bytes(head)
    lookups = sum(row_bytes(t.head if isinstance(t, FlashEmbedding) else t) for t in tables)
    return parameter_bytes(model) - skipped + lookups + head_bytes_read(model)


def stage_calls(head, inputs: List[mx.array]) -> Dict[str, tuple]:
    """FlashHead's stages as :func:`alternate` takes them, each on the outputs of the one before."""
    scores = [head.cluster_scores(h) for h in inputs]
    probes = [top_clusters(s, head.n_probes)[0] for s in scores]
    candidates = [head.cluster_logits(h, p) for h, p in zip(inputs, probes)]
    mx.eval(scores, probes, candidates)
    return {
        "centroid pass": (head.cluster_scores, inputs),
        "selection": (lambda s: top_clusters(s, head.n_probes), scores),
        "gather and score": (lambda a: head.cluster_logits(*a), list(zip(inputs, probes))),
        "scatter to full vocabulary": (lambda a: head.scatter(*a), candidates),
    }


# The configurations Mac users run, counted on paper (:func:`mac_configurations`): the body in
# MLX's default affine quantization (mlx-lm's ``convert -q``: 4 bits, groups of 64, a bfloat16
# scale and bias per group; norms and other small parameters in bfloat16) with the head in
# each of these formats (bits; None: bfloat16).
MAC_HEADS = {"4-bit head": 4, "bf16 head": None}
MAC_BITS, MAC_GROUP_SIZE, BF16 = 4, 64, 2


def mac_bytes(shape: Sequence[int], bits: Optional[int], group_size: int = MAC_GROUP_SIZE
              ) -> float:
    """Bytes of a parameter of logical ``shape`` quantized with ``bits`` (a bfloat16 scale and
    bias per ``group_size`` values of the last axis), or in bfloat16 (``bits`` None, or a last
    axis that is not a multiple of ``group_size``)."""
    size = math.prod(shape)
    if bits is None or shape[-1] % group_size:
        return BF16 * size
    return size * bits / 8 + 2 * BF16 * size / group_size


def own_parameters(module: nn.Module) -> Dict[str, tuple]:
    """The logical shape of each array ``module`` holds itself (not its children's), by name: a
    quantized weight's unpacked shape, its scales and biases left out."""
    shapes = {name: tuple(a.shape) for name, a in module.items() if isinstance(a, mx.array)}
    if "scales" in module:
        shapes.pop("scales"), shapes.pop("biases", None)
        shapes["weight"] = (*shapes["weight"][:-1], shapes["weight"][-1] * 32 // module.bits)
    return shapes


def module_mac_bytes(module: nn.Module, bits: Optional[int]) -> float:
    """Bytes of ``module``'s own parameters with its weight quantized with ``bits`` (as mlx-lm
    quantizes the weights of the modules that have ``to_quantized``) and the rest in
    bfloat16."""
    quantizable = hasattr(module, "to_quantized")
    return sum(mac_bytes(shape, bits if quantizable and name == "weight" else None)
               for name, shape in own_parameters(module).items())


def mac_bytes_per_token(dense: nn.Module, head: FlashHead, head_bits: Optional[int]) -> dict:
    """Bytes of weights one decode step at B = 1 reads with the dense head (``dense``, a model
    with its dense head) and with FlashHead (``head``), as :func:`bytes_per_token` counts them,
    for the body as 4-bit (:data:`MAC_HEADS`) and the head quantized with ``head_bits`` (None:
    bfloat16): every body parameter once, one row of each embedding table; FlashHead's head the
    packed centroids (their stored bits and group size, bfloat16 scales and biases), the cluster
    biases (bfloat16), the probed clusters' rows at the head's precision and their token ids
    (int32). Counted from the parameters' shapes; nothing is quantized."""
    module, tables = head_module(dense), embedding_tables(dense)
    body = sum(module_mac_bytes(m, MAC_BITS) for _, m in dense.named_modules()
               if m is not module and all(m is not t for t in tables))
    d = own_parameters(module)["weight"][-1]
    row = mac_bytes((1, d), head_bits)
    lookups = sum(row if t is module else mac_bytes((1, d), MAC_BITS) for t in tables)
    vocab_size = own_parameters(module)["weight"][0]
    n_clusters = head.n_clusters
    centroids = mac_bytes((n_clusters, d), head.centroid_bits, head.centroid_group_size)
    probed = head.n_probes * head.cluster_size * (row + head.order.itemsize)
    dense_bytes = body + lookups + vocab_size * row
    flash_bytes = body + lookups + centroids + BF16 * n_clusters + probed
    return {
        "bytes_per_token_dense": round(dense_bytes),
        "bytes_per_token_flash": round(flash_bytes),
        "bandwidth_bound_speedup": dense_bytes / flash_bytes,
    }


def mac_configurations(dense: nn.Module, head: FlashHead) -> Dict[str, dict]:
    """:func:`mac_bytes_per_token` for each head format of :data:`MAC_HEADS`, by its name."""
    return {name: mac_bytes_per_token(dense, head, bits) for name, bits in MAC_HEADS.items()}


def stage1_calls(centroids, scales, biases, cluster_bias, group_size: int, bits,
                 inputs: List[mx.array]) -> Dict[str, tuple]:
    """Stage 1 (:func:`~flashhead_mlx.kernels.cluster_scores`) in each centroid format, as
    :func:`alternate` takes them: ``"{bits}-bit"``, the packed centroids (MLX's quantized
    matmul; what a FlashHead keeps on a GPU), ``"float32"`` (a plain matmul over centroids
    dequantized once; what it keeps on the CPU) and ``"dequantized per call"``; only
    ``"float32"`` for float centroids (``bits`` None). The arguments are
    :func:`~flashhead_mlx.kernels.centroid_topk`'s."""
    f32 = float32_centroids(centroids, scales, biases, group_size, bits)
    mx.eval(f32)
    calls = {"float32": (lambda h: cluster_scores(h, f32, None, None, cluster_bias, 0, None),
                         inputs)}
    if bits is not None:
        packed = (centroids, scales, biases)

        def per_call(h: mx.array) -> mx.array:
            rows = float32_centroids(*packed, group_size, bits)
            return cluster_scores(h, rows, None, None, cluster_bias, 0, None)

        calls = {
            f"{bits}-bit": (lambda h: cluster_scores(h, *packed, cluster_bias, group_size, bits),
                            inputs),
            **calls,
            "dequantized per call": (per_call, inputs),
        }
    return calls


def stage1_times(dense: nn.Module, head: FlashHead, tokenizer, runs: int) -> Dict[str, dict]:
    """Per batch size of :data:`~flashhead_mlx.speed.BATCH_SIZES`: stage 1's ms in each centroid
    format (:func:`stage1_calls`, from the head's stored centroids) over
    :data:`N_BATCH_INPUTS` hidden states, alternated."""
    arrays = (head.centroids, head.get("centroid_scales"), head.get("centroid_biases"),
              head.cluster_bias, head.centroid_group_size, head.centroid_bits)
    return {
        str(b): alternate(stage1_calls(*arrays, hidden_inputs(dense, tokenizer, b,
                                                              N_BATCH_INPUTS)), runs)
        for b in BATCH_SIZES
    }


def head_latency(dense, flash, tokenizer, runs: int) -> Dict[int, dict]:
    """Per batch size: the dense and FlashHead decode steps' ms and FlashHead's stages' ms."""
    result = {}
    for batch_size in BATCH_SIZES:
        inputs = hidden_inputs(dense, tokenizer, batch_size)
        steps = {"dense": (decode_step(dense), inputs), "flash": (decode_step(flash), inputs)}
        result[batch_size] = {
            **alternate(steps, runs),
            "stages": alternate(stage_calls(flash_head(flash), inputs), runs),
        }
    return result


def path_step(model: nn.Module, path: str) -> Callable[[mx.array], mx.array]:
    """The FlashHead model's decode step (:func:`decode_step`) with stage 2 on batch ``path``."""
    step, head = decode_step(model), flash_head(model)

    def run(h: mx.array) -> mx.array:
        head.batch_path = path
        try:
            return step(h)
        finally:
            head.batch_path = None

    return run


def kernels_ran(step: Callable[[mx.array], mx.array], h: mx.array) -> Dict[str, str]:
    """What the FlashHead decode step ``step`` ran on the hidden states ``h`` (after a first call,
    in which the kernels' first-use self-test decides for the shape): the implementation of each
    stage that ran (``"metal"`` or ``"mlx"``) and the batch path
    (:func:`flashhead_mlx.kernels.recording`)."""
    mx.eval(step(h))
    with recording() as ran:
        mx.eval(step(h))
    return ran


def kernels_label(ran: Dict[str, str]) -> str:
    """:func:`kernels_ran`'s stages in words: ``"centroid_topk mlx, cluster_argmax metal"``, or
    ``"none (the dense head)"`` where the step took the dense switch."""
    return ", ".join(f"{stage} {ran[stage]}" for stage in STAGES if stage in ran) or (
        "none (the dense head)"
    )


def batch_speeds(dense, flash, tokenizer, batch_sizes: Sequence[int], runs: int) -> dict:
    """Per batch size B: head tokens/s (B rows per decode step) of the dense head (``dense_head``),
    of FlashHead's decode step on each batch path (``rows``, ``union``, and ``dense``: the dense
    switch) and on the one it chooses (``chosen``), alternated; the path the chosen step ran
    (``chosen_path``) and its stages' implementations (``kernels``, :func:`kernels_ran`); the
    padded union's share of the clusters (``union_share``) and the rows' probes per cluster
    (``probes_per_cluster``, what :data:`~flashhead_mlx.kernels.cluster_argmax.DENSE_PROBE_RATIO`
    is compared with)."""
    head = flash_head(flash)
    result = {}
    for batch_size in batch_sizes:
        inputs = hidden_inputs(dense, tokenizer, batch_size, N_BATCH_INPUTS)
        calls = {"dense_head": (decode_step(dense), inputs), "chosen": (decode_step(flash), inputs)}
        calls.update({path: (path_step(flash, path), inputs) for path in BATCH_PATHS})
        ms = alternate(calls, runs)
        ran = kernels_ran(decode_step(flash), inputs[0])
        probes = batch_size * head.n_probes
        result[str(batch_size)] = {
            **{name: 1000 * batch_size / t for name, t in ms.items()},
            "chosen_path": ran["batch_path"],
            "kernels": {stage: ran[stage] for stage in STAGES if stage in ran},
            "union_share": min(probes, head.n_clusters) / head.n_clusters,
            "probes_per_cluster": probes / head.n_clusters,
        }
    return result


def batch_prompts(tokenizer, batch_size: int, prompt_tokens: int) -> List[List[int]]:
    """``batch_size`` different prompts of ``prompt_tokens`` tokens: consecutive pieces of the
    built-in text."""
    tokens = tokenizer.encode(TUNING_TEXT.read_text())
    return [tokens[i * prompt_tokens : (i + 1) * prompt_tokens] for i in range(batch_size)]


def batch_generation_run(model: nn.Module, prompts: List[List[int]], max_tokens: int,
                         temperature: float = 0.0) -> Tuple[float, Dict[str, int]]:
    """One run of :class:`flashhead_mlx.BatchGenerator` (what ``batch_generate`` runs) on
    ``prompts``, ``max_tokens`` tokens each (no stop tokens, so every row decodes them all),
    greedy or sampling at ``temperature`` (mlx-lm's ``make_sampler``):
    decode tokens/s of all rows (mlx-lm's ``generation_tps``) and how many of its decode steps
    after the first took each batch path (:func:`flashhead_mlx.kernels.recording`; the first
    call also runs the prompts)."""
    generator = BatchGenerator(model, max_tokens=max_tokens, sampler=make_sampler(temperature))
    generator.insert(prompts, [max_tokens] * len(prompts))
    paths, steps = Counter(), 0
    with generator.stats() as stats:
        while True:
            with recording() as ran:
                responses = generator.next_generated()
            if not responses:
                break
            if steps and "batch_path" in ran:
                paths[ran["batch_path"]] += 1
            steps += 1
    generator.close()
    return stats.generation_tps, dict(paths)


def batch_generation_speeds(dense, flash, tokenizer, batch_sizes: Sequence[int],
                            prompt_tokens: int, max_tokens: int, runs: int,
                            temperature: float = 0.0) -> dict:
    """Per batch size B: batch generation (:func:`batch_generation_run`, at ``temperature``) of
    B prompts of the built-in text, dense and FlashHead alternated after a warm-up run each:
    median decode tokens/s of all rows (``dense_tok_s``, ``flash_tok_s``), their ratio
    (``speedup``) and the batch paths of FlashHead's decode steps over its timed runs
    (``flash_paths``)."""
    result = {}
    for batch_size in batch_sizes:
        prompts = batch_prompts(tokenizer, batch_size, prompt_tokens)
        runs_of = {name: lambda m=model: batch_generation_run(m, prompts, max_tokens, temperature)
                   for name, model in (("dense", dense), ("flash", flash))}
        results = alternated_runs(runs_of, runs)
        tok_s = {name: statistics.median(t for t, _ in r) for name, r in results.items()}
        paths = sum((Counter(p) for _, p in results["flash"]), Counter())
        result[str(batch_size)] = {
            "dense_tok_s": tok_s["dense"],
            "flash_tok_s": tok_s["flash"],
            "speedup": tok_s["flash"] / tok_s["dense"],
            "flash_paths": dict(paths),
        }
    return result


def break_even(speeds: dict) -> dict:
    """The first batch size of :func:`batch_speeds` at which FlashHead's dense switch (the dense
    head) is at least as fast as the union (``None``: none measured), the padded union's share
    of the clusters and the rows' probes per cluster there; and the first at which the chosen
    path is dense."""
    dense_wins = [b for b, r in speeds.items() if r["dense"] >= r["union"]]
    chosen = [b for b, r in speeds.items() if r["chosen_path"] == "dense"]
    first = speeds[dense_wins[0]] if dense_wins else {}
    return {
        "batch_size": int(dense_wins[0]) if dense_wins else None,
        "union_share": first.get("union_share"),
        "probes_per_cluster": first.get("probes_per_cluster"),
        "chosen_dense_from": int(chosen[0]) if chosen else None,
    }


def verified_speeds(speed: dict, blocks: Sequence[Blocks]) -> Dict[str, dict]:
    """Per K of ``blocks`` (by :func:`~flashhead_mlx.verified.block_label`: ``"8"``, ``"4-32"``):
    verified decode tokens/s, its speedup over dense, the share of FlashHead's decode gain it
    keeps and its rollbacks per 1000 tokens."""
    dense, flash = speed["dense"]["decode_tok_s"], speed["flash"]["decode_tok_s"]
    result = {}
    for block in blocks:
        verified = speed[f"verified K={block_label(block)}"]
        tok_s = verified["decode_tok_s"]
        result[block_label(block)] = {
            "decode_tok_s": tok_s,
            "speedup": tok_s / dense,
            "share_of_flash_gain": (tok_s - dense) / (flash - dense) if flash != dense else None,
            "rollbacks_per_1000_tokens": verified["rollbacks_per_1000_tokens"],
        }
    return result


def free_logits(h: mx.array, vocab_size: int) -> mx.array:
    """Zero logits ``[..., V]`` that depend on ``h`` (``0 * sum(h)``): evaluating them evaluates
    the body, and costs only their write and one pass over ``h``."""
    return mx.zeros((*h.shape[:-1], vocab_size), h.dtype) + 0 * h.sum(axis=-1, keepdims=True)


class FreeHead(nn.Module):
    """The free-head baseline's ``lm_head``: :func:`free_logits`."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def __call__(self, h: mx.array) -> mx.array:
        return free_logits(h, self.vocab_size)


class FreeEmbedding(nn.Module):
    """The free-head baseline's tied ``embed_tokens``: the embedding's lookup, and
    :func:`free_logits` as ``as_linear``."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.embedding(tokens)

    def as_linear(self, h: mx.array) -> mx.array:
        return free_logits(h, self.embedding.weight.shape[0])


def free_head(model: nn.Module) -> nn.Module:
    """Replace the dense head of ``model`` by the free head (:func:`free_logits`), in place, and
    return it: the baseline a head replacement can at best reach."""
    module, probe = head_module(model), probe_head(model)
    free = FreeEmbedding(module) if probe.tied else FreeHead(module.weight.shape[0])
    set_module(model, probe.path, free)
    return model


def started_generation(model: nn.Module, prompt: List[int], max_tokens: int
                       ) -> Tuple[Iterator, Dict[str, float]]:
    """A greedy ``generate_step`` of ``max_tokens`` tokens (no stop at EOS) after its first
    token, and the ms of its prefill (every prompt token but the last, until the cache is
    evaluated) and of its first step (the last prompt token through the body, the head and the
    sampler)."""
    marks = []
    generator = generate_step(
        mx.array(prompt),
        model,
        max_tokens=max_tokens,
        prompt_progress_callback=lambda done, total: marks.append(time.perf_counter()),
    )
    next(generator)
    # marks: the start, after each prefill chunk (none for a 1-token prompt), the first token.
    prefill_end = marks[-2] if len(marks) > 2 else marks[0]
    return generator, {"prefill_ms": 1000 * (prefill_end - marks[0]),
                       "first_step_ms": 1000 * (marks[-1] - prefill_end)}


def decode_turn(generator: Iterator, steps: int,
                clock: Callable[[], float] = time.perf_counter) -> List[float]:
    """The ms of ``steps`` decode steps of a started ``generate_step``: the intervals between its
    next ``steps + 2`` tokens (by ``clock``, seconds) but the first. The first interval is left
    out: the turn's first token was evaluated before the turn
    (:func:`~flashhead_mlx.timing.settle`), so its interval does not overlap the next step's
    graph building with the step before, as the others do."""
    marks = []
    for _ in range(steps + 2):
        next(generator)
        marks.append(clock())
    return [1000 * (b - a) for a, b in zip(marks[1:], marks[2:])]


def step_times(models: Dict[str, nn.Module], prompt: List[int], steps: int, runs: int) -> dict:
    """Per ``name -> model``: the median ms of the prefill, the first step
    (:func:`started_generation`) and a decode step, the models' greedy ``generate_step`` runs
    interleaved.

    Each run (after one warm-up run) starts every model's generation on ``prompt``, one after
    the other, then takes ``steps`` decode steps of each in turns of :data:`DECODE_TURN`
    (:func:`decode_turn`): a round gives each model a turn, at the same context length, the
    order reversed every other round, every turn started once the one before has ended
    (:func:`~flashhead_mlx.timing.settle`). So the machine's slow drift (the same model's
    decode step moves by +-8% between runs minutes apart on a shared 2-core CPU) falls on the
    three alike. ``decode_ms`` is the median of the turns' medians, ``decode_turns_ms`` each
    turn's median, the same index a round for every model."""
    names = list(models)
    starts = {name: [] for name in names}
    turns = {name: [] for name in names}
    rounds = -(-steps // DECODE_TURN)
    for run in range(runs + 1):
        generators = {}
        for name in turn_order(names, run):
            settle()
            generators[name], start = started_generation(
                models[name], prompt, 1 + steps + 2 * rounds)
            if run:
                starts[name].append(start)
        for round_ in range(rounds):
            count = min(DECODE_TURN, steps - round_ * DECODE_TURN)
            for name in turn_order(names, round_):
                settle()
                turn = decode_turn(generators[name], count)
                if run:
                    turns[name].append(statistics.median(turn))
        for generator in generators.values():
            generator.close()
        settle()
    return {
        name: {**{key: statistics.median(s[key] for s in starts[name])
                  for key in ("prefill_ms", "first_step_ms")},
               "decode_ms": statistics.median(turns[name]),
               "decode_turns_ms": turns[name]}
        for name in names
    }


def head_time_share(dense, flash, free):
    """The share of the dense head's time per decode step that FlashHead removes,
    ``(dense - flash) / (dense - free)``, from decode-step times (floats or arrays)."""
    return (dense - flash) / (dense - free)


def share_interval(decode_turns: Dict[str, List[float]], resamples: int = 2000,
                   seed: int = 0) -> Optional[List[float]]:
    """A 95% bootstrap interval of :func:`head_time_share` of the medians of
    :func:`step_times`' turns: the rounds resampled with replacement, a round's ``dense``,
    ``flash`` and ``free`` turns drawn together (they share the machine's state); ``None``
    where the dense head costs nothing more than the free one in most resamples."""
    times = np.array([decode_turns[name] for name in ("dense", "flash", "free")])  # [3, rounds]
    picks = np.random.default_rng(seed).integers(0, times.shape[1], (resamples, times.shape[1]))
    dense, flash, free = np.median(times[:, picks], axis=-1)  # [resamples] each
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = head_time_share(dense, flash, free)[dense > free]
    if 2 * shares.size < resamples:
        return None
    return [float(x) for x in np.percentile(shares, [2.5, 97.5])]


def free_head_baseline(
    steps: dict, head_ms: Dict[str, float], heads_read: Dict[str, float]
) -> dict:
    """Bench's free-head keys from :func:`step_times` of ``dense``, ``flash`` and ``free``, the
    heads' ms alone at B = 1 and the bytes each head reads per step (``dense``, ``flash``)."""
    decode = {name: times["decode_ms"] for name, times in steps.items()}
    dense_head = decode["dense"] - decode["free"]
    return {
        "step_ms": steps,
        "head_in_step_dense_ms": dense_head,
        "head_in_step_flash_ms": decode["flash"] - decode["free"],
        "share_of_head_time_removed": (
            head_time_share(decode["dense"], decode["flash"], decode["free"])
            if dense_head > 0 else None
        ),
        "share_of_head_time_removed_95": share_interval(
            {name: times["decode_turns_ms"] for name, times in steps.items()}),
        "head_bytes_read_dense": round(heads_read["dense"]),
        "head_bytes_read_flash": round(heads_read["flash"]),
        "head_dense_gb_s": heads_read["dense"] / head_ms["dense"] / 1e6,
        "head_flash_gb_s": heads_read["flash"] / head_ms["flash"] / 1e6,
        "prefill_flash_vs_dense": steps["flash"]["prefill_ms"] / steps["dense"]["prefill_ms"],
        "first_step_flash_vs_dense": (
            steps["flash"]["first_step_ms"] / steps["dense"]["first_step_ms"]
        ),
    }


def bench(
    model: str,
    prompt_tokens: int = 32,
    gen_tokens: int = 128,
    runs: int = 5,
    verify_blocks: Sequence[Blocks] = (),
    batch_sizes: Sequence[int] = (),
    batch_gen_tokens: int = BATCH_GEN_TOKENS,
    n_probes: Optional[int] = None,
    batch_temp: float = 0.0,
) -> dict:
    """Benchmark the FlashHead folder ``model`` (with ``n_probes`` probes, default the folder's)
    against its dense head (and verified decoding at each K of ``verify_blocks``, the batch paths
    and batch generation of ``batch_gen_tokens`` tokens a row, at temperature ``batch_temp``, at
    each of ``batch_sizes``): the JSON object ``bench --json`` writes."""
    dense, tokenizer = load(model, flashhead=False)
    flash, _ = load(model, n_probes=n_probes)
    if not is_patched(flash):
        raise ValueError(f"{model} has no FlashHead (convert it with `flashhead-mlx convert`)")
    latency = head_latency(dense, flash, tokenizer, runs)
    stage1 = stage1_times(dense, flash_head(flash), tokenizer, runs)
    batches = batch_speeds(dense, flash, tokenizer, batch_sizes, runs)
    generation = batch_generation_speeds(dense, flash, tokenizer, batch_sizes, prompt_tokens,
                                         batch_gen_tokens, runs, batch_temp)
    ran = {str(b): kernels_ran(decode_step(flash), hidden_inputs(dense, tokenizer, b, 1)[0])
           for b in BATCH_SIZES}
    prompt = tokenizer.encode(TUNING_TEXT.read_text())[:prompt_tokens]
    models = {"dense": (dense, 0), "flash": (flash, 0)}
    models.update({f"verified K={block_label(block)}": (flash, block) for block in verify_blocks})
    speed = decode_speed(models, tokenizer, prompt, gen_tokens, runs)
    free, _ = load(model, flashhead=False)
    steps = step_times(
        {"dense": dense, "flash": flash, "free": free_head(free)}, prompt, gen_tokens, runs
    )
    heads_read = {"dense": head_bytes_read(dense), "flash": head_bytes_read(flash)}
    read = {name: bytes_per_token(m) for name, m in (("dense", dense), ("flash", flash))}
    ceiling = read["dense"] / read["flash"]
    decode_speedup = speed["flash"]["decode_tok_s"] / speed["dense"]["decode_tok_s"]
    return {
        "model": model,
        "head": describe_head(flash),
        "head_dense_ms": latency[1]["dense"],
        "head_flash_ms": latency[1]["flash"],
        "head_speedup": latency[1]["dense"] / latency[1]["flash"],
        "decode_dense_tok_s": speed["dense"]["decode_tok_s"],
        "decode_flash_tok_s": speed["flash"]["decode_tok_s"],
        "decode_speedup": decode_speedup,
        "bytes_per_token_dense": round(read["dense"]),
        "bytes_per_token_flash": round(read["flash"]),
        "ceiling_speedup": ceiling,
        "share_of_ceiling": (decode_speedup - 1) / (ceiling - 1) if ceiling > 1 else None,
        "resident_dense_bytes": parameter_bytes(dense),
        "resident_flash_bytes": parameter_bytes(flash),
        "mac_configurations": mac_configurations(dense, flash_head(flash)),
        "device": device_description(),
        "kernels": kernels_label(ran["1"]),
        "kernels_ran": ran,
        "head_by_batch_size": {str(b): latency[b] for b in BATCH_SIZES},
        "stage1_format": flash_head(flash).stage1_format,
        "stage1_ms_by_format": stage1,
        "prompt_dense_tok_s": speed["dense"]["prompt_tok_s"],
        "prompt_flash_tok_s": speed["flash"]["prompt_tok_s"],
        "end_to_end": speed,
        "verified": verified_speeds(speed, verify_blocks),
        **free_head_baseline(steps, latency[1], heads_read),
        "batches": batches,
        "batch_break_even": break_even(batches) if batches else None,
        "batch_generation": generation,
        "batch_gen_tokens": batch_gen_tokens,
        "batch_temp": batch_temp,
        "prompt_tokens": len(prompt),
        "gen_tokens": gen_tokens,
        "runs": runs,
    }


def side_by_side(label: str, dense: float, flash: float, digits: int, ratio: float) -> list:
    """A table row: ``label``, the dense and FlashHead values and their ratio."""
    return [label, f"{dense:.{digits}f}", f"{flash:.{digits}f}", f"{ratio:.2f}x"]


def format_result(result: dict) -> str:
    """The human tables of :func:`bench`'s result."""
    by_batch = result["head_by_batch_size"]
    head = table(
        ["head per decode step", "dense ms", "FlashHead ms", "speedup"],
        [
            side_by_side(f"B = {b}", r["dense"], r["flash"], 3, r["dense"] / r["flash"])
            for b, r in by_batch.items()
        ],
    )
    stages = table(
        ["FlashHead stage (ms)", *(f"B = {b}" for b in by_batch)],
        [
            [stage, *(f"{r['stages'][stage]:.3f}" for r in by_batch.values())]
            for stage in next(iter(by_batch.values()))["stages"]
        ],
    )
    e2e = result["end_to_end"]
    speed = table(
        ["end to end (stream_generate)", "dense", "FlashHead", "speedup"],
        [
            side_by_side(
                f"{label} tok/s",
                e2e["dense"][key],
                e2e["flash"][key],
                1,
                e2e["flash"][key] / e2e["dense"][key],
            )
            for label, key in (("decode", "decode_tok_s"), ("prompt", "prompt_tok_s"))
        ],
    )
    mib = 2**20
    resident = result["resident_dense_bytes"], result["resident_flash_bytes"]
    read = result["bytes_per_token_dense"], result["bytes_per_token_flash"]
    memory = table(
        ["memory (MiB)", "dense", "FlashHead", "dense / FlashHead"],
        [
            side_by_side(
                "resident", resident[0] / mib, resident[1] / mib, 1, resident[0] / resident[1]
            ),
            side_by_side(
                "weights read per token", read[0] / mib, read[1] / mib, 1, read[0] / read[1]
            ),
        ],
    )
    verified = result["verified"]
    rows = [
        ["dense", f"{e2e['dense']['decode_tok_s']:.1f}", "1.00x", "", ""],
        [
            "FlashHead",
            f"{e2e['flash']['decode_tok_s']:.1f}",
            f"{result['decode_speedup']:.2f}x",
            "100%",
            "",
        ],
    ] + [
        [
            f"verified K={block}",
            f"{v['decode_tok_s']:.1f}",
            f"{v['speedup']:.2f}x",
            "n/a" if v["share_of_flash_gain"] is None else f"{100 * v['share_of_flash_gain']:.0f}%",
            f"{v['rollbacks_per_1000_tokens']:.1f}",
        ]
        for block, v in verified.items()
    ]
    header = ["verified greedy", "decode tok/s", "vs dense", "of FlashHead's gain",
              "rollbacks per 1000 tokens"]
    verified_table = [table(header, rows)] if verified else []
    batches = result["batches"]
    batch_rows = [
        [
            f"B = {b}",
            *(f"{r[name]:.0f}" for name in ("dense_head", "rows", "union", "dense", "chosen")),
            r["chosen_path"],
            f"{r['chosen'] / r['dense_head']:.2f}x",
            f"{100 * r['union_share']:.0f}%",
            kernels_label(r["kernels"]),
        ]
        for b, r in batches.items()
    ]
    header = ["head tok/s (B rows per step)", "dense head", "FlashHead per-row", "union",
              "dense switch", "chosen", "chosen path", "chosen / dense head",
              "padded union of clusters", "kernels ran (chosen)"]
    batch_table = [table(header, batch_rows) + "\n\n" + break_even_line(result) + "\n\n"
                   + format_batch_generation(result)] if batches else []
    share = result["share_of_ceiling"]
    summary = (
        f"Measured decode speedup {result['decode_speedup']:.2f}x = "
        + ("n/a" if share is None else f"{100 * share:.0f}%")
        + " of the gain a bandwidth-bound decode could reach (the ratio of weights read, "
        f"{result['ceiling_speedup']:.2f}x); tokens generated: dense {e2e['dense']['tokens']:g}, "
        f"FlashHead {e2e['flash']['tokens']:g}; medians of {result['runs']} alternated runs."
    )
    return "\n\n".join(
        [head, stages, format_stage1(result), *batch_table, speed, *verified_table, memory,
         format_mac(result), summary, format_free_head(result)]
    )


def format_stage1(result: dict) -> str:
    """The table of stage 1's ms per centroid format (:func:`stage1_times`) and the format the
    head uses."""
    by_batch = result["stage1_ms_by_format"]
    formats = next(iter(by_batch.values()))
    rows = [[name, *(f"{ms[name]:.3f}" for ms in by_batch.values())] for name in formats]
    return (table(["stage 1 per centroid format (ms)", *(f"B = {b}" for b in by_batch)], rows)
            + f"\n\nFlashHead's stage 1 here multiplies {result['stage1_format']} centroids.")


def format_mac(result: dict) -> str:
    """The bytes per decode token of the Mac configurations (:func:`mac_configurations`) beside
    the measured model's."""
    rows = [["this model (as measured)", f"{result['bytes_per_token_dense'] / 1e6:.1f}",
             f"{result['bytes_per_token_flash'] / 1e6:.1f}", f"{result['ceiling_speedup']:.2f}x"]]
    rows += [[f"4-bit body, {name}", f"{c['bytes_per_token_dense'] / 1e6:.1f}",
              f"{c['bytes_per_token_flash'] / 1e6:.1f}", f"{c['bandwidth_bound_speedup']:.2f}x"]
             for name, c in result["mac_configurations"].items()]
    header = ["weights read per decode token (MB)", "dense", "FlashHead",
              "bandwidth-bound speedup"]
    return table(header, rows) + ("\n\nThe 4-bit rows are counted on paper from the parameters' "
                                  "shapes (MLX's affine 4-bit, groups of 64, bf16 scales).")


def format_free_head(result: dict) -> str:
    """The free-head baseline's table (:func:`step_times`) and its summary."""
    steps = result["step_ms"]
    rows = [
        [
            label,
            f"{steps[name]['prefill_ms']:.1f}",
            f"{steps[name]['first_step_ms']:.1f}",
            f"{steps[name]['decode_ms']:.2f}",
        ]
        for name, label in (("dense", "dense"), ("flash", "FlashHead"), ("free", "free head"))
    ]
    header = ["generate_step (ms)", f"prefill ({result['prompt_tokens'] - 1} tokens)",
              "first step", "decode step"]
    share = result["share_of_head_time_removed"]
    interval = result.get("share_of_head_time_removed_95")  # absent from JSON before 2026-12-03
    turns = steps["dense"].get("decode_turns_ms")  # absent from JSON before 2026-12-03
    summary = (
        ("" if turns is None else
         f"Decode steps: the three heads interleaved in turns of {DECODE_TURN} steps "
         f"(turns per head: {len(turns)}). ")
        + "FlashHead removes "
        + ("n/a" if share is None else f"{100 * share:.0f}%")
        + ("" if interval is None else
           f" (95% interval over the rounds: {100 * interval[0]:.0f}-{100 * interval[1]:.0f}%)")
        + " of the head's time per decode token ((dense - FlashHead) / (dense - free head)). "
        f"Head alone at B = 1: dense reads {result['head_bytes_read_dense'] / 1e6:.1f} MB per "
        f"step at {result['head_dense_gb_s']:.1f} GB/s, FlashHead "
        f"{result['head_bytes_read_flash'] / 1e6:.1f} MB at {result['head_flash_gb_s']:.1f} GB/s. "
        f"FlashHead / dense: prefill {result['prefill_flash_vs_dense']:.3f}, first step "
        f"{result['first_step_flash_vs_dense']:.3f}."
    )
    return table(header, rows) + "\n\n" + summary


def format_batch_generation(result: dict) -> str:
    """The end-to-end batch generation table of :func:`bench`'s result."""
    rows = [
        [f"B = {b}", f"{r['dense_tok_s']:.1f}", f"{r['flash_tok_s']:.1f}", f"{r['speedup']:.2f}x",
         ", ".join(f"{path} {n}" for path, n in r["flash_paths"].items()) or "none recorded"]
        for b, r in result["batch_generation"].items()
    ]
    temp = result.get("batch_temp", 0.0)
    mode = f"temperature {temp:g}" if temp > 0 else "greedy"
    header = [f"batch generation, {mode}, {result['batch_gen_tokens']} tokens a row",
              "dense tok/s", "FlashHead tok/s", "FlashHead / dense", "FlashHead's decode steps"]
    return table(header, rows)


def break_even_line(result: dict) -> str:
    """The batch break-even of :func:`bench`'s result in words."""
    even = result["batch_break_even"]
    if even["batch_size"] is None:
        measured = "the union was faster than the dense switch at every B measured"
    else:
        measured = (
            f"the dense switch is at least as fast as the union from B = {even['batch_size']} "
            f"({even['probes_per_cluster']:.2f} probes per cluster, padded union "
            f"{100 * even['union_share']:.0f}% of the clusters)"
        )
    chosen = even["chosen_dense_from"]
    return (
        f"Break-even: {measured}; FlashHead chooses the dense switch "
        + ("at no B measured" if chosen is None else f"from B = {chosen}")
        + f" (DENSE_PROBE_RATIO = {DENSE_PROBE_RATIO:g}); medians of {result['runs']} "
        f"alternated runs over {N_BATCH_INPUTS} inputs."
    )


def plot(result: dict, path: str, title: str) -> None:
    """Bars: head latency per decode step and decode tokens/s, dense vs FlashHead."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    by_batch = result["head_by_batch_size"]
    x = range(len(by_batch))
    for offset, (name, label) in zip((-0.2, 0.2), (("dense", "dense"), ("flash", "FlashHead"))):
        left.bar([i + offset for i in x], [r[name] for r in by_batch.values()], 0.4, label=label)
    left.set_xticks(list(x), [f"B = {b}" for b in by_batch])
    left.set_ylabel("head, ms per decode step")
    left.legend(loc="upper left")
    speeds = [result["decode_dense_tok_s"], result["decode_flash_tok_s"]]
    right.bar(["dense", "FlashHead"], speeds, 0.5, color=["C0", "C1"])
    right.axhline(
        result["decode_dense_tok_s"] * result["ceiling_speedup"],
        color="grey",
        ls="--",
        label=f"bandwidth-bound ceiling ({result['ceiling_speedup']:.2f}x)",
    )
    right.set_ylabel("decode tokens/s (stream_generate)")
    right.set_ylim(
        top=1.25 * max(*speeds, result["decode_dense_tok_s"] * result["ceiling_speedup"])
    )
    right.legend(loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def blocks(text: str) -> List[int]:
    """``--batch-sizes``: comma-separated positive integers."""
    try:
        values = [int(k) for k in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 4,8,16, got {text!r}")
    return values


def block_list(text: str) -> List[Blocks]:
    """``--verify-blocks``: comma-separated Ks, each fixed (``8``) or adaptive (``4-32``)."""
    return [block_argument(k) for k in text.split(",")]


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashhead-mlx bench",
        description="Time the dense head and the FlashHead side by side in one process.",
    )
    parser.add_argument("--model", required=True, help="A converted FlashHead folder or repo.")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="Prompt length.")
    parser.add_argument("--gen-tokens", type=int, default=128, help="Tokens to generate.")
    parser.add_argument("--runs", type=int, default=5, help="Timed runs of each head.")
    parser.add_argument(
        "--verify-blocks",
        type=block_list,
        default=(),
        metavar="K,K,...",
        help="Also time verified greedy decoding at each K, e.g. 4,8,16,32,4-32 (LOW-HIGH: "
        "adaptive K) (default: none).",
    )
    parser.add_argument(
        "--batch-sizes",
        type=blocks,
        default=(),
        metavar="B,B,...",
        help="Also time the head's batch paths and greedy batch generation at each batch size, "
        "e.g. 1,2,4,8,16,32 (default: none).",
    )
    parser.add_argument(
        "--batch-gen-tokens",
        type=int,
        default=BATCH_GEN_TOKENS,
        help="Tokens each row decodes in the batch generation of --batch-sizes "
        f"(default: {BATCH_GEN_TOKENS}).",
    )
    parser.add_argument(
        "--batch-temp",
        type=float,
        default=0.0,
        help="Sampling temperature of the batch generation of --batch-sizes (default: 0.0, "
        "greedy).",
    )
    parser.add_argument(
        "--n-probes", type=int, default=None, help="Clusters scored exactly per token "
        "(default: the folder's)."
    )
    parser.add_argument("--json", default=None, help="Write the results to this JSON file.")
    parser.add_argument("--plot", default=None, help="Draw the comparison to this PNG.")
    return parser


def main() -> None:
    parser = setup_arg_parser()
    args = parser.parse_args()
    if min(args.prompt_tokens, args.gen_tokens, args.runs, args.batch_gen_tokens) < 1:
        parser.error("--prompt-tokens, --gen-tokens, --runs and --batch-gen-tokens must be "
                     "positive")
    if args.batch_temp < 0:
        parser.error(f"--batch-temp must be 0 (greedy) or positive, got {args.batch_temp}")
    try:
        if args.plot:
            pyplot()  # fail now, not after the measurements
        result = bench(
            args.model, args.prompt_tokens, args.gen_tokens, args.runs, args.verify_blocks,
            args.batch_sizes, args.batch_gen_tokens, args.n_probes, args.batch_temp,
        )
    except ValueError as error:
        raise SystemExit(f"flashhead-mlx bench: error: {error}")
    print(f"{result['model']}: {result['head']}")
    ran = "; ".join(f"B = {b}: {kernels_label(r)}" for b, r in result["kernels_ran"].items())
    print(f"Device: {result['device']}; kernels that ran: {ran}\n")
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.json}")
    if args.plot:
        plot(result, args.plot, f"{Path(args.model).name}: {result['head']}")
        print(f"Wrote {args.plot}")


if __name__ == "__main__":
    main()
