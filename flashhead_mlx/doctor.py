"""``flashhead-mlx doctor``: what a report about FlashHead on a machine needs, in one run.

- the machine: chip or CPU, memory, OS, Python, MLX and mlx-lm versions, the BLAS on Linux;
- the kernels' self-test (:mod:`flashhead_mlx.kernels.selftest`), run afresh on the head at
  B = 1 and B = 4 for each stage: whether the kernels compiled (the error if not), whether they
  agree with the pure-MLX path, their time against it, and the path that implies. Without Metal
  the kernels run in the CPU emulator (:mod:`flashhead_mlx.testing.metal_emulator`): their
  correctness only, marked ``emulated: correctness only, no speed``;
- the head's time per decode step at B = 1 and B = 4: the dense head, FlashHead on the MLX path,
  and FlashHead on the kernels (with Metal);
- with ``--model``: decode tokens/s of greedy generation, dense vs FlashHead on the path the
  self-test chooses (bench's timing, :func:`flashhead_mlx.bench.decode_speed`).

The head is the model's, or without ``--model`` a synthetic one of SmolLM2-135M's shape
(:func:`synthetic_head`).
"""

import argparse
import contextlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from .assets import make_assets
from .bench import BATCH_SIZES, decode_speed, decode_step, hidden_inputs
from .blas import blas_name
from .calibration import TUNING_TEXT
from .decode import decoding
from .head import FlashHead
from .kernels import forced_path, kernel_path, row_logits
from .kernels.selftest import (
    RUNS,
    centroid_topk_case,
    cluster_argmax_case,
    os_version,
    random_rows,
    self_test,
)
from .loading import load
from .patch import describe_head, flash_head, is_patched
from .report import device_description, table
from .timing import alternate

EMULATED = "emulated: correctness only, no speed"
# The synthetic head: SmolLM2-135M's vocabulary and hidden size, clusters of 16, n_probes as
# tuned for SmolLM2; 4-bit rows with Metal, float32 without (synthetic_head).
SYNTHETIC = {"vocab_size": 49152, "hidden_size": 576, "cluster_size": 16, "n_probes": 286}
# Decode-step inputs per timed run, prompt and generated tokens of the decode speed.
N_INPUTS = 16
PROMPT_TOKENS = 32
GEN_TOKENS = 64


