"""The conversion pipeline: calibrate, cluster, tune, fit and write a FlashHead model folder.

A library the commands call (``flashhead-mlx convert``, ``import-assets``, ``demo``, and
:func:`flashhead_mlx.load`'s on-the-fly clustering). The output is an mlx-lm folder, weights in
their original order, plus the FlashHead assets and a ``flashhead`` section in ``config.json``.
"""

import importlib
import json
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.convert import convert as mlx_lm_convert

from ._version import __version__
from .assets import MODEL_FILES, is_assets_file, is_flashhead_folder, make_assets, save_assets
from .calibration import text_contexts, text_hidden_states
from .calibration_mix import dev_suite_states, mix_hidden_states
from .clustering import CLUSTER_SIZE, cluster_head, scored_fraction
from .containment import TUNING_TOKENS, suite_n_probes, target_ranks, tuned_n_probes
from .durable import publish_folder, reclaim_stages, stage_folder
from .head import FlashHead
from .model_card import CARD_FILE, render_folder_card
from .model_head import head_module, head_rows
from .probe import probe_head
from .sampling import fit_mass_bias
from .storage import check_free_space, check_writable, plain_write_errors
from .suite import model_fingerprint

# Calibration positions the sampling mass offsets are averaged over (a mean per cluster).
MASS_FIT_POSITIONS = 2048
FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
SAFETENSORS_FLOATS = {"F16": 2, "BF16": 2, "F32": 4}


