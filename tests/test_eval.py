"""``flashhead-mlx eval``: the metrics on heads whose answers are known by hand, against a numpy
brute force on a random head, the exact sampler distributions against mlx-lm's own sampler, and
the command's JSON and plot."""

import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from conftest import SHARED_AUSTEN, TINY_TEXT, make_clusters, make_tiny_model, run_cli
from flashhead_mlx import decoding, evaluate, flash_head, patch
from flashhead_mlx.assets import make_assets
from flashhead_mlx.pipeline import convert
from flashhead_mlx.calibration import text_contexts, text_hidden_states, text_windows
from flashhead_mlx.clustering import CLUSTER_SIZE
from flashhead_mlx.metrics import decimals, default_n_probes, dense_pass, evaluate as evaluate_head
from flashhead_mlx.patch import apply_flashhead
from flashhead_mlx.head import FlashHead
from flashhead_mlx.model_card import EVAL_KEYS
from flashhead_mlx.model_head import head_module, head_rows
from flashhead_mlx.sampling import sampler_distribution
from flashhead_mlx.sampling_distance import (
    dense_distribution,
    dense_draws,
    enumerated_distribution,
    expected_distribution,
    sampler_draws,
)


def hand_head(weight, order, cluster_bias, n_probes=1, mass_bias=None) -> FlashHead:
    """A FlashHead over ``weight`` whose stage 1 ignores ``h``: zero probe vectors, so the
    clusters rank by ``cluster_bias`` alone."""
    weight = np.array(weight, np.float32)
    clusters = {
        "order": np.array(order, np.int32),
        "centroids": np.zeros((len(cluster_bias), weight.shape[1]), np.float32),
        "cluster_bias": np.array(cluster_bias, np.float32),
    }
    if mass_bias is not None:
        mass_bias = mx.array(mass_bias, mx.float32)
    assets = make_assets(clusters, n_probes, centroid_bits=None, mass_bias=mass_bias)
    return FlashHead(assets, mx.array(weight))


def test_containment_greedy_and_mass_by_hand():
    # Two clusters, {0, 1} and {2, 3}; stage 1 always prefers the first.
    head = hand_head([[1, 0], [-1, 0], [0, 1], [0, -1]], [0, 1, 2, 3], [1.0, 0.0])
    # Dense argmax: tokens 0, 2, 1, 3: the first cluster holds it at positions 0 and 2.
    hidden = mx.array([[2, 0], [0, 2], [-2, 0], [0, -2]], mx.float32)
    rows, _ = evaluate_head(head, hidden, [1, 2], tv_positions=0)
    one, two = rows
    assert one["top1_containment"] == 0.5 and two["top1_containment"] == 1.0
    # Where the argmax is missed, the candidates tie at 0 and greedy takes token 0.
    assert one["greedy_agreement"] == 0.5 and two["greedy_agreement"] == 1.0
    # V = 4: the "top 5" is every token, so it needs both clusters.
    assert one["top5_containment"] == 0.0 and two["top5_containment"] == 1.0
    # Mass of the first cluster: e^2 + e^-2 against 2 at positions 0 and 2, the reverse at
    # positions 1 and 3, so the mean is exactly 1/2.
    assert one["candidate_mass"] == pytest.approx(0.5, abs=1e-6)
    assert two["candidate_mass"] == pytest.approx(1.0, abs=1e-6)
    assert one["scored_fraction"] == (2 + 1 * 2) / 4
    assert {k: one[k] for k in ("n_probes", "n_clusters", "cluster_size")} == {
        "n_probes": 1,
        "n_clusters": 2,
        "cluster_size": 2,
    }


def test_sampling_distance_by_hand():
    # Three one-token clusters with equal logits (h = 0): the dense sampler is uniform. Token 0 is
    # the candidate; the sampler draws token 1 with q = 1/4 and token 2 with q = 3/4 and weighs
    # the drawn token by 1/q, so it returns token 1 with 1/(1 + 4) = 1/5, token 2 with
    # 1/(1 + 4/3) = 3/7 and token 0 with the rest, 13/35. Top-p 0.9 drops nothing here (each
    # draw has two tokens, the larger below 90% of their mass), so both settings give
    # TV = (|13/35 - 1/3| + |1/5 - 1/3| + |3/7 - 1/3|) / 2 = 2/15.
    mass_bias = [[0.0, 0.0, math.log(3.0)], [0.0, 0.0, 0.0]]
    head = hand_head(np.eye(3, 2), [0, 1, 2], [1.0, 0.0, 0.0], mass_bias=mass_bias)
    hidden = mx.zeros((8, 2))
    rows, _ = evaluate_head(head, hidden, [1, 3], tv_positions=4)
    stored, every = rows
    assert stored["mass_bias"] == "stored" and every["mass_bias"] == "refit"
    for key in ("sampling_tv_t1", "sampling_tv_t07_p09"):
        assert stored[key] == pytest.approx(2 / 15, abs=1e-6)
        assert stored[f"{key}_stderr"] == pytest.approx(0, abs=1e-7)
        assert every[key] == pytest.approx(0, abs=1e-6)  # every cluster probed: the dense sampler
    assert stored["sampling_positions"] == 4


