"""Saving and loading FlashHead assets: round trip, and a clear error for each corruption."""

import json
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from conftest import make_clusters, make_tiny_model
from flashhead_mlx.assets import (
    ASSETS_FILE,
    head_fingerprint,
    load_assets,
    make_assets,
    save_assets,
)
from flashhead_mlx.model_head import head_module, head_rows

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
    section = json.loads((folder / "config.json").read_text())["flashhead"]
    assert section["vocab_size"] == 1000 and section["n_clusters"] * section["cluster_size"] >= 1000
    assert section["centroid_bits"] == 4 and section["centroid_group_size"] == 64


def test_float_centroids_and_quantized_head(tmp_path):
    folder = make_tiny_model(tmp_path / "q", quantize=True)
    model, clusters, _ = convert_in_place(folder, centroid_bits=None)
    loaded = load_assets(folder, model)
    assert loaded["centroid_bits"] is None
    np.testing.assert_array_equal(np.array(loaded["centroids"]), clusters["centroids"])


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
    path = copy / ASSETS_FILE
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="truncated"):
        load_assets(copy, converted[1])


def test_missing_file(copy, converted):
    (copy / ASSETS_FILE).unlink()
    with pytest.raises(ValueError, match="missing"):
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
    arrays = mx.load(str(copy / ASSETS_FILE))
    order = np.array(arrays["order"])
    order[order == 5] = 6
    arrays["order"] = mx.array(order)
    mx.save_safetensors(str(copy / ASSETS_FILE), arrays)
    with pytest.raises(ValueError, match="permutation"):
        load_assets(copy, converted[1])


def test_bad_centroid_settings(converted):
    clusters = converted[2]
    with pytest.raises(ValueError, match="centroid_bits"):
        make_assets(clusters, 4, centroid_bits=7)
    with pytest.raises(ValueError, match="centroid_group_size"):
        make_assets(clusters, 4, centroid_group_size=48)
    with pytest.raises(ValueError, match="n_probes"):
        make_assets(clusters, 64)
