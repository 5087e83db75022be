"""Upload a FlashHead folder to the Hugging Face Hub in one commit, as ``mlx_lm.upload`` does
for mlx-lm folders (``flashhead-mlx upload`` and ``convert --upload-repo``).

The folder's model card is rendered for ``ORG/NAME`` (``ORG`` alone: the source's name plus
``-flashhead``), the repo created if needed and the folder sent in one commit
(``HfApi.create_commit``), so the repo gets the whole folder or nothing; mlx-lm's
``upload_large_folder`` commits in several steps and keeps its resume state inside the folder.
Hidden files and folders (caches, the temporary files of atomic writes), ``__pycache__``,
``*.pyc``, partial or temporary files and FlashHead assets files that ``config.json`` does not
name (left by an interrupted write) are never sent; a folder whose assets fail their digest is
refused. The folder's own card is rewritten only
after the upload succeeded: a failed upload (no token, no network) leaves the folder as it was.
"""

import json
import os
from pathlib import Path
from typing import Optional

from ._version import __version__
from .assets import assets_section, is_assets_file, read_assets
from .model_card import CARD_FILE, render_folder_card, suggested_name, write_card

IGNORED_SUFFIXES = (".pyc", ".partial", ".tmp", ".incomplete", ".lock")


class UploadError(RuntimeError):
    """The hub refused or could not be reached; the local folder is unchanged."""


def check_token() -> str:
    """The Hugging Face token (``HF_TOKEN`` or ``hf auth login``), or an :class:`UploadError`."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UploadError(
            "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token with "
            "write access)"
        )
    return token


def repo_id(upload_repo: str, config: dict, folder: Path) -> str:
    """``ORG/NAME`` as given, or ``ORG`` completed with the suggested name (the source's name,
    or else the folder's, plus ``-flashhead``)."""
    suggestion = suggested_name(config["flashhead"].get("source", folder.name))
    parts = upload_repo.split("/")
    if len(parts) == 1 and parts[0]:
        return f"{upload_repo}/{suggestion}"
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--upload-repo must be ORG/NAME or ORG, got {upload_repo!r}")
    if not parts[1].endswith("-flashhead"):
        print(f"[INFO] FlashHead repos are usually named after their source: {parts[0]}/{suggestion}")
    return upload_repo


def upload_files(folder: Path) -> list:
    """The files of ``folder`` an upload sends, as sorted relative POSIX paths: all but hidden
    files and folders, ``__pycache__`` and partial or temporary files."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in names:
            if not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES):
                files.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(files)


def read_flashhead_config(folder: Path) -> dict:
    """``config.json`` of a FlashHead folder whose assets match their digest, or a
    ``ValueError`` saying why ``folder`` is not one."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a model folder (no config.json)")
    config = json.loads(config_path.read_text())
    if "flashhead" not in config:
        raise ValueError(
            f"{folder} is not a FlashHead folder (no flashhead section in config.json): convert "
            "it first with `flashhead-mlx convert`"
        )
    read_assets(folder, assets_section(folder, config))
    return config


def upload(
    path: str,
    upload_repo: str,
    eval_json: Optional[str] = None,
    bench_json: Optional[str] = None,
) -> str:
    """Upload the FlashHead folder ``path`` to the hub repo ``upload_repo``; returns the repo id.

    Args:
        path: a folder written by ``flashhead-mlx convert`` or ``import-assets``.
        upload_repo: ``ORG/NAME``, or ``ORG`` for the suggested name.
        eval_json, bench_json: ``flashhead-mlx eval`` / ``bench`` JSON files whose figures go in
            the model card (replacing those it had).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, logging

    folder = Path(path).expanduser().resolve()
    config = read_flashhead_config(folder)
    repo = repo_id(upload_repo, config, folder)
    card = render_folder_card(folder, config, repo, eval_json, bench_json)
    token = check_token()
    assets_file = config["flashhead"]["assets_file"]
    files = [
        name
        for name in upload_files(folder)
        if name != CARD_FILE and (name == assets_file or not is_assets_file(name))
    ]
    logging.set_verbosity_info()
    try:
        operations = [CommitOperationAdd(name, str(folder / name)) for name in files]
        operations.append(CommitOperationAdd(CARD_FILE, card.encode()))
        api = HfApi(token=token)
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.create_commit(
            repo_id=repo,
            repo_type="model",
            operations=operations,
            commit_message=f"Upload FlashHead model (flashhead-mlx {__version__})",
        )
    except Exception as error:  # the hub's and its HTTP client's errors, whatever the version
        raise UploadError(
            f"uploading {folder} to {repo} failed ({type(error).__name__}: {error}); the folder "
            f"is unchanged: retry with `flashhead-mlx upload --path {folder} --upload-repo {repo}`"
        ) from error
    write_card(folder, card)
    print(f"Upload successful, go to https://huggingface.co/{repo} for details.")
    return repo
