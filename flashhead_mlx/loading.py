"""``load``: mlx-lm's loader, with a FlashHead installed when the folder has one."""

import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .assets import (
    FORMAT_VERSION,
    MODEL_FILE,
    head_fingerprint,
    load_assets,
    read_config,
    save_assets,
)
from .durable import replace_text
from .model_head import head_module
from .patch import apply_flashhead, disabled, is_patched
from .pipeline import cluster_model, is_local
from .verified import DEFAULT_BLOCK, set_verification

CACHE_DIR = Path.home() / ".cache" / "flashhead-mlx" / "clusters"
LOAD_OPTIONS = ("convert", "n_probes", "recent_tokens", "verify")


def download(path_or_hf_repo: str, revision: Optional[str] = None) -> Path:
    """The local folder of a model, as ``mlx_lm.load`` finds it: ``path_or_hf_repo`` when it
    exists, else its hub snapshot of mlx-lm's files (``huggingface_hub.snapshot_download`` with
    mlx-lm's ``DEFAULT_ALLOW_PATTERNS``). The FlashHead assets file, which those patterns leave
    out, is fetched when the assets are read (:func:`flashhead_mlx.assets.load_assets`)."""
    path = Path(path_or_hf_repo)
    if path.exists():
        return path
    if is_local(path_or_hf_repo):
        raise ValueError(f"{path_or_hf_repo} does not exist (a model folder, or a hub repo id)")
    import huggingface_hub
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    return Path(
        huggingface_hub.snapshot_download(
            path_or_hf_repo, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS
        )
    )


def cached_assets(model, tokenizer, cache_dir: Optional[Path] = None) -> dict:
    """The FlashHead assets of ``model``'s head, clustered once and cached by its fingerprint
    (under ``cache_dir``, default ``~/.cache/flashhead-mlx/clusters``)."""
    folder = (cache_dir or CACHE_DIR) / head_fingerprint(head_module(model)).replace("sha256:", "")
    config = folder / "config.json"
    cached = json.loads(config.read_text()).get("flashhead", {}) if config.is_file() else {}
    if cached.get("format_version") != FORMAT_VERSION:  # not yet, or of an older format
        start = time.perf_counter()
        result = cluster_model(model, tokenizer)
        folder.mkdir(parents=True, exist_ok=True)
        if not config.is_file():
            replace_text(config, "{}\n")
        save_assets(folder, **result, head_module=head_module(model))
        warnings.warn(
            f"FlashHead: clustered the head in {time.perf_counter() - start:.0f} s (cached in "
            f"{folder}); convert the model once with `flashhead-mlx convert` to skip this"
        )
    return load_assets(folder, model)


def load(
    path_or_hf_repo: str,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    *,
    flashhead: Union[bool, dict] = True,
    n_probes: Optional[int] = None,
):
    """``mlx_lm.load``, with a FlashHead installed when the folder has FlashHead assets.

    Takes ``mlx_lm.load``'s arguments and returns what it returns (``(model, tokenizer)``, plus
    the config with ``return_config=True``), usable with ``mlx_lm.generate``, ``stream_generate``,
    ``batch_generate``, ``generate_step``, and mlx-lm's samplers and logits processors.

    Args:
        flashhead (bool or dict): ``False`` loads the dense head. A dict sets options:
            ``{"convert": True}`` clusters a folder without assets on the fly (cached under
            ``~/.cache/flashhead-mlx/clusters``), ``{"n_probes": 256}`` overrides the probes,
            ``{"recent_tokens": 0}`` turns off the exact scoring of each row's recent tokens
            (default :data:`~flashhead_mlx.recent.RECENT_TOKENS`), ``{"verify": 8}`` makes
            decoding verified by the dense head 8 tokens at a time the default of FlashHead's
            ``generate`` functions (``True``: the default K; ``(4, 32)``: adaptive K).
            Default: ``True`` (FlashHead when the folder has assets, dense otherwise).
        n_probes (int, optional): clusters scored exactly per token. Default: the folder's.
    """
    from mlx_lm.utils import load as mlx_lm_load

    options = flashhead if isinstance(flashhead, dict) else {}
    unknown = set(options) - set(LOAD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown flashhead options {sorted(unknown)}; choose from {LOAD_OPTIONS}")
    enabled = flashhead is not False and not disabled()
    n_probes = options.get("n_probes", n_probes)
    recent = options.get("recent_tokens")

    folder = download(path_or_hf_repo, revision=revision)
    model_config = dict(model_config or {})
    if read_config(folder).get("model_file") == MODEL_FILE:
        # Our own model file: the library does what it would, without running the folder's code.
        model_config["model_file"] = None
    model, tokenizer, config = mlx_lm_load(
        str(folder),
        tokenizer_config=tokenizer_config,
        model_config=model_config,
        adapter_path=adapter_path,
        lazy=lazy,
        return_config=True,
        trust_remote_code=trust_remote_code,
    )
    if enabled:
        if "flashhead" in config:
            apply_flashhead(model, load_assets(folder, model), n_probes, recent)
        elif options.get("convert"):
            apply_flashhead(model, cached_assets(model, tokenizer), n_probes, recent)
        else:
            warnings.warn(
                f"{path_or_hf_repo} has no FlashHead assets: loaded with its dense head "
                "(convert it with `flashhead-mlx convert`, or pass flashhead={'convert': True})"
            )
    if options.get("verify") and is_patched(model):
        set_verification(model, DEFAULT_BLOCK if options["verify"] is True else options["verify"])
    return (model, tokenizer, config) if return_config else (model, tokenizer)
