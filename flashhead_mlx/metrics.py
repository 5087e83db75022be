"""What ``flashhead-mlx eval`` and ``tune`` measure: how closely a FlashHead follows its dense
head on hidden states of a text (teacher forcing, no generation).

Every metric, for every ``n_probes``, is computed on those hidden states against the exact dense
logits:

- ``top1_containment`` / ``top5_containment``: shares of positions whose dense argmax (all of the
  dense top 5) is among the candidates; given each position's recent tokens (its last
  ``recent_tokens`` context tokens, which the head scores exactly at greedy steps:
  :mod:`flashhead_mlx.recent`), top-1 also counts the argmax among them (top 5 does not: sampling
  steps score no recent tokens);
- ``greedy_agreement``: share of positions where the head's greedy decode step (the recent tokens
  scored) returns the dense argmax (it differs from top-1 containment only through ties and
  padding, so a bug shows);
- ``candidate_mass``: the dense softmax mass inside the candidates, averaged over positions;
- ``sampling_tv_t1`` / ``sampling_tv_t07_p09``: the total variation distance between the
  distribution of a token sampled through mlx-lm's sampler from FlashHead's logits and from the
  dense logits (T = 1; T = 0.7 with top_p = 0.9), exact at each position
  (:mod:`flashhead_mlx.sampling_distance`), averaged over a subsample of the text's second half.
  The means are printed to the leading digit of their standard error (the JSON keeps them whole,
  with the standard errors). The sampling mass offsets (``mass_bias``) depend on ``n_probes``:
  the folder's serve its own ``n_probes``, and are refitted on the text's first half for any
  other.

Every containment figure comes with its Wilson 95% score interval (``top1_interval``,
``top5_interval``), from the count of positions (``positions``) and of those contained.
:func:`pool_rows` merges the rows of several texts (the suite's domains) into their overall row.

Stage 1 is the head's own (its stored centroids, its kernels' ranking), so a containment figure
is what the head does at run time.
"""

import math
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .clustering import scored_fraction
from .containment import CHUNK_SIZE, counted_ranks, ranked_chunks, token_clusters
from .head import FlashHead
from .loading import load
from .patch import flash_head
from .recent import reading
from .report import table
from .sampling import fit_mass_bias, sampler_distribution, total_variation
from .sampling_distance import dense_draws, expected_distribution, sampler_draws

# n_probes measured by default, as multiples of the folder's.
DEFAULT_PROBE_FACTORS = (0.5, 1.0, 2.0)
# The sampling settings measured: JSON key -> (temperature, top_p).
SAMPLING_SETTINGS = {"sampling_tv_t1": (1.0, None), "sampling_tv_t07_p09": (0.7, 0.9)}
# Positions of the text's first half that mass_bias is refitted on, for other n_probes.
REFIT_POSITIONS = 256
# The standard normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054
# The counts behind the containment shares: JSON key of the count -> key of the share.
COUNTS = {"top1_contained": "top1_containment", "top5_contained": "top5_containment"}


