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

The asset format is read by ``flashhead_format.py``, which the folder carries beside this file
(both fetched by mlx-lm, whose downloads include ``*.py``). Written by ``flashhead-mlx convert
--model-file``; do not edit.
"""

import importlib.util
import json
import os
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

# Not resolved: in the hub's cache the files of a snapshot are links into its blobs/ folder.
FOLDER = Path(os.path.abspath(__file__)).parent


def _load_format():
    """``flashhead_format.py`` beside this file (mlx-lm runs this file alone, as a module named
    ``custom_model``: a relative import cannot reach it)."""
    spec = importlib.util.spec_from_file_location("flashhead_format", FOLDER / "flashhead_format.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_format = _load_format()
assets_section, read_assets = _format.assets_section, _format.read_assets


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

    def __init__(self, module: nn.Module, arrays: dict, section: dict, tied: bool):
        super().__init__()
        self.module, self.tied = module, tied
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
        return self.module.as_linear(h) if self.tied else self.module(h)

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
    """Install the pure-MLX :class:`FallbackHead` (``flashhead_mlx`` is not installed) on the
    head module that probing found at conversion (the section's ``head`` entry): it keeps the
    dense head, with a warning, where the model softcaps the head's output or scores with the
    head's table inside its body. A scale the model applies to the head's output keeps the
    fallback's -inf at -inf; a softcap would make them finite."""
    section = config["flashhead"]
    head = section.get("head")
    softcap = head is not None and (head["transform"] or {}).get("kind") == "softcap"
    if head is None or softcap or head["body_calls"]:
        warnings.warn(
            "this architecture needs flashhead_mlx (pip install flashhead-mlx): dense head kept"
        )
        return
    module = dict(model.named_modules())[head["path"]]
    fallback = FallbackHead(module, arrays, section, head["tied"])
    replacement = FallbackEmbedding(fallback) if head["tied"] else fallback
    model.update_modules(tree_unflatten([(head["path"], replacement)]))
