"""Verified greedy decoding's K on a converted model: decode speed and rollbacks per K, fixed or
adaptive, on chat prompts (where FlashHead misses more than on prose).

For each prompt (the model's chat template) and run, greedy ``stream_generate`` with the dense
head, plain FlashHead and verified decoding at each K, one after the other, so that every ratio
to dense is taken between neighbouring runs on a machine whose load varies; then the median of
those ratios over prompts and runs, and the rollbacks per 1000 tokens (greedy: the same in every
run). The speed is tokens over the whole call's wall time (the same prompt's prefill in each):
``stream_generate``'s decode rate starts at the first token, which verified decoding yields
only after a whole block, so it leaves the first block out. ``4-32`` is the adaptive K
(:func:`flashhead_mlx.verified.next_block`).

    python scripts/verified_blocks.py path/to/smollm2-flashhead --blocks 4,8,16,32,4-32 \\
        --tokens 48 --runs 1 [--n-probes 143] [--chat-template gemma_turns.jinja]
"""

import argparse
import statistics
import sys

from flashhead_mlx import flash_head, load
from flashhead_mlx.bench import block_list
from flashhead_mlx.speed import generation_run
from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.suite import chat_prompt_tokens
from flashhead_mlx.timing import settle
from flashhead_mlx.verified import block_label
from verified_acceptance import PROMPTS  # the same short prompts



def timed(model, tokenizer, prompt, tokens: int, block):
    """:func:`flashhead_mlx.speed.generation_run` (after the work before it has ended), its
    tokens, rollbacks, and decode rate: the tokens over the call's time after the prefill."""
    settle()
    run = generation_run(model, tokenizer, prompt, tokens, block)
    return run["tokens"], run["rollbacks"], run["tokens"] / (run["total_s"] - run["prefill_s"])


def measure(model: str, blocks, prompts, tokens: int, runs: int, n_probes=None,
            chat_template=None) -> dict:
    """Per configuration: decode tok/s ratios to dense (median over prompts and runs), median
    tok/s, and rollbacks per 1000 tokens."""
    dense, tokenizer = load(model, flashhead=False)
    flash, _ = load(model, n_probes=n_probes)
    if chat_template:
        tokenizer.chat_template = chat_template
    configs = {"dense": (dense, 0), "FlashHead": (flash, 0)}
    configs.update({f"verified K={block_label(b)}": (flash, b) for b in blocks})
    ratios = {name: [] for name in configs}
    speeds = {name: [] for name in configs}
    rollbacks = dict.fromkeys(configs, 0)
    generated = dict.fromkeys(configs, 0)
    chats = [chat_prompt_tokens(tokenizer, text) for text in prompts]
    generation_run(flash, tokenizer, chats[0], 4, blocks[0])  # warm-up
    for run in range(runs):
        for prompt in chats:
            results = {name: timed(m, tokenizer, prompt, tokens, b)
                       for name, (m, b) in configs.items()}
            for name, (n_tokens, n, tok_s) in results.items():
                speeds[name].append(tok_s)
                ratios[name].append(tok_s / results["dense"][2])
                if run == 0:
                    rollbacks[name] += n
                    generated[name] += n_tokens
    return {
        "n_probes": flash_head(flash).n_probes,
        "rows": {
            name: {
                "vs_dense": statistics.median(ratios[name]),
                "decode_tok_s": statistics.median(speeds[name]),
                "rollbacks_per_1000_tokens": 1000 * rollbacks[name] / generated[name],
            }
            for name in configs
        },
    }


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="A converted FlashHead folder.")
    parser.add_argument("--blocks", type=block_list, default=block_list("4,8,16,32,4-32"))
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="How many prompts.")
    parser.add_argument("--tokens", type=int, default=48, help="Tokens generated per prompt.")
    parser.add_argument("--runs", type=int, default=1, help="Runs over the prompts.")
    parser.add_argument("--n-probes", type=int, default=None, help="Default: the folder's.")
    parser.add_argument("--chat-template", help="A Jinja chat template file for a tokenizer "
                        "without one (Gemma 3's turn format is in docs/suite.md).")
    args = parser.parse_args()
    template = open(args.chat_template).read() if args.chat_template else None
    result = measure(args.model, args.blocks, PROMPTS[: args.prompts], args.tokens, args.runs,
                     args.n_probes, template)
    print(f"{args.model}: n_probes={result['n_probes']}, {args.prompts} chat prompts x "
          f"{args.tokens} tokens, {args.runs} run(s); medians of the ratios to the dense run "
          "next to each")
    print("| greedy decode | vs dense | decode tok/s | rollbacks per 1000 tokens |")
    print("|---|---|---|---|")
    for name, row in result["rows"].items():
        rate = "" if "verified" not in name else f"{row['rollbacks_per_1000_tokens']:.1f}"
        print(f"| {name} | {row['vs_dense']:.2f}x | {row['decode_tok_s']:.1f} | {rate} |")


if __name__ == "__main__":
    main()
