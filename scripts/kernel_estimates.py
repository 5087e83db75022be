"""Paper estimates (UNMEASURED: no Mac has run the kernels) of the Metal kernels' bytes per
call and share of memory bandwidth, before and after issue 16's rewrite, and of MLX's qmv for
the same shapes; then stage 1's selection, in one threadgroup per row (the kernel) or split over
threadgroups: the tables in metal/README.md. One row of h (a decode step), default probes.

Little's law: a chip reaches its bandwidth only with bandwidth x latency bytes of loads in
flight. Assumed: LATENCY_NS of DRAM latency, at most SIMDGROUPS_PER_CORE resident SIMD groups per
GPU core, and each resident SIMD group keeping one step's loads in flight (the loads of one
step of its loop: the old kernels' rows are scored one after another, a simd_sum between them).

The selection is bound by latency and instruction issue, not bytes: its cycles are counted from
the kernel's loops (select_cycles) with the instruction counts and latencies assumed below.

Usage: python scripts/kernel_estimates.py
"""

from flashhead_mlx.kernels.centroid_topk import select_shape

LATENCY_NS = 600
SIMDGROUPS_PER_CORE = 24
# GB/s, GPU cores, GPU clock in GHz (third-party figures).
CHIPS = {"M1": (68, 8, 1.28), "M4": (120, 10, 1.47), "M4 Max": (546, 40, 1.58)}
# d, clusters (V / 16), default n_probes (the 12% cap with 128 recent tokens,
# docs/clustering.md), vocabulary.
MODELS = {"SmolLM2-135M": (576, 3072, 168, 49152), "Gemma-3-270M": (640, 16384, 934, 262144)}
CLUSTER_SIZE, GROUP_SIZE = 16, 64
# Stored formats: bytes per weight (scales and biases in bfloat16 for packed rows), and the
# values a lane reads per load in the old kernels, the new ones and MLX's qmv.
FORMATS = {"4-bit": (0.5 + 4 / GROUP_SIZE, 8, 16, 16), "bf16": (2.0, 4, 8, None)}
# The selection (assumed): a GPU core issues one instruction per cycle for each of ISSUE SIMD
# groups (4 x 32 lanes); COUNT_OPS instructions per key and pass (prefix test, digit, 4 masked
# adds), PLACE_OPS per key to place the result; a simd_sum or simd prefix sum costs SIMD_OPS
# issued and SIMD_CYCLES of latency, a threadgroup barrier BARRIER_CYCLES once all SIMD groups
# arrive, a threadgroup-memory read TG_READ_CYCLES, a dependent ALU step ALU_CYCLES; a core reads
# the keys from cache at CORE_BYTES_PER_CYCLE after one LATENCY_NS; each added dispatch in the
# same command buffer (its wait for the one before) costs DISPATCH_US.
ISSUE, COUNT_OPS, PLACE_OPS, SIMD_OPS, SIMD_CYCLES = 4, 22, 18, 10, 40
BARRIER_CYCLES, TG_READ_CYCLES, ALU_CYCLES, CORE_BYTES_PER_CYCLE, DISPATCH_US = 60, 30, 4, 64, 2.0
PASSES, DIGITS = 8, 16  # 4-bit digits of a 32-bit key
SPLITS = (2, 4, 8, 16)  # threadgroups tried for the split selection


