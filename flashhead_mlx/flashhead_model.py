"""FlashHead model file: lets plain mlx-lm load this folder as a FlashHead model, with
``trust_remote_code=True``. Only folders converted with ``flashhead-mlx convert --model-file``
carry it; the default folders need no remote code (plain mlx-lm loads them dense).

mlx-lm runs this file (config.json names it in ``model_file``) to build the model. The model is
the folder's own mlx-lm architecture (``model_type``); once its weights are loaded, its dense head
is replaced by a FlashHead built from the assets file that config.json's ``flashhead`` section
names. mlx-lm downloads only its own files from the hub, so the assets are fetched here, from the
repo of the hub snapshot this file runs in, and checked against their digest. With
``flashhead_mlx`` installed the FlashHead is the library's (exact dense logits outside mlx-lm's
decode loops); without it, a small pure-MLX FlashHead below (greedy candidates at single-position
calls, dense otherwise). ``FLASHHEAD_DISABLE=1`` keeps the dense head.

This file is also where the reading side of the asset format (docs/format.md) is written, once:
it must work without ``flashhead_mlx``, and ``flashhead_mlx.assets`` imports it from here.
Written by ``flashhead-mlx convert``; do not edit.
"""

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Not resolved: in the hub's cache the files of a snapshot are links into its blobs/ folder.
FOLDER = Path(os.path.abspath(__file__)).parent
# The version of the asset format (docs/format.md) this file reads and flashhead_mlx writes.
FORMAT_VERSION = 2


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


