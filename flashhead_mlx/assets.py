"""FlashHead assets: the clusters of a head, saved next to a normal mlx-lm model folder.

A converted folder keeps the model's weights untouched, in their original order, and adds one
content-addressed assets file, ``flashhead-<first 16 hex digits of its digest>.safetensors``
(slot order, stage-1 centroids in their stored quantized form, biases), named with its digest in
a ``"flashhead"`` section of ``config.json`` (format version 2, docs/format.md). Loading checks
the digest, every shape against the model and a fingerprint of the head's weights, so assets
never silently produce wrong tokens. :func:`write_assets` is the one writer: a new assets file,
then ``config.json`` replaced atomically, then the old file removed, so a reader sees the folder
as before or as after; a killed writer's leftovers are reclaimed by the next
(:func:`reclaim_leftovers`). The reading side (digest, names, version, hub fetch) is in
:mod:`flashhead_mlx.flashhead_format`, which the remote-code variant's model file uses too.
"""

import fnmatch
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .durable import folder_lock, fsync_path, kill_point, replace_text
from .flashhead_format import (
    CENTROID_BITS,
    FORMAT_VERSION,
    assets_file_name,
    assets_section,
    content_digest,
    read_assets,
    read_config,
)
from .model_card import CARD_FILE
from .model_head import head_module as find_head_module

# Names of the assets files: content-addressed (format 2), and format 1's single name.
ASSETS_PATTERN = "flashhead-*.safetensors"
LEGACY_ASSETS_FILE = "flashhead.safetensors"
# The model file of the remote-code variant (``convert --model-file``), named by ``model_file``,
# and the format reader it runs (the whole variant: these files beside the config).
MODEL_FILE = "flashhead_model.py"
MODEL_FILES = (MODEL_FILE, "flashhead_format.py")


def is_assets_file(name: str) -> bool:
    """Whether ``name`` is the name of a FlashHead assets file (of any format version)."""
    plain = "/" not in name and os.sep not in name
    return plain and (fnmatch.fnmatchcase(name, ASSETS_PATTERN) or name == LEGACY_ASSETS_FILE)


def is_flashhead_folder(folder: Path) -> bool:
    """Whether ``folder``'s ``config.json`` has a ``flashhead`` section."""
    config = Path(folder) / "config.json"
    return config.is_file() and "flashhead" in read_config(folder)


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


