"""What the kernels' first-use self-test (flashhead_mlx.kernels.selftest) costs a FlashHead's
greedy decode step, in the CPU emulator (no Mac here: the kernels run emulated, so the first-use
figure is an upper bound dominated by the emulator, not a Mac's time):

- first use: the first greedy step of each shape with an empty cache (both stages self-tested:
  compiled, checked, timed) against a later step;
- a later process: the first step with the decisions in the cache file (read and key hashed);
- a later call: the self-test's lookup per stage call (its shape key and dictionary), against
  the same call without it.

    python scripts/selftest_cost.py [--vocab 1000 --dims 64 --n-probes 8 --rows 1]
"""

import argparse
import os
import tempfile
import time
import timeit

import mlx.core as mx
import numpy as np

from flashhead_mlx.assets import make_assets
from flashhead_mlx.head import FlashHead
from flashhead_mlx.kernels import centroid_topk, kernel_path, selftest
from flashhead_mlx.testing.metal_emulator import emulate


def random_head(vocab: int, dims: int, n_probes: int, cluster_size: int = 16) -> FlashHead:
    """A float32 FlashHead over random rows in random clusters (centroids the clusters' means)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(vocab, dims)).astype(np.float32)
    n_clusters = -(-vocab // cluster_size)
    order = np.full(n_clusters * cluster_size, -1, np.int32)
    order[rng.permutation(order.size)[:vocab]] = np.arange(vocab)
    slots = order.reshape(n_clusters, cluster_size)
    rows = np.where((slots >= 0)[..., None], weight[np.maximum(slots, 0)], 0.0)
    centroids = rows.sum(1) / (slots >= 0).sum(1, keepdims=True)
    clusters = {"order": order, "centroids": centroids, "cluster_bias": np.zeros(n_clusters)}
    return FlashHead(make_assets(clusters, n_probes), mx.array(weight))


def step_ms(head: FlashHead, h: mx.array) -> float:
    start = time.perf_counter()
    mx.eval(head.greedy(h))
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--n-probes", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    head = random_head(args.vocab, args.dims, args.n_probes)
    h = mx.random.normal((args.rows, args.dims), key=mx.random.key(0))
    os.environ.pop("FLASHHEAD_KERNELS", None)
    with tempfile.TemporaryDirectory() as tmp, emulate():
        os.environ["FLASHHEAD_SELFTEST_CACHE"] = os.path.join(tmp, "selftest.json")
        step_ms(head, h)  # the emulator's compilations (cached on disk), not the self-test's
        selftest._decisions.clear()
        os.remove(os.environ["FLASHHEAD_SELFTEST_CACHE"])
        first = step_ms(head, h)
        later = np.median([step_ms(head, h) for _ in range(10)])
        cached = []
        for _ in range(10):
            selftest._decisions.clear()  # a new process: the decisions are in the cache file
            cached.append(step_ms(head, h))
        paths = sorted(selftest._decisions.values())
        # The lookup against the same call on the path it found (graphs built, not evaluated),
        # alternated; the fastest of each (the machine may be loaded).
        args1 = head.stage1_arguments()
        with_test, without = [], []
        for _ in range(30):
            with_test.append(timeit.timeit(lambda: selftest.centroid_topk(h, *args1), number=100))
            with kernel_path(paths[0]):
                without.append(timeit.timeit(lambda: centroid_topk(h, *args1), number=100))
    assert paths == ["mlx", "mlx"], "emulated kernels are slower: the lookup is timed on MLX"
    print(f"head: vocab {args.vocab}, d {args.dims}, {head.n_clusters} clusters of 16, "
          f"n_probes {args.n_probes}, {args.rows} row(s); emulated kernels; paths {paths}")
    print(f"greedy step, first use (both stages self-tested): {first:.1f} ms")
    print(f"greedy step, later calls (median of 10): {later:.1f} ms")
    print(f"greedy step, first in a new process (decisions from the cache file, median of 10): "
          f"{np.median(cached):.1f} ms")
    overhead = 1e6 * (min(with_test) - min(without)) / 100
    print(f"stage-1 call (graph built, not evaluated): {1e6 * min(without) / 100:.1f} us, "
          f"+{overhead:.1f} us for the self-test's lookup")


if __name__ == "__main__":
    main()
