"""Convert a model (hub repo, mlx-lm folder or GGUF file) into a FlashHead model folder.

The output is an mlx-lm folder, weights in their original order, plus the FlashHead assets file
and a ``flashhead`` section in ``config.json`` (docs/format.md): plain mlx-lm loads it dense,
``flashhead_mlx.load`` with its FlashHead. ``--model-file`` adds the model file that gives plain
mlx-lm the FlashHead too (``trust_remote_code=True``).
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from . import __version__
from .assets import MODEL_FILE, is_assets_file, is_flashhead_folder
from .model_card import CARD_FILE
from .model_head import head_module, head_rows
from .upload import UploadError, add_upload_arguments, check_token, upload

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
# Calibration positions the sampling mass offsets are averaged over (a mean per cluster).
MASS_FIT_POSITIONS = 2048


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
    from mlx_lm.convert import convert as mlx_lm_convert

    source = model
    looks_like_path = is_local(model)
    if looks_like_path and not Path(model).expanduser().exists():
        raise ValueError(f"{model} does not exist (a local folder, a .gguf file or a hub repo id)")
    if model.endswith(".gguf"):
        from .gguf import import_gguf

        source = str(import_gguf(Path(model).expanduser(), mlx_path.parent / "gguf", dtype=dtype or "float32"))
    elif looks_like_path and is_flashhead_folder(Path(model).expanduser()):
        source = str(_dense_copy(Path(model).expanduser(), mlx_path.parent / "dense"))
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
    card = Path(model).expanduser() / CARD_FILE
    if looks_like_path and card.is_file():
        # mlx-lm writes a blank card for a local source: keep the source's own (license, ...).
        shutil.copyfile(card, mlx_path / CARD_FILE)


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
        flashhead_file = is_assets_file(path.name) or path.name == MODEL_FILE
        if path.is_file() and not flashhead_file and path.name != "config.json":
            (out / path.name).symlink_to(path.resolve())
    config = json.loads((folder / "config.json").read_text())
    config.pop("flashhead", None)
    config.pop("model_file", None)
    (out / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    return out


def calibration_states(model, tokenizer, calibration_tokens: int) -> mx.array:
    """Final hidden states of ``calibration_tokens`` tokens of the shipped calibration text."""
    from .calibration import calibration_hidden_states

    print(f"[INFO] Calibrating on {calibration_tokens} tokens of {CALIBRATION_TEXT.name}")
    return calibration_hidden_states(
        model, tokenizer, CALIBRATION_TEXT.read_text(), n_tokens=calibration_tokens
    )


def cluster_model(
    model,
    tokenizer,
    cluster_size: int = 16,
    n_clusters: Optional[int] = None,
    n_probes: Optional[int] = None,
    centroid_bits: Optional[int] = 4,
    seed: int = 0,
    calibration_tokens: int = 16384,
    calibration_text: Optional[str] = None,
) -> dict:
    """Cluster the head of a loaded mlx-lm model: the arguments of
    :func:`flashhead_mlx.assets.save_assets` (``clusters``, ``n_probes``, ``centroid_bits``,
    ``mass_bias``). ``n_probes`` defaults to the tuned one (:func:`finish_assets`)."""
    from .clustering import cluster_head

    weight = head_rows(head_module(model))
    vocab_size = weight.shape[0]
    if n_clusters is not None:
        if n_clusters <= 0:
            raise ValueError(f"--n-clusters must be positive, got {n_clusters}")
        cluster_size = -(-vocab_size // n_clusters)
    if not 1 <= cluster_size <= vocab_size:
        raise ValueError(f"--cluster-size must be in [1, {vocab_size}], got {cluster_size}")

    hidden = calibration_states(model, tokenizer, calibration_tokens)
    print(f"[INFO] Clustering {vocab_size} rows into clusters of {cluster_size}")
    start = time.perf_counter()
    clusters = cluster_head(weight, cluster_size=cluster_size, hidden_states=hidden, seed=seed)
    note = f"clustered in {time.perf_counter() - start:.1f} s"
    del weight
    return finish_assets(
        model, tokenizer, clusters, hidden, n_probes, centroid_bits, note, calibration_text
    )


def finish_assets(
    model,
    tokenizer,
    clusters: dict,
    hidden: mx.array,
    n_probes: Optional[int],
    centroid_bits: Optional[int],
    note: str = "",
    calibration_text: Optional[str] = None,
) -> dict:
    """The arguments of :func:`flashhead_mlx.assets.save_assets` for ``clusters`` (from
    ``clustering.cluster_head`` or ``clusters_from_order``) of ``model``'s head, with the
    sampling mass offsets fitted on ``hidden``. ``n_probes`` defaults to the fewest probes with
    99.9% top-1 containment on ``calibration_text`` (a file; default: the built-in tuning text,
    :func:`flashhead_mlx.tune.tuned_n_probes`)."""
    from .assets import make_assets
    from .clustering import scored_fraction
    from .head import FlashHead
    from .sampling import fit_mass_bias
    from .tune import tuned_n_probes

    head = head_module(model)
    n_clusters = clusters["cluster_bias"].shape[0]
    cluster_size = clusters["order"].size // n_clusters
    vocab_size = int((np.asarray(clusters["order"]) >= 0).sum())
    if n_probes is None:
        n_probes = tuned_n_probes(model, tokenizer, clusters, centroid_bits, calibration_text)
    if not 1 <= n_probes <= n_clusters:
        raise ValueError(f"--n-probes must be in [1, {n_clusters}], got {n_probes}")
    assets = make_assets(clusters, n_probes, centroid_bits=centroid_bits)
    print("[INFO] Fitting the sampling mass estimates")
    stride = max(1, hidden.shape[0] // MASS_FIT_POSITIONS)
    mass_bias = fit_mass_bias(FlashHead.from_module(head, assets), hidden[::stride])
    scored = scored_fraction(n_clusters, cluster_size, n_probes, vocab_size)
    print(
        f"[INFO] FlashHead: {n_clusters} clusters of {cluster_size}, {n_probes} probes "
        f"({100 * scored:.1f}% of the vocabulary scored){', ' + note if note else ''}"
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
    ``flashhead`` section), written atomically (:func:`flashhead_mlx.assets.save_assets`), the
    model file when ``model_file`` (the remote-code variant), then the model card (``card``:
    keyword arguments of :func:`flashhead_mlx.model_card.render_folder_card`).
    """
    from .assets import save_assets
    from .model_card import render_folder_card, write_card

    provenance = {**provenance, "flashhead_mlx_version": __version__}
    config = save_assets(
        path, **result, head_module=head_module(model), provenance=provenance, model_file=model_file
    )
    write_card(path, render_folder_card(path, config, **(card or {})))


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
    from mlx_lm import load

    model, tokenizer = load(str(path))
    result = cluster_model(model, tokenizer, **options)
    provenance = {"source": source_name(source or str(path))}
    install_flashhead(path, result, model, provenance, card, model_file)


