"""Saving and loading FlashHead assets (format 2): round trip, a clear error for each corruption
(a flipped byte, an older format, ...), and atomic replacement."""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from conftest import make_clusters, make_tiny_model
import flashhead_mlx
from flashhead_mlx import assets as assets_module
from flashhead_mlx.assets import (
    FORMAT_VERSION,
    LEGACY_ASSETS_FILE,
    content_digest,
    head_fingerprint,
    load_assets,
    make_assets,
    save_assets,
    set_n_probes,
    write_assets,
)
from flashhead_mlx.model_head import head_module, head_rows
from flashhead_mlx.patch import head_assets

N_PROBES = 5


def convert_in_place(folder, centroid_bits=4):
    model, _ = mlx_lm.load(str(folder))
    clusters = make_clusters(np.array(head_rows(head_module(model))))
    mass_bias = mx.arange(clusters["centroids"].shape[0], dtype=mx.float32)
    module = head_module(model)
    save_assets(folder, clusters, N_PROBES, centroid_bits, mass_bias, head_module=module)
    return model, clusters, mass_bias


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("assets") / "model"
    shutil.copytree(tiny_llama, folder)
    return folder, *convert_in_place(folder)


@pytest.fixture
def copy(converted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(converted[0], folder)
    return folder


def section_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["flashhead"]


def assets_path(folder) -> Path:
    """The assets file the folder's config.json names."""
    return folder / section_of(folder)["assets_file"]


def edit_section(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["flashhead"].update(changes)
    path.write_text(json.dumps(config))


def test_round_trip(converted):
    folder, model, clusters, mass_bias = converted
    loaded = load_assets(folder, model)
    expected = make_assets(clusters, N_PROBES, mass_bias=mass_bias)
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        if isinstance(value, mx.array):
            assert mx.array_equal(loaded[key], value), key
        else:
            assert loaded[key] == value, key
    section = section_of(folder)
    assert section["vocab_size"] == 1000 and section["n_clusters"] * section["cluster_size"] >= 1000
    assert section["centroid_bits"] == 4 and section["centroid_group_size"] == 64
    assert section["format_version"] == FORMAT_VERSION == 2
    digest = content_digest(mx.load(str(assets_path(folder))))
    assert section["assets_digest"] == digest and digest.startswith("sha256:")
    assert section["assets_file"] == f"flashhead-{digest[7:23]}.safetensors"
    assert sorted(p.name for p in folder.iterdir() if "flashhead" in p.name) == [section["assets_file"]]


def test_float_centroids_and_quantized_head(tmp_path):
    folder = make_tiny_model(tmp_path / "q", quantize=True)
    model, clusters, _ = convert_in_place(folder, centroid_bits=None)
    loaded = load_assets(folder, model)
    assert loaded["centroid_bits"] is None
    np.testing.assert_array_equal(np.array(loaded["centroids"]), clusters["centroids"])


def test_what_a_cpu_load_saves_keeps_the_stored_format(converted, copy):
    """On the CPU the FlashHead multiplies float32 centroids, but what it hands on (its assets,
    for ``patch`` again or a new assets file) are the stored packed ones, bit for bit."""
    folder, model, clusters, mass_bias = converted
    stored = make_assets(clusters, N_PROBES, mass_bias=mass_bias)
    loaded, _ = flashhead_mlx.load(str(copy))
    head = flashhead_mlx.flash_head(loaded)
    assert head.stage1_format == "float32" and head.stage1_centroids.dtype == mx.float32
    arrays = {k: v for k, v in head_assets(head).items() if isinstance(v, mx.array)}
    section = section_of(copy)
    write_assets(copy, arrays, section)
    saved = load_assets(copy, model)
    assert saved["centroid_bits"] == 4 and saved["centroids"].dtype == mx.uint32
    for key in ("centroids", "centroid_scales", "centroid_biases", "cluster_bias", "order"):
        assert mx.array_equal(saved[key], stored[key]), key
    flashhead_mlx.unpatch(loaded)
    flashhead_mlx.patch(loaded)  # from the assets the unpatched head handed on
    assert mx.array_equal(flashhead_mlx.flash_head(loaded).centroids, stored["centroids"])


def test_model_weights_are_untouched(converted, tiny_llama):
    folder = converted[0]
    original = mx.load(str(tiny_llama / "model.safetensors"))
    saved = mx.load(str(folder / "model.safetensors"))
    assert all(mx.array_equal(original[k], saved[k]) for k in original)


def test_fingerprint_sees_one_changed_weight(converted):
    module = head_module(converted[1])
    before = head_fingerprint(module)
    module.weight = module.weight.at[3, 7].add(1e-3)
    assert head_fingerprint(module) != before
    module.weight = module.weight.at[3, 7].add(-1e-3)


def test_assets_of_another_model(copy, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=1)
    model, _ = mlx_lm.load(str(other))
    with pytest.raises(ValueError, match="fingerprint"):
        load_assets(copy, model)


def test_other_vocabulary(copy, tmp_path):
    other = make_tiny_model(tmp_path / "other", vocab_size=1200)
    model, _ = mlx_lm.load(str(other))
    with pytest.raises(ValueError, match="1000 x 64.*1200 x 64"):
        load_assets(copy, model)


def test_truncated_file(copy, converted):
    path = assets_path(copy)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="truncated"):
        load_assets(copy, converted[1])


def test_missing_file(copy, converted):
    path = assets_path(copy)
    path.unlink()
    with pytest.raises(ValueError, match=f"{path} is missing"):
        load_assets(copy, converted[1])


def test_not_converted(tiny_llama, converted):
    with pytest.raises(ValueError, match="convert"):
        load_assets(tiny_llama, converted[1])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": 99}, "format_version"),
        ({"n_clusters": 64}, "do not fit"),
        ({"n_clusters": 125, "cluster_size": 8}, "order has shape"),
        ({"vocab_size": 999}, "head of 999"),
        ({"n_probes": 0}, "n_probes"),
        ({"centroid_bits": 8}, "centroids has shape"),
        ({"centroid_group_size": 32}, "centroid_scales has shape"),
    ],
)
def test_edited_config(copy, converted, changes, message):
    edit_section(copy, **changes)
    with pytest.raises(ValueError, match=message):
        load_assets(copy, converted[1])


