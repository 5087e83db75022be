"""A FlashHead installed on tiny random mlx-lm models, against the same model's dense head."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler

from conftest import make_clusters, make_tiny_model
from flashhead_mlx.assets import make_assets, save_assets
from flashhead_mlx.model_head import final_hidden_states, head_module, head_rows
from flashhead_mlx.patch import apply_flashhead, flash_head, load
from flashhead_mlx.sampling import fit_mass_bias

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 999]])
N_PROBES = 6
MODELS = {
    "llama-tied": dict(model_type="llama"),
    "llama-untied": dict(model_type="llama", tied=False),
    "llama-quantized": dict(model_type="llama", quantize=True),
    "qwen3-untied-quantized": dict(model_type="qwen3", tied=False, quantize=True),
    "gemma3": dict(model_type="gemma3_text"),
}


def assert_close(actual, expected):
    np.testing.assert_allclose(np.array(actual), np.array(expected), rtol=1e-4, atol=1e-4)


def clusters_of(model):
    return make_clusters(np.array(head_rows(head_module(model))))


def patched(folder, n_probes=N_PROBES):
    dense, tokenizer = mlx_lm.load(str(folder))
    model, _ = mlx_lm.load(str(folder))
    apply_flashhead(model, make_assets(clusters_of(model), n_probes))
    return dense, model, tokenizer


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", **MODELS[request.param])
    return (folder, *patched(folder))


def test_prefill_logits_are_dense(pair):
    _, dense, model, _ = pair
    assert_close(model(TOKENS), dense(TOKENS))


def test_hidden_states_are_unchanged(pair):
    _, dense, model, _ = pair
    np.testing.assert_array_equal(
        np.array(final_hidden_states(model, TOKENS)), np.array(final_hidden_states(dense, TOKENS))
    )


def test_decode_step(pair):
    _, dense, model, _ = pair
    batch = TOKENS.reshape(-1, 1)  # B = 8 decode rows, each with its own probes
    step, reference = np.array(model(batch))[:, 0], np.array(dense(batch))[:, 0]
    head = flash_head(model)
    finite = np.isfinite(step)
    assert np.all(finite.sum(-1) <= N_PROBES * head.cluster_size) and np.all(finite.sum(-1) > 0)
    assert len({tuple(np.flatnonzero(f)) for f in finite}) > 1
    assert np.all(np.isneginf(step[~finite]))
    np.testing.assert_allclose(step[finite], reference[finite], rtol=1e-4, atol=1e-4)
    contained = finite[np.arange(len(batch)), reference.argmax(-1)]
    np.testing.assert_array_equal(step.argmax(-1)[contained], reference.argmax(-1)[contained])


def test_all_probes_is_dense(pair):
    folder = pair[0]
    dense, model, _ = patched(folder, n_probes=flash_head(pair[2]).n_clusters)
    batch = TOKENS.reshape(-1, 1)
    assert_close(model(batch), dense(batch))
    sampler = make_sampler(temp=0.0)
    dense_text = mlx_lm.generate(dense, pair[3], "It is a truth", max_tokens=8, sampler=sampler)
    text = mlx_lm.generate(model, pair[3], "It is a truth", max_tokens=8, sampler=sampler)
    assert text == dense_text


def test_generate_runs(pair):
    _, _, model, tokenizer = pair
    sampler = make_sampler(temp=1.0)
    text = mlx_lm.generate(model, tokenizer, "It is a truth", max_tokens=5, sampler=sampler)
    assert isinstance(text, str)


def test_full_vocabulary_sampling_in_generate(pair):
    folder = pair[0]
    dense, model, tokenizer = patched(folder)
    head = flash_head(model)
    head.mass_bias = fit_mass_bias(head, final_hidden_states(dense, TOKENS))
    head.sampling_temperature = 0.7
    batch = TOKENS.reshape(-1, 1)
    step, reference = np.array(model(batch))[:, 0], np.array(dense(batch))[:, 0]
    candidates = np.array(head.candidates(final_hidden_states(dense, batch))[0])[:, 0]
    order = np.array(head.order)
    for row, ref, cand in zip(step, reference, candidates):
        cand = cand[cand >= 0]
        np.testing.assert_allclose(row[cand], ref[cand], rtol=1e-4, atol=1e-4)
        extra = np.setdiff1d(np.flatnonzero(np.isfinite(row)), cand)
        assert 0 < extra.size <= head.cluster_size
        slots = np.flatnonzero(np.isin(order, extra))
        assert len(set(slots // head.cluster_size)) == 1  # one drawn, non-probed cluster
    sampler = make_sampler(temp=0.7)
    text = mlx_lm.generate(model, tokenizer, "It is a truth", max_tokens=5, sampler=sampler)
    assert isinstance(text, str)


def test_no_second_copy_of_the_head(pair):
    _, dense, model, _ = pair

    def nbytes(m):
        return sum(v.nbytes for _, v in tree_flatten(m.parameters()))

    head = flash_head(model)
    padding = (head.order.size - head.vocab_size) * head.weight.nbytes // head.order.size
    small = ("order", "inverse", "centroids", "centroid_scales", "centroid_biases", "cluster_bias")
    extras = sum(getattr(head, name).nbytes for name in small)
    assert nbytes(model) - nbytes(dense) <= padding * 2 + extras


def test_load_converted_folder(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    dense, _ = mlx_lm.load(str(folder))
    save_assets(folder, clusters_of(dense), N_PROBES, head_module=head_module(dense))
    model, _ = load(str(folder), n_probes=3)
    assert flash_head(model).n_probes == 3
    assert_close(model(TOKENS), dense(TOKENS))
    assert np.isfinite(np.array(model(TOKENS[:, :1]))).sum() <= 3 * 16


def test_unsupported_architecture():
    class Model(nn.Module):
        pass

    with pytest.raises(ValueError, match="'test_patch' architecture"):
        apply_flashhead(Model(), {})
