"""``flashhead-mlx server`` on a real model under load: concurrent clients on loopback, in rounds.

First the server with the dense head (``--no-flashhead``) answers one round, the reference; then
the server with the FlashHead answers ``--rounds`` rounds of the same requests
(:mod:`flashhead_mlx.testing.server_load`: greedy, streamed, sampled, and malformed ones: bad
JSON, a negative max_tokens, an unknown model). Each round prints its requests, the requests that
got another status than their kind's, the p50/p95 latency of the well-formed ones and MLX's
active memory in the server's process after it; at the end, each wrong answer, the greedy
responses that differ from the dense server's, the FlashHead's sparse decode steps, and each
kind's latency and completion tokens (the responses' ``usage``):

    nice -n 19 python scripts/server_load.py --model DIR [--clients 16] [--rounds 3]
"""

import argparse
import sys

import numpy as np

from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.head import FlashHead
from flashhead_mlx.testing.server_load import KINDS, greedy_texts, load_rounds, serve, wrong

PROMPTS = [
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "List three prime numbers.",
    "Explain what a hash table is.",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A converted FlashHead folder.")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients.")
    parser.add_argument(
        "--requests-per-client", type=int, default=len(KINDS), help="Requests per client a round."
    )
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of the FlashHead server.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens per completion.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    parser.add_argument(
        "--server-args", default="", help="More flags of `flashhead-mlx server` (one string)."
    )
    args = parser.parse_args()
    options = dict(
        clients=args.clients,
        requests_per_client=args.requests_per_client,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
    )
    flags = args.server_args.split()

    def rounds(n: int):
        return lambda url: load_rounds(url, PROMPTS, n, log=lambda line: print(line, flush=True),
                                       **options)

    print("Dense head (the reference):", flush=True)
    dense = serve(args.model, ["--no-flashhead", *flags], rounds(1))
    reference = greedy_texts(dense[0]["records"])
    steps = []
    method = FlashHead.decode_logits

    def counted(self, *a, **k):
        steps.append(1)
        return method(self, *a, **k)

    FlashHead.decode_logits = counted
    print("FlashHead:", flush=True)
    try:
        flash = serve(args.model, flags, rounds(args.rounds))
    finally:
        FlashHead.decode_logits = method
    for index, row in enumerate([*dense, *flash]):
        for r in filter(wrong, row["records"]):
            where = "dense" if index == 0 else f"FlashHead round {index}"
            print(f"wrong answer ({where}): {r['kind']} got {r['status']}: {str(r['text'])[:200]}")
    greedy = [
        r for row in flash for r in row["records"] if r["kind"] in ("greedy", "stream")
        and r["status"] == 200
    ]
    differ = sum(r["text"] not in reference.get(r["prompt"], ()) for r in greedy)
    unstable = {p: len(t) for p, t in reference.items() if len(t) > 1}
    print(f"greedy responses differing from the dense server's: {differ} of {len(greedy)}")
    if unstable:
        print(f"prompts with more than one dense greedy text (batch shapes): {unstable}")
    print(f"FlashHead sparse decode steps: {len(steps)}")
    for head, rows in (("dense", dense), ("FlashHead", flash)):
        for kind in KINDS:
            records = [r for row in rows for r in row["records"] if r["kind"] == kind]
            seconds = [r["seconds"] for r in records]
            p50, p95 = np.percentile(seconds, 50), np.percentile(seconds, 95)
            tokens = [r["tokens"] for r in records if r["tokens"] is not None]
            made = f", {np.mean(tokens):.1f} tokens on average" if tokens else ""
            print(f"{head} {kind}: p50 {p50:.2f} s, p95 {p95:.2f} s{made}")


if __name__ == "__main__":
    main()
