"""FlashHead assets: the clusters of a head, saved next to a normal mlx-lm model folder.

A converted folder keeps the model's weights untouched, in their original order, and adds
``flashhead.safetensors`` (slot order, stage-1 centroids in their stored quantized form, biases)
and a ``"flashhead"`` section in ``config.json``. Loading checks every shape against the model and
a fingerprint of the head's weights, so assets never silently produce wrong tokens.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .model_head import head_module as find_head_module

FORMAT_VERSION = 1
ASSETS_FILE = "flashhead.safetensors"
# The model file that lets plain mlx-lm load a converted folder (trust_remote_code=True).
MODEL_FILE = "flashhead_model.py"
CENTROID_BITS = (2, 3, 4, 5, 6, 8)


def head_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the raw arrays (weight, scales, biases) of a head module, with their shapes."""
    digest = hashlib.sha256()
    for name in ("weight", "scales", "biases"):
        array = module.get(name)
        if array is None:
            continue
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)};".encode())
        digest.update(memoryview(np.array(array.view(mx.uint8), copy=False)))
    return "sha256:" + digest.hexdigest()


def _head_shape(module: nn.Module) -> tuple:
    """``(V, d)`` of a head module, quantized or not."""
    rows, columns = module.weight.shape
    return rows, columns * 32 // module.bits if "scales" in module else columns


def make_assets(
    clusters: dict,
    n_probes: int,
    centroid_bits: Optional[int] = 4,
    centroid_group_size: int = 64,
    mass_bias: Optional[mx.array] = None,
) -> dict:
    """The runtime assets of ``clusters`` (from ``clustering.cluster_head``), centroids quantized.

    Args:
        clusters (dict): ``order`` ``[n_clusters * cluster_size]`` (-1 for padding),
            ``centroids`` ``[n_clusters, d]`` and ``cluster_bias`` ``[n_clusters]``.
        n_probes (int): default number of clusters scored exactly per token.
        centroid_bits (int, optional): affine quantization bits of the centroids, ``None`` to keep
            them float32. Default: ``4``.
        centroid_group_size (int): quantization group size of the centroids. Default: ``64``.
        mass_bias (mx.array, optional): per-cluster mass offsets for full-vocabulary sampling.
    """
    order = mx.array(clusters["order"]).astype(mx.int32)
    centroids = mx.array(clusters["centroids"]).astype(mx.float32)
    n_clusters, dims = centroids.shape
    if order.size % n_clusters:
        raise ValueError(f"order has {order.size} slots, not a multiple of {n_clusters} clusters")
    if not 1 <= n_probes <= n_clusters:
        raise ValueError(f"n_probes must be in [1, {n_clusters}], got {n_probes}")
    assets = {
        "order": order,
        "cluster_bias": mx.array(clusters["cluster_bias"]).astype(mx.float32),
        "cluster_size": order.size // n_clusters,
        "n_probes": n_probes,
        "centroid_bits": centroid_bits,
        "centroid_group_size": centroid_group_size,
    }
    if centroid_bits is None:
        assets["centroids"] = centroids
    else:
        if centroid_bits not in CENTROID_BITS:
            raise ValueError(
                f"centroid_bits must be one of {CENTROID_BITS} or None, got {centroid_bits}"
            )
        if centroid_group_size not in (32, 64, 128) or dims % centroid_group_size:
            raise ValueError(
                f"centroid_group_size must be 32, 64 or 128 and divide the hidden size {dims}, "
                f"got {centroid_group_size}"
            )
        assets["centroids"], assets["centroid_scales"], assets["centroid_biases"] = mx.quantize(
            centroids, centroid_group_size, centroid_bits
        )
    if mass_bias is not None:
        assets["mass_bias"] = mx.array(mass_bias).astype(mx.float32)
    return assets


