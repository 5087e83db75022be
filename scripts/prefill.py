"""Prompt processing with FlashHead against the dense head, per prompt length.

Greedy ``generate_step`` runs alternated between the dense head, FlashHead and the free head
(``bench``'s :func:`~flashhead_mlx.bench.step_times`), one per prompt length: the ms of the
prefill (every prompt token but the last, until the cache is evaluated), of the first step (the
last prompt token through the body, the head and the sampler) and of a decode step, and
FlashHead / dense for each. The prompts are the start of the built-in text.

    python scripts/prefill.py path/to/gemma3-flashhead --prompt-tokens 32,512 --runs 5
"""

import argparse
import json
import sys

from flashhead_mlx import load
from flashhead_mlx.bench import blocks, free_head, step_times
from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.calibration import TUNING_TEXT
from flashhead_mlx.report import table


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="A converted FlashHead folder.")
    parser.add_argument("--prompt-tokens", type=blocks, default=[32, 512],
                        help="Prompt lengths, e.g. 32,512 (default: 32,512).")
    parser.add_argument("--gen-tokens", type=int, default=8,
                        help="Decode steps after the first (default: 8).")
    parser.add_argument("--runs", type=int, default=5, help="Alternated runs (medians).")
    parser.add_argument("--json", help="Also write the times to this file.")
    args = parser.parse_args()
    dense, tokenizer = load(args.model, flashhead=False)
    flash, _ = load(args.model)
    free, _ = load(args.model, flashhead=False)
    models = {"dense": dense, "FlashHead": flash, "free head": free_head(free)}
    text = tokenizer.encode(TUNING_TEXT.read_text())
    results = {}
    for n in args.prompt_tokens:
        steps = step_times(models, text[:n], args.gen_tokens, args.runs)
        results[str(n)] = steps
        rows = [[name, *(f"{t[key]:.1f}" for key in ("prefill_ms", "first_step_ms", "decode_ms"))]
                for name, t in steps.items()]
        rows.append(["FlashHead / dense", *(
            f"{steps['FlashHead'][key] / steps['dense'][key]:.3f}"
            for key in ("prefill_ms", "first_step_ms", "decode_ms"))])
        print(f"\n{n}-token prompt, medians of {args.runs} alternated runs")
        print(table(["generate_step (ms)", f"prefill ({n - 1} tokens)", "first step",
                     "decode step"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