def _prepare_mlx_model(
    model: str,
    mlx_path: Path,
    dtype: Optional[str],
    quantize: bool,
    q_group_size: Optional[int],
    q_bits: Optional[int],
    revision: Optional[str],
    trust_remote_code: bool,
) -> None:
    """Write ``model`` as an mlx-lm folder at ``mlx_path`` (GGUF files are imported first)."""

    source = model
    looks_like_path = is_local(model)
    if looks_like_path and not Path(model).expanduser().exists():
        raise ValueError(f"{model} does not exist (a local folder, a .gguf file or a hub repo id)")
    if model.endswith(".gguf"):
        from .gguf import import_gguf

        source = str(import_gguf(Path(model).expanduser(), mlx_path.parent / "gguf", dtype=dtype or "float32"))
    elif looks_like_path and is_flashhead_folder(Path(model).expanduser()):
        source = str(_dense_copy(Path(model).expanduser(), mlx_path.parent / "dense"))
    try:
        mlx_lm_convert(
            source,
            mlx_path=str(mlx_path),
            quantize=quantize,
            q_group_size=q_group_size,
            q_bits=q_bits,
            dtype=dtype,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as error:
        unsupported = re.fullmatch(r"Model type (\S+) not supported\.", str(error))
        if unsupported is None:
            raise
        models = Path(importlib.import_module("mlx_lm.models").__file__).parent
        raise ValueError(
            f"{model}: model type {unsupported[1]!r} is not one mlx-lm {mlx_lm.__version__} "
            f"supports (its model types are the modules in {models}; FlashHead converts any of "
            "them whose head it can serve exactly: docs/architectures.md)"
        ) from error
    card = Path(model).expanduser() / CARD_FILE
    if looks_like_path and card.is_file():
        # mlx-lm writes a blank card for a local source: keep the source's own (license, ...).
        shutil.copyfile(card, mlx_path / CARD_FILE)


def conversion_bytes(model: str, dtype: Optional[str], quantize: bool) -> Optional[int]:
    """About how many bytes converting ``model`` writes beside its output (a GGUF file's imported
    folder and the converted one; a folder's converted copy), or ``None`` where that is not known
    before the work (a hub repo, ``-q``)."""
    path = Path(model).expanduser()
    if quantize:
        return None
    if model.endswith(".gguf") and path.is_file():
        from .gguf_file import GGUFFile

        elements = sum(int(np.prod(t.shape, dtype=object)) for t in GGUFFile(path).tensors)
        return 2 * elements * FLOAT_BYTES[dtype or "float32"]
    if path.is_dir():
        return sum(_safetensors_bytes(file, dtype) for file in path.glob("model*.safetensors"))
    return None


def _safetensors_bytes(path: Path, dtype: Optional[str]) -> int:
    """The bytes of the safetensors file ``path`` once its float arrays are of ``dtype``."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, 100 << 20)))
        total = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            if dtype is not None and entry["dtype"] in SAFETENSORS_FLOATS:
                n_values = (end - start) // SAFETENSORS_FLOATS[entry["dtype"]]
                end = start + n_values * FLOAT_BYTES[dtype]
            total += end - start
        return total
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return path.stat().st_size  # mlx-lm says what is wrong with it


def is_local(model: str) -> bool:
    """Whether ``model`` names a local path rather than a hub repo id (``org/name``)."""
    return model.startswith(("/", ".", "~")) or model.count("/") != 1


def source_name(model: str) -> str:
    """How a model folder names its source: a hub repo id as is, a local path by its name."""
    return Path(model.rstrip("/")).name if is_local(model) else model


def _dense_copy(folder: Path, out: Path) -> Path:
    """A FlashHead folder as a plain mlx-lm folder (links to its files, config without the
    FlashHead entries), to convert again."""
    out.mkdir()
    for path in folder.iterdir():
        flashhead_file = is_assets_file(path.name) or path.name in MODEL_FILES
        if path.is_file() and not flashhead_file and path.name != "config.json":
            (out / path.name).symlink_to(path.resolve())
    config = json.loads((folder / "config.json").read_text())
    config.pop("flashhead", None)
    config.pop("model_file", None)
    (out / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    return out


def calibration_states(
    model, tokenizer, calibration_tokens: int, seed: int = 0, fingerprint: Optional[str] = None
) -> mx.array:
    """Final hidden states of ``calibration_tokens`` positions of the calibration mix
    (:func:`flashhead_mlx.calibration_mix.mix_hidden_states`; its chat replies are cached by
    ``fingerprint``)."""
    start = time.perf_counter()
    hidden = mix_hidden_states(model, tokenizer, calibration_tokens, seed, fingerprint=fingerprint)
    seconds = time.perf_counter() - start
    print(f"[INFO] Calibration mix: {hidden.shape[0]} positions in {seconds:.1f} s")
    return hidden


def cluster_model(
    model,
    tokenizer,
    cluster_size: int = CLUSTER_SIZE,
    n_clusters: Optional[int] = None,
    n_probes: Optional[int] = None,
    centroid_bits: Optional[int] = 4,
    seed: int = 0,
    calibration_tokens: int = 16384,
    tuning_text: Optional[str] = None,
    fingerprint: Optional[str] = None,
) -> dict:
    """Cluster the head of a loaded mlx-lm model: the arguments of
    :func:`flashhead_mlx.assets.save_assets` (``clusters``, ``n_probes``, ``centroid_bits``,
    ``mass_bias``). ``n_probes`` defaults to the tuned one (:func:`finish_assets`);
    ``fingerprint`` (:func:`flashhead_mlx.suite.model_fingerprint`) caches the model's chat
    replies."""
    weight = head_rows(head_module(model))
    vocab_size = weight.shape[0]
    if n_clusters is not None:
        if n_clusters <= 0:
            raise ValueError(f"--n-clusters must be positive, got {n_clusters}")
        cluster_size = -(-vocab_size // n_clusters)
    if not 1 <= cluster_size <= vocab_size:
        raise ValueError(f"--cluster-size must be in [1, {vocab_size}], got {cluster_size}")

    hidden = calibration_states(model, tokenizer, calibration_tokens, seed, fingerprint)
    print(f"[INFO] Clustering {vocab_size} rows into clusters of {cluster_size}")
    start = time.perf_counter()
    clusters = cluster_head(weight, cluster_size=cluster_size, hidden_states=hidden, seed=seed)
    note = f"clustered in {time.perf_counter() - start:.1f} s"
    del weight
    return finish_assets(
        model, tokenizer, clusters, hidden, n_probes, centroid_bits, note, tuning_text, fingerprint
    )


def tune_n_probes(
    model,
    tokenizer,
    head: FlashHead,
    tuning_text: Optional[str] = None,
    fingerprint: Optional[str] = None,
) -> int:
    """The fewest probes with :data:`~flashhead_mlx.containment.TARGET_CONTAINMENT` top-1
    containment for ``head`` (``model``'s, not installed), ranked by the head's own stage 1 and
    its recent tokens counted (:func:`flashhead_mlx.containment.counted_ranks`): on
    every domain of the development suite (:func:`flashhead_mlx.calibration_mix.dev_suite_states`,
    chat replies cached by ``fingerprint``) within
    :data:`~flashhead_mlx.containment.MAX_SCORED_FRACTION` of the vocabulary scored
    (:func:`flashhead_mlx.containment.suite_n_probes`), or on the file ``tuning_text`` when
    given."""
    recent = head.recent_tokens
    if tuning_text:
        text = Path(tuning_text).read_text()
        hidden = text_hidden_states(model, tokenizer, text, TUNING_TOKENS)
        contexts = text_contexts(tokenizer, text, TUNING_TOKENS, recent)
        n_probes, reached = tuned_n_probes(head, hidden, contexts=contexts)
        where = f"{hidden.shape[0]} positions of {Path(tuning_text).name}"
        print(f"[INFO] Tuned n_probes to {n_probes}: top-1 containment {reached:.4f} on {where}")
        return n_probes
    states = dev_suite_states(model, tokenizer, fingerprint, recent=recent)
    ranks = {domain: target_ranks(head, *positions) for domain, positions in states.items()}
    n_probes, line = suite_n_probes(head, ranks)
    print(f"[INFO] Tuned on the development suite: {line}")
    return n_probes


def finish_assets(
    model,
    tokenizer,
    clusters: dict,
    hidden: mx.array,
    n_probes: Optional[int],
    centroid_bits: Optional[int],
    note: str = "",
    tuning_text: Optional[str] = None,
    fingerprint: Optional[str] = None,
) -> dict:
    """The arguments of :func:`flashhead_mlx.assets.save_assets` for ``clusters`` (from
    ``clustering.cluster_head`` or ``clusters_from_order``) of ``model``'s head, with the
    sampling mass offsets fitted on ``hidden``. ``n_probes`` defaults to the fewest probes with
    99.9% top-1 containment on every domain of the development suite within the scored-fraction
    cap, or on ``tuning_text`` (:func:`tune_n_probes`)."""
    n_clusters = clusters["cluster_bias"].shape[0]
    if n_probes is not None and not 1 <= n_probes <= n_clusters:
        raise ValueError(f"--n-probes must be in [1, {n_clusters}], got {n_probes}")
    assets = make_assets(clusters, n_probes or 1, centroid_bits=centroid_bits)
    head = FlashHead.from_module(head_module(model), assets)
    if n_probes is None:
        n_probes = tune_n_probes(model, tokenizer, head, tuning_text, fingerprint)
    head.n_probes = n_probes
    print("[INFO] Fitting the sampling mass estimates")
    stride = max(1, hidden.shape[0] // MASS_FIT_POSITIONS)
    mass_bias = fit_mass_bias(head, hidden[::stride])
    scored = scored_fraction(
        n_clusters, head.cluster_size, n_probes, head.vocab_size, head.recent_tokens
    )
    print(
        f"[INFO] FlashHead: {n_clusters} clusters of {head.cluster_size}, {n_probes} probes, "
        f"{head.recent_tokens} recent tokens ({100 * scored:.1f}% of the vocabulary scored)"
        f"{', ' + note if note else ''}"
    )
    return {
        "clusters": clusters,
        "n_probes": n_probes,
        "centroid_bits": centroid_bits,
        "mass_bias": mass_bias,
    }


def install_flashhead(
    path: Path,
    result: dict,
    model,
    provenance: dict,
    card: Optional[dict] = None,
    model_file: bool = False,
) -> None:
    """Make the mlx-lm folder at ``path`` a FlashHead folder: the assets (``result``, from
    :func:`finish_assets`) of ``model``'s head with ``provenance`` (added to ``config.json``'s
    ``flashhead`` section), the model file when ``model_file`` (the remote-code variant) and the
    model card (``card``: keyword arguments of
    :func:`flashhead_mlx.model_card.render_folder_card`), written atomically, ``config.json``
    the switch (:func:`flashhead_mlx.assets.write_assets`).
    """
    provenance = {**provenance, "flashhead_mlx_version": __version__}
    save_assets(
        path,
        **result,
        head_module=head_module(model),
        provenance=provenance,
        head=probe_head(model).config(),
        model_file=model_file,
        card=lambda config: render_folder_card(path, config, **(card or {})),
    )


def add_flashhead(
    path: Path,
    source: Optional[str] = None,
    card: Optional[dict] = None,
    model_file: bool = False,
    **options,
) -> None:
    """Cluster the head of the mlx-lm model at ``path`` and make it a FlashHead folder
    (:func:`install_flashhead`). ``source`` is what it was converted from (recorded in
    ``config.json`` and the model card), ``card`` the options of the card, ``model_file`` adds
    the model file, ``options`` are those of :func:`cluster_model`."""
    model, tokenizer = mlx_lm.load(str(path))
    result = cluster_model(model, tokenizer, fingerprint=model_fingerprint(path), **options)
    provenance = {"source": source_name(source or str(path))}
    install_flashhead(path, result, model, provenance, card, model_file)


def convert(
    model: str,
    output: str,
    cluster_size: int = CLUSTER_SIZE,
    n_clusters: Optional[int] = None,
    n_probes: Optional[int] = None,
    centroid_bits: Optional[int] = 4,
    seed: int = 0,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    calibration_tokens: int = 16384,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    force: bool = False,
    tuning_text: Optional[str] = None,
    eval_json: Optional[str] = None,
    bench_json: Optional[str] = None,
    model_file: bool = False,
) -> Path:
    """Convert ``model`` into a FlashHead folder at ``output``, atomically; returns its path.
    With ``model_file``, the folder carries the model file that gives plain mlx-lm the FlashHead
    (``trust_remote_code=True``); without it plain mlx-lm loads the folder dense.

    Everything is written to a hidden stage folder beside ``output`` and renamed into place at
    the end (:func:`flashhead_mlx.durable.publish_folder`), so an interrupted or killed
    conversion leaves nothing that looks finished; the next one reclaims its stage folder. ``eval_json`` and
    ``bench_json`` (from ``flashhead-mlx eval`` and ``bench``) put measurements in the model card.
    Without ``n_probes``, the fewest probes with 99.9% top-1 containment on every domain of the
    development suite within the scored-fraction cap (or on the file ``tuning_text``) are chosen
    (:func:`tune_n_probes`).
    """
    if tuning_text is not None and n_probes is not None:
        raise ValueError("--tuning-text tunes n_probes: give it or --n-probes, not both")
    if tuning_text is not None and not Path(tuning_text).is_file():
        raise ValueError(f"--tuning-text {tuning_text} is not a file")
    output_path = Path(output).expanduser().resolve()
    reclaim_stages(output_path)
    if output_path.exists() and not force:
        raise ValueError(f"{output_path} already exists; pass --force to overwrite it")
    check_writable(output_path.parent)
    needed = conversion_bytes(model, dtype, quantize)
    if needed is not None:
        check_free_space(output_path.parent, needed, f"converting {source_name(model)}")
    # A full disk, a folder turned read-only, ...: one line.
    with plain_write_errors(output_path.parent), stage_folder(output_path) as stage:
        mlx_path = stage / "model"
        _prepare_mlx_model(
            model, mlx_path, dtype, quantize, q_group_size, q_bits, revision, trust_remote_code
        )
        add_flashhead(
            mlx_path,
            source=model,
            card={
                "model_id": output_path.name, "eval_json": eval_json, "bench_json": bench_json
            },
            cluster_size=cluster_size,
            n_clusters=n_clusters,
            n_probes=n_probes,
            centroid_bits=centroid_bits,
            seed=seed,
            calibration_tokens=calibration_tokens,
            tuning_text=tuning_text,
            model_file=model_file,
        )
        publish_folder(mlx_path, output_path, stage)
    print(f"[INFO] Wrote {output_path}")
    return output_path


