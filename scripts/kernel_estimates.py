"""Paper estimates (UNMEASURED: no Mac has run the kernels) of the Metal kernels' bytes per
call and share of memory bandwidth, before and after issue 16's rewrite, and of MLX's qmv for
the same shapes: the table in metal/README.md. One row of h (a decode step), default probes.

Little's law: a chip reaches its bandwidth only with bandwidth x latency bytes of loads in
flight. Assumed: LATENCY_NS of DRAM latency, at most SIMDGROUPS_PER_CORE resident SIMD groups per
GPU core, and each resident SIMD group keeping one step's loads in flight (the loads of one
step of its loop: the old kernels' rows are scored one after another, a simd_sum between them).

Usage: python scripts/kernel_estimates.py
"""

LATENCY_NS = 600
SIMDGROUPS_PER_CORE = 24
CHIPS = {"M1": (68, 8), "M4": (120, 10), "M4 Max": (546, 40)}  # GB/s, GPU cores
# d, clusters (V / 16), default n_probes (docs/results.md), vocabulary.
MODELS = {"SmolLM2-135M": (576, 3072, 286, 49152), "Gemma-3-270M": (640, 16384, 741, 262144)}
CLUSTER_SIZE, GROUP_SIZE = 16, 64
# Stored formats: bytes per weight (scales and biases in bfloat16 for packed rows), and the
# values a lane reads per load in the old kernels, the new ones and MLX's qmv.
FORMATS = {"4-bit": (0.5 + 4 / GROUP_SIZE, 8, 16, 16), "bf16": (2.0, 4, 8, None)}


def in_flight(d: int, values_per_lane: int, rows: int, bytes_per_value: float) -> float:
    """Bytes one SIMD group has in flight per step: ``rows`` rows, the lanes active in an
    average step of a row of ``d`` values (``values_per_lane`` per lane and step)."""
    lane_steps = d / values_per_lane
    steps = -(-lane_steps // 32)
    return rows * lane_steps / steps * values_per_lane * bytes_per_value


def share(simdgroups: int, per_simdgroup: float, gbs: int, cores: int) -> float:
    resident = min(simdgroups, cores * SIMDGROUPS_PER_CORE)
    return min(1.0, resident * per_simdgroup / (gbs * LATENCY_NS))


def main() -> None:
    print(f"UNMEASURED estimates: latency {LATENCY_NS} ns, {SIMDGROUPS_PER_CORE} resident SIMD "
          "groups per core; time = bytes / (bandwidth x share)")
    print("| model | stage, rows | kernel | MB per call | " + " | ".join(
        f"{chip} share, us" for chip in CHIPS) + " |")
    print("|---|---|---|---|" + "---|" * len(CHIPS))
    for model, (d, C, P, V) in MODELS.items():
        n = P * CLUSTER_SIZE
        stage1 = C * d * FORMATS["4-bit"][0] + 2 * C + 2 * d
        cases = {("stage 1", "4-bit"): {
            # old: 8 SIMD groups x 4 clusters one after another; ticket and zero fill of
            # (2 P + C + 1) words; new: keys written, read back by the select from cache.
            "old": (stage1 + 4 * C + 4 * (2 * P + C + 1), C // 4, in_flight(d, 8, 1, 0.5)),
            "new": (stage1 + 4 * C + 8 * P, C // 4, in_flight(d, 16, 4, 0.5)),
            "MLX qmv": (stage1 + 2 * C, C // 4, in_flight(d, 16, 4, 0.5)),
        }}
        for name, (per_weight, old_values, new_values, qmv_values) in FORMATS.items():
            rows = n * (d * per_weight + 4) + 4 * P  # rows, order, probes
            value_bytes = 0.5 if name == "4-bit" else 2.0
            cases[("stage 2", name)] = {
                # old: one SIMD group per probe, its 16 rows one after another; zero fill of
                # the logits, tokens, pairs and tickets.
                "old": (rows + 4 * n + 4 * (n + 3 + 2 * -(-P // 8)), P,
                        in_flight(d, old_values, 1, value_bytes)),
                "new": (rows + 4 * n + 8 * (n // 4), n // 4,
                        in_flight(d, new_values, 4, value_bytes)),
            }
            if qmv_values:
                cases[("stage 2", name)]["MLX qmv"] = (rows + 4 * n, n // 4,
                                                       in_flight(d, qmv_values, 4, value_bytes))
        for (stage, rows_format), kernels in cases.items():
            for kernel, (nbytes, simdgroups, per_simdgroup) in kernels.items():
                cells = []
                for gbs, cores in CHIPS.values():
                    s = share(simdgroups, per_simdgroup, gbs, cores)
                    cells.append(f"{s:.0%}, {nbytes / (gbs * 1e3 * s):.0f}")
                print(f"| {model} | {stage}, {rows_format} | {kernel} | {nbytes / 1e6:.2f} | "
                      + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