VOCAB, DIMS = 1000, 64


@pytest.fixture(scope="module")
def random_head():
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.3, (VOCAB, DIMS)).astype(np.float32)
    clusters = make_clusters(weight)
    n_clusters = clusters["centroids"].shape[0]
    mass_bias = mx.zeros((2, n_clusters))
    head = FlashHead(make_assets(clusters, 8, None, mass_bias=mass_bias), mx.array(weight))
    picks = weight[rng.integers(0, VOCAB, 96)]
    hidden = (2.5 * picks + rng.normal(0, 0.4, picks.shape)).astype(np.float32)
    return head, weight, clusters, hidden


def brute_force(weight, clusters, hidden, n_probes) -> dict:
    """The containment metrics computed the obvious way, in float64."""
    logits = hidden.astype(np.float64) @ weight.T.astype(np.float64)
    scores = hidden @ clusters["centroids"].T + clusters["cluster_bias"]
    probes = np.argsort(-scores, axis=1, kind="stable")[:, :n_probes]
    slots = clusters["order"].reshape(-1, 16)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top1, top5, mass = [], [], []
    for row in range(hidden.shape[0]):
        candidates = set(slots[probes[row]].ravel()) - {-1}
        top = np.argsort(-logits[row])[:5]
        top1.append(top[0] in candidates)
        top5.append(all(t in candidates for t in top))
        mass.append(probs[row, sorted(candidates)].sum())
    return {
        "top1_containment": np.mean(top1),
        "top5_containment": np.mean(top5),
        "greedy_agreement": np.mean(top1),  # exact candidate logits, no ties
        "candidate_mass": np.mean(mass),
    }


def test_metrics_match_brute_force(random_head):
    head, weight, clusters, hidden = random_head
    probes = [1, 4, 16, 63]
    rows, _ = evaluate_head(head, mx.array(hidden), probes, tv_positions=0)
    for row, p in zip(rows, probes):
        expected = brute_force(weight, clusters, hidden, p)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, abs=1e-5), (p, key)
    assert 0 < rows[0]["top1_containment"] < rows[1]["top1_containment"] < 1
    assert rows[-1]["top1_containment"] == 1.0


@pytest.mark.slow
def test_real_model_matches_brute_force(smollm2_dir):
    """SmolLM2-135M's hidden states on Emma, with stand-in clusters (conftest)."""
    model, tokenizer = mlx_lm.load(str(smollm2_dir))
    weight = np.array(head_rows(head_module(model)))
    clusters = make_clusters(weight)
    n_clusters = clusters["centroids"].shape[0]
    patch(model, make_assets(clusters, 48, None, mass_bias=mx.zeros((2, n_clusters))))
    hidden = text_hidden_states(model, tokenizer, (SHARED_AUSTEN / "emma.txt").read_text(), 256)
    rows, _ = evaluate_head(flash_head(model), hidden, [48, n_clusters], tv_positions=16)
    for row in rows:
        expected = brute_force(weight, clusters, np.array(hidden), row["n_probes"])
        for key, value in expected.items():  # one position may differ at a float near-tie
            assert row[key] == pytest.approx(value, abs=1.01 / 256), (row["n_probes"], key)
    assert rows[1]["top1_containment"] == 1.0
    assert rows[1]["sampling_tv_t1"] == pytest.approx(0, abs=1e-5)
    assert rows[0]["sampling_tv_t07_p09"] > 0


def test_head_is_left_as_it_was(random_head):
    head, _, _, hidden = random_head
    before = head.n_probes, head.mass_bias
    evaluate_head(head, mx.array(hidden[:16]), [2, 30], tv_positions=4)
    assert (head.n_probes, head.mass_bias) == before


def test_tv_of_every_probe_is_zero_and_shrinks_with_probes(random_head):
    head, _, _, hidden = random_head
    rows, _ = evaluate_head(head, mx.array(hidden[:32]), [1, 8, 63], tv_positions=16)
    for key in ("sampling_tv_t1", "sampling_tv_t07_p09"):
        assert rows[0][key] > rows[1][key] > 0
        assert rows[2][key] == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(1.0, None), (0.7, 0.9), (1.3, 0.5)])
