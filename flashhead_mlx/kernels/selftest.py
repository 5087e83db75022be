"""The kernels' first-use self-test: on a Mac, the Metal kernels run only where they compile,
agree with their pure-MLX path and are faster than it, on this machine, for this shape.

At a FlashHead's first call of a stage (:func:`centroid_topk`, :func:`cluster_argmax`: the
kernels of the same names, called with the same arguments) with a new shape, where Metal is
available, the self-test

1. runs the kernels on random rows of that shape, which compiles them: an error (Apple's
   compiler rejecting the source, a failure at run time) is recorded;
2. checks them against the pure-MLX path on those rows, tie-aware: every score or logit within
   the tolerance (:data:`REL_TOL` of the row's largest magnitude, plus :data:`ABS_TOL`), and the
   ids (probed clusters, the greedy token) the same but where the MLX path's scores of the ids
   that differ lie within twice the tolerance of the selection's boundary (a near-tie that
   another summation order may break the other way);
3. times the two paths on those rows: :data:`RUNS` runs alternated after a warm-up run each,
   :data:`CALLS` calls a run, medians compared.

The kernels run only if they compiled, agreed and were faster; otherwise the MLX path does, and
one line on the standard error says why. A shape is the stage's arguments' shapes and dtypes and
the rows of the call, rounded up to a power of two (calls of more than :data:`MAX_ROWS` rows, such
as prompt chunks, take the MLX path untested). The decision is kept for the process and in
:func:`cache_file`, keyed by the machine too (:func:`machine`: chip, OS and MLX versions, a hash of
the kernel sources), so a later process, or a new shape, tests only what it has not met.

``FLASHHEAD_KERNELS=metal|mlx`` (or a :func:`~flashhead_mlx.kernels.kernel_path` block) forces a
path and skips the self-test; without Metal, or for a format the kernels do not take, the
kernels' own choice stands and nothing is tested.
"""

import datetime
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..durable import replace_text
from ..timing import alternate
from ._common import METAL_DIR, forced_path, kernel_path
from .centroid_topk import KERNEL_BITS as STAGE1_BITS
from .centroid_topk import centroid_topk as centroid_topk_kernel
from .centroid_topk import cluster_scores
from .cluster_argmax import KERNEL_BITS as STAGE2_BITS
from .cluster_argmax import cluster_argmax as cluster_argmax_kernel
from .cluster_argmax import slot_tokens

# The most rows a self-tested call has (a shape's rows are the call's, rounded up to a power of
# two); calls of more take the MLX path untested.
MAX_ROWS = 64
# Timed runs of each path (after a warm-up run each), and calls per run.
RUNS = 5
CALLS = 4
# A score or logit agrees within REL_TOL of its row's largest magnitude plus ABS_TOL (float32
# sums in another order differ by ~1e-6 of it).
REL_TOL = 1e-4
ABS_TOL = 1e-6
CACHE_FORMAT = 1
# The self-test's clock (seconds); the tests replace it.
clock: Callable[[], float] = time.perf_counter
# The path ("metal" or "mlx") of each shape met in this process, by its fields' values.
_decisions: Dict[tuple, str] = {}

# (run, check): run(path) computes the stage on the case's rows on ``path`` ("metal" or "mlx");
# check(outputs of the kernels) says how they disagree with the MLX path, or None.
Case = Tuple[Callable[[str], tuple], Callable[[tuple], Optional[str]]]


def centroid_topk(h, centroids, scales, biases, cluster_bias, n_probes, group_size=64, bits=4):
    """:func:`flashhead_mlx.kernels.centroid_topk` on the path the self-test chose for its
    shape."""
    args = (centroids, scales, biases, cluster_bias, n_probes, group_size, bits)
    d = h.shape[-1]
    shape = None
    if bits in STAGE1_BITS and (bits is not None or d % 4 == 0):
        shape = {"stage": "centroid_topk", "rows": h.size // d, "h": (h.dtype, (d,)),
                 "centroids": signature(centroids), "scales": signature(scales),
                 "cluster_bias": signature(cluster_bias), "n_probes": n_probes,
                 "group_size": group_size, "bits": bits}
    with kernel_path(choose(shape, lambda rows: centroid_topk_case(rows, h.dtype, *args))):
        return centroid_topk_kernel(h, *args)


