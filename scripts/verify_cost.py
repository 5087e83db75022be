"""What verified decoding's dense check costs on this machine, and whether a bound could skip it.

Per K: the exact logits of K rows with the head's rows gathered back into token order first
(``FlashHead.dense_logits`` on ``[1, K, d]``: the dense head's own product, what the verify pass
used before), the verify pass as verified decoding runs it (``FlashHead.exact_logits``: the same
K-row product on the rows in the FlashHead's cluster order, then a gather of the K x V logits
into token order), and K decode steps of the dense head (one row each, a matrix-vector
product), alternated in one run (medians of ``--runs``), with FlashHead's own decode step for
scale. Then, at 64 hidden
states of the built-in text, whether the gathered and the cluster-order products agree bit for
bit, and how far an exact bound gets: for each cluster not probed, ``max_v w_v . h <= c . h +
r ||h||`` (``c`` the mean of its rows, ``r`` their largest distance to it) certifies FlashHead's
token when every such bound lies below that token's logit; the share of positions certified and of
clusters whose bound does not (which a bound-based check would have to score row by row).

    python scripts/verify_cost.py path/to/smollm2-flashhead --ks 1,4,8,16,32 --runs 5
"""

import argparse
import sys

import mlx.core as mx
import numpy as np

from flashhead_mlx import decoding, flash_head, load
from flashhead_mlx.bench import blocks
from flashhead_mlx.speed import decode_step, hidden_inputs
from flashhead_mlx.timing import alternate
from flashhead_mlx.blas import reexec_with_openblas

N_STATES = 64


def timings(dense, flash, tokenizer, ks, runs: int) -> dict:
    """Milliseconds per call of each way to score K rows, alternated."""
    head = flash_head(flash)
    rows = hidden_inputs(dense, tokenizer, 1)
    calls = {"dense head, 1 row": (decode_step(dense), rows),
             "FlashHead decode step, 1 row": (decode_step(flash), rows)}
    for k in ks:
        inputs = [h.reshape(1, k, -1) for h in hidden_inputs(dense, tokenizer, k, 8)]
        calls[f"head gather + product, K={k}"] = (head.dense_logits, inputs)
        calls[f"verify pass (product + logit gather), K={k}"] = (head.exact_logits, inputs)
    return alternate(calls, runs)


def bound_study(dense, flash, tokenizer) -> dict:
    """Bit-for-bit agreement of the two K-row products, and the share of positions (and of
    clusters) a Cauchy-Schwarz bound per cluster certifies."""
    head = flash_head(flash)
    h = mx.concatenate(hidden_inputs(dense, tokenizer, N_STATES, 1))[:, 0]  # [N, d]
    gathered, ordered = head.dense_logits(h[None]), head.exact_logits(h[None])
    same = bool(mx.array_equal(gathered, ordered))
    weight = np.array(head.embed(mx.arange(head.vocab_size)).astype(mx.float32))
    order = np.array(head.order).reshape(head.n_clusters, head.cluster_size)
    centers = np.stack([weight[o[o >= 0]].mean(0) for o in order])
    radius = np.array([np.linalg.norm(weight[o[o >= 0]] - c, axis=1).max()
                       for o, c in zip(order, centers)])
    states = np.array(h.astype(mx.float32))
    with decoding():
        tokens = np.array(head(h[:, None])).argmax(-1)[:, 0]
    probes = np.array(head.probe(h))
    raw = np.array(head.raw_logits(h).astype(mx.float32))  # the transforms are increasing
    certified, open_clusters = 0, []
    for i, x in enumerate(states):
        bound = centers @ x + radius * np.linalg.norm(x)
        bound[probes[i]] = -np.inf  # scored exactly already
        above = bound > raw[i, tokens[i]]
        certified += not above.any()
        open_clusters.append(above.mean())
    return {"bit_for_bit": same, "certified": certified / len(states),
            "open_clusters": float(np.mean(open_clusters))}


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="A converted FlashHead folder.")
    parser.add_argument("--ks", type=blocks, default=[1, 4, 8, 16, 32], help="Rows K, e.g. 1,8")
    parser.add_argument("--runs", type=int, default=5, help="Alternated runs (medians).")
    args = parser.parse_args()
    dense, tokenizer = load(args.model, flashhead=False)
    flash, _ = load(args.model)
    head = flash_head(flash)
    print(f"{args.model}: V={head.vocab_size}, n_probes={head.n_probes}, "
          f"{head.weight.dtype}, medians of {args.runs} alternated runs")
    ms = timings(dense, flash, tokenizer, args.ks, args.runs)
    one = ms["dense head, 1 row"]
    for name, value in ms.items():
        k = int(name.rsplit("=", 1)[1]) if "K=" in name else 1
        print(f"{name}: {value:.2f} ms = {value / one:.2f} dense rows "
              f"({value / (k * one):.2f} of K one-row products)")
    study = bound_study(dense, flash, tokenizer)
    print(f"gathered and cluster-order products equal bit for bit: {study['bit_for_bit']}")
    print(f"bound per unprobed cluster: "
          f"{100 * study['certified']:.1f}% of {N_STATES} positions certified; on average "
          f"{100 * study['open_clusters']:.1f}% of the clusters' bounds above the token's logit")


if __name__ == "__main__":
    main()
