"""Install a FlashHead on an mlx-lm model, remove it, and load FlashHead models like mlx-lm."""

import os
import warnings
import weakref
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .assets import load_assets
from .clustering import scored_fraction
from .forward import HeadOutputModel
from .head import FlashHead
from .model_head import head_module, language_model
from .probe import Unsupported, probe_head, set_module
from .recent import RECENT_TOKENS, RecentTokensModel

# Assets of the heads that :func:`unpatch` removed, by id of their model, for :func:`patch`.
_removed: dict = {}


def disabled() -> bool:
    """Whether ``FLASHHEAD_DISABLE`` turns FlashHead off everywhere (for debugging)."""
    return os.environ.get("FLASHHEAD_DISABLE", "") not in ("", "0")


class FlashEmbedding(nn.Module):
    """A tied embedding whose table is the FlashHead's rows, stored once in cluster order.

    Token ids are mapped to their slots at lookup, and ``as_linear`` is the FlashHead. A body
    that reads the table itself (gemma4_text matches input embeddings against it) gets the rows
    in token order from ``weight``, gathered when read.
    """

    def __init__(self, head: FlashHead):
        super().__init__()
        self.head = head

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.head.embed(tokens)

    def as_linear(self, h: mx.array) -> mx.array:
        return self.head(h)

    @property
    def weight(self) -> mx.array:
        return mx.take(self.head.weight, self.head.inverse, axis=0)