def cluster_argmax(h, probes, weight, scales, biases, order, cluster_size, group_size=None,
                   bits=None, transform=None, mode="affine", path=None):
    """:func:`flashhead_mlx.kernels.cluster_argmax` on the path the self-test chose for its
    shape."""
    args = (weight, scales, biases, order, cluster_size, group_size, bits, transform, mode)
    d = h.shape[-1]
    shape = None
    if (path in (None, "rows") and mode == "affine" and bits in STAGE2_BITS
            and (bits is not None or d % 4 == 0)):
        shape = {"stage": "cluster_argmax", "rows": h.size // d, "h": (h.dtype, (d,)),
                 "clusters_per_row": probes.shape[-1], "weight": signature(weight),
                 "scales": signature(scales), "cluster_size": cluster_size,
                 "group_size": group_size, "bits": bits,
                 "softcap": transform is not None and transform.kind == "softcap"}
    k = probes.shape[-1]
    with kernel_path(choose(shape, lambda rows: cluster_argmax_case(rows, h.dtype, k, *args))):
        return cluster_argmax_kernel(h, probes, *args, path)


def signature(a: Optional[mx.array]) -> Optional[tuple]:
    """``a``'s dtype and shape (None for None): a field of a shape."""
    return None if a is None else (a.dtype, tuple(a.shape))


def key_fields(key: dict) -> dict:
    """``key`` with each dtype and shape as text, e.g. ``"float16[3072, 576]"``: what the cache
    file holds."""
    return {name: f"{str(v[0]).split('.')[-1]}{list(v[1])}" if isinstance(v, tuple) else v
            for name, v in key.items()}


def choose(shape: Optional[dict], make_case: Callable[[int], Case]) -> Optional[str]:
    """The path of a stage call of ``shape`` (None: a format the kernels do not take): ``None``
    (no choice: the kernels' own) where a path is forced (``FLASHHEAD_KERNELS``, a
    :func:`~flashhead_mlx.kernels.kernel_path` block) or Metal is absent;
    ``"mlx"`` above :data:`MAX_ROWS` rows; else the self-test's decision, made on first use
    (:func:`decide`, on the case ``make_case(rows)``)."""
    if shape is None or forced_path() or not mx.metal.is_available():
        return None
    if shape["rows"] > MAX_ROWS:
        return "mlx"
    shape = {**shape, "rows": 1 << (shape["rows"] - 1).bit_length()}
    memo = tuple(shape.values())
    if memo not in _decisions:
        _decisions[memo] = decide(key_fields(shape), make_case)["path"]
    return _decisions[memo]


def key_name(key: dict) -> str:
    """The text of a key (a shape, or a machine and a shape): ``name=value`` pairs."""
    return " ".join(f"{name}={value}" for name, value in key.items())


