"""Dense head vs FlashHead, side by side in one process, for the converted demo models.

For each model (a GGUF file converted to float32 with FlashHead assets under ``--models-dir``,
converted there on first use) it measures:

1. greedy agreement: ``mlx_lm.batch_generate`` continuations of held-out prompts (the first
   tokens of paragraphs of Emma and Persuasion, no chat template), the same batches for both heads;
2. sampling total variation distance to the dense sampler, exact (no Monte Carlo): the FlashHead
   sampler's expected distribution enumerates every non-probed cluster it may draw, with mlx-lm's
   own top-p rule (checked against ``apply_top_p`` and ``sampler_distribution``);
3. speculative decoding acceptance with a 4-bit dense-head draft of the same model;
4. perplexity through ``mlx_lm.perplexity.eval_ppl`` (FlashHead is exact outside decoding);
5. decode tokens/s (``stream_generate``, greedy), median of alternated runs.

    python scripts/decode_table.py --models smollm2 gemma3
"""

import argparse
import json
import os
import re
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm import batch_generate, stream_generate
from mlx_lm.perplexity import eval_ppl
from mlx_lm.sample_utils import make_sampler

from flashhead_mlx import flash_head, load
from flashhead_mlx.speed import decode_speed
from flashhead_mlx.blas import blas_name
from flashhead_mlx.metrics import sampling_distances
from flashhead_mlx.model_head import final_hidden_states
from flashhead_mlx.sampling import sampler_distribution, total_variation
from flashhead_mlx.sampling_distance import (
    enumerated_distribution,
    expected_distribution,
    sampler_draws,
)

ROOT = Path(__file__).resolve().parents[1]
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
GGUF_DIR = Path.home() / ".cache" / "flashhead-mlx" / "gguf"
GGUF_FILES = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}
# (temperature, top_p or None) of the two sampling settings measured.
SAMPLING_SETTINGS = ((0.7, 0.9), (1.0, None))


def model_folder(name: str, models_dir: Path) -> Path:
    """The float32 FlashHead folder of ``name``, converted from its GGUF file when missing."""
    folder = models_dir / f"{name}-flashhead"
    if not (folder / "config.json").is_file():
        from flashhead_mlx.pipeline import convert

        start = time.perf_counter()
        convert(str(GGUF_DIR / GGUF_FILES[name]), str(folder), dtype="float32")
        print(f"converted {name} into {folder} in {time.perf_counter() - start:.0f} s")
    return folder


# --- held-out text ------------------------------------------------------------------------------


def paragraphs(text: str, min_chars: int = 300) -> list:
    """The paragraphs of ``text`` (blank-line separated, lines joined) of at least ``min_chars``."""
    blocks = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    return [block for block in blocks if len(block) >= min_chars]


