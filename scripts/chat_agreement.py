"""Greedy chat answers identical to the dense head's (issue 12's target: >= 95% of held-out
prompts at 48 tokens), per FlashHead setting, with Wilson 95% intervals.

    python scripts/chat_agreement.py --model DIR [--split held-out] [--max-tokens 48]
        [--n-probes P] [--recent-tokens 128,0] [--verify K] [--prompts N] [--chat-template FILE]
        [--json OUT.json]

Each prompt goes through the model's chat template, one sequence at a time (as a chat app decodes
it): the dense head with mlx-lm's ``generate``, FlashHead with flashhead_mlx's, at each
``--recent-tokens`` setting, and with ``--verify K`` in verified mode (``flashhead_verify=K``, the
folder's recent tokens). An answer counts as identical when its tokens are the dense ones.
A model whose tokenizer has no chat template (the Gemma-3-270M GGUF file) takes one from
``--chat-template`` (a Jinja file; Gemma 3's turn format is in docs/suite.md).
"""

import argparse
import json
import sys
from functools import partial

import mlx.core as mx
from mlx_lm.generate import generate_step as dense_generate_step
from tqdm import tqdm

from flashhead_mlx import flash_head, load
from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.generation import generate_step
from flashhead_mlx.metrics import wilson_interval
from flashhead_mlx.suite import CHAT, chat_prompt_tokens, read_prompts, suite_files


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a FlashHead folder")
    parser.add_argument("--split", default="held-out", choices=["dev", "held-out"])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--n-probes", type=int, help="override the folder's n_probes")
    parser.add_argument("--recent-tokens", default="128,0", help="settings, comma-separated (or none)")
    parser.add_argument("--verify", type=int, help="also verified decoding with this block size")
    parser.add_argument("--prompts", type=int, default=None, help="the first N prompts only")
    parser.add_argument("--chat-template", help="a Jinja chat template file for the tokenizer")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    model, tokenizer = load(args.model, n_probes=args.n_probes)
    if args.chat_template:
        with open(args.chat_template) as f:
            tokenizer.chat_template = f.read()
    dense, _ = load(args.model, flashhead=False)
    head = flash_head(model)
    prompts = read_prompts(suite_files(args.split)[CHAT])[: args.prompts]
    stops = set(tokenizer.eos_token_ids)
    settings = [int(r) for r in args.recent_tokens.split(",") if r]
    answers = {"dense": []}
    answers.update({f"recent {r}": [] for r in settings})
    recent = head.recent_tokens
    verified = f"verified K={args.verify}"
    if args.verify:
        answers[verified] = []
    for prompt in tqdm(prompts, desc="Chat answers"):
        tokens = mx.array(chat_prompt_tokens(tokenizer, prompt))
        answers["dense"].append(greedy(dense_generate_step, tokens, dense, args, stops))
        for r in settings:
            head.recent_tokens = r
            answers[f"recent {r}"].append(greedy(generate_step, tokens, model, args, stops))
        if args.verify:
            head.recent_tokens = recent
            step = partial(generate_step, flashhead_verify=args.verify)
            answers[verified].append(greedy(step, tokens, model, args, stops))
    results = {"model": args.model, "split": args.split, "max_tokens": args.max_tokens,
               "prompts": len(prompts), "n_probes": head.n_probes, "settings": {}}
    print(f"{args.model}: greedy {args.max_tokens}-token chat answers identical to dense, "
          f"{len(prompts)} {args.split} prompts, n_probes {head.n_probes}")
    for name in answers:
        if name == "dense":
            continue
        same = sum(a == d for a, d in zip(answers[name], answers["dense"]))
        low, high = wilson_interval(same, len(prompts))
        results["settings"][name] = {"identical": same, "interval": [low, high]}
        print(f"  {name}: {same}/{len(prompts)} = {100 * same / len(prompts):.1f}% "
              f"[{100 * low:.1f}, {100 * high:.1f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def greedy(step, tokens, model, args, stops) -> list:
    """The greedy answer's tokens from ``step`` (mlx-lm's or FlashHead's ``generate_step``), up
    to ``--max-tokens`` or a stop token."""
    out = []
    for token, _ in step(tokens, model, max_tokens=args.max_tokens):
        if token in stops:
            break
        out.append(token)
    return out


if __name__ == "__main__":
    main()