def decide(shape: dict, make_case: Callable[[int], Case]) -> dict:
    """The cached self-test of ``shape`` (:func:`key_fields`) on this machine, or a new one
    (:func:`self_test`), saved and, when it falls back to the MLX path, said in one line."""
    key = {**machine(), **shape}
    name = key_name(key)
    cached = read_cache().get(name)
    if isinstance(cached, dict) and cached.get("path") in ("metal", "mlx"):
        return cached
    result = {"key": key, **self_test(*make_case(shape["rows"]), RUNS)}
    result["tested_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if result["path"] == "mlx":
        print(f"[INFO] FlashHead: {shape['stage']} takes the MLX path for {key_name(shape)}: "
              f"{result['reason']}", file=sys.stderr)
    save_decision(name, result)
    return result


def self_test(run: Callable[[str], tuple], check: Callable[[tuple], Optional[str]],
              runs: int) -> dict:
    """Run, check and time the kernels against the MLX path on a case (:data:`Case`): whether
    they compiled and ran (``compiled``, else the ``error``), how they disagree (``mismatch``,
    or None), the median ms of a call of each path (``kernel_ms``, ``mlx_ms``; None untimed,
    ``runs=0``), the ``path`` this implies ("mlx" when untimed) and the ``reason``."""
    result = {"compiled": False, "error": None, "mismatch": None, "kernel_ms": None,
              "mlx_ms": None}
    try:
        outputs = run("metal")
        mx.eval(outputs)
        result["compiled"] = True
    except Exception as error:  # Apple's compiler, or the kernel at run time: say which
        result["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
    if result["compiled"]:
        result["mismatch"] = check(outputs)
    if result["compiled"] and not result["mismatch"] and runs:
        calls = {"kernel_ms": (lambda _: run("metal"), range(CALLS)),
                 "mlx_ms": (lambda _: run("mlx"), range(CALLS))}
        result.update(alternate(calls, runs, clock))
    return {**result, **verdict(result)}


def verdict(result: dict) -> dict:
    """The ``path`` and ``reason`` of a :func:`self_test` result."""
    kernel, mlx = result["kernel_ms"], result["mlx_ms"]
    if not result["compiled"]:
        return {"path": "mlx", "reason": f"the kernels failed: {result['error']}"}
    if result["mismatch"]:
        return {"path": "mlx", "reason": f"the kernels disagree with the MLX path: "
                                          f"{result['mismatch']}"}
    if kernel is None:
        return {"path": "mlx", "reason": "the kernels agree with the MLX path (not timed)"}
    timing = f"{kernel:.3f} ms a call, the MLX path {mlx:.3f} ms"
    if kernel >= mlx:
        return {"path": "mlx", "reason": f"the kernels are not faster ({timing})"}
    return {"path": "metal", "reason": f"the kernels agree and are faster ({timing})"}


def random_rows(rows: int, d: int, dtype: mx.Dtype) -> mx.array:
    """``rows`` hidden states ``[rows, d]`` of ``dtype``, standard normal (a fixed seed)."""
    return mx.random.normal((rows, d), key=mx.random.key(0)).astype(dtype)


def centroid_topk_case(rows: int, dtype: mx.Dtype, centroids, scales, biases, cluster_bias,
                       n_probes, group_size=64, bits=4) -> Case:
    """The self-test's :data:`Case` of stage 1 (the arguments of :func:`centroid_topk` after
    ``h``) on ``rows`` random hidden states of ``dtype``: the probed clusters checked against
    every cluster's MLX score."""
    args = (centroids, scales, biases, cluster_bias, n_probes, group_size, bits)
    d = centroids.shape[-1] * (32 // bits if bits else 1)
    h = random_rows(rows, d, dtype)

    def run(path: str) -> tuple:
        with kernel_path(path):
            return centroid_topk_kernel(h, *args)

    def check(outputs: tuple) -> Optional[str]:
        exact = np.array(cluster_scores(h, centroids, scales, biases, cluster_bias, group_size,
                                        bits))
        return selection_mismatch(*(np.array(a) for a in outputs), exact, n_probes)

    return run, check


def cluster_argmax_case(rows: int, dtype: mx.Dtype, clusters_per_row: int, weight, scales,
                        biases, order, cluster_size, group_size=None, bits=None, transform=None,
                        mode="affine") -> Case:
    """The self-test's :data:`Case` of stage 2 (the arguments of :func:`cluster_argmax` after
    ``h`` and ``probes``) on ``rows`` random hidden states of ``dtype``, each with
    ``clusters_per_row`` distinct random clusters: the logits and greedy token checked against
    the MLX path's."""
    args = (weight, scales, biases, order, cluster_size, group_size, bits, transform, mode)
    d = weight.shape[-1] * (32 // bits if bits else 1)
    h = random_rows(rows, d, dtype)
    rng = np.random.default_rng(0)
    n_clusters = order.size // cluster_size
    probes = mx.array(np.stack([np.sort(rng.choice(n_clusters, clusters_per_row, replace=False))
                                for _ in range(rows)]).astype(np.uint32))

    def run(path: str) -> tuple:
        with kernel_path(path):
            return cluster_argmax_kernel(h, probes, *args)

    def check(outputs: tuple) -> Optional[str]:
        tokens = np.array(slot_tokens(probes, order, cluster_size))
        exact = tuple(np.array(a) for a in run("mlx"))
        return argmax_mismatch(*(np.array(a) for a in outputs), *exact, tokens)

    return run, check


def tolerance(values: np.ndarray) -> float:
    """How far a score or logit of a row of ``values`` may be from the MLX path's."""
    finite = np.abs(values[np.isfinite(values)])
    return REL_TOL * (finite.max() if finite.size else 0.0) + ABS_TOL


def selection_mismatch(ids: np.ndarray, scores: np.ndarray, exact: np.ndarray,
                       n_probes: int) -> Optional[str]:
    """How stage 1's ``ids`` and ``scores`` ``[rows, n_probes]`` disagree with every cluster's
    MLX scores ``exact`` ``[rows, n_clusters]``, or None: each row must hold ``n_probes``
    distinct clusters with their scores, every cluster clearly above the ``n_probes``-th best
    and none clearly below it (within twice the tolerance, either way)."""
    for row, (chosen, own, row_exact) in enumerate(zip(ids.astype(np.int64), scores, exact)):
        tol = tolerance(row_exact)
        if len(set(chosen)) != n_probes or not (0 <= chosen).all() \
                or not (chosen < len(row_exact)).all():
            return f"row {row}: clusters {chosen[:8].tolist()}... are not {n_probes} clusters"
        far = ~(np.abs(own - row_exact[chosen]) <= tol)
        if far.any():
            at = chosen[far][0]
            return (f"row {row}: cluster {at} scored {own[far][0]:.6g}, by the MLX path "
                    f"{row_exact[at]:.6g}")
        kth = np.sort(row_exact)[-n_probes]
        above = np.flatnonzero(row_exact > kth + 2 * tol)
        if not np.isin(above, chosen).all() or (row_exact[chosen] < kth - 2 * tol).any():
            return f"row {row}: not the {n_probes} best clusters (beyond near-ties)"
    return None


def argmax_mismatch(token: np.ndarray, logits: np.ndarray, exact_token: np.ndarray,
                    exact: np.ndarray, tokens: np.ndarray) -> Optional[str]:
    """How stage 2's greedy ``token`` ``[rows]`` and ``logits`` ``[rows, slots]`` disagree with
    the MLX path's (``exact_token``, ``exact``) at the slots' token ids ``tokens``, or None:
    the same padding (``-inf``), each logit within the tolerance, and the same token but where
    the MLX logits of the two are within twice the tolerance."""
    for row in range(exact.shape[0]):
        tol = tolerance(exact[row])
        if not np.array_equal(np.isneginf(logits[row]), np.isneginf(exact[row])):
            return f"row {row}: the padding slots (-inf) differ"
        real = np.isfinite(exact[row])
        far = ~(np.abs(logits[row][real] - exact[row][real]) <= tol)
        if far.any():
            slot = np.flatnonzero(real)[far][0]
            return (f"row {row}: slot {slot} has logit {logits[row, slot]:.6g}, by the MLX path "
                    f"{exact[row, slot]:.6g}")
        if token[row] != exact_token[row]:
            at = np.flatnonzero(tokens[row] == token[row])
            if not at.size or exact[row, at[0]] < exact[row].max() - 2 * tol:
                return f"row {row}: greedy token {token[row]}, by the MLX path {exact_token[row]}"
    return None


def os_version() -> str:
    """The operating system and its version, e.g. ``macOS 15.1`` or ``Linux 6.1.0``."""
    mac = platform.mac_ver()[0]
    return f"macOS {mac}" if mac else f"{platform.system()} {platform.release()}"


def source_hash(paths: Sequence[Path]) -> str:
    """SHA-256 (16 hex digits) of the files ``paths``, names and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def kernel_source_hash() -> str:
    """:func:`source_hash` of the kernels: their Metal sources and their Python launchers."""
    return source_hash([*METAL_DIR.glob("*.metal"), *Path(__file__).parent.glob("*.py")])


def machine() -> dict:
    """What a decision holds for besides the shape: the chip, the OS and MLX versions, and the
    kernel sources' hash."""
    return {"chip": mx.device_info().get("device_name", platform.machine()),
            "os": os_version(), "mlx": mx.__version__, "kernels": kernel_source_hash()}


def cache_file() -> Path:
    """The decisions' JSON file: ``~/.cache/flashhead-mlx/kernel-selftest.json``, or
    ``FLASHHEAD_SELFTEST_CACHE``."""
    default = Path.home() / ".cache" / "flashhead-mlx" / "kernel-selftest.json"
    return Path(os.environ.get("FLASHHEAD_SELFTEST_CACHE", default))


def read_cache() -> Dict[str, dict]:
    """The decisions of :func:`cache_file` by key text (:func:`key_name`); none when it is
    missing, unreadable or of another format."""
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("format") == CACHE_FORMAT
    return data.get("decisions", {}) if ok else {}


def save_decision(name: str, result: dict) -> None:
    """Add one decision to :func:`cache_file`, rewritten atomically (a concurrent writer's may be
    lost, and tested again); a cache that cannot be written is left as it is."""
    path = cache_file()
    decisions = {**read_cache(), name: result}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, json.dumps({"format": CACHE_FORMAT, "decisions": decisions},
                                      indent=1) + "\n")
    except OSError:
        pass
