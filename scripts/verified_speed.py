"""Verified greedy decoding's speed per K, as ``bench`` measures it, without the rest of bench.

Greedy ``stream_generate`` of the built-in text's first ``--prompt-tokens`` tokens with the dense
head, plain FlashHead (``--n-probes``, default the folder's) and verified decoding at each K,
alternated (:func:`flashhead_mlx.speed.decode_speed`, bench's whole-call rates): decode tok/s,
the ratio to dense, the share of FlashHead's gain kept and rollbacks per 1000 tokens.

    python scripts/verified_speed.py path/to/gemma3-flashhead --blocks 8,16,32 [--n-probes 467]
"""

import argparse
import sys

from flashhead_mlx import load
from flashhead_mlx.bench import block_list, verified_speeds
from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.calibration import TUNING_TEXT
from flashhead_mlx.speed import decode_speed
from flashhead_mlx.verified import block_label


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="A converted FlashHead folder.")
    parser.add_argument("--blocks", type=block_list, default=block_list("8,16,32"))
    parser.add_argument("--n-probes", type=int, default=None, help="Default: the folder's.")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="Alternated runs (medians).")
    args = parser.parse_args()
    dense, tokenizer = load(args.model, flashhead=False)
    flash, _ = load(args.model, n_probes=args.n_probes)
    prompt = tokenizer.encode(TUNING_TEXT.read_text())[: args.prompt_tokens]
    models = {"dense": (dense, 0), "flash": (flash, 0)}
    models.update({f"verified K={block_label(b)}": (flash, b) for b in args.blocks})
    speed = decode_speed(models, tokenizer, prompt, args.gen_tokens, args.runs)
    dense_rate, flash_rate = speed["dense"]["decode_tok_s"], speed["flash"]["decode_tok_s"]
    probes = args.n_probes or "the folder's"
    print(f"{args.model}, n_probes={probes}: {args.gen_tokens} tokens, "
          f"medians of {args.runs} alternated runs")
    print("| greedy decode | tok/s | vs dense | of FlashHead's gain | rollbacks per 1000 tokens |")
    print("|---|---|---|---|---|")
    print(f"| dense | {dense_rate:.2f} | 1.00x | | |")
    print(f"| FlashHead | {flash_rate:.2f} | {flash_rate / dense_rate:.2f}x | 100% | |")
    for label, row in verified_speeds(speed, args.blocks).items():
        gain = row["share_of_flash_gain"]
        print(f"| verified K={label} | {row['decode_tok_s']:.2f} | {row['speedup']:.2f}x | "
              f"{'' if gain is None else f'{gain:.0%}'} | "
              f"{row['rollbacks_per_1000_tokens']:.1f} |")


if __name__ == "__main__":
    main()