def held_out_prompts(tokenizer, n_prompts: int, n_tokens: int) -> list:
    """The first ``n_tokens`` tokens of ``n_prompts`` paragraphs, evenly spread over Emma and
    Persuasion (half from each)."""
    prompts = []
    for book, count in (("emma", (n_prompts + 1) // 2), ("persuasion", n_prompts // 2)):
        blocks = paragraphs((AUSTEN / f"{book}.txt").read_text())
        step = len(blocks) / count
        prompts += [tokenizer.encode(blocks[int(i * step)])[:n_tokens] for i in range(count)]
    return prompts


def book_tokens(tokenizer, book: str, n_tokens: int) -> list:
    """The first ``n_tokens`` tokens of a book's text (one BOS at most, where the tokenizer adds
    one)."""
    tokens = tokenizer.encode((AUSTEN / f"{book}.txt").read_text())
    if len(tokens) < n_tokens:
        raise ValueError(f"{book} has only {len(tokens)} tokens, {n_tokens} wanted")
    return tokens[:n_tokens]


def held_out_hidden_states(model, tokenizer, n_positions: int, seq_len: int = 512) -> mx.array:
    """Hidden states ``[n_positions, d]`` the head reads, at positions evenly spread over
    ``seq_len``-token windows of Persuasion (64 positions a window, each with 64+ tokens of
    context)."""
    per_window = 64
    n_windows = -(-n_positions // per_window)
    tokens = mx.array(book_tokens(tokenizer, "persuasion", n_windows * seq_len))
    positions = np.linspace(per_window, seq_len - 1, per_window).astype(np.int32)
    states = []
    for window in tokens.reshape(n_windows, seq_len):
        hidden = final_hidden_states(model, window[None])[0]
        states.append(hidden[mx.array(positions)].astype(mx.float32))
        mx.eval(states[-1])
    return mx.concatenate(states)[:n_positions]


# --- 1. greedy agreement ------------------------------------------------------------------------


def greedy_continuations(model, tokenizer, prompts: list, max_tokens: int, batch_size: int):
    """Greedy continuations (token ids) of ``prompts`` by ``mlx_lm.batch_generate``, in batches
    of ``batch_size``, and the seconds it took."""
    start = time.perf_counter()
    outputs = []
    for i in range(0, len(prompts), batch_size):
        response = batch_generate(
            model,
            tokenizer,
            prompts[i : i + batch_size],
            max_tokens=max_tokens,
            return_token_ids=True,
            completion_batch_size=batch_size,
            prefill_batch_size=batch_size,
        )
        outputs += response.token_ids
    return outputs, time.perf_counter() - start


def common_prefix(a: list, b: list) -> int:
    """The number of leading tokens ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy_agreement(dense, flash, tokenizer, prompts, max_tokens: int, batch_size: int) -> dict:
    """Share of FlashHead continuations identical to the dense ones, and the mean share of each
    continuation generated before the first divergence."""
    dense_out, dense_s = greedy_continuations(dense, tokenizer, prompts, max_tokens, batch_size)
    flash_out, flash_s = greedy_continuations(flash, tokenizer, prompts, max_tokens, batch_size)
    prefix = [common_prefix(d, f) / max(len(d), len(f), 1) for d, f in zip(dense_out, flash_out)]
    return {
        "prompts": len(prompts),
        "identical": float(np.mean([d == f for d, f in zip(dense_out, flash_out)])),
        "before_divergence": float(np.mean(prefix)),
        "mean_length_dense": float(np.mean([len(d) for d in dense_out])),
        "seconds_dense": dense_s,
        "seconds_flashhead": flash_s,
    }


# --- 2. sampling distance -----------------------------------------------------------------------


def check_enumeration(head, hidden: mx.array, n_clusters: int = 256) -> dict:
    """Check :func:`expected_distribution` on a few hidden states: without top-p against
    ``sampler_distribution``; with top-p against :func:`enumerated_distribution` on the
    ``n_clusters`` most likely draws plus as many random ones (the literal mlx-lm path)."""
    rng = np.random.default_rng(0)
    worst = {"vs_sampler_distribution": 0.0, "vs_apply_top_p": 0.0}
    for temperature, top_p in SAMPLING_SETTINGS:
        draws = sampler_draws(head, hidden, temperature)
        for row, draw in enumerate(draws):
            if top_p is None:
                exact = np.array(sampler_distribution(head, hidden[row], temperature), np.float64)
                fast = expected_distribution(draw, temperature, None, head.vocab_size)
                worst["vs_sampler_distribution"] = max(
                    worst["vs_sampler_distribution"], float(total_variation(fast, exact))
                )
            likely = np.argsort(-draw[4])[:n_clusters]
            others = rng.permutation(np.setdiff1d(np.arange(len(draw[4])), likely))[:n_clusters]
            subset = np.concatenate([likely, others])
            part = (*draw[:2], *(a[subset] for a in draw[2:]))
            fast = expected_distribution(part, temperature, top_p, head.vocab_size)
            literal = enumerated_distribution(part, temperature, top_p, head.vocab_size)
            worst["vs_apply_top_p"] = max(worst["vs_apply_top_p"], float(total_variation(fast, literal)))
    assert worst["vs_sampler_distribution"] < 1e-4, worst
    assert worst["vs_apply_top_p"] < 1e-4, worst
    return worst


def sampling_distance(head, hidden: mx.array, chunk: int = 16) -> dict:
    """Mean and 95th percentile of the total variation distance between FlashHead's and the
    dense sampler's distributions, for each setting of :data:`SAMPLING_SETTINGS`."""
    result = {}
    for temperature, top_p in SAMPLING_SETTINGS:
        distances = np.concatenate(
            [
                sampling_distances(head, hidden[start : start + chunk], temperature, top_p)
                for start in range(0, hidden.shape[0], chunk)
            ]
        )
        key = f"T={temperature}" + ("" if top_p is None else f",top_p={top_p}")
        result[key] = {
            "mean": float(np.mean(distances)),
            "p95": float(np.quantile(distances, 0.95)),
            "positions": len(distances),
        }
    return result


# --- 3. speculative decoding --------------------------------------------------------------------


def quantized_draft(folder: Path, bits: int, group_size: int):
    """The model with its dense head, quantized in memory to ``bits`` bits."""
    model, _ = load(str(folder), flashhead=False)
    nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


def acceptance(model, draft, tokenizer, prompts, max_tokens: int, num_draft: int) -> float:
    """Share of tokens that greedy speculative decoding takes from the draft."""
    from_draft = total = 0
    for prompt in prompts:
        for response in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=max_tokens,
            draft_model=draft,
            num_draft_tokens=num_draft,
            sampler=make_sampler(0.0),
        ):
            from_draft += response.from_draft
            total += 1
    return from_draft / total


# --- 4. perplexity ------------------------------------------------------------------------------


def perplexity_data(tokenizer, n_tokens: int, seq_len: int) -> mx.array:
    """The first ``ceil(n_tokens / seq_len)`` windows ``[n, seq_len + 1]`` of Emma, as
    ``mlx_lm.perplexity.eval_ppl`` takes them."""
    rows = -(-n_tokens // seq_len)
    return mx.array(book_tokens(tokenizer, "emma", rows * (seq_len + 1))).reshape(rows, -1)


# --- the table ----------------------------------------------------------------------------------


def timed(label: str, timings: dict, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its wall time stored in ``timings[label]`` and printed."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[label] = time.perf_counter() - start
    print(f"  [{label}: {timings[label]:.0f} s]", flush=True)
    return result


def measure_model(name: str, args) -> dict:
    """Every measurement of one model, dense and FlashHead."""
    folder = model_folder(name, Path(args.models_dir))
    dense, tokenizer = load(str(folder), flashhead=False)
    flash, _ = load(str(folder))
    head = flash_head(flash)
    print(
        f"\n== {name} ({folder}): {head.vocab_size} tokens, {head.n_clusters} clusters of "
        f"{head.cluster_size}, n_probes {head.n_probes}",
        flush=True,
    )
    timings, result = {}, {"folder": str(folder)}
    result["head"] = {
        key: getattr(head, key) for key in ("vocab_size", "n_clusters", "cluster_size", "n_probes")
    }

    prompts = held_out_prompts(tokenizer, args.prompts, args.prompt_tokens)
    result["greedy"] = timed(
        "greedy",
        timings,
        greedy_agreement,
        dense,
        flash,
        tokenizer,
        prompts,
        args.max_tokens,
        args.batch_size,
    )
    print(f"  greedy: {result['greedy']}")

    hidden = held_out_hidden_states(flash, tokenizer, args.positions)
    result["sampling_check"] = timed(
        "sampling check", timings, check_enumeration, head, hidden[: args.check_positions]
    )
    print(f"  enumeration check (max TV): {result['sampling_check']}")
    result["sampling"] = timed("sampling", timings, sampling_distance, head, hidden)
    print(f"  sampling TV: {result['sampling']}")

    draft = quantized_draft(folder, args.draft_bits, args.draft_group_size)
    heads = {"dense": dense, "flashhead": flash}
    result["acceptance"] = {
        head_name: timed(
            f"speculative {head_name}",
            timings,
            acceptance,
            model,
            draft,
            tokenizer,
            prompts[: args.spec_prompts],
            args.spec_max_tokens,
            args.num_draft_tokens,
        )
        for head_name, model in heads.items()
    }
    print(f"  speculative acceptance: {result['acceptance']}")
    del draft

    data = perplexity_data(tokenizer, args.ppl_tokens, args.ppl_seq_len)
    result["perplexity"] = {
        name: timed(f"perplexity {name}", timings, eval_ppl, model, data, args.ppl_batch)[0]
        for name, model in heads.items()
    }
    print(f"  perplexity: {result['perplexity']}")

    result["decode_tps"] = timed(
        "decode speed", timings, decode_speed, heads, tokenizer, prompts[0], args.max_tokens,
        args.runs,
    )
    print(f"  decode tok/s: {result['decode_tps']}")
    result["seconds"] = timings
    return result


def table(results: dict) -> str:
    """The markdown table: one row per measurement, one column per model."""

    def row(label, cell):
        return f"| {label} | " + " | ".join(cell(r) for r in results.values()) + " |"

    def tv(key):
        return lambda r: f"{r['sampling'][key]['mean']:.4f} (p95 {r['sampling'][key]['p95']:.4f})"

    def pair(section, fmt):
        return lambda r: f"{r[section]['dense']:{fmt}} / {r[section]['flashhead']:{fmt}}"

    def speed(r):
        dense = r["decode_tps"]["dense"]["decode_tok_s"]
        flash = r["decode_tps"]["flashhead"]["decode_tok_s"]
        return f"{dense:.1f} / {flash:.1f} ({flash / dense:.2f}x)"

    def probes(r):
        return f"{r['head']['n_probes']} / {r['head']['n_clusters']}"

    def percent(key, digits):
        return lambda r: f"{100 * r['greedy'][key]:.{digits}f}"

    return "\n".join(
        [
            "| | " + " | ".join(results) + " |",
            "|---|" + "---|" * len(results),
            row("head: n_probes / clusters", probes),
            row("greedy identical continuations (%)", percent("identical", 0)),
            row("tokens before first divergence (%)", percent("before_divergence", 1)),
            row("sampling TV, T=0.7, top_p=0.9 (mean, p95)", tv("T=0.7,top_p=0.9")),
            row("sampling TV, T=1 (mean, p95)", tv("T=1.0")),
            row("speculative acceptance dense / FlashHead", pair("acceptance", ".3f")),
            row("perplexity dense / FlashHead", pair("perplexity", ".4f")),
            row("decode tok/s dense / FlashHead (ratio)", speed),
        ]
    )


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(GGUF_FILES), choices=list(GGUF_FILES))
    parser.add_argument("--models-dir", default=str(ROOT / "results" / "models"))
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=25, help="batch_generate batch size")
    parser.add_argument("--positions", type=int, default=256, help="held-out positions for TV")
    parser.add_argument("--check-positions", type=int, default=2)
    parser.add_argument("--spec-prompts", type=int, default=10)
    parser.add_argument("--spec-max-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--draft-bits", type=int, default=4)
    parser.add_argument("--draft-group-size", type=int, default=64)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--ppl-seq-len", type=int, default=512)
    parser.add_argument("--ppl-batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", default="results/decode_table.json")
    return parser


def main():
    args = setup_arg_parser().parse_args()
    blas = blas_name()
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        blas += " (via LD_PRELOAD)"
    print(f"BLAS: {blas}; MLX {mx.__version__}, device {mx.default_device()}")
    print(
        "greedy: the same batch_generate batches for both heads "
        f"(batch size {args.batch_size}), so batching affects both alike"
    )
    start = time.perf_counter()
    results = {name: measure_model(name, args) for name in args.models}
    print(f"\nBLAS: {blas}; total {time.perf_counter() - start:.0f} s\n")
    print(table(results))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"blas": blas, "args": vars(args), "models": results}, indent=2))
    print(f"\nsaved {output}")


if __name__ == "__main__":
    main()