def test_order_not_a_permutation(copy, converted):
    arrays = mx.load(str(assets_path(copy)))
    order = np.array(arrays["order"])
    order[order == 5] = 6
    arrays["order"] = mx.array(order)
    write_assets(copy, arrays, section_of(copy))  # a consistent digest: the next check speaks
    with pytest.raises(ValueError, match="permutation"):
        load_assets(copy, converted[1])


def test_flipped_bytes_give_the_digest_error(copy, converted):
    path = assets_path(copy)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as error:
        load_assets(copy, converted[1])
    message = str(error.value)
    assert message.startswith(f"{path}: the arrays' digest sha256:") and "\n" not in message
    assert "changed or corrupted" in message


def test_one_flipped_byte_changes_the_digest(converted):
    arrays = dict(mx.load(str(assets_path(converted[0]))))
    before = content_digest(arrays)
    centroids = np.array(arrays["centroids"])
    centroids.view(np.uint8)[0, 0] ^= 1
    assert content_digest({**arrays, "centroids": mx.array(centroids)}) != before
    renamed = {("x" + k if k == "order" else k): v for k, v in arrays.items()}
    assert content_digest(renamed) != before
    reshaped = {**arrays, "cluster_bias": arrays["cluster_bias"].reshape(1, -1)}
    assert content_digest(reshaped) != before


def test_file_name_must_be_that_of_the_digest(copy, converted):
    name = assets_path(copy).name
    other = "flashhead-0000000000000000.safetensors"
    os.rename(copy / name, copy / other)
    edit_section(copy, assets_file=other)
    with pytest.raises(ValueError, match=f"names the assets file '{other}'.*not the name of its assets_digest"):
        load_assets(copy, converted[1])


def test_format_1_folder_says_how_to_upgrade(copy, converted):
    """A folder written by format 1: flashhead.safetensors, no digest."""
    os.rename(assets_path(copy), copy / LEGACY_ASSETS_FILE)
    config = json.loads((copy / "config.json").read_text())
    for key in ("assets_file", "assets_digest"):
        del config["flashhead"][key]
    config["flashhead"]["format_version"] = 1
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_assets(copy, converted[1])
    message = str(error.value)
    assert "format_version 1 (flashhead.safetensors)" in message and "\n" not in message
    assert f"flashhead-mlx convert --model {copy} --output NEW_DIR" in message


def test_replacing_the_assets_is_atomic(copy, converted, monkeypatch):
    """set_n_probes writes a new file, replaces config.json, then removes the old file: after
    every step a reader loads the folder as before or as after, and no hidden file is left."""
    model = converted[1]
    old_name, old_probes = assets_path(copy).name, section_of(copy)["n_probes"]
    mass_bias = mx.ones((2, section_of(copy)["n_clusters"]))
    states = []
    real_replace, real_unlink = os.replace, Path.unlink

    def observed(step):
        def wrapper(*args, **kwargs):
            result = step(*args, **kwargs)
            loaded = load_assets(copy, model)
            states.append((loaded["n_probes"], loaded["mass_bias"].shape))
            return result

        return wrapper

    monkeypatch.setattr(assets_module.os, "replace", observed(real_replace))
    monkeypatch.setattr(Path, "unlink", observed(real_unlink))
    set_n_probes(copy, old_probes + 1, mass_bias)
    monkeypatch.undo()
    before, after = (old_probes, (converted[3].size,)), (old_probes + 1, (2, mass_bias.shape[1]))
    assert states[0] == before and states[-1] == after and set(states) == {before, after}
    assert len(states) >= 3  # the new file, config.json, the old file's removal
    new_name = section_of(copy)["assets_file"]
    assert new_name != old_name and not (copy / old_name).exists()
    assert [p.name for p in copy.iterdir() if "flashhead" in p.name] == [new_name]
    assert [p.name for p in copy.iterdir() if p.name.startswith(".")] == []
    assert mx.array_equal(load_assets(copy, model)["mass_bias"], mass_bias)


def test_an_interrupted_write_changes_nothing(copy, converted, monkeypatch):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(assets_module, "content_digest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        set_n_probes(copy, 2, mx.ones((2, section_of(copy)["n_clusters"])))
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_bad_centroid_settings(converted):
    clusters = converted[2]
    with pytest.raises(ValueError, match="centroid_bits"):
        make_assets(clusters, 4, centroid_bits=7)
    with pytest.raises(ValueError, match="centroid_group_size"):
        make_assets(clusters, 4, centroid_group_size=48)
    with pytest.raises(ValueError, match="n_probes"):
        make_assets(clusters, 64)