def in_flight(d: int, values_per_lane: int, rows: int, bytes_per_value: float) -> float:
    """Bytes one SIMD group has in flight per step: ``rows`` rows, the lanes active in an
    average step of a row of ``d`` values (``values_per_lane`` per lane and step)."""
    lane_steps = d / values_per_lane
    steps = -(-lane_steps // 32)
    return rows * lane_steps / steps * values_per_lane * bytes_per_value


def share(simdgroups: int, per_simdgroup: float, gbs: int, cores: int) -> float:
    resident = min(simdgroups, cores * SIMDGROUPS_PER_CORE)
    return min(1.0, resident * per_simdgroup / (gbs * LATENCY_NS))


def select_cycles(n_keys: int, key_bytes: int = 4) -> float:
    """Cycles of one threadgroup running centroid_topk_select's loops over ``n_keys`` keys of
    ``key_bytes`` (the launcher's threads and keys per thread), after its first load's latency."""
    threads, per_thread = select_shape(n_keys)
    n_sg = threads // 32
    rounds = -(-n_sg // ISSUE)  # SIMD groups sharing one issue slot
    merge = 2 * (BARRIER_CYCLES + TG_READ_CYCLES) + n_sg * ALU_CYCLES + DIGITS * 2 * ALU_CYCLES
    one_pass = rounds * (per_thread * COUNT_OPS + 8 * SIMD_OPS) + SIMD_CYCLES + merge
    prefix_sum = SIMD_CYCLES + 2 * BARRIER_CYCLES + TG_READ_CYCLES + n_sg * ALU_CYCLES
    place = rounds * per_thread * PLACE_OPS + 2 * prefix_sum
    return n_keys * key_bytes / CORE_BYTES_PER_CYCLE + PASSES * one_pass + place


def select_us(n_keys: int, ghz: float, key_bytes: int = 4) -> float:
    """Microseconds of one selection threadgroup (:func:`select_cycles`)."""
    return LATENCY_NS / 1e3 + select_cycles(n_keys, key_bytes) / (ghz * 1e3)


def split_us(n_keys: int, n_probes: int, groups: int, ghz: float) -> float:
    """The selection split over ``groups`` threadgroups (one per core), each keeping the
    ``n_probes`` best of its slice (all of it when smaller) in its own output slice, then one
    threadgroup selecting among those candidates (key and id) in an added dispatch."""
    size = -(-n_keys // groups)
    return (select_us(size, ghz) + DISPATCH_US
            + select_us(groups * min(size, n_probes), ghz, key_bytes=8))


def cases(d: int, C: int, P: int) -> dict:
    """Per (stage, rows' format) and kernel: bytes per call, SIMD groups, bytes in flight per
    SIMD group (:func:`in_flight`)."""
    n = P * CLUSTER_SIZE
    stage1 = C * d * FORMATS["4-bit"][0] + 2 * C + 2 * d
    found = {("stage 1", "4-bit"): {
        # old: 8 SIMD groups x 4 clusters one after another; ticket and zero fill of
        # (2 P + C + 1) words; new: keys written, read back by the select from cache.
        "old": (stage1 + 4 * C + 4 * (2 * P + C + 1), C // 4, in_flight(d, 8, 1, 0.5)),
        "new": (stage1 + 4 * C + 8 * P, C // 4, in_flight(d, 16, 4, 0.5)),
        "MLX qmv": (stage1 + 2 * C, C // 4, in_flight(d, 16, 4, 0.5)),
    }}
    for name, (per_weight, old_values, new_values, qmv_values) in FORMATS.items():
        rows = n * (d * per_weight + 4) + 4 * P  # rows, order, probes
        value_bytes = 0.5 if name == "4-bit" else 2.0
        found[("stage 2", name)] = {
            # old: one SIMD group per probe, its 16 rows one after another; zero fill of
            # the logits, tokens, pairs and tickets.
            "old": (rows + 4 * n + 4 * (n + 3 + 2 * -(-P // 8)), P,
                    in_flight(d, old_values, 1, value_bytes)),
            "new": (rows + 4 * n + 8 * (n // 4), n // 4,
                    in_flight(d, new_values, 4, value_bytes)),
        }
        if qmv_values:
            found[("stage 2", name)]["MLX qmv"] = (rows + 4 * n, n // 4,
                                                   in_flight(d, qmv_values, 4, value_bytes))
    return found


def bandwidth_table() -> None:
    """Bytes per call, share of bandwidth and time per chip, per stage and kernel."""
    print(f"UNMEASURED estimates: latency {LATENCY_NS} ns, {SIMDGROUPS_PER_CORE} resident SIMD "
          "groups per core; time = bytes / (bandwidth x share)")
    print("| model | stage, rows | kernel | MB per call | " + " | ".join(
        f"{chip} share, us" for chip in CHIPS) + " |")
    print("|---|---|---|---|" + "---|" * len(CHIPS))
    for model, (d, C, P, _) in MODELS.items():
        for (stage, rows_format), kernels in cases(d, C, P).items():
            for kernel, (nbytes, simdgroups, per_simdgroup) in kernels.items():
                cells = []
                for gbs, cores, _ in CHIPS.values():
                    s = share(simdgroups, per_simdgroup, gbs, cores)
                    cells.append(f"{s:.0%}, {nbytes / (gbs * 1e3 * s):.0f}")
                print(f"| {model} | {stage}, {rows_format} | {kernel} | {nbytes / 1e6:.2f} | "
                      + " | ".join(cells) + " |")


def select_table() -> None:
    """Stage 1's score (4-bit centroids, the new kernel) and its selection per chip: the
    kernel's one threadgroup per row, split over threadgroups, and a radix over threadgroups."""
    print(f"\nUNMEASURED selection estimates: {ISSUE} SIMD groups issue per core and cycle, "
          f"{COUNT_OPS} instructions per key and pass, simd_sum {SIMD_CYCLES} cycles, barrier "
          f"{BARRIER_CYCLES}, threadgroup read {TG_READ_CYCLES}, {DISPATCH_US:g} us per added "
          f"dispatch, clock {' / '.join(f'{c[2]:g}' for c in CHIPS.values())} GHz")
    print("| model | dispatch, design | " + " | ".join(f"{chip} us" for chip in CHIPS) + " |")
    print("|---|---|" + "---|" * len(CHIPS))

    def row(name: str, design: str, times) -> None:
        print(f"| {name} | {design} | " + " | ".join(times) + " |")

    for model, (d, C, P, _) in MODELS.items():
        name = f"{model} ({C} clusters, {P} probes)"
        nbytes, simdgroups, per_simdgroup = cases(d, C, P)[("stage 1", "4-bit")]["new"]
        times = [nbytes / (gbs * 1e3 * share(simdgroups, per_simdgroup, gbs, cores))
                 for gbs, cores, _ in CHIPS.values()]
        row(name, "score", [f"{t:.1f}" for t in times])
        threads, per_thread = select_shape(C)
        row(name, f"select, one threadgroup ({threads} threads x {per_thread} keys)",
            [f"{select_us(C, ghz):.1f}" for _, _, ghz in CHIPS.values()])
        for groups in SPLITS:
            size = -(-C // groups)
            if groups * P < C:
                row(name, f"select split: {groups} threadgroups of {size} keys, merge of "
                    f"{groups * min(size, P)} (+1 dispatch)",
                    [f"{split_us(C, P, groups, ghz):.1f}" for _, _, ghz in CHIPS.values()])
        # 8 passes of (per-threadgroup digit counts, a merge picking the digit), then the
        # counts' prefix over threadgroups and the placement: 2 x 8 + 1 dispatches added after
        # the first; their waits alone, whatever the work.
        radix = (2 * PASSES + 1) * DISPATCH_US
        row(name, f"select, radix over threadgroups (+{2 * PASSES + 1} dispatches)",
            [f">= {radix:.0f}" for _ in CHIPS])


def main() -> None:
    bandwidth_table()
    select_table()


if __name__ == "__main__":
    main()
