"""Make an mlx-lm folder a FlashHead folder from a FlashHead clustering published for vLLM.

``flashhead-mlx import-assets --model DIR --assets PATH``. The published layout:
``clustering_cache.safetensors`` holds ``centroids`` ``(hidden_size, n_clusters)`` and
``cluster_assignments`` ``(vocab_size,)``, the cluster of every token (leading axes of size 1
are allowed), next to ``clustering_config.json`` with ``vocab_size``, ``hidden_size`` and
``n_clusters``. ``PATH`` is that folder, the ``.safetensors`` file, or a model folder whose
``config.json`` names the folder in ``flash_head_cache_dir``.

The imported assignment fixes the clusters, kept exactly (cluster ``k`` holds the tokens
assigned to ``k``, in token order); every cluster must have the same size. The stage-1 centroids are
not the published ones (the clusters' mean directions) but flashhead-mlx's own, fitted on
calibration hidden states exactly as ``convert`` fits them (``clustering.fit_centroids``: a least-
squares estimate of each cluster's largest logit): at the same cost they find the dense argmax
far more often (on clusters of SmolLM2-135M's raw rows at 10% of the vocabulary scored, 98.88%
top-1 containment against 88.40% with unit centroids; docs/clustering.md). The published
centroids are checked for their shape only. The sampling mass offsets are fitted too, so the
folder is what ``convert`` would have written with these clusters.
"""

import argparse
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .arguments import add_assets_arguments
from .assets import is_flashhead_folder, reclaim_leftovers
from .flashhead_format import brief, load_safetensors
from .clustering import clusters_from_order, slot_order
from .loading import load
from .model_card import read_card
from .model_head import head_module, head_rows
from .pipeline import calibration_states, finish_assets, install_flashhead, source_name
from .storage import plain_write_errors

CACHE_FILE = "clustering_cache.safetensors"
META_FILE = "clustering_config.json"


def clustering_files(path: Path) -> tuple:
    """The ``clustering_cache.safetensors`` and ``clustering_config.json`` of ``path``."""
    path = path.expanduser()
    if path.is_file():
        cache = path
    else:
        config = path / "config.json"
        if not (path / CACHE_FILE).is_file() and config.is_file():
            path = path / json.loads(config.read_text()).get("flash_head_cache_dir", "")
        cache = path / CACHE_FILE
    meta = cache.with_name(META_FILE)
    for file in (cache, meta):
        if not file.is_file():
            raise ValueError(
                f"{file} is missing: --assets takes the folder of {CACHE_FILE} and {META_FILE}, "
                "the .safetensors file, or a model folder naming it in flash_head_cache_dir"
            )
    return cache, meta


def _squeezed(array: mx.array, name: str, shape: tuple, where: Path) -> mx.array:
    """``array`` without leading axes of size 1, checked to be ``shape``."""
    if any(n != 1 for n in array.shape[: -len(shape)]) or tuple(array.shape[-len(shape) :]) != shape:
        raise ValueError(f"{where}: {name} has shape {tuple(array.shape)}, expected {shape}")
    return array.reshape(shape)


