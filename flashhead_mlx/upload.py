"""``flashhead-mlx upload --path DIR --upload-repo ORG/NAME``: upload a FlashHead folder to the
Hugging Face Hub in one commit (:func:`flashhead_mlx.hub.upload`)."""

import argparse

from .arguments import add_upload_arguments
from .hub import UploadError, upload


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashhead-mlx upload",
        description="Upload a FlashHead model folder to the Hugging Face Hub.",
    )
    parser.add_argument("--path", required=True, help="The FlashHead model folder.")
    return add_upload_arguments(parser, required=True)


def main() -> None:
    args = setup_arg_parser().parse_args()
    try:
        upload(args.path, args.upload_repo, args.eval_json, args.bench_json)
    except (ValueError, UploadError) as error:
        raise SystemExit(f"flashhead-mlx upload: error: {error}")


if __name__ == "__main__":
    main()
