"""``flashhead-mlx convert``: convert a model (hub repo, mlx-lm folder or GGUF file) into a
FlashHead model folder (:func:`flashhead_mlx.pipeline.convert`), and upload it when asked."""

import argparse

from .arguments import add_assets_arguments, add_upload_arguments
from .clustering import CLUSTER_SIZE
from .hub import UploadError, check_token, upload
from .pipeline import convert

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
    parser.add_argument(
        "--cluster-size", type=int, default=CLUSTER_SIZE, help="Tokens per cluster (default: 16)."
    )
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
        "--tuning-text",
        default=None,
        help="Text file the default n_probes is tuned on (default: every domain of the "
        "development suite).",
    )
    add_upload_arguments(parser, required=False)
    return parser


def main() -> None:
    args = setup_arg_parser().parse_args()
    try:
        options = vars(args)
        upload_repo = options.pop("upload_repo")
        if upload_repo is not None:
            check_token()  # before the conversion, not after it
        path = convert(**options)
        if upload_repo is not None:
            upload(str(path), upload_repo)
    except (ValueError, UploadError) as error:
        raise SystemExit(f"flashhead-mlx convert: error: {error}")


if __name__ == "__main__":
    main()