def convert(
    model: str,
    output: str,
    cluster_size: int = 16,
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
    calibration_text: Optional[str] = None,
    upload_repo: Optional[str] = None,
    eval_json: Optional[str] = None,
    bench_json: Optional[str] = None,
    model_file: bool = False,
) -> Path:
    """Convert ``model`` into a FlashHead folder at ``output``, atomically, and upload it to
    the hub repo ``upload_repo`` when given (:func:`flashhead_mlx.upload.upload`). With
    ``model_file``, the folder carries the model file that gives plain mlx-lm the FlashHead
    (``trust_remote_code=True``); without it plain mlx-lm loads the folder dense.

    Everything is written to a temporary folder beside ``output`` and renamed into place at the
    end, so an interrupted conversion leaves nothing that looks finished. ``eval_json`` and
    ``bench_json`` (from ``flashhead-mlx eval`` and ``bench``) put measurements in the model card.
    Without ``n_probes``, the fewest probes with 99.9% top-1 containment on ``calibration_text``
    (a file; default: the built-in tuning text) are chosen (:func:`flashhead_mlx.tune.tuned_n_probes`).
    """
    if calibration_text is not None and n_probes is not None:
        raise ValueError("--calibration-text tunes n_probes: give it or --n-probes, not both")
    if calibration_text is not None and not Path(calibration_text).is_file():
        raise ValueError(f"--calibration-text {calibration_text} is not a file")
    output_path = Path(output).expanduser().resolve()
    if output_path.exists() and not force:
        raise ValueError(f"{output_path} already exists; pass --force to overwrite it")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent))
    try:
        mlx_path = stage / "model"
        _prepare_mlx_model(
            model, mlx_path, dtype, quantize, q_group_size, q_bits, revision, trust_remote_code
        )
        add_flashhead(
            mlx_path,
            source=model,
            card={"model_id": output_path.name, "eval_json": eval_json, "bench_json": bench_json},
            cluster_size=cluster_size,
            n_clusters=n_clusters,
            n_probes=n_probes,
            centroid_bits=centroid_bits,
            seed=seed,
            calibration_tokens=calibration_tokens,
            calibration_text=calibration_text,
            model_file=model_file,
        )
        if output_path.exists():
            output_path.rename(stage / "previous")
        mlx_path.rename(output_path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"[INFO] Wrote {output_path}")
    if upload_repo is not None:
        upload(output_path, upload_repo)
    return output_path


