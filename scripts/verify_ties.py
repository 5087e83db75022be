"""How often verified decoding's K-row dense check and dense decoding's one-row product pick
different greedy tokens (near-ties rounded differently), on the evaluation suite's held-out texts.

Dense decoding scores one position at a time (a matrix-vector product) and takes mlx-lm's
greedy token (the argmax of ``logits - logsumexp(logits)``, ties to the lowest id). The verify
pass scores a block of K positions in one matrix product over the rows in cluster order and takes
its token there with verified decoding's own check (``flashhead_mlx.verified.greedy_check``: the
largest logit, ties to the lowest token id, and the largest log-probability where another logit
lies within ``near_tie_margin`` of it); those logits gathered into token order are
``FlashHead.exact_logits``. Both sum
the same dot products, possibly in another order. For every position of ``--tokens`` tokens of
each held-out text domain, this counts the positions where the two tokens differ and prints the
gap between their one-row logits there, with the positions whose logits are bit-equal both ways,
the largest difference, the positions whose top two one-row logits lie within 1e-4, and those
where the check searched the log-probabilities (``near_ties``: a logit within its margin of the
largest).

    python scripts/verify_ties.py path/to/flashhead-folder --tokens 512 --block 8
"""

import argparse
import sys

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from flashhead_mlx import flash_head, load
from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.model_head import final_hidden_states
from flashhead_mlx.speed import decode_step
from flashhead_mlx.suite import CHAT, plain_prompt_tokens, read_text, suite_files
from flashhead_mlx.transform import apply
from flashhead_mlx.verified import greedy_check, log_softmax, near_ties

NEAR = 1e-4


def greedy(logits: mx.array) -> np.ndarray:
    """mlx-lm's greedy tokens of ``logits`` ``[..., V]``."""
    return np.array(mx.argmax(log_softmax(logits.astype(mx.float32)), axis=-1))


def domain_counts(dense, flash, tokens: list, block: int) -> dict:
    """Positions, differing greedy tokens and near-ties of one text."""
    head, step = flash_head(flash), decode_step(dense)
    n = len(tokens) // block * block
    hidden = final_hidden_states(dense, mx.array(tokens[:n])[None])[0]  # [n, d]
    one_row = [apply(head.transform, step(hidden[i][None, None]))[0, 0] for i in range(n)]
    one_row = mx.stack(one_row).astype(mx.float32)
    slots = mx.concatenate(
        [head.slot_logits(hidden[i : i + block][None])[0] for i in range(0, n, block)]
    )
    k_rows = head.token_order(slots).astype(mx.float32)  # exact_logits
    # The verify pass's greedy check (verified.GreedyProposal.check): in cluster order.
    checked = [greedy_check(head.order, slots[i : i + block]) for i in range(0, n, block)]
    a, b = greedy(one_row), np.concatenate([np.array(c) for c in checked])
    values = np.array(one_row)
    top2 = -np.partition(-values, 1, axis=-1)[:, :2]
    differ = np.flatnonzero(a != b)
    gaps = [abs(values[i, a[i]] - values[i, b[i]]) for i in differ]
    diff = np.abs(values - np.array(k_rows))
    return {
        "positions": n,
        "bit_equal": int((diff == 0).all(axis=-1).sum()),
        "max_diff": float(diff.max()),
        "differ": len(differ),
        "gaps": gaps,
        "near_ties": int((top2[:, 0] - top2[:, 1] < NEAR).sum()),
        "searched": int(near_ties(slots).sum().item()),
    }


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a FlashHead folder")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per held-out domain")
    parser.add_argument("--block", type=int, default=8, help="K, the verify pass's rows")
    args = parser.parse_args()
    dense, tokenizer = load(args.model, flashhead=False)
    flash, _ = load(args.model)
    total = {"positions": 0, "bit_equal": 0, "differ": 0, "near_ties": 0, "searched": 0}
    print(f"| domain | positions | logits bit-equal | largest difference | greedy differs (one "
          f"row vs K = {args.block} rows) | one-row logit gap there | top two within {NEAR:g} "
          "| log-probabilities searched |\n|---|---|---|---|---|---|---|---|")
    texts = {d: p for d, p in suite_files("held-out").items() if d != CHAT}  # CHAT: prompts
    for domain, paths in tqdm(texts.items(), desc="domains"):
        tokens = plain_prompt_tokens(tokenizer, read_text(paths))[: args.tokens]
        counts = domain_counts(dense, flash, tokens, args.block)
        gaps = ", ".join(f"{g:.2g}" for g in counts["gaps"]) or "-"
        print(f"| {domain} | {counts['positions']} | {counts['bit_equal']} | "
              f"{counts['max_diff']:.2g} | {counts['differ']} | {gaps} | {counts['near_ties']} | "
              f"{counts['searched']} |")
        for key in total:
            total[key] += counts[key]
    print(f"| all | {total['positions']} | {total['bit_equal']} | | {total['differ']} | | "
          f"{total['near_ties']} | {total['searched']} |")


if __name__ == "__main__":
    main()