def assets_section(folder: Path, config: dict) -> dict:
    """The ``flashhead`` section of ``folder``'s ``config``, checked to be of this format."""
    section = config.get("flashhead")
    if section is None:
        raise ValueError(
            f"{folder} has no FlashHead assets (no 'flashhead' section in config.json): "
            "convert it first with `flashhead-mlx convert`"
        )
    version = section.get("format_version")
    if version == 1:
        raise ValueError(
            f"{folder} holds FlashHead assets of format_version 1 (flashhead.safetensors), which "
            f"this version no longer reads: convert it again (`flashhead-mlx convert --model "
            f"{folder} --output NEW_DIR`) for format_version {FORMAT_VERSION}"
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{folder}: FlashHead format_version {version!r} is not supported (this version "
            f"reads {FORMAT_VERSION}): upgrade flashhead-mlx or convert the model again"
        )
    name, digest = section.get("assets_file"), section.get("assets_digest")
    if not re.fullmatch("sha256:[0-9a-f]{64}", str(digest)) or name != assets_file_name(digest):
        raise ValueError(
            f"{folder}: config.json's flashhead section names the assets file {name!r}, which is "
            f"not the name of its assets_digest {digest!r}: convert the model again"
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


def read_assets(folder: Path, section: dict) -> dict:
    """The arrays of the assets file ``section`` names (fetched when ``folder`` is a hub
    snapshot without it), checked against the section's ``assets_digest``."""
    path = fetch_assets(folder, section)
    if not path.is_file():
        raise ValueError(f"{path} is missing: re-run the conversion")
    try:
        arrays = mx.load(str(path))
        digest = content_digest(arrays)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path} is unreadable (truncated or corrupt?): {error}") from error
    if digest != section["assets_digest"]:
        raise ValueError(
            f"{path}: the arrays' digest {digest} is not config.json's {section['assets_digest']}: "
            "the assets were changed or corrupted; download or convert the model again"
        )
    return arrays


class ModelArgs:
    """The whole config; the architecture's own arguments are made by :func:`Model`."""

    def __init__(self, config: dict):
        self.config = config

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        return cls(config)


class FlashHeadLoading:
    """Mixed into the architecture's model class: installs the FlashHead after loading."""

    def load_weights(self, *args, **kwargs):
        result = super().load_weights(*args, **kwargs)
        if os.environ.get("FLASHHEAD_DISABLE", "") in ("", "0"):
            install(self)
        return result


def Model(args: ModelArgs) -> nn.Module:
    """The folder's mlx-lm architecture, which installs a FlashHead once its weights load."""
    try:
        from mlx_lm.utils import _get_classes
    except ImportError:
        import mlx_lm

        raise ImportError(
            f"flashhead_model.py needs mlx_lm.utils._get_classes, which mlx-lm "
            f"{mlx_lm.__version__} lacks: load this folder with flashhead_mlx.load instead"
        ) from None
    config = {k: v for k, v in args.config.items() if k != "model_file"}
    model_class, args_class = _get_classes(config)
    namespace = {"__module__": model_class.__module__}
    loading_class = type(model_class.__name__, (FlashHeadLoading, model_class), namespace)
    return loading_class(args_class.from_dict(config))


def install(model: nn.Module) -> None:
    """Install the FlashHead of this folder on ``model``."""
    config = json.loads((FOLDER / "config.json").read_text())
    section = assets_section(FOLDER, config)
    try:
        from flashhead_mlx.patch import patch
    except ImportError:
        install_fallback(model, config, read_assets(FOLDER, section))
    else:
        patch(model, FOLDER)


class FallbackHead(nn.Module):
    """A pure-MLX FlashHead over the model's own head module (rows left in token order)."""

    def __init__(self, module: nn.Module, arrays: dict, section: dict):
        super().__init__()
        self.module = module
        self.tokens = arrays["order"].reshape(section["n_clusters"], section["cluster_size"])
        self.centroids = arrays["centroids"]
        self.centroid_bits = section["centroid_bits"]
        self.centroid_group_size = section["centroid_group_size"]
        if self.centroid_bits is not None:
            self.centroid_scales = arrays["centroid_scales"]
            self.centroid_biases = arrays["centroid_biases"]
        self.cluster_bias = arrays["cluster_bias"]
        self.n_probes = section["n_probes"]
        self.freeze()

    def dense(self, h: mx.array) -> mx.array:
        module = self.module
        tied = isinstance(module, (nn.Embedding, nn.QuantizedEmbedding))
        return module.as_linear(h) if tied else module(h)

    def __call__(self, h: mx.array) -> mx.array:
        if h.shape[-2] != 1:
            return self.dense(h)
        x = h.astype(mx.float32)
        if self.centroid_bits is None:
            scores = x @ self.centroids.T
        else:
            scores = mx.quantized_matmul(
                x, self.centroids, self.centroid_scales, self.centroid_biases,
                group_size=self.centroid_group_size, bits=self.centroid_bits,
            )
        scores = scores + self.cluster_bias
        probes = mx.argpartition(-scores, self.n_probes - 1, axis=-1)[..., : self.n_probes]
        tokens = self.tokens[probes].reshape(*h.shape[:-1], -1)
        ids = mx.maximum(tokens, 0)
        module = self.module
        if "scales" in module:
            biases = module["biases"][ids] if "biases" in module else None
            rows = mx.dequantize(
                module.weight[ids], module.scales[ids], biases,
                group_size=module.group_size, bits=module.bits, mode=module.mode,
            )
        else:
            rows = module.weight[ids]
        logits = (rows @ h[..., None]).squeeze(-1)
        logits = mx.where(tokens >= 0, logits, -mx.inf)
        vocab_size = module.weight.shape[0]
        full = mx.full((*tokens.shape[:-1], vocab_size + 1), -mx.inf, logits.dtype)
        slots = mx.where(tokens >= 0, tokens, vocab_size)
        return mx.put_along_axis(full, slots, logits, axis=-1)[..., :vocab_size]


class FallbackEmbedding(nn.Module):
    """A tied embedding whose ``as_linear`` is a :class:`FallbackHead`."""

    def __init__(self, head: FallbackHead):
        super().__init__()
        self.head = head

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.head.module(tokens)

    def as_linear(self, h: mx.array) -> mx.array:
        return self.head(h)


def install_fallback(model: nn.Module, config: dict, arrays: dict) -> None:
    """Install the pure-MLX :class:`FallbackHead` (``flashhead_mlx`` is not installed)."""
    lm = getattr(model, "language_model", model)
    no_head = "lm_head" not in lm and not hasattr(lm.model, "embed_tokens")
    if config.get("final_logit_softcapping") or no_head:
        warnings.warn(
            "this architecture needs flashhead_mlx (pip install flashhead-mlx): dense head kept"
        )
        return
    tied = "lm_head" not in lm
    module = lm.model.embed_tokens if tied else lm.lm_head
    head = FallbackHead(module, arrays, config["flashhead"])
    if tied:
        lm.model.embed_tokens = FallbackEmbedding(head)
    else:
        lm.lm_head = head