def _centroid_bits(text: str) -> Optional[int]:
    """``--centroid-bits``: 4 or 8, or 0 for unquantized centroids (``None``)."""
    if text not in ("4", "8", "0"):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 4, 8, 0)")
    return int(text) or None


def add_assets_arguments(parser: argparse.ArgumentParser) -> None:
    """``--n-probes``, ``--centroid-bits``, ``--calibration-tokens`` and ``--model-file``
    (shared with ``import-assets``)."""
    parser.add_argument(
        "--n-probes",
        type=int,
        default=None,
        help=(
            "Clusters scored exactly per token (default: the fewest with 99.9%% top-1 "
            "containment on the tuning text, --calibration-text)."
        ),
    )
    parser.add_argument(
        "--centroid-bits",
        type=_centroid_bits,
        default=4,
        metavar="{4,8,0}",
        help="Bits of the stage-1 centroids (0: unquantized).",
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=16384,
        help="Tokens of calibration text run through the model.",
    )
    parser.add_argument(
        "--model-file",
        action="store_true",
        help="Add the model file that gives plain mlx-lm the FlashHead with trust_remote_code "
        "(default: none; plain mlx-lm loads the folder dense).",
    )


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashhead-mlx convert",
        description="Cluster a model's head and write a FlashHead model folder.",
    )
    parser.add_argument(
        "--model",
        "--hf-path",
        required=True,
        help="A Hugging Face repo id, a local mlx-lm folder or a .gguf file.",
    )
    parser.add_argument("--output", "--mlx-path", required=True, help="Folder to write.")
    parser.add_argument("--cluster-size", type=int, default=16, help="Tokens per cluster.")
    parser.add_argument(
        "--n-clusters",
        type=int,
        default=None,
        help="Number of clusters (sets the cluster size to ceil(vocab_size / n_clusters)).",
    )
    add_assets_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="Clustering seed.")
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="Type of the non-quantized parameters (float32 is fastest on a CPU).",
    )
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize the model.")
    parser.add_argument("--q-group-size", type=int, default=None, help="Quantization group size.")
    parser.add_argument("--q-bits", type=int, default=None, help="Quantization bits.")
    parser.add_argument("--revision", default=None, help="Hub revision of --model.")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="Trust remote code of --model."
    )
    parser.add_argument(
        "--force", action="store_true", help="Overwrite --output if it exists."
    )
    parser.add_argument(
        "--calibration-text",
        default=None,
        help="Text file the default n_probes is tuned on (default: a built-in Austen excerpt).",
    )
    add_upload_arguments(parser, required=False)
    return parser


def main() -> None:
    args = setup_arg_parser().parse_args()
    try:
        if args.upload_repo is not None:
            check_token()  # before the conversion, not after it
        convert(**vars(args))
    except (ValueError, UploadError) as error:
        raise SystemExit(f"flashhead-mlx convert: error: {error}")


if __name__ == "__main__":
    main()
