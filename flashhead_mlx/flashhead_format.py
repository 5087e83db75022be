"""The reading side of the FlashHead asset format (docs/format.md), written once: the digest, the
content-addressed file name, the version check and the fetch from the hub.

It imports nothing from ``flashhead_mlx``: ``flashhead_mlx.assets`` uses it, and the remote-code
variant of a converted folder (``convert --model-file``) carries it beside ``flashhead_model.py``
as ``flashhead_format.py``, so the model file reads the assets without ``flashhead_mlx``
installed.
"""

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

# The version of the asset format (docs/format.md) this file reads and flashhead_mlx writes.
FORMAT_VERSION = 2
# The entries of the flashhead section that shape the assets, positive integers; centroid_bits is
# one of CENTROID_BITS or null (float centroids), the head's fingerprint a string.
SHAPE_KEYS = (
    "vocab_size", "hidden_size", "n_clusters", "cluster_size", "n_probes", "centroid_group_size"
)
CENTROID_BITS = (2, 3, 4, 5, 6, 8)
CENTROID_GROUP_SIZES = (32, 64, 128)
MAX_SIZE = 1 << 31


def brief(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a corrupt file's strings can be long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def content_digest(arrays: dict) -> str:
    """``"sha256:<hex>"`` over ``arrays`` in name order: for each, the header
    ``"<name>:<dtype>:<d0,d1,...>:<nbytes>;"`` then its bytes (row-major, little-endian)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        data = np.ascontiguousarray(array.view(mx.uint8))
        dtype = str(array.dtype).rsplit(".", 1)[-1]
        shape = ",".join(str(n) for n in array.shape)
        digest.update(f"{name}:{dtype}:{shape}:{data.nbytes};".encode())
        digest.update(memoryview(data))
    return "sha256:" + digest.hexdigest()


def assets_file_name(digest: str) -> str:
    """The content-addressed name of the assets file with ``digest``."""
    return f"flashhead-{digest.removeprefix('sha256:')[:16]}.safetensors"


def read_config(folder: Path) -> dict:
    """``folder``'s ``config.json``; a ``ValueError`` naming it unless it holds a JSON object."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: {folder} is not a model folder")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:  # not UTF-8, or not JSON
        raise ValueError(
            f"{path} is not valid JSON ({error}): restore it, or convert the model again"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def assets_section(folder: Path, config: dict) -> dict:
    """The ``flashhead`` section of ``folder``'s ``config``, checked to be of this format: its
    version, the assets file's name and digest, and the entries that shape the assets."""
    section = config.get("flashhead")
    if section is None:
        raise ValueError(
            f"{folder} has no FlashHead assets (no 'flashhead' section in config.json): "
            "convert it first with `flashhead-mlx convert`"
        )
    edited = "config.json was edited or is corrupt: convert the model again"
    if not isinstance(section, dict):
        raise ValueError(
            f"{folder}: the flashhead section of config.json is not an object; {edited}"
        )
    version = section.get("format_version")
    if version == 1 and type(version) is int:
        raise ValueError(
            f"{folder} holds FlashHead assets of format_version 1 (flashhead.safetensors), which "
            f"this version no longer reads: convert it again (`flashhead-mlx convert --model "
            f"{folder} --output NEW_DIR`) for format_version {FORMAT_VERSION}"
        )
    if type(version) is int and version > FORMAT_VERSION:
        raise ValueError(
            f"{folder}: FlashHead format_version {brief(version)} is newer than this flashhead-mlx "
            f"reads ({FORMAT_VERSION}): upgrade flashhead-mlx (pip install -U flashhead-mlx)"
        )
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(
            f"{folder}: FlashHead format_version {brief(version)} is not one flashhead-mlx writes "
            f"(this version reads {FORMAT_VERSION}); {edited}"
        )
    name, digest = section.get("assets_file"), section.get("assets_digest")
    if not re.fullmatch("sha256:[0-9a-f]{64}", str(digest)) or name != assets_file_name(digest):
        raise ValueError(
            f"{folder}: config.json's flashhead section names the assets file {brief(name)}, which is "
            f"not the name of its assets_digest {brief(digest)}: convert the model again"
        )
    required = (*SHAPE_KEYS, "centroid_bits", "head_fingerprint")
    missing = [key for key in required if key not in section]
    if missing:
        raise ValueError(
            f"{folder}: the flashhead section of config.json lacks {missing}; {edited}"
        )
    for key in SHAPE_KEYS:
        value = section[key]
        if type(value) is not int or not 1 <= value < MAX_SIZE:
            raise ValueError(
                f"{folder}: the flashhead section's {key} is {brief(value)}, not a positive integer; "
                f"{edited}"
            )
    bits, group_size = section["centroid_bits"], section["centroid_group_size"]
    if bits is not None and (type(bits) is not int or bits not in CENTROID_BITS):
        raise ValueError(
            f"{folder}: the flashhead section's centroid_bits is {brief(bits)}, not one of "
            f"{CENTROID_BITS} or null; {edited}"
        )
    dims = section["hidden_size"]
    if bits is not None and (group_size not in CENTROID_GROUP_SIZES or dims % group_size):
        raise ValueError(
            f"{folder}: the flashhead section's centroid_group_size {group_size} is not one of "
            f"{CENTROID_GROUP_SIZES} dividing hidden_size {section['hidden_size']}; {edited}"
        )
    if not section["n_probes"] <= section["n_clusters"]:
        raise ValueError(
            f"{folder}: n_probes {section['n_probes']} is not in [1, {section['n_clusters']}]"
        )
    if type(section["head_fingerprint"]) is not str:
        raise ValueError(
            f"{folder}: the flashhead section's head_fingerprint is not a string; {edited}"
        )
    return section


def hub_snapshot(folder: Path) -> Optional[tuple]:
    """``(cache_dir, repo_id, revision)`` of a folder in the hub's cache layout
    (``<cache_dir>/models--ORG--NAME/snapshots/<revision>``), else ``None``."""
    repo = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return folder.parents[2], repo.removeprefix("models--").replace("--", "/"), folder.name


def fetch_assets(folder: Path, section: dict) -> Path:
    """The path of the assets file ``section`` names, downloaded first when ``folder`` is a hub
    snapshot without it (mlx-lm downloads only its own files)."""
    name = section["assets_file"]
    path = folder / name
    hub = None if path.is_file() else hub_snapshot(folder)
    if hub is not None:
        import huggingface_hub

        cache_dir, repo_id, revision = hub
        try:
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=[name]
            )
        except Exception as error:  # offline, refused, whatever the hub's version
            raise ValueError(
                f"{name} is missing from {folder} and could not be fetched from the hub repo "
                f"{repo_id} ({type(error).__name__}): go online, or set FLASHHEAD_DISABLE=1 "
                "for the dense head"
            ) from error
        if not path.is_file():
            raise ValueError(f"{name} is missing from the hub repo {repo_id} at {revision}")
    return path


def load_safetensors(path: Path) -> dict:
    """The arrays of the safetensors file ``path``, its header first checked by the
    ``safetensors`` package against the format (every tensor's dtype, shape and offsets, the data
    covering the file exactly); a ``ValueError`` naming the file if it is not one."""
    try:
        from safetensors import safe_open
    except ImportError:  # the remote-code variant with neither flashhead_mlx nor safetensors
        safe_open = None
    try:
        if safe_open is not None:
            with safe_open(str(path), framework="numpy"):
                pass
        return mx.load(str(path))
    except Exception as error:  # SafetensorError, MLX's RuntimeError and ValueError
        message = str(error).replace("\n", " ")
        raise ValueError(f"{path} is unreadable (truncated or corrupt?): {message}") from error


def read_assets(folder: Path, section: dict) -> dict:
    """The arrays of the assets file ``section`` names (fetched when ``folder`` is a hub
    snapshot without it), checked against the section's ``assets_digest``."""
    path = fetch_assets(folder, section)
    if not path.is_file():
        raise ValueError(f"{path} is missing: re-run the conversion")
    arrays = load_safetensors(path)
    try:
        digest = content_digest(arrays)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path} is unreadable (truncated or corrupt?): {error}") from error
    if digest != section["assets_digest"]:
        raise ValueError(
            f"{path}: the arrays' digest {digest} is not config.json's {section['assets_digest']}: "
            "the assets were changed or corrupted; download or convert the model again"
        )
    return arrays