def wilson_interval(successes: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """The Wilson score interval of a binomial proportion, ``successes`` out of ``n`` (95% by
    default): the proportions ``p`` whose score test ``|k/n - p| <= z sqrt(p(1-p)/n)`` accepts."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At 0 (n) successes the bound is 0 (1) exactly; the float difference may miss it by an ulp.
    low = 0.0 if successes == 0 else centre - half
    high = 1.0 if successes == n else centre + half
    return low, high


def add_intervals(row: dict) -> dict:
    """Set a row's containment shares and Wilson intervals from its counts; returns ``row``."""
    for count, share in COUNTS.items():
        row[share] = row[count] / row["positions"]
        row[share.replace("containment", "interval")] = list(
            wilson_interval(row[count], row["positions"])
        )
    return row


def load_head(
    model_path: str, recent_tokens: Optional[int] = None
) -> Tuple[object, object, FlashHead]:
    """The model of the FlashHead folder or repo ``model_path`` with its FlashHead installed (its
    ``recent_tokens``: default :data:`~flashhead_mlx.recent.RECENT_TOKENS`), its tokenizer and
    the FlashHead."""
    options = {} if recent_tokens is None else {"recent_tokens": recent_tokens}
    model, tokenizer = load(model_path, flashhead=options or True)
    return model, tokenizer, flash_head(model)


def default_n_probes(n_probes: int, n_clusters: int) -> List[int]:
    """A folder's ``n_probes`` and multiples of it (:data:`DEFAULT_PROBE_FACTORS`), each in
    ``[1, n_clusters]``."""
    values = (round(f * n_probes) for f in DEFAULT_PROBE_FACTORS)
    return sorted({min(n_clusters, max(1, p)) for p in values})


@contextmanager
def probing(head: FlashHead, n_probes: int, mass_bias: Optional[mx.array] = None):
    """Within the block, ``head`` probes ``n_probes`` clusters (and samples with ``mass_bias``
    when given)."""
    saved = head.n_probes, head.mass_bias
    head.n_probes = n_probes
    if mass_bias is not None:
        head.mass_bias = mass_bias
    try:
        yield head
    finally:
        head.n_probes, head.mass_bias = saved


def dense_pass(
    head: FlashHead, hidden: mx.array, contexts: Optional[mx.array] = None
) -> Dict[str, np.ndarray]:
    """What every ``n_probes`` is measured from, in one pass over the dense logits
    (:func:`flashhead_mlx.containment.ranked_chunks`); ``contexts`` ``[N, R]``: each position's
    recent tokens (:func:`flashhead_mlx.calibration.text_contexts`), or ``None``.

    Returns ``targets`` (the dense argmax at each position, ties to the lowest token id),
    ``top1_ranks`` (the stage-1 rank of the cluster holding the argmax: it is a candidate with
    ``n_probes`` probes exactly when its rank is below ``n_probes``; 0 where the argmax is among
    the position's recent tokens: :func:`flashhead_mlx.containment.counted_ranks`),
    ``top5_ranks`` (the worst rank of the clusters holding the dense top 5) and ``mass_curve``
    (``[n_clusters]``: the mean dense softmax mass of the candidates with ``n_probes = 1, 2,
    ...``).
    """
    n_clusters, size = head.n_clusters, head.cluster_size
    owner = np.array(token_clusters(head.order, size))
    n_top = min(5, head.vocab_size)
    targets, top1, top5 = [], [], []
    mass_total = np.zeros(n_clusters)
    chunks = tqdm(
        ranked_chunks(head, hidden), desc="Dense logits", total=-(-hidden.shape[0] // CHUNK_SIZE)
    )
    for logits, ranks, target in chunks:
        rows = np.arange(logits.shape[0])[:, None]
        targets.append(target)
        top1.append(ranks[rows[:, 0], owner[target]])
        # The dense top 5 lie in the (at most) 5 clusters with the largest logits.
        by_cluster = logits.reshape(logits.shape[0], n_clusters, size)
        k = min(n_top, n_clusters)
        best_clusters = np.argpartition(-by_cluster.max(axis=2), k - 1, axis=1)[:, :k]
        inner = by_cluster[rows, best_clusters].reshape(logits.shape[0], -1)
        top = np.argpartition(-inner, n_top - 1, axis=1)[:, :n_top]
        top5.append(ranks[rows, best_clusters[rows, top // size]].max(axis=1))
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        mass = probs.reshape(logits.shape[0], n_clusters, size).sum(axis=2)
        mass /= mass.sum(axis=1, keepdims=True)
        by_rank = np.empty_like(mass)
        np.put_along_axis(by_rank, ranks, mass, axis=1)
        mass_total += np.cumsum(by_rank, axis=1).sum(axis=0)
    targets = np.concatenate(targets)
    return {
        "targets": targets,
        "top1_ranks": counted_ranks(np.concatenate(top1), targets, contexts),
        "top5_ranks": np.concatenate(top5),
        "mass_curve": mass_total / hidden.shape[0],
    }


def containment_curve(ranks: np.ndarray, n_clusters: int) -> np.ndarray:
    """Share of positions whose rank is below ``n_probes``, for ``n_probes = 1 ... n_clusters``."""
    return np.cumsum(np.bincount(ranks, minlength=n_clusters)[:n_clusters]) / ranks.size


def greedy_tokens(head: FlashHead, h: mx.array, contexts: Optional[mx.array] = None) -> mx.array:
    """The token ``[N]`` the head's greedy decode step picks at each hidden state ``h`` ``[N, d]``
    whose recent tokens are ``contexts`` ``[N, R]`` (``None``: the candidates alone)."""
    if contexts is None or contexts.shape[-1] == 0:
        return head.greedy(h)
    with reading(contexts[None]):
        return mx.argmax(head.greedy_logits(h[None]), axis=-1)[0]


def greedy_agreement(
    head: FlashHead,
    hidden: mx.array,
    targets: np.ndarray,
    contexts: Optional[mx.array] = None,
    chunk_size: int = 256,
) -> float:
    """Share of positions where :func:`greedy_tokens` returns ``targets``."""
    agree = 0
    for start in range(0, hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        greedy = greedy_tokens(head, hidden[part], None if contexts is None else contexts[part])
        agree += int((np.array(greedy) == targets[part]).sum())
    return agree / hidden.shape[0]


def head_row(
    head: FlashHead,
    hidden: mx.array,
    stats: dict,
    n_probes: int,
    contexts: Optional[mx.array] = None,
) -> dict:
    """The containment metrics of ``n_probes`` (from :func:`dense_pass`'s ``stats``, with the same
    ``contexts``), with the counts and Wilson intervals behind the containment shares; the
    scored fraction counts the ``recent_tokens`` rows of ``contexts`` ``[N, R]``."""
    recent = 0 if contexts is None else contexts.shape[-1]
    with probing(head, n_probes):
        greedy = greedy_agreement(head, hidden, stats["targets"], contexts)
    row = {
        "n_probes": n_probes,
        "n_clusters": head.n_clusters,
        "cluster_size": head.cluster_size,
        "recent_tokens": recent,
        "scored_fraction": scored_fraction(
            head.n_clusters, head.cluster_size, n_probes, head.vocab_size, recent
        ),
        "positions": int(stats["targets"].size),
        "top1_contained": int(np.sum(stats["top1_ranks"] < n_probes)),
        "top5_contained": int(np.sum(stats["top5_ranks"] < n_probes)),
        "greedy_agreement": greedy,
        "candidate_mass": float(stats["mass_curve"][n_probes - 1]),
    }
    return add_intervals(row)


def dense_probs(head: FlashHead, h: mx.array, temperature: float, top_p) -> np.ndarray:
    """The dense head's sampler distribution ``[N, V]`` through mlx-lm's sampler."""
    order, logits = np.array(head.order), np.array(head.slot_logits(h).astype(mx.float32))
    draws = (dense_draws(order, row) for row in logits)
    return np.stack([expected_distribution(d, temperature, top_p, head.vocab_size) for d in draws])


def flash_probs(head: FlashHead, h: mx.array, temperature: float, top_p) -> np.ndarray:
    """FlashHead's sampler distribution ``[N, V]`` through mlx-lm's sampler, exact."""
    if top_p is None:
        return np.array(sampler_distribution(head, h, temperature))
    draws = sampler_draws(head, h, temperature)
    return np.stack([expected_distribution(d, temperature, top_p, head.vocab_size) for d in draws])


def sampling_distances(
    head: FlashHead, h: mx.array, temperature: float, top_p, dense: Optional[np.ndarray] = None
) -> np.ndarray:
    """The total variation distance ``[N]`` between FlashHead's and the dense head's sampler
    distributions at each hidden state ``h`` ``[N, d]`` (``dense``: :func:`dense_probs`, when
    already computed)."""
    if dense is None:
        dense = dense_probs(head, h, temperature, top_p)
    return np.array(total_variation(flash_probs(head, h, temperature, top_p), dense))


def evenly(hidden: mx.array, n: int) -> mx.array:
    """At most ``n`` rows of ``hidden``, evenly spaced."""
    return hidden[:: max(1, -(-hidden.shape[0] // n))]


def mean_and_stderr(values: np.ndarray) -> Tuple[float, float]:
    """The mean of ``values`` and its standard error (``nan`` from a single value)."""
    stderr = values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else math.nan
    return float(values.mean()), float(stderr)


def decimals(stderr: float, most: int = 6) -> int:
    """Decimals that print a mean to the leading digit of its standard error ``stderr`` (at most
    ``most``; ``most`` for an exact mean, 4 for an unknown error)."""
    if math.isnan(stderr):
        return 4
    if stderr <= 0:
        return most
    return int(min(most, max(0, -math.floor(math.log10(stderr)))))


def add_sampling_distances(
    head: FlashHead, hidden: mx.array, rows: List[dict], tv_positions: int, chunk_size: int = 32
) -> None:
    """Add the sampling distances (:data:`SAMPLING_SETTINGS`) to each row of :func:`head_row`,
    with their standard errors, the positions measured and where ``mass_bias`` came from."""
    half = hidden.shape[0] // 2
    fit, held_out = evenly(hidden[:half], REFIT_POSITIONS), evenly(hidden[half:], tv_positions)
    mass_biases = {}
    for row in rows:
        stored = row["n_probes"] == head.n_probes and head.mass_bias is not None
        with probing(head, row["n_probes"]):
            mass_biases[row["n_probes"]] = head.mass_bias if stored else fit_mass_bias(head, fit)
        row["mass_bias"] = "stored" if stored else "refit"
    distances = {(row["n_probes"], key): [] for row in rows for key in SAMPLING_SETTINGS}
    for start in tqdm(range(0, held_out.shape[0], chunk_size), desc="Sampling distances"):
        h = held_out[start : start + chunk_size]
        for key, (temperature, top_p) in SAMPLING_SETTINGS.items():
            dense = dense_probs(head, h, temperature, top_p)
            for p, mass_bias in mass_biases.items():
                with probing(head, p, mass_bias):
                    tv = sampling_distances(head, h, temperature, top_p, dense)
                distances[p, key].append(tv)
    for row in rows:
        for key in SAMPLING_SETTINGS:
            mean, stderr = mean_and_stderr(np.concatenate(distances[row["n_probes"], key]))
            row[key] = mean
            row[f"{key}_stderr"] = stderr
        row["sampling_positions"] = held_out.shape[0]


def evaluate(
    head: FlashHead,
    hidden: mx.array,
    n_probes: Sequence[int],
    tv_positions: int = 128,
    contexts: Optional[mx.array] = None,
) -> Tuple[List[dict], dict]:
    """One row of metrics per ``n_probes`` (the JSON's ``results``) and :func:`dense_pass`'s
    statistics; no sampling distances when ``tv_positions`` is 0; top-1 and greedy count each
    position's recent tokens ``contexts`` ``[N, R]`` when given."""
    for p in n_probes:
        if not 1 <= p <= head.n_clusters:
            raise ValueError(f"n_probes must be in [1, {head.n_clusters}], got {p}")
    stats = dense_pass(head, hidden, contexts)
    rows = [
        head_row(head, hidden, stats, p, contexts) for p in tqdm(n_probes, desc="Greedy tokens")
    ]
    if tv_positions:
        add_sampling_distances(head, hidden, rows, tv_positions)
    return rows, stats


def pool_rows(tables: Sequence[List[dict]]) -> List[dict]:
    """The overall rows of several texts measured at the same ``n_probes`` (one list of
    :func:`evaluate` rows per text): counts added, the other shares and the sampling distances
    averaged over positions (their standard errors combined as for a stratified mean)."""
    pooled = []
    for rows in zip(*tables):
        if len({row["n_probes"] for row in rows}) != 1:
            raise ValueError("the texts were measured at different n_probes")
        n = sum(row["positions"] for row in rows)
        row = {k: v for k, v in rows[0].items() if k not in ("positions", *COUNTS)}
        row["positions"] = n
        for count in COUNTS:
            row[count] = sum(r[count] for r in rows)
        for key in ("greedy_agreement", "candidate_mass"):
            row[key] = sum(r[key] * r["positions"] for r in rows) / n
        if "sampling_positions" in row:
            m = sum(r["sampling_positions"] for r in rows)
            for key in SAMPLING_SETTINGS:
                row[key] = sum(r[key] * r["sampling_positions"] for r in rows) / m
                variance = sum((r[f"{key}_stderr"] * r["sampling_positions"]) ** 2 for r in rows)
                row[f"{key}_stderr"] = math.sqrt(variance) / m
            row["sampling_positions"] = m
        pooled.append(add_intervals(row))
    return pooled


def pool_stats(stats: Sequence[dict]) -> dict:
    """:func:`dense_pass`'s statistics of several texts as those of one."""
    keys = ("targets", "top1_ranks", "top5_ranks")
    pooled = {k: np.concatenate([s[k] for s in stats]) for k in keys}
    sizes = np.array([s["targets"].size for s in stats])
    curves = np.stack([s["mass_curve"] for s in stats])
    pooled["mass_curve"] = (sizes[:, None] * curves).sum(axis=0) / sizes.sum()
    return pooled


def format_rows(rows: List[dict], labels: Optional[List[str]] = None) -> str:
    """The human table of :func:`evaluate`'s rows (each after its label, when given): the
    containment shares with their Wilson 95% intervals; the top-1 and greedy headers say how
    many recent tokens they count."""
    recent = rows[0].get("recent_tokens", 0)
    counted = f" +recent {recent}" if recent else ""
    header = ["n_probes", "scored", f"top-1{counted} [95% CI]", "top-5 [95% CI]",
              f"greedy{counted}", "cand. mass"]
    sampling = "sampling_tv_t1" in rows[0]
    if sampling:
        header += ["TV T=1", "TV T=0.7 top_p=0.9", "mass_bias"]
    cells = []
    for row in rows:
        cell = [str(row["n_probes"]), f"{100 * row['scored_fraction']:.1f}%"]
        for key in ("top1", "top5"):
            low, high = row[f"{key}_interval"]
            share = row[f"{key}_containment"]
            cell.append(f"{100 * share:.2f}% [{100 * low:.2f}, {100 * high:.2f}]")
        cell += [f"{100 * row[key]:.2f}%" for key in ("greedy_agreement", "candidate_mass")]
        if sampling:
            for key in SAMPLING_SETTINGS:
                digits = decimals(row[f"{key}_stderr"])
                cell.append(f"{row[key]:.{digits}f} ± {row[f'{key}_stderr']:.1g}")
            cell.append(row["mass_bias"])
        cells.append(cell)
    if labels:
        return table(["", *header], [[label, *cell] for label, cell in zip(labels, cells)])
    return table(header, cells)