def read_clustering(path: str, vocab_size: int, hidden_size: int) -> tuple:
    """The cluster of every token (``[vocab_size]``) and ``n_clusters`` of the published
    clustering at ``path``, checked against a head of ``vocab_size`` x ``hidden_size`` rows.

    Raises ``ValueError`` naming the mismatch: sizes that differ from the model's or between the
    files, missing arrays, cluster ids out of range, or clusters of unequal sizes.
    """
    cache, meta_path = clustering_files(Path(path))
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as error:  # not UTF-8, or not JSON
        raise ValueError(f"{meta_path} is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object")
    missing = [key for key in ("vocab_size", "hidden_size", "n_clusters") if key not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}")
    for key in ("vocab_size", "hidden_size", "n_clusters"):
        if type(meta[key]) is not int:
            raise ValueError(f"{meta_path}: {key} is {brief(meta[key])}, not an integer")
    for key, expected in (("vocab_size", vocab_size), ("hidden_size", hidden_size)):
        if meta[key] != expected:
            raise ValueError(
                f"{meta_path}: {key} is {meta[key]}, but the model's head has {expected} "
                f"({'rows' if key == 'vocab_size' else 'columns'}): a clustering of another model?"
            )
    n_clusters = meta["n_clusters"]
    if not 1 <= n_clusters <= vocab_size:
        raise ValueError(f"{meta_path}: n_clusters must be in [1, {vocab_size}], got {brief(n_clusters)}")
    if vocab_size % n_clusters:
        raise ValueError(
            f"{meta_path}: {vocab_size} tokens cannot make {n_clusters} clusters of equal size "
            "(FlashHead needs clusters of equal size)"
        )
    arrays = load_safetensors(cache)
    for name in ("centroids", "cluster_assignments"):
        if name not in arrays:
            raise ValueError(f"{cache} lacks the array {name!r} (it has {sorted(arrays)})")
    _squeezed(arrays["centroids"], "centroids", (hidden_size, n_clusters), cache)
    labels = _squeezed(arrays["cluster_assignments"], "cluster_assignments", (vocab_size,), cache)
    if not mx.issubdtype(labels.dtype, mx.integer):
        dtype = str(labels.dtype).split(".")[-1]
        raise ValueError(f"{cache}: cluster_assignments are {dtype}, not integers")
    labels = np.array(labels).astype(np.int64)
    if labels.min() < 0 or labels.max() >= n_clusters:
        raise ValueError(
            f"{cache}: cluster_assignments range over [{labels.min()}, {labels.max()}], outside "
            f"the {n_clusters} clusters of {meta_path.name}"
        )
    sizes = np.bincount(labels, minlength=n_clusters)
    uneven = np.flatnonzero(sizes != vocab_size // n_clusters)
    if uneven.size:
        raise ValueError(
            f"{cache}: cluster {uneven[0]} has {sizes[uneven[0]]} tokens, not "
            f"{vocab_size // n_clusters} (vocab_size / n_clusters), and {uneven.size} clusters "
            "in all differ: FlashHead needs clusters of equal size"
        )
    return labels, n_clusters


def import_assets(
    model: str,
    assets: str,
    n_probes: Optional[int] = None,
    centroid_bits: Optional[int] = 4,
    calibration_tokens: int = 16384,
    force: bool = False,
    model_file: bool = False,
) -> Path:
    """Make the mlx-lm folder ``model`` a FlashHead folder with the clusters of the published
    clustering ``assets``, centroids fitted on ``calibration_tokens`` tokens (see the module's
    docstring), as ``convert`` writes it (``model_file``: the remote-code variant). Nothing is
    written unless the clustering fits the model; an existing FlashHead folder is only replaced
    with ``force``, atomically. Returns the folder."""
    folder = Path(model).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not an mlx-lm model folder (no config.json)")
    with plain_write_errors(folder):  # a full disk, a read-only folder, ...: one line
        reclaim_leftovers(folder)
        if is_flashhead_folder(folder) and not force:
            raise ValueError(f"{folder} already has FlashHead assets; pass --force to replace them")
        mlx_model, tokenizer = load(str(folder), flashhead=False)
        weight = head_rows(head_module(mlx_model))
        labels, n_clusters = read_clustering(assets, *weight.shape)
        cluster_size = weight.shape[0] // n_clusters
        order = slot_order(labels, cluster_size)
        imported = Path(assets).expanduser()
        imported_from = (imported.parent if imported.is_file() else imported).resolve().name
        print(f"[INFO] Imported {n_clusters} clusters from {imported_from}")

        hidden = calibration_states(mlx_model, tokenizer, calibration_tokens)
        clusters = clusters_from_order(weight, order, cluster_size, hidden)
        del weight
        result = finish_assets(
            mlx_model, tokenizer, clusters, hidden, n_probes, centroid_bits, "clusters imported"
        )
        base_model = read_card(folder)[0].get("base_model")
        source = base_model if isinstance(base_model, str) else source_name(str(folder))
        provenance = {"source": source, "imported_from": imported_from}
        install_flashhead(folder, result, mlx_model, provenance, model_file=model_file)
        print(f"[INFO] Wrote the FlashHead assets of {folder}")
        return folder


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashhead-mlx import-assets",
        description="Make an mlx-lm folder a FlashHead folder from a FlashHead clustering "
        "published for vLLM (clustering_cache.safetensors + clustering_config.json).",
    )
    parser.add_argument("--model", required=True, help="The local mlx-lm model folder to complete.")
    parser.add_argument(
        "--assets",
        required=True,
        help="The clustering: its folder, its clustering_cache.safetensors, or a model folder "
        "whose config.json names it in flash_head_cache_dir.",
    )
    add_assets_arguments(parser)
    parser.add_argument(
        "--force", action="store_true", help="Replace the folder's FlashHead assets if it has some."
    )
    return parser


def main() -> None:
    args = setup_arg_parser().parse_args()
    try:
        import_assets(**vars(args))
    except ValueError as error:  # the plain errors, a full disk or a read-only folder too
        raise SystemExit(f"flashhead-mlx import-assets: error: {error}")


if __name__ == "__main__":
    main()