def machine_facts() -> dict:
    """The chip or CPU, memory, OS and versions, and the BLAS and device MLX computes with."""
    info = mx.device_info()
    memory = info.get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    versions = {}
    for package in ("mlx", "mlx-lm"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "chip": info.get("device_name", platform.processor() or platform.machine()),
        "architecture": info.get("architecture", platform.machine()),
        "memory_gb": round(memory / 2**30, 1),
        "os": os_version(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": versions["mlx-lm"],
        "blas": blas_name(),
        "device": device_description(),
        "metal": mx.metal.is_available(),
    }


def synthetic_head(vocab_size: int, hidden_size: int, cluster_size: int, n_probes: int,
                   quantized: bool, seed: int = 0) -> tuple:
    """A FlashHead over random rows in random clusters, with the dense head's decode step on the
    same rows: ``(head, dense_step)``. ``quantized``: 4-bit rows (group 64, bfloat16 scales, as
    mlx-community's 4-bit models), else float32 (MLX's CPU has no fast 4-bit matmul)."""
    key, order_key = mx.random.split(mx.random.key(seed))
    rows = 0.05 * mx.random.normal((vocab_size, hidden_size), key=key)
    packed = mx.quantize(rows.astype(mx.bfloat16), group_size=64, bits=4) if quantized else None
    if packed is not None:
        rows = mx.dequantize(*packed, group_size=64, bits=4)
    n_clusters = -(-vocab_size // cluster_size)
    order = mx.random.permutation(n_clusters * cluster_size, key=order_key).astype(mx.int32)
    order = mx.where(order < vocab_size, order, -1)
    slots = rows[mx.maximum(order, 0)].reshape(n_clusters, cluster_size, -1)
    real = (order >= 0).reshape(n_clusters, cluster_size, 1)
    centroids = (slots * real).sum(axis=1) / real.sum(axis=1)
    clusters = {"order": order, "centroids": centroids, "cluster_bias": mx.zeros(n_clusters)}
    weight, scales, biases = packed or (rows, None, None)
    quantization = {"group_size": 64, "bits": 4} if quantized else {}
    head = FlashHead(make_assets(clusters, n_probes), weight, scales, biases, **quantization)

    def dense_step(h: mx.array) -> mx.array:
        return row_logits(h, weight, scales, biases, **quantization)

    return head, dense_step


def emulated_kernels():
    """The CPU emulator's context (:func:`~flashhead_mlx.testing.metal_emulator.emulate`)."""
    from .testing.metal_emulator import emulate

    return emulate()


def kernel_results(head: FlashHead, emulated: bool) -> List[dict]:
    """The self-test (:func:`~flashhead_mlx.kernels.selftest.self_test`) of each stage at each
    of :data:`~flashhead_mlx.bench.BATCH_SIZES`, run afresh; emulated: untimed, in the
    emulator."""
    dtype = head.cluster_bias.dtype
    results = []
    with emulated_kernels() if emulated else contextlib.nullcontext():
        for rows in BATCH_SIZES:
            cases = {
                "centroid_topk": centroid_topk_case(rows, dtype, *head.stage1_arguments()),
                "cluster_argmax": cluster_argmax_case(rows, dtype, head.n_probes,
                                                      *head.stage2_arguments()),
            }
            for stage, case in cases.items():
                result = self_test(*case, runs=0 if emulated else RUNS)
                results.append({"stage": stage, "rows": rows, "emulated": emulated, **result})
    return results


def on_path(step: Callable, path: str) -> Callable:
    """``step`` with the kernels on ``path`` ("metal" or "mlx")."""
    def run(h: mx.array) -> mx.array:
        with kernel_path(path):
            return step(h)

    return run


def head_times(dense_step: Callable, flash_step: Callable, inputs: Dict[int, list], runs: int,
               metal: bool) -> Dict[str, dict]:
    """Per batch size, ms per decode step of the dense head, FlashHead on the MLX path and (with
    ``metal``) on the kernels, alternated (:func:`flashhead_mlx.timing.alternate`)."""
    result = {}
    for batch_size, xs in inputs.items():
        calls = {"dense": (dense_step, xs), "mlx": (on_path(flash_step, "mlx"), xs)}
        if metal:
            calls["kernels"] = (on_path(flash_step, "metal"), xs)
        result[str(batch_size)] = {"kernels": None, **alternate(calls, runs)}
    return result


def doctor(model: Optional[str] = None, runs: int = RUNS, gen_tokens: int = GEN_TOKENS) -> dict:
    """The facts ``doctor --json`` writes, for the FlashHead folder ``model`` or, without one,
    the synthetic head."""
    metal = mx.metal.is_available()
    result = {"machine": machine_facts(), "model": model,
              "kernels_forced": forced_path(), "emulated": not metal}
    if model is None:
        head, dense_step = synthetic_head(**SYNTHETIC, quantized=metal)
        flash_step = decode_step_of(head)
        d = SYNTHETIC["hidden_size"]
        dtype = head.cluster_bias.dtype
        inputs = {b: [mx.random.normal((b, 1, d), key=mx.random.key(i)).astype(dtype)
                      for i in range(N_INPUTS)] for b in BATCH_SIZES}
        rows = "4-bit" if metal else "float32"
        result["head"] = f"synthetic, SmolLM2-135M's shape, {rows} rows: {head}"
    else:
        dense, tokenizer = load(model, flashhead=False)
        flash, _ = load(model)
        if not is_patched(flash):
            raise ValueError(f"{model} has no FlashHead (convert it with `flashhead-mlx convert`)")
        head, dense_step, flash_step = flash_head(flash), decode_step(dense), decode_step(flash)
        inputs = {b: hidden_inputs(dense, tokenizer, b, N_INPUTS) for b in BATCH_SIZES}
        result["head"] = describe_head(flash)
    result["kernels"] = kernel_results(head, emulated=not metal)
    result["head_ms"] = head_times(dense_step, flash_step, inputs, runs, metal)
    result["decode"] = None
    if model is not None:
        prompt = tokenizer.encode(TUNING_TEXT.read_text())[:PROMPT_TOKENS]
        speed = decode_speed({"dense": (dense, 0), "flash": (flash, 0)}, tokenizer, prompt,
                             gen_tokens, runs)
        dense_tok_s, flash_tok_s = (speed[n]["decode_tok_s"] for n in ("dense", "flash"))
        result["decode"] = {"dense_tok_s": dense_tok_s, "flash_tok_s": flash_tok_s,
                            "speedup": flash_tok_s / dense_tok_s, "gen_tokens": gen_tokens}
    result["path"] = chosen_paths(result)
    return result


def decode_step_of(head: FlashHead) -> Callable[[mx.array], mx.array]:
    """The FlashHead's greedy decode step (:func:`flashhead_mlx.decoding`)."""
    def step(h: mx.array) -> mx.array:
        with decoding():
            return head(h)

    return step


def chosen_paths(result: dict) -> Dict[str, Dict[str, str]]:
    """Per stage and batch size, the path the head takes: the forced one, ``mlx`` without Metal,
    else the self-test's."""
    paths = {}
    for test in result["kernels"]:
        forced = result["kernels_forced"]
        path = forced or ("mlx (no Metal)" if result["emulated"] else test["path"])
        paths.setdefault(test["stage"], {})[str(test["rows"])] = path
    return paths


def format_result(result: dict) -> str:
    """The human report of :func:`doctor`'s result."""
    m = result["machine"]
    lines = [
        f"Machine: {m['chip']} ({m['architecture']}), {m['memory_gb']} GB, {m['os']}, "
        f"Python {m['python']}",
        f"MLX {m['mlx']}, mlx-lm {m['mlx_lm']}; device: {m['device']}; BLAS: {m['blas']}; "
        f"Metal: {'yes' if m['metal'] else 'no'}",
        f"Head: {result['head']}",
    ]
    if result["kernels_forced"]:
        lines.append(f"FLASHHEAD_KERNELS={result['kernels_forced']} forces the path")
    rows = []
    for t in result["kernels"]:
        timing = EMULATED if t["emulated"] else (
            "n/a" if t["kernel_ms"] is None else f"{t['kernel_ms']:.3f} vs {t['mlx_ms']:.3f}")
        agree = "n/a" if not t["compiled"] else "no" if t["mismatch"] else "yes"
        rows.append([f"{t['stage']}, B = {t['rows']}", "yes" if t["compiled"] else "NO", agree,
                     timing, result["path"][t["stage"]][str(t["rows"])]])
    kernels = table(["kernel self-test", "compiled", "agrees with MLX",
                     "ms kernels vs MLX path", "path taken"], rows)
    problems = [f"- {t['stage']}, B = {t['rows']}: {t['reason']}" for t in result["kernels"]
                if not t["compiled"] or t["mismatch"]]
    head = table(["head per decode step (ms)", "dense", "FlashHead, MLX path",
                  "FlashHead, kernels"],
                 [[f"B = {b}", f"{r['dense']:.3f}", f"{r['mlx']:.3f}",
                   EMULATED if result["emulated"] else f"{r['kernels']:.3f}"]
                  for b, r in result["head_ms"].items()])
    parts = ["\n".join(lines), kernels, *(["\n".join(problems)] if problems else []), head]
    decode = result["decode"]
    if decode:
        parts.append(f"Decode ({decode['gen_tokens']} tokens, greedy): dense "
                     f"{decode['dense_tok_s']:.1f} tok/s, FlashHead {decode['flash_tok_s']:.1f} "
                     f"tok/s ({decode['speedup']:.2f}x)")
    return "\n\n".join(parts)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashhead-mlx doctor",
        description="Report the machine, the kernels' self-test and FlashHead's speed on it "
        "(paste the output in bug and performance reports).",
    )
    parser.add_argument("--model", default=None,
                        help="A converted FlashHead folder or repo (default: a synthetic head of "
                        "SmolLM2-135M's shape, no decode speed).")
    parser.add_argument("--json", default=None, help="Write the same facts to this JSON file.")
    return parser


def main() -> None:
    args = setup_arg_parser().parse_args()
    try:
        result = doctor(args.model, RUNS, GEN_TOKENS)
    except ValueError as error:
        raise SystemExit(f"flashhead-mlx doctor: error: {error}")
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