def test_expected_distribution_is_mlx_lm_sampler_over_the_draws(random_head, temperature, top_p):
    head, weight, _, hidden = random_head
    h = mx.array(hidden[:3])
    for row, draws in enumerate(sampler_draws(head, h, temperature)):
        fast = expected_distribution(draws, temperature, top_p, VOCAB)
        literal = enumerated_distribution(draws, temperature, top_p, VOCAB)
        np.testing.assert_allclose(fast, literal, atol=1e-6)
        assert fast.sum() == pytest.approx(1.0)
        if top_p is None:
            exact = np.array(sampler_distribution(head, h[row], temperature))
            np.testing.assert_allclose(fast, exact, atol=1e-6)
    logits = mx.array(hidden[:3] @ weight.T)
    dense = np.array(dense_distribution(logits, temperature, top_p))
    order = np.array(head.order)
    for row, slot_logits in enumerate(np.array(head.slot_logits(h))):
        mine = expected_distribution(dense_draws(order, slot_logits), temperature, top_p, VOCAB)
        np.testing.assert_allclose(mine, dense[row], rtol=1e-4, atol=1e-6)


def test_decimals_reach_the_standard_errors_leading_digit():
    assert decimals(0.004) == 3 and decimals(0.0004) == 4 and decimals(0.3) == 1
    assert decimals(0.0099) == 3 and decimals(3.0) == 0 and decimals(1e-9) == 6
    assert decimals(0.0) == 6 and decimals(math.nan) == 4


def test_default_n_probes():
    assert default_n_probes(8, 63) == [4, 8, 16]
    assert default_n_probes(1, 63) == [1, 2] and default_n_probes(40, 63) == [20, 40, 63]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval")
    source = make_tiny_model(folder / "tiny", tied=False)
    return convert(str(source), str(folder / "tiny-flashhead"), calibration_tokens=256)


def test_cli_json_keys_and_plot(converted, tmp_path):
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    result = run_cli(
        "eval",
        "--model",
        str(converted),
        "--max-tokens",
        "64",
        "--n-probes",
        "1,3",
        "--tv-positions",
        "8",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert result.returncode == 0, result.stderr
    assert "| n_probes |" in result.stdout and "TV T=1" in result.stdout
    report = json.loads(out.read_text())
    assert {"model", "text", "tokens", "results"} <= set(report)
    assert report["tokens"] == 64 and report["text"].endswith("tuning.txt")
    assert [row["n_probes"] for row in report["results"]] == [1, 3]
    for row in report["results"]:
        assert set(EVAL_KEYS) <= set(row)  # the model card reads these
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors(converted, tmp_path, monkeypatch, capsys):
    def run(*args):
        monkeypatch.setattr(sys, "argv", ["flashhead-mlx eval", "--model", str(converted), *args])
        with pytest.raises(SystemExit) as error:
            evaluate.main()
        return str(error.value.code) + capsys.readouterr().err

    assert "flashhead-mlx eval: error: argument --n-probes" in run("--n-probes", "3,x")
    n_clusters = -(-1000 // CLUSTER_SIZE)
    message = f"n_probes must be in [1, {n_clusters}], got {n_clusters + 1}"
    assert message in run("--n-probes", str(n_clusters + 1), "--max-tokens", "8")
    assert f"{tmp_path / 'absent.txt'} is not a file" in run("--text", str(tmp_path / "absent.txt"))


def test_top1_and_greedy_count_what_the_head_scores_at_decode(tiny_llama):
    """Position by position, eval's top-1 with the recent tokens counted says whether the real
    head, decoding each window a token at a time (its recent tokens scored), scores the dense
    argmax exactly, and its greedy column is that decode's token; the recent tokens add
    positions that the probes alone miss."""
    n, seq_len, recent, n_probes = 96, 48, 32, 1
    model, tokenizer = mlx_lm.load(str(tiny_llama))
    assets = make_assets(make_clusters(np.array(head_rows(head_module(model)))), n_probes)
    head = flash_head(apply_flashhead(model, assets, recent_tokens=recent))
    hidden = text_hidden_states(model, tokenizer, TINY_TEXT, n, seq_len)
    contexts = text_contexts(tokenizer, TINY_TEXT, n, recent, seq_len)
    rows, stats = evaluate_head(head, hidden, [n_probes], tv_positions=0, contexts=contexts)
    windows = np.array(text_windows(tokenizer, TINY_TEXT, n, seq_len))
    prefix = windows.shape[1] - seq_len
    scored, greedy = [], []
    for window in windows:
        cache = make_prompt_cache(model)
        with decoding(temperatures=[0.0]):
            for position, token in enumerate(window):
                logits = model(mx.array([[int(token)]]), cache=cache)[0, -1]
                if position >= prefix:
                    scored.append(np.isfinite(np.array(logits)))
                    greedy.append(int(mx.argmax(logits)))
    argmax = stats["targets"]
    exact = np.stack(scored)[:n][np.arange(n), argmax]
    np.testing.assert_array_equal(stats["top1_ranks"] < n_probes, exact)
    assert rows[0]["top1_contained"] == exact.sum() and rows[0]["recent_tokens"] == recent
    assert rows[0]["greedy_agreement"] == np.mean(np.array(greedy[:n]) == argmax)
    probes_alone = dense_pass(head, hidden)["top1_ranks"] < n_probes
    assert (exact & ~probes_alone).any() and not (probes_alone & ~exact).any()
