"""Plain messages for what users meet: a truncated GGUF file, an unsupported architecture or
tensor type, a folder of an older asset format, and a full disk or a read-only folder while
converting. Each ends in one line, printed by the command as one line, naming the file or folder
and what to do, with nothing left behind."""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from conftest import gguf_path, make_tiny_model, run_cli
from flashhead_mlx import import_assets as import_assets_module
from flashhead_mlx import pipeline, storage
from flashhead_mlx import tune as tune_module
from flashhead_mlx.gguf import import_gguf
from flashhead_mlx.gguf_file import GGUFError, GGUFFile
from flashhead_mlx.pipeline import convert
from flashhead_mlx.storage import StorageError
from test_gguf import write_gguf

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny llama as llama.cpp writes it (Q8_0 matrices)."""
    root = tmp_path_factory.mktemp("messages")
    model_dir = make_tiny_model(root / "tiny", vocab_size=320, tied=False)
    model, _ = mlx_lm.load(str(model_dir))
    write_gguf(root / "tiny.gguf", model_dir, model, Q.Q8_0)
    return root / "tiny.gguf"


def one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    """The error a command printed: one line, no traceback; returns its text."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    prefix = f"flashhead-mlx {command}"
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and result.stderr.rstrip().endswith(lines[0]), result.stderr[-3000:]
    return lines[0].removeprefix(f"flashhead-mlx {command}: error: ")


def nothing_left(folder: Path, *expected: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


# -- A truncated GGUF file ---------------------------------------------------------------------


def test_truncated_gguf_says_by_how_much(tiny_gguf, tmp_path):
    """Cut in its tensor data (today: "cannot reshape array of size ... into shape ...", then
    "tensor ... runs past the end of the file"): the file is truncated, N bytes of M."""
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    result = run_cli("convert", "--model", str(cut), "--output", str(tmp_path / "out"))
    message = one_line_error(result, "convert")
    assert message == (
        f"{cut} is truncated: its tensors need {len(data)} bytes, but the file has "
        f"{len(data) * 2 // 3} ({len(data) - len(data) * 2 // 3} missing; an incomplete download? "
        "download it again)"
    )
    nothing_left(tmp_path, "cut.gguf")


def test_gguf_cut_in_its_metadata(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:3000])
    with pytest.raises(GGUFError) as error:
        GGUFFile(cut)
    assert str(error.value).startswith(f"{cut} is truncated or corrupt: metadata field ")
    assert "past the end of the file (3000 bytes)" in str(error.value)


