"""Install a FlashHead on an mlx-lm model, and load a converted FlashHead folder."""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .assets import load_assets
from .head import FlashHead
from .model_head import head_module, is_tied, language_model

# mlx-lm model files whose forward pass ends in ``embed_tokens.as_linear`` or ``lm_head``.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3_text")


class FlashEmbedding(nn.Module):
    """A tied embedding whose table is the FlashHead's rows, stored once in cluster order.

    Token ids are mapped to their slots at lookup, and ``as_linear`` is the FlashHead.
    """

    def __init__(self, head: FlashHead):
        super().__init__()
        self.head = head

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.head.embed(tokens)

    def as_linear(self, h: mx.array) -> mx.array:
        return self.head(h)


def architecture(model: nn.Module) -> str:
    """The mlx-lm model file of the language model (``"llama"``, ``"gemma3_text"``, ...)."""
    return type(language_model(model)).__module__.rsplit(".", 1)[-1]


def flash_head(model: nn.Module) -> FlashHead:
    """The FlashHead installed on ``model`` by :func:`apply_flashhead`."""
    module = head_module(model)
    head = module.head if isinstance(module, FlashEmbedding) else module
    if not isinstance(head, FlashHead):
        raise ValueError("the model has no FlashHead: call apply_flashhead or load first")
    return head


def apply_flashhead(
    model: nn.Module,
    assets: dict,
    n_probes: Optional[int] = None,
    sampling_temperature: Optional[float] = None,
) -> nn.Module:
    """Replace the head of an mlx-lm ``model`` by a FlashHead built from ``assets``, in place.

    The head's rows are reordered into cluster order and the original rows are released: a tied
    embedding becomes a :class:`FlashEmbedding` over the same (reordered) table, an untied
    ``lm_head`` becomes the :class:`FlashHead`. Returns ``model``.

    Args:
        model (nn.Module): a model loaded with ``mlx_lm.load``.
        assets (dict): from :func:`flashhead_mlx.assets.load_assets` or ``make_assets``.
        n_probes (int, optional): clusters scored exactly per token. Default: the assets'.
        sampling_temperature (float, optional): sample the full vocabulary at this temperature
            (pass the same temperature to mlx-lm's sampler). Default: ``None``.
    """
    arch = architecture(model)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"FlashHead does not support the {arch!r} architecture "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    lm = language_model(model)
    head = FlashHead.from_module(
        head_module(model), assets, n_probes=n_probes, sampling_temperature=sampling_temperature
    )
    mx.eval(head.parameters())
    if is_tied(model):
        lm.model.embed_tokens = FlashEmbedding(head)
    else:
        lm.lm_head = head
    return model


def load(
    path_or_hf_repo: str,
    n_probes: Optional[int] = None,
    sampling_temperature: Optional[float] = None,
    **kwargs,
):
    """``mlx_lm.load`` a converted FlashHead folder and install its FlashHead.

    Args:
        path_or_hf_repo (str): a local folder or a Hugging Face repository.
        n_probes (int, optional): clusters scored exactly per token. Default: the folder's.
        sampling_temperature (float, optional): sample the full vocabulary at this temperature
            (pass the same temperature to mlx-lm's sampler). Default: ``None``.
        **kwargs: passed to ``mlx_lm.load`` (``tokenizer_config``, ``lazy``, ...).

    Returns:
        What ``mlx_lm.load`` returns: ``(model, tokenizer)``, plus the config when asked.
    """
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.utils import _download

    folder = _download(path_or_hf_repo, revision=kwargs.get("revision"))
    loaded = mlx_lm_load(str(folder), **{k: v for k, v in kwargs.items() if k != "revision"})
    assets = load_assets(folder, loaded[0])
    apply_flashhead(loaded[0], assets, n_probes, sampling_temperature)
    return loaded