def flash_head(model: nn.Module) -> FlashHead:
    """The FlashHead installed on ``model`` by :func:`patch` or :func:`load`."""
    module = head_module(model)
    head = module.head if isinstance(module, FlashEmbedding) else module
    if not isinstance(head, FlashHead):
        raise ValueError("the model has no FlashHead: call flashhead_mlx.patch or load first")
    return head


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` has a FlashHead installed (``False`` for a model whose head FlashHead
    cannot serve)."""
    try:
        module = head_module(model)
    except Unsupported:
        return False
    return isinstance(module, (FlashHead, FlashEmbedding))


def describe_head(model, requested: bool = True) -> str:
    """Which head ``model`` scores with, e.g. ``FlashHead (n_probes=..., 3072 clusters of 16, 12.0%
    of the vocabulary scored, stage 1 on float32 centroids)`` (with ``, verified greedy (K=8, 12.5
    rollbacks per 1000 tokens)`` in verified mode) or ``dense``; ``requested``: whether a
    FlashHead was asked for."""
    if is_patched(model):
        head = flash_head(model)
        scored = scored_fraction(
            head.n_clusters, head.cluster_size, head.n_probes, head.vocab_size, head.recent_tokens
        )
        verified = "" if head.verification is None else f", {head.verification.describe()}"
        return (
            f"FlashHead (n_probes={head.n_probes}, {head.n_clusters} clusters of "
            f"{head.cluster_size}, {head.recent_tokens} recent tokens, {100 * scored:.1f}% of "
            f"the vocabulary scored, stage 1 on {head.stage1_format} centroids){verified}"
        )
    if requested and disabled():
        return "dense (FLASHHEAD_DISABLE is set)"
    return "dense (the model has no FlashHead assets)" if requested else "dense"


def mix_in(lm: nn.Module, mixins: tuple, **attributes) -> None:
    """Give ``lm`` a class with ``mixins`` (and class ``attributes``) before its own; the
    original class is kept as ``flashhead_original`` for :func:`mix_out`."""
    original = type(lm)
    namespace = {"__module__": original.__module__, "flashhead_original": original, **attributes}
    lm.__class__ = type(original.__name__, (*mixins, original), namespace)


def mix_out(lm: nn.Module) -> None:
    """Give ``lm`` back the class :func:`mix_in` replaced."""
    lm.__class__ = type(lm).__dict__.get("flashhead_original", type(lm))


def apply_flashhead(
    model: nn.Module,
    assets: dict,
    n_probes: Optional[int] = None,
    recent_tokens: Optional[int] = None,
) -> nn.Module:
    """Replace the head of an mlx-lm ``model`` by a FlashHead built from ``assets``, in place.

    The head's rows are reordered into cluster order and the original rows are released: a tied
    embedding becomes a :class:`FlashEmbedding` over the same (reordered) table, an untied
    ``lm_head`` becomes the :class:`FlashHead`. Returns ``model``.

    The head and what the model does to its output are found by probing
    (:func:`flashhead_mlx.probe.probe_head`); a model whose head FlashHead cannot serve exactly
    raises :class:`~flashhead_mlx.probe.Unsupported` (a ``ValueError``) saying why.

    Args:
        model (nn.Module): a model loaded with ``mlx_lm.load``.
        assets (dict): from :func:`flashhead_mlx.assets.load_assets` or ``make_assets``.
        n_probes (int, optional): clusters scored exactly per token. Default: the assets'.
        recent_tokens (int, optional): tokens of each row's context scored exactly at greedy
            steps (:mod:`flashhead_mlx.recent`).
            Default: :data:`~flashhead_mlx.recent.RECENT_TOKENS`.
    """
    try:
        probe = probe_head(model)
    except Unsupported as e:
        raise Unsupported(f"FlashHead cannot serve the head of {architecture(model)}: {e}") from None
    if is_patched(model):
        raise ValueError("the model already has a FlashHead: call flashhead_mlx.unpatch first")
    recent_tokens = RECENT_TOKENS if recent_tokens is None else recent_tokens
    head = FlashHead.from_module(
        head_module(model),
        assets,
        n_probes=n_probes,
        transform=probe.transform,
        recent_tokens=recent_tokens,
    )
    mx.eval(head.parameters())
    set_module(model, probe.path, FlashEmbedding(head) if probe.tied else head)
    lm = language_model(model)
    if lm is model:
        mix_in(model, (HeadOutputModel, RecentTokensModel), flashhead_head=head)
    else:
        mix_in(model, (HeadOutputModel,))
        mix_in(lm, (RecentTokensModel,), flashhead_head=head)
    return model


def architecture(model: nn.Module) -> str:
    """The mlx-lm model file of ``model`` (``"llama"``, ``"gemma3"``, ...)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def head_assets(head: FlashHead) -> dict:
    """The assets a FlashHead was built from (in the form :func:`apply_flashhead` takes)."""
    names = ("order", "centroids", "centroid_scales", "centroid_biases", "cluster_bias")
    assets = {name: getattr(head, name) for name in names if name in head}
    if head.mass_bias is not None:
        assets["mass_bias"] = head.mass_bias
    assets.update(
        cluster_size=head.cluster_size,
        n_probes=head.n_probes,
        centroid_bits=head.centroid_bits,
        centroid_group_size=head.centroid_group_size,
    )
    return assets


def _dense_module(head: FlashHead, tied: bool) -> nn.Module:
    """The head as mlx-lm builds it (token order): ``nn.Embedding``/``nn.Linear`` or quantized."""
    if "scales" in head:
        quantization = dict(group_size=head.group_size, bits=head.bits, mode=head.mode)
        if tied:
            module = nn.QuantizedEmbedding(1, 128, **quantization)
        else:
            module = nn.QuantizedLinear(128, 1, bias=False, **quantization)
        if tied:
            module.num_embeddings = head.vocab_size
            module.dims = head.weight.shape[1] * 32 // head.bits
        module.scales = mx.take(head.scales, head.inverse, axis=0)
        if head.biases is not None:
            module.biases = mx.take(head.biases, head.inverse, axis=0)
    else:
        module = nn.Embedding(1, 1) if tied else nn.Linear(1, 1, bias=False)
    module.weight = mx.take(head.weight, head.inverse, axis=0)
    return module


def unpatch(model: nn.Module) -> nn.Module:
    """Put the dense head back on a FlashHead ``model`` (rows back in token order), in place.

    :func:`patch` without assets installs the same FlashHead again. Returns ``model``.
    """
    head = flash_head(model)
    probe = probe_head(model)
    dense = _dense_module(head, probe.tied)
    mx.eval(dense.parameters())
    set_module(model, probe.path, dense)
    mix_out(model)
    mix_out(language_model(model))
    if id(model) not in _removed:
        weakref.finalize(model, _removed.pop, id(model), None)
    _removed[id(model)] = head_assets(head)
    return model


def patch(
    model: nn.Module,
    assets: Union[dict, str, Path, None] = None,
    n_probes: Optional[int] = None,
    recent_tokens: Optional[int] = None,
) -> nn.Module:
    """Install a FlashHead on an mlx-lm ``model``, in place, and return it.

    Args:
        model (nn.Module): a model loaded with ``mlx_lm.load`` (or unpatched by :func:`unpatch`).
        assets (dict or path, optional): the clusters: a converted FlashHead folder, or assets
            from :func:`flashhead_mlx.assets.load_assets`. Default: those :func:`unpatch` removed.
        n_probes (int, optional): clusters scored exactly per token. Default: the assets'.
        recent_tokens (int, optional): tokens of each row's context scored exactly at greedy
            steps. Default: :data:`~flashhead_mlx.recent.RECENT_TOKENS`.
    """
    if disabled():
        warnings.warn("FLASHHEAD_DISABLE is set: the model keeps its dense head")
        return model
    if assets is None:
        if id(model) not in _removed:
            raise ValueError("pass the assets (or a converted folder) to patch this model")
        assets = _removed[id(model)]
    elif not isinstance(assets, dict):
        assets = load_assets(assets, model)
    return apply_flashhead(model, assets, n_probes, recent_tokens)