def save_assets(
    folder,
    clusters: dict,
    n_probes: int,
    centroid_bits: Optional[int] = 4,
    mass_bias: Optional[mx.array] = None,
    *,
    head_module: nn.Module,
    centroid_group_size: int = 64,
) -> None:
    """Write ``flashhead.safetensors`` and the ``"flashhead"`` section of ``config.json``.

    ``head_module`` is the model's head (``lm_head`` or tied ``embed_tokens``) the clusters were
    computed from; its fingerprint is stored. Writing atomically is the caller's job.
    """
    folder = Path(folder)
    assets = make_assets(clusters, n_probes, centroid_bits, centroid_group_size, mass_bias)
    vocab_size, dims = _head_shape(head_module)
    n_clusters = assets["cluster_bias"].size
    arrays = {k: v for k, v in assets.items() if isinstance(v, mx.array)}
    mx.save_safetensors(str(folder / ASSETS_FILE), arrays, metadata={"format": "mlx"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["flashhead"] = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "hidden_size": dims,
        "n_clusters": n_clusters,
        "cluster_size": assets["cluster_size"],
        "n_probes": n_probes,
        "centroid_bits": centroid_bits,
        "centroid_group_size": centroid_group_size,
        "head_fingerprint": head_fingerprint(head_module),
    }
    config_path.write_text(json.dumps(config, indent=4) + "\n")


def set_n_probes(folder, n_probes: int, mass_bias: mx.array) -> None:
    """Store a new default ``n_probes`` in a converted ``folder``, with the sampling mass offsets
    fitted for it (they depend on which clusters are probed).

    Each file is written beside itself and renamed into place (``flashhead.safetensors`` first),
    so an interruption leaves every file whole.
    """
    folder = Path(folder)
    config_path, assets_path = folder / "config.json", folder / ASSETS_FILE
    config = json.loads(config_path.read_text())
    n_clusters = config["flashhead"]["n_clusters"]
    if not 1 <= n_probes <= n_clusters:
        raise ValueError(f"n_probes must be in [1, {n_clusters}], got {n_probes}")
    if mass_bias.ndim != 2 or mass_bias.shape[1] != n_clusters:
        raise ValueError(f"mass_bias must be [terms, {n_clusters}], got {tuple(mass_bias.shape)}")
    arrays = {**mx.load(str(assets_path)), "mass_bias": mass_bias.astype(mx.float32)}
    staged = assets_path.with_name(f".{ASSETS_FILE}.partial.safetensors")
    mx.save_safetensors(str(staged), arrays, metadata={"format": "mlx"})
    os.replace(staged, assets_path)
    config["flashhead"]["n_probes"] = n_probes
    staged = config_path.with_name(".config.json.partial")
    staged.write_text(json.dumps(config, indent=4) + "\n")
    os.replace(staged, config_path)


def _check_shape(name: str, array: mx.array, expected: tuple) -> None:
    if tuple(array.shape) != expected:
        raise ValueError(
            f"{ASSETS_FILE}: {name} has shape {tuple(array.shape)}, expected {expected} "
            "from the flashhead section of config.json and the model"
        )


def load_assets(folder, model: nn.Module) -> dict:
    """Read and validate the FlashHead assets of ``folder`` for ``model`` (loaded from it).

    Raises ``ValueError`` naming the problem when the assets are missing, from another format
    version or another model, truncated, or inconsistent with ``config.json``.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    section = config.get("flashhead")
    if section is None:
        raise ValueError(
            f"{folder} has no FlashHead assets (no 'flashhead' section in config.json): "
            "convert it first with `flashhead-mlx convert`"
        )
    if section.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder}: FlashHead format_version {section.get('format_version')!r} is not "
            f"supported (this version reads {FORMAT_VERSION}); re-run the conversion"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "n_clusters",
        "cluster_size",
        "n_probes",
        "centroid_bits",
        "centroid_group_size",
        "head_fingerprint",
    )
    missing = [key for key in required if key not in section]
    if missing:
        raise ValueError(f"{folder}: the flashhead section of config.json lacks {missing}")

    module = find_head_module(model)
    vocab_size, dims = _head_shape(module)
    if (section["vocab_size"], section["hidden_size"]) != (vocab_size, dims):
        raise ValueError(
            f"{folder}: the FlashHead assets are for a head of {section['vocab_size']} x "
            f"{section['hidden_size']}, but the model's head is {vocab_size} x {dims}"
        )
    n_clusters, cluster_size = section["n_clusters"], section["cluster_size"]
    n_slots = n_clusters * cluster_size
    if cluster_size < 1 or not vocab_size <= n_slots < vocab_size + cluster_size:
        raise ValueError(
            f"{folder}: {n_clusters} clusters of {cluster_size} do not fit a vocabulary of "
            f"{vocab_size} (need n_clusters * cluster_size >= {vocab_size} with less than one "
            "cluster of padding)"
        )
    if not 1 <= section["n_probes"] <= n_clusters:
        raise ValueError(f"{folder}: n_probes {section['n_probes']} is not in [1, {n_clusters}]")

    path = folder / ASSETS_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: re-run the conversion")
    try:
        arrays = mx.load(str(path))
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path} is unreadable (truncated or corrupt?): {error}") from error

    bits, group_size = section["centroid_bits"], section["centroid_group_size"]
    expected = {"order": (n_slots,), "cluster_bias": (n_clusters,)}
    if bits is None:
        expected["centroids"] = (n_clusters, dims)
    else:
        expected["centroids"] = (n_clusters, dims * bits // 32)
        expected["centroid_scales"] = (n_clusters, dims // group_size)
        expected["centroid_biases"] = (n_clusters, dims // group_size)
    for name, shape in expected.items():
        if name not in arrays:
            raise ValueError(f"{path} lacks the array {name!r}: re-run the conversion")
        _check_shape(name, arrays[name], shape)
    if "mass_bias" in arrays and arrays["mass_bias"].shape[-1] != n_clusters:
        raise ValueError(
            f"{path}: mass_bias has shape {tuple(arrays['mass_bias'].shape)}, expected "
            f"{n_clusters} clusters in its last axis"
        )

    order = np.array(arrays["order"])
    tokens = np.sort(order[order != -1])
    if tokens.size != vocab_size or not np.array_equal(tokens, np.arange(vocab_size)):
        raise ValueError(
            f"{path}: order is not a permutation of the {vocab_size} token ids plus -1 padding"
        )
    if section["head_fingerprint"] != head_fingerprint(module):
        raise ValueError(
            f"{folder}: the model's head weights differ from those the FlashHead clusters were "
            "computed from (fingerprint mismatch): re-run the conversion on this model"
        )
    return {
        **arrays,
        "cluster_size": cluster_size,
        "n_probes": section["n_probes"],
        "centroid_bits": bits,
        "centroid_group_size": group_size,
    }