def test_huge_counts_are_refused_before_parsing(tiny_gguf, tmp_path):
    """A header declaring 2^60 fields (a flipped bit): refused from the file size, at once."""
    data = bytearray(tiny_gguf.read_bytes())
    data[16:24] = (1 << 60).to_bytes(8, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    expected = f"declares {1 << 60} metadata fields and .* tensors, more than its {len(data)} bytes"
    with pytest.raises(GGUFError, match=expected):
        GGUFFile(bad)


@pytest.mark.slow
def test_truncated_real_gguf(tmp_path):
    """The issue's case: SmolLM2's GGUF cut at 50 MB."""
    cut = tmp_path / "SmolLM2.gguf"
    with open(gguf_path("smollm2"), "rb") as source:
        cut.write_bytes(source.read(50_000_000))
    with pytest.raises(GGUFError) as error:
        import_gguf(cut, tmp_path / "out")
    size = gguf_path("smollm2").stat().st_size
    assert str(error.value).startswith(
        f"{cut} is truncated: its tensors need {size} bytes, but the file has 50000000 ("
    )


# -- Unsupported architectures and tensor types ------------------------------------------------


def test_unsupported_gguf_architecture_names_it_and_the_list(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv7")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    message = one_line_error(
        run_cli("convert", "--model", str(tmp_path / "rwkv.gguf"), "--output", str(tmp_path / "o")),
        "convert",
    )
    assert message == (
        f"{tmp_path / 'rwkv.gguf'}: GGUF architecture 'rwkv7' is not supported; the GGUF import "
        "reads gemma3, gemma4, granite, llama, olmo2, phi3, qwen2, qwen3, qwen35, smollm3 "
        "(docs/cli.md, under convert); convert the model from its Hugging Face repo or an mlx-lm "
        "folder instead"
    )
    nothing_left(tmp_path, "rwkv.gguf")


def test_unsupported_mlx_model_type_names_it_and_the_list(tmp_path):
    folder = make_tiny_model(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "phi9"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        convert(str(folder), str(tmp_path / "out"), calibration_tokens=256)
    models = Path(mlx_lm.__file__).parent / "models"
    assert str(error.value) == (
        f"{folder}: model type 'phi9' is not one mlx-lm {mlx_lm.__version__} supports (its model "
        f"types are the modules in {models}; FlashHead converts any of them whose head "
        "it can serve exactly: docs/architectures.md)"
    )
    nothing_left(tmp_path, "tiny")


def test_unsupported_tensor_type_names_the_file_and_the_types_read(
    tiny_gguf, tmp_path, monkeypatch
):
    """A GGUF whose matrices are Q8_1, a type gguf cannot dequantize: refused before any tensor
    is dequantized."""
    model_dir = tiny_gguf.parent / "tiny"
    model, _ = mlx_lm.load(str(model_dir))
    block_bytes = gguf.GGML_QUANT_SIZES[Q.Q8_1][1]
    # gguf cannot write Q8_1 either: blocks of zeros, in the layout it would have.
    def blocks(a, tensor_type):
        return np.zeros((*a.shape[:-1], a.shape[-1] // 32 * block_bytes), np.uint8)

    def values(a, tensor_type):
        return np.zeros((*a.shape[:-1], a.shape[-1] // block_bytes * 32), np.float32)

    monkeypatch.setattr(gguf.quants, "quantize", blocks)
    monkeypatch.setattr(gguf.quants, "dequantize", values)
    write_gguf(tmp_path / "q8_1.gguf", model_dir, model, Q.Q8_1)
    monkeypatch.undo()
    with pytest.raises(GGUFError) as error:
        import_gguf(tmp_path / "q8_1.gguf", tmp_path / "out")
    message = str(error.value)
    assert message.startswith(
        f"{tmp_path / 'q8_1.gguf'}: tensor token_embd.weight is of type Q8_1, which the GGUF "
        "import cannot dequantize (it reads F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, "
    )
    assert message.endswith("); requantize the model to one of them (llama.cpp's llama-quantize)")
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_type_code(tiny_gguf, tmp_path):
    """A type code no GGML version has (here 99, patched into the tensor table)."""
    data = bytearray(tiny_gguf.read_bytes())
    reader = GGUFFile(tiny_gguf)
    name = reader.tensors[0].name.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError) as error:
        import_gguf(bad, tmp_path / "out")
    assert str(error.value) == (
        f"{bad}: tensor {name.decode()!r} has type code 99, which is no GGML tensor type: the "
        "file is corrupt, or newer than the installed gguf package (pip install -U gguf)"
    )


def test_more_heads_than_embedding_width(tiny_gguf, tmp_path):
    """attention.head_count above embedding_length and no attention.key_length: no head dimension
    (today: "metadata llama.attention.key_length is missing", though no file has that key)."""
    data = bytearray(tiny_gguf.read_bytes())
    key = b"llama.attention.head_count"
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    assert int.from_bytes(data[at : at + 4], "little") == gguf.GGUFValueType.UINT32
    data[at + 4 : at + 8] = (100).to_bytes(4, "little")  # the embedding is 64 wide
    bad = tmp_path / "heads.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError) as error:
        import_gguf(bad, tmp_path / "out")
    assert str(error.value) == (
        f"{bad}: llama.attention.head_count is 100, more than llama.embedding_length 64, and no "
        "llama.attention.key_length gives the head dimension"
    )


# -- A folder of an older asset format ---------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from conftest import make_clusters
    from flashhead_mlx.assets import save_assets
    from flashhead_mlx.model_head import head_module, head_rows

    folder = make_tiny_model(tmp_path_factory.mktemp("older") / "model")
    model, _ = mlx_lm.load(str(folder))
    clusters = make_clusters(np.array(head_rows(head_module(model))))
    save_assets(folder, clusters, 5, 4, head_module=head_module(model))
    return folder


def older(converted, tmp_path, **section) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(converted, folder)
    config = json.loads((folder / "config.json").read_text())
    name = config["flashhead"]["assets_file"]
    os.rename(folder / name, folder / "flashhead.safetensors")
    config["flashhead"] = {k: v for k, v in config["flashhead"].items()
                           if k not in ("assets_file", "assets_digest", "format_version")}
    config["flashhead"].update(section)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_format_1_folder_through_generate(converted, tmp_path):
    folder = older(converted, tmp_path, format_version=1)
    result = run_cli("generate", "--model", str(folder), "--prompt", "Hi")
    message = one_line_error(result, "generate")
    assert message == (
        f"{folder} holds FlashHead assets of format_version 1 (flashhead.safetensors), which this "
        f"version no longer reads: convert it again (`flashhead-mlx convert --model {folder} "
        "--output NEW_DIR`) for format_version 2"
    )


@pytest.mark.parametrize("version", [None, 0, "2", 2.0])
def test_folder_without_a_format_this_writes(converted, tmp_path, version):
    """No version, 0, or a version of the wrong type: convert again (today's message also
    asked to upgrade flashhead-mlx, which cannot help)."""
    from flashhead_mlx.loading import load

    folder = older(converted, tmp_path, **({} if version is None else {"format_version": version}))
    with pytest.raises(ValueError) as error:
        load(str(folder))
    message = str(error.value)
    assert message == (
        f"{folder}: FlashHead format_version {version!r} is not one flashhead-mlx writes (this "
        "version reads 2); config.json was edited or is corrupt: convert the model again"
    )


def test_newer_format_asks_to_upgrade(converted, tmp_path):
    from flashhead_mlx.loading import load

    folder = older(converted, tmp_path, format_version=3)
    with pytest.raises(ValueError) as error:
        load(str(folder))
    assert str(error.value) == (
        f"{folder}: FlashHead format_version 3 is newer than this flashhead-mlx reads (2): "
        "upgrade flashhead-mlx (pip install -U flashhead-mlx)"
    )


def test_config_that_is_not_json(converted, tmp_path):
    from flashhead_mlx.loading import load

    folder = tmp_path / "model"
    shutil.copytree(converted, folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError) as error:
        load(str(folder))
    assert str(error.value).startswith(f"{folder / 'config.json'} is not valid JSON (")
    assert str(error.value).endswith("): restore it, or convert the model again")


# -- No disk space, or a read-only output folder, while converting -----------------------------


def test_too_little_space_is_refused_up_front(tiny_gguf, tmp_path, monkeypatch):
    elements = sum(int(np.prod(t.shape)) for t in GGUFFile(tiny_gguf).tensors)
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 300 << 10)
    with pytest.raises(StorageError) as error:
        convert(str(tiny_gguf), str(tmp_path / "out"), calibration_tokens=256, n_probes=2)
    needed = storage.size_text(2 * elements * 4)
    assert str(error.value) == (
        f"converting tiny.gguf needs about {needed} in {tmp_path}, which has 300.0 KiB free: "
        "free some space, or write elsewhere"
    )
    nothing_left(tmp_path)


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("[write] Unable to write 65536 bytes to file."),  # MLX's, on a full disk
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["mlx", "oserror"],
)
def test_disk_full_while_writing(tiny_gguf, tmp_path, monkeypatch, failure):
    """The disk fills while the model is written (a writer raising what MLX or the OS raise)."""

    def full(path, *args, **kwargs):
        if isinstance(failure, OSError):
            raise OSError(failure.errno, failure.strerror, str(path))
        raise failure

    monkeypatch.setattr(mx, "save_safetensors", full)
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 12 << 10)
    monkeypatch.setattr(pipeline, "conversion_bytes", lambda *args: None)  # no check up front
    with pytest.raises(StorageError) as error:
        convert(str(tiny_gguf), str(tmp_path / "out"), calibration_tokens=256, n_probes=2)
    assert str(error.value) == (
        f"cannot write into {tmp_path}: no space left on the device (12.0 KiB free); free some "
        "space, or write elsewhere"
    )
    nothing_left(tmp_path)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_output_folder(tiny_gguf, tmp_path, monkeypatch, code):
    """The tests run as root, for whom a chmod'ed folder stays writable: the file system's
    refusal is simulated where the folder is probed (a real read-only mount is tested below)."""
    parent = tmp_path / "ro"
    parent.mkdir()

    def refused(*args, dir=None, **kwargs):
        raise OSError(code, os.strerror(code), str(Path(dir) / "tmpXXXX"))

    monkeypatch.setattr(storage.tempfile, "TemporaryFile", refused)
    with pytest.raises(StorageError) as error:
        convert(str(tiny_gguf), str(parent / "out"), calibration_tokens=256, n_probes=2)
    reason = {errno.EROFS: "it is on a read-only file system"}.get(
        code, "no permission to write there"
    )
    assert str(error.value) == f"cannot write into {parent}: {reason}; write elsewhere"
    nothing_left(parent)


@pytest.mark.parametrize("command", ["tune", "import-assets"])
def test_rewriting_a_read_only_or_full_folder(converted, tmp_path, monkeypatch, command):
    """``tune`` and ``import-assets`` rewrite a folder in place: a read-only one, or a full disk,
    gives the same one line as ``convert``, from Python too (today: the OSError itself)."""
    folder = Path(shutil.copytree(converted, tmp_path / "model"))
    module = {"tune": tune_module, "import-assets": import_assets_module}[command]

    def refused(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(path) / ".stage"))

    monkeypatch.setattr(module, "reclaim_leftovers", refused)
    run = {
        "tune": lambda: tune_module.tune(str(folder), max_tokens=16),
        "import-assets": lambda: import_assets_module.import_assets(str(folder), str(tmp_path)),
    }[command]
    with pytest.raises(StorageError) as error:
        run()
    assert str(error.value) == (
        f"cannot write into {folder}: it is on a read-only file system; write elsewhere"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod'ed folder")
def test_chmod_read_only_output_folder(tiny_gguf, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = run_cli("convert", "--model", str(tiny_gguf), "--output", str(parent / "out"))
        message = one_line_error(result, "convert")
    finally:
        parent.chmod(0o755)
    assert message == f"cannot write into {parent}: no permission to write there; write elsewhere"


@pytest.fixture
def tmpfs(tmp_path):
    """A factory of tmpfs mounts (root with CAP_SYS_ADMIN; skipped elsewhere), unmounted after."""
    mounts = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
        result = subprocess.run(command, capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def convert_cli(model: Path, output: Path) -> subprocess.CompletedProcess:
    return run_cli("convert", "--model", str(model), "--output", str(output), "--n-probes", "2")


def test_real_read_only_mount(tiny_gguf, tmpfs):
    parent = tmpfs("ro", "size=1m,ro")
    message = one_line_error(convert_cli(tiny_gguf, parent / "out"), "convert")
    assert message == (
        f"cannot write into {parent}: it is on a read-only file system; write elsewhere"
    )


def test_real_full_disk(tiny_gguf, tmpfs):
    parent = tmpfs("small", "size=256k")
    message = one_line_error(convert_cli(tiny_gguf, parent / "out"), "convert")
    assert message.startswith("converting tiny.gguf needs about ")
    assert message.endswith(
        f" in {parent}, which has 256.0 KiB free: free some space, or write elsewhere"
    )
    assert list(parent.iterdir()) == []


def test_real_full_disk_while_writing(tiny_gguf, tmpfs, monkeypatch):
    """The disk fills for real (MLX's own write error), the check up front bypassed."""
    parent = tmpfs("small", "size=192k")
    monkeypatch.setattr(pipeline, "conversion_bytes", lambda *args: None)
    with pytest.raises(StorageError) as error:
        convert(str(tiny_gguf), str(parent / "out"), calibration_tokens=256, n_probes=2)
    assert str(error.value).startswith(f"cannot write into {parent}: no space left on the device (")
    assert list(parent.iterdir()) == []