def reclaim_leftovers(folder) -> None:
    """Remove what a killed :func:`write_assets` left in ``folder``, the folder locked: its hidden
    stage files, content-addressed assets files and model files ``config.json`` does not name (a
    format-1 ``flashhead.safetensors`` stays until new assets replace it); a staged card of the
    assets it names is put in place (the kill came after the switch)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        with folder_lock(folder):
            _reclaim(folder, json.loads((folder / "config.json").read_text()))


def _reclaim(folder: Path, config: dict) -> None:
    section = config.get("flashhead") or {}
    current = section.get("assets_file")
    hidden = tuple(f".{name}." for name in ("config.json", CARD_FILE, *MODEL_FILES))
    for path in folder.iterdir():
        name = path.name
        if name == f".{CARD_FILE}.{current}.next":
            os.replace(path, folder / CARD_FILE)
        elif name.startswith(hidden) or fnmatch.fnmatchcase(name, f".{ASSETS_PATTERN}"):
            path.unlink(missing_ok=True)
        elif fnmatch.fnmatchcase(name, ASSETS_PATTERN) and name != current:
            path.unlink(missing_ok=True)
        elif name in MODEL_FILES and "model_file" not in config:
            path.unlink(missing_ok=True)


def write_assets(
    folder,
    arrays: dict,
    section: dict,
    model_file: Optional[bool] = None,
    card: Optional[Callable[[dict], str]] = None,
) -> dict:
    """Make ``arrays`` the FlashHead assets of ``folder``, atomically; returns the new config.

    With the folder locked and the leftovers of a killed writer reclaimed
    (:func:`reclaim_leftovers`): the arrays are staged in a hidden file, their digest computed
    from it and the file renamed to its content-addressed name; the card ``card(config)`` is
    staged; then ``config.json`` is replaced atomically (the switch), its ``flashhead`` section
    being ``section`` with the format version, file name and digest; then the card is put in
    place and the assets file the old config named is removed. Every file is flushed to disk
    before it is named. ``model_file`` ``True`` makes the folder the remote-code variant (the
    model file is written first and named by ``model_file``), ``False`` the default one (key and
    file removed last), ``None`` keeps the folder's variant.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    with folder_lock(folder):
        config = read_config(folder)
        _reclaim(folder, config)
        previous = (config.get("flashhead") or {}).get("assets_file", LEGACY_ASSETS_FILE)
        fd, stage = tempfile.mkstemp(prefix=".flashhead-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            mx.save_safetensors(stage, arrays, metadata={"format": "mlx"})
            os.chmod(stage, config_path.stat().st_mode & 0o777)
            fsync_path(Path(stage))
            kill_point("assets-staged")
            digest = content_digest(mx.load(stage))
            name = assets_file_name(digest)
            os.replace(stage, folder / name)
            fsync_path(folder)
        finally:
            if os.path.exists(stage):
                os.unlink(stage)
        kill_point("assets-named")
        if model_file:
            for file in MODEL_FILES:
                replace_text(folder / file, Path(__file__).with_name(file).read_text())
            config["model_file"] = MODEL_FILE
        elif model_file is False:
            config.pop("model_file", None)
        written = {"format_version": FORMAT_VERSION, "assets_file": name, "assets_digest": digest}
        config["flashhead"] = {**written, **{k: v for k, v in section.items() if k not in written}}
        staged_card = folder / f".{CARD_FILE}.{name}.next"
        if card is not None:
            replace_text(staged_card, card(config))
        replace_text(config_path, json.dumps(config, indent=4) + "\n")
        kill_point("config-replaced")
        if card is not None:
            os.replace(staged_card, folder / CARD_FILE)
        for stale in {previous, LEGACY_ASSETS_FILE} - {name}:
            if is_assets_file(stale):
                (folder / stale).unlink(missing_ok=True)
        if model_file is False:
            for file in MODEL_FILES:
                (folder / file).unlink(missing_ok=True)
        fsync_path(folder)
    return config


def save_assets(
    folder,
    clusters: dict,
    n_probes: int,
    centroid_bits: Optional[int] = 4,
    mass_bias: Optional[mx.array] = None,
    *,
    head_module: nn.Module,
    centroid_group_size: int = 64,
    provenance: Optional[dict] = None,
    head: Optional[dict] = None,
    model_file: Optional[bool] = None,
    card: Optional[Callable[[dict], str]] = None,
) -> dict:
    """Write the assets of ``clusters`` into ``folder`` (:func:`write_assets`, with the card
    ``card(config)`` when given); returns the new config.

    ``head_module`` is the model's head module (found by probing) the clusters were computed
    from; its shape and fingerprint are stored, with ``provenance`` (``source``, ...) and
    ``head``, what probing found (:meth:`flashhead_mlx.probe.HeadProbe.config`), when given.
    """
    assets = make_assets(clusters, n_probes, centroid_bits, centroid_group_size, mass_bias)
    vocab_size, dims = _head_shape(head_module)
    section = {
        "vocab_size": vocab_size,
        "hidden_size": dims,
        "n_clusters": assets["cluster_bias"].size,
        "cluster_size": assets["cluster_size"],
        "n_probes": n_probes,
        "centroid_bits": centroid_bits,
        "centroid_group_size": centroid_group_size,
        "head_fingerprint": head_fingerprint(head_module),
        **(provenance or {}),
        **({"head": head} if head is not None else {}),
    }
    arrays = {k: v for k, v in assets.items() if isinstance(v, mx.array)}
    return write_assets(folder, arrays, section, model_file, card)


def set_n_probes(folder, n_probes: int, mass_bias: mx.array) -> None:
    """Store a new default ``n_probes`` in a converted ``folder``, with the sampling mass offsets
    fitted for it (they depend on which clusters are probed), atomically (:func:`write_assets`)."""
    folder = Path(folder)
    section = assets_section(folder, read_config(folder))
    n_clusters = section["n_clusters"]
    if not 1 <= n_probes <= n_clusters:
        raise ValueError(f"n_probes must be in [1, {n_clusters}], got {n_probes}")
    if mass_bias.ndim != 2 or mass_bias.shape[1] != n_clusters:
        raise ValueError(f"mass_bias must be [terms, {n_clusters}], got {tuple(mass_bias.shape)}")
    arrays = {**read_assets(folder, section), "mass_bias": mass_bias.astype(mx.float32)}
    write_assets(folder, arrays, {**section, "n_probes": n_probes})


# The type of each array of the assets file (centroids: float32, or uint32 when quantized).
ARRAY_DTYPES = {
    "order": mx.int32,
    "cluster_bias": mx.float32,
    "centroid_scales": mx.float32,
    "centroid_biases": mx.float32,
    "mass_bias": mx.float32,
}


def _check_shape(path: Path, name: str, array: mx.array, expected: tuple) -> None:
    if tuple(array.shape) != expected:
        raise ValueError(
            f"{path}: {name} has shape {tuple(array.shape)}, expected {expected} "
            "from the flashhead section of config.json and the model"
        )


def load_assets(folder, model: nn.Module) -> dict:
    """Read and validate the FlashHead assets of ``folder`` for ``model`` (loaded from it),
    fetching the assets file when ``folder`` is a hub snapshot without it.

    Raises ``ValueError`` naming the problem when the assets are missing, of another format
    version, changed since they were written (digest), for another model, truncated, or
    inconsistent with ``config.json``.
    """
    folder = Path(folder)
    section = assets_section(folder, read_config(folder))  # checks the entries' types too
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

    path = folder / section["assets_file"]
    arrays = read_assets(folder, section)
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
        _check_shape(path, name, arrays[name], shape)
    mass_bias = arrays.get("mass_bias")
    if mass_bias is not None and (
        mass_bias.ndim not in (1, 2) or mass_bias.shape[-1] != n_clusters
    ):
        raise ValueError(
            f"{path}: mass_bias has shape {tuple(mass_bias.shape)}, expected "
            f"[{n_clusters}] or [terms, {n_clusters}]"
        )
    dtypes = {**ARRAY_DTYPES, "centroids": mx.float32 if bits is None else mx.uint32}
    for name, array in arrays.items():
        if name in dtypes and array.dtype != dtypes[name]:
            raise ValueError(f"{path}: {name} is {array.dtype}, expected {dtypes[name]}")
        if mx.issubdtype(array.dtype, mx.floating) and not mx.all(mx.isfinite(array)).item():
            raise ValueError(f"{path}: {name} holds values that are not finite (NaN or infinite)")

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
