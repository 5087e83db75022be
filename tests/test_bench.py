"""``flashhead-mlx bench``: a smoke run on a tiny model (no timing assertions), its JSON keys,
and the bytes a decode step reads, counted by hand."""

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import make_clusters, make_tiny_model, run_cli
from flashhead_mlx import flash_head, generation, load, timing
from flashhead_mlx.bench import (
    batch_generation_run,
    batch_prompts,
    block_list,
    blocks,
    DECODE_TURN,
    break_even,
    bytes_per_token,
    decode_turn,
    free_head,
    head_time_share,
    mac_configurations,
    parameter_bytes,
    share_interval,
    step_times,
)
from flashhead_mlx.kernels import choose_batch_path
from flashhead_mlx.model_head import head_module, is_tied, language_model
from flashhead_mlx.pipeline import convert
from flashhead_mlx.speed import decode_speed
from flashhead_mlx.model_card import BENCH_KEYS
from flashhead_mlx.assets import make_assets
from flashhead_mlx.head import FlashHead
from flashhead_mlx.patch import apply_flashhead
from flashhead_mlx.testing.architectures import build

JSON_KEYS = set(BENCH_KEYS)  # the keys, which the model card reads
VERIFIED_KEYS = {"decode_tok_s", "speedup", "share_of_flash_gain", "rollbacks_per_1000_tokens"}
FREE_HEAD_KEYS = {
    "share_of_head_time_removed",
    "head_in_step_dense_ms",
    "head_in_step_flash_ms",
    "head_bytes_read_dense",
    "head_bytes_read_flash",
    "head_dense_gb_s",
    "head_flash_gb_s",
    "prefill_flash_vs_dense",
    "first_step_flash_vs_dense",
}
STEP_KEYS = {"prefill_ms", "first_step_ms", "decode_ms"}
BATCH_KEYS = {"dense_head", "rows", "union", "dense", "chosen", "chosen_path", "kernels",
              "union_share", "probes_per_cluster"}
GENERATION_KEYS = {"dense_tok_s", "flash_tok_s", "speedup", "flash_paths"}
VOCAB, DIMS = 1000, 64


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench")
    source = make_tiny_model(folder / "tiny", tied=request.param)
    return convert(str(source), str(folder / "tiny-flashhead"), calibration_tokens=256)


def test_bytes_per_token_by_hand(converted):
    dense, _ = load(str(converted), flashhead=False)
    flash, _ = load(str(converted))
    head = flash_head(flash)
    row = DIMS * 4  # float32
    table = VOCAB * row
    tied = not hasattr(dense, "lm_head")
    # Dense: every parameter, the embedding table only once (as the head) or as one row.
    expected_dense = parameter_bytes(dense) + row if tied else parameter_bytes(dense) - table + row
    assert bytes_per_token(dense) == pytest.approx(expected_dense)
    # FlashHead: the head's whole table becomes the centroids stage 1 multiplies (on the CPU,
    # float32), the cluster biases and the probed rows with their token ids.
    centroids = head.n_clusters * DIMS * 4
    probed = head.n_probes * head.cluster_size * (row + 4)
    expected_flash = expected_dense - table + centroids + 4 * head.n_clusters + probed
    assert bytes_per_token(flash) == pytest.approx(expected_flash)


def test_cli_smoke_json_and_plot(converted, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_cli(
        "bench",
        "--model",
        str(converted),
        "--runs",
        "1",
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "4",
        "--json",
        str(out),
        "--plot",
        str(png),
        "--verify-blocks",
        "2,2-4",
        "--batch-sizes",
        "1,2",
        "--batch-gen-tokens",
        "3",
    )
    assert result.returncode == 0, result.stderr
    for line in ("head per decode step", "centroid pass", "decode tok/s", "weights read",
                 "verified K=2-4", "FlashHead per-row", "Break-even:", "dequantized per call",
                 "stage 1 here multiplies float32", "4-bit body, bf16 head", "dense switch",
                 "batch generation", "kernels that ran: B = 1: centroid_topk mlx",
                 f"interleaved in turns of {DECODE_TURN} steps (turns per head: 1)"):
        assert line in result.stdout
    report = json.loads(out.read_text())
    assert JSON_KEYS <= set(report)
    assert report["device"].startswith(("cpu", "gpu"))
    # What ran (no Metal here): both stages on the MLX path at B = 1 and 4, but none on the
    # dense switch.
    assert report["kernels"] == "centroid_topk mlx, cluster_argmax mlx"
    head = flash_head(load(str(converted))[0])
    for b, ran in report["kernels_ran"].items():
        path = choose_batch_path(int(b), head.n_probes, head.n_clusters)
        stages = {} if path == "dense" else {"centroid_topk": "mlx", "cluster_argmax": "mlx"}
        assert ran == {**stages, "batch_path": path}
    assert report["ceiling_speedup"] == pytest.approx(
        report["bytes_per_token_dense"] / report["bytes_per_token_flash"], rel=1e-3
    )
    assert report["resident_flash_bytes"] > report["resident_dense_bytes"]  # + the assets
    for key in JSON_KEYS - {"device", "kernels", "share_of_ceiling"}:
        assert report[key] > 0, key
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["verified"]) == {"2", "2-4"}
    for verified in report["verified"].values():
        assert set(verified) == VERIFIED_KEYS
        assert verified["decode_tok_s"] > 0 and verified["rollbacks_per_1000_tokens"] >= 0
    assert FREE_HEAD_KEYS <= set(report) and "free head" in result.stdout
    assert set(report["step_ms"]) == {"dense", "flash", "free"}
    for times in report["step_ms"].values():
        assert set(times) == STEP_KEYS | {"decode_turns_ms"}
        assert min(times[key] for key in STEP_KEYS) > 0
        assert len(times["decode_turns_ms"]) == report["runs"]  # one turn of 4 steps a run
    assert "share_of_head_time_removed_95" in report
    for key in FREE_HEAD_KEYS - {"share_of_head_time_removed", "head_in_step_dense_ms",
                                 "head_in_step_flash_ms"}:
        assert report[key] > 0, key

    assert set(report["batches"]) == {"1", "2"}
    for b, batch in report["batches"].items():
        assert set(batch) == BATCH_KEYS
        assert min(batch[k] for k in BATCH_KEYS - {"chosen_path", "kernels"}) > 0
        # The path recorded is the one the rule gives (stage 1 skipped by the dense switch).
        path = choose_batch_path(int(b), head.n_probes, head.n_clusters)
        assert batch["chosen_path"] == path
        assert set(batch["kernels"]) == (set() if path == "dense" else
                                         {"centroid_topk", "cluster_argmax"})
    assert report["batches"]["1"]["chosen_path"] == "rows"
    assert set(report["batch_break_even"]) == {"batch_size", "union_share", "probes_per_cluster",
                                               "chosen_dense_from"}
    assert set(report["batch_generation"]) == {"1", "2"} and report["batch_gen_tokens"] == 3
    assert report["batch_temp"] == 0.0  # greedy unless --batch-temp
    for b, generation in report["batch_generation"].items():
        assert set(generation) == GENERATION_KEYS and generation["flash_tok_s"] > 0
        # Each row decodes 3 tokens: 2 steps after the first, in the 1 timed run.
        path = choose_batch_path(int(b), head.n_probes, head.n_clusters)
        assert generation["flash_paths"] == {path: 2}
    assert report["stage1_format"] == "float32"
    assert set(report["stage1_ms_by_format"]) == {"1", "4"}
    for times in report["stage1_ms_by_format"].values():
        assert set(times) == {"4-bit", "float32", "dequantized per call"} and min(times.values()) > 0
    assert set(report["mac_configurations"]) == {"4-bit head", "bf16 head"}
    for config in report["mac_configurations"].values():
        assert set(config) == {"bytes_per_token_dense", "bytes_per_token_flash",
                               "bandwidth_bound_speedup"}


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batch_generation_samples_at_the_temperature_asked(converted, monkeypatch, temperature):
    """``bench --batch-temp``: every decode step of the batch generation reaches the head with
    each row's temperature (greedy rows read as temperature 0)."""
    flash, tokenizer = load(str(converted))
    seen = []
    decode_logits = FlashHead.decode_logits
    monkeypatch.setattr(FlashHead, "decode_logits", lambda self, h, context:
                        seen.append(context.temperatures) or decode_logits(self, h, context))
    prompts = batch_prompts(tokenizer, 3, 4)
    tok_s, _ = batch_generation_run(flash, prompts, 3, temperature)
    assert tok_s > 0
    rows = (temperature,) * 3
    if temperature:  # the prompts' step reads no settings (None)
        assert rows in seen and all(t in (None, rows) for t in seen)
    else:
        assert seen and all(t is None or not any(t) for t in seen)


def test_decode_rate_counts_whole_calls(converted, monkeypatch):
    """A generator that yields every token only at its end (as verified decoding yields a
    block) gets the decode rate of one that yields each as it is decoded at the same cost per
    token: the tokens over the call's time after the prefill, measured on a fake clock. From
    the first token yielded on (``stream_generate``'s rate), the first would look instant."""
    flash, tokenizer = load(str(converted))
    now = [0.0]
    prefill_s, step_s, tokens = 2.0, 0.5, 6
    token = next(t for t in range(10, VOCAB) if t not in tokenizer.eos_token_ids)

    def fake_generate_step(prompt, model, stream=None, *, max_tokens, prompt_progress_callback,
                           flashhead_verify=None, **kwargs):
        prompt_progress_callback(0, len(prompt))
        now[0] += prefill_s
        prompt_progress_callback(len(prompt) - 1, len(prompt))
        for _ in range(max_tokens):
            now[0] += step_s
            if not flashhead_verify:
                yield token, mx.zeros(VOCAB)
        for _ in range(max_tokens if flashhead_verify else 0):
            yield token, mx.zeros(VOCAB)

    monkeypatch.setattr(generation, "generate_step", fake_generate_step)
    prompt = tokenizer.encode("one two three four five")
    speed = decode_speed({"flash": (flash, 0), "verified K=8": (flash, 8)}, tokenizer, prompt,
                         tokens, runs=2, clock=lambda: now[0])
    for name in ("flash", "verified K=8"):
        assert speed[name]["tokens"] == tokens
        assert speed[name]["decode_tok_s"] == pytest.approx(1 / step_s), name
        assert speed[name]["decode_runs"] == pytest.approx([1 / step_s] * 2), name
        assert speed[name]["prompt_tok_s"] == pytest.approx((len(prompt) - 1) / prefill_s)


def spy(monkeypatch, module, method: str, calls: list, only_this: bool = True) -> None:
    """Record in ``calls`` each call of ``module``'s ``method`` (of every instance of its class
    unless ``only_this``)."""
    original = getattr(type(module), method)

    def wrapper(self, *args, **kwargs):
        if self is module or not only_this:
            calls.append(method)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(module), method, wrapper)


def test_free_head_skips_the_head_not_the_body(converted, monkeypatch):
    model, _ = load(str(converted), flashhead=False)
    body = language_model(model).model
    head_calls, layer_calls = [], []
    spy(monkeypatch, head_module(model), "as_linear" if is_tied(model) else "__call__", head_calls)
    spy(monkeypatch, body.layers[0], "__call__", layer_calls, only_this=False)
    tokens = mx.array([[1, 2, 3]])
    mx.eval(model(tokens))
    assert head_calls and len(layer_calls) == len(body.layers)  # the spies see the dense head
    head_calls.clear(), layer_calls.clear()

    logits = free_head(model)(tokens)
    assert not head_calls and len(layer_calls) == len(body.layers)
    assert logits.shape == (1, 3, VOCAB) and not mx.any(logits).item()
    # The logits depend on the body's output (a NaN there reaches them): evaluating them runs it.
    body.norm.weight = mx.full(body.norm.weight.shape, mx.nan)
    assert mx.isnan(model(tokens)).all().item()


def test_a_decode_turn_leaves_out_its_first_interval():
    now = [0.0]

    def tokens():  # the k-th token comes k ms after the one before
        for k in itertools.count():
            now[0] += k / 1000
            yield k

    assert decode_turn(tokens(), 5, clock=lambda: now[0]) == pytest.approx([2, 3, 4, 5, 6])


def test_step_times_interleaves_the_models_in_turns(converted, monkeypatch):
    """The three models' decode steps alternate in turns (none gets more than two turns ahead of
    another: running each model's steps in one go fails this), and each run gives a turn median
    per round."""
    models = {"dense": load(str(converted), flashhead=False)[0], "flash": load(str(converted))[0],
              "free": free_head(load(str(converted), flashhead=False)[0])}
    layers = {id(language_model(m).model.layers[0]): name for name, m in models.items()}
    steps = {name: 0 for name in models}
    most_ahead = [0]
    layer_class = type(language_model(models["dense"]).model.layers[0])
    original = layer_class.__call__

    def counted(self, x, *args, **kwargs):
        if id(self) in layers and x.shape[-2] == 1:  # a decode step (the prompts have 3 tokens)
            steps[layers[id(self)]] += 1
            most_ahead[0] = max(most_ahead[0], max(steps.values()) - min(steps.values()))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(layer_class, "__call__", counted)
    n_steps = 5 * DECODE_TURN
    times = step_times(models, [1, 2, 3], n_steps, runs=2)
    rounds = n_steps // DECODE_TURN
    assert min(steps.values()) > 2 * rounds * DECODE_TURN  # every model's steps were seen
    assert most_ahead[0] <= 2 * (DECODE_TURN + 2) < rounds * DECODE_TURN
    for name, t in times.items():
        assert len(t["decode_turns_ms"]) == 2 * rounds
        assert t["decode_ms"] == pytest.approx(np.median(t["decode_turns_ms"]))
        assert min(t["prefill_ms"], t["first_step_ms"]) > 0


def test_break_even_is_the_first_batch_where_the_dense_path_keeps_up():
    def row(union, dense, path, share):
        return {"union": union, "dense": dense, "chosen_path": path, "union_share": min(share, 1),
                "probes_per_cluster": share}

    speeds = {"1": row(10, 2, "rows", 0.1), "2": row(15, 8, "union", 0.2),
              "4": row(20, 20, "union", 0.4), "8": row(20, 30, "dense", 0.8)}
    assert break_even(speeds) == {"batch_size": 4, "union_share": 0.4, "probes_per_cluster": 0.4,
                                  "chosen_dense_from": 8}
    speeds = {"1": row(10, 2, "rows", 0.1)}
    assert break_even(speeds) == {"batch_size": None, "union_share": None,
                                  "probes_per_cluster": None, "chosen_dense_from": None}


def test_share_interval_resamples_the_three_heads_rounds_together():
    """The free-head share's bootstrap interval: one value where every resample gives the same
    share (identical rounds, or rounds that drift by the same amount for the three heads, since a
    round's three turns are resampled together), around the point estimate and narrowing with
    more rounds where FlashHead's time is noisy, ``None`` where the dense head costs no more than
    the free one."""
    assert share_interval({"dense": [100.0] * 5, "flash": [60.0] * 5, "free": [50.0] * 5}) == \
        pytest.approx([0.8, 0.8])
    drift = np.linspace(0, 30, 15)  # the machine slows during the runs
    runs = {"dense": 100 + drift, "flash": 60 + drift, "free": 50 + drift}
    assert share_interval(runs) == pytest.approx([0.8, 0.8])
    unpaired = {name: np.random.default_rng(i).permutation(times) for i, (name, times)
                in enumerate(runs.items())}
    low, high = share_interval(unpaired)
    assert high - low > 0.2  # the drift alone, once the runs are no longer resampled together

    def noisy(n):
        flash = 60 + np.random.default_rng(n).normal(0, 5, n)
        return {"dense": [100.0] * n, "flash": flash, "free": [50.0] * n}, flash
    intervals = {}
    for n in (9, 81):
        times, flash = noisy(n)
        intervals[n] = share_interval(times)
        point = head_time_share(100.0, np.median(flash), 50.0)
        assert intervals[n][0] < point < intervals[n][1]
    assert np.diff(intervals[81]) < np.diff(intervals[9]) / 2
    assert share_interval({"dense": [50.0] * 3, "flash": [60.0] * 3, "free": [50.0] * 3}) is None


def test_verify_blocks_are_positive_integers():
    assert blocks("4,8,16,32") == [4, 8, 16, 32]
    for text in ("", "4,x", "0,4"):
        with pytest.raises(argparse.ArgumentTypeError):
            blocks(text)
    assert block_list("4,8,4-32") == [4, 8, (4, 32)]
    for text in ("", "4,0", "8-4"):
        with pytest.raises(argparse.ArgumentTypeError):
            block_list(text)


def test_a_negative_batch_temperature_is_refused(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--model", str(tmp_path), "--batch-temp", "-0.5", "--json", str(out))
    assert result.returncode == 2 and "--batch-temp must be 0 (greedy) or positive" in result.stderr
    assert not out.exists()


def test_folder_without_flashhead_is_refused(tmp_path):
    source = make_tiny_model(tmp_path / "plain")
    result = run_cli("bench", "--model", str(source), "--runs", "1")
    assert result.returncode != 0
    assert "flashhead-mlx bench: error:" in result.stderr and "has no FlashHead" in result.stderr


# Tiny models of the matrix whose head and embedding tables a name lookup (``lm_head``,
# ``model.embed_tokens``) misses: gpt2's tied head ``model.wte`` beside its position table
# ``model.wpe``, llama4_text's untied ``output`` beside ``model.embed_tokens``.
TABLES = {"gpt2": ("model.wte", ["model.wte", "model.wpe"]),
          "llama4_text": ("output", ["model.embed_tokens"])}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_bytes_per_token_by_hand_on_the_probed_head(name):
    head, tables = TABLES[name]
    model = build(name)
    arrays = dict(tree_flatten(model.parameters()))
    total = sum(a.nbytes for a in arrays.values())
    table_bytes = sum(arrays[f"{t}.weight"].nbytes for t in tables)
    rows = sum(arrays[f"{t}.weight"].nbytes // arrays[f"{t}.weight"].shape[0] for t in tables)
    head_bytes = arrays[f"{head}.weight"].nbytes
    skipped = table_bytes + (0 if head in tables else head_bytes)
    assert bytes_per_token(model) == total - skipped + rows + head_bytes
    dense = bytes_per_token(model)
    clusters = make_clusters(np.array(arrays[f"{head}.weight"]))
    apply_flashhead(model, make_assets(clusters, 3))
    flash = flash_head(model)
    stage1 = flash.n_clusters * (arrays[f"{head}.weight"].shape[1] + 1) * 4  # float32 on the CPU
    probed = 3 * flash.cluster_size * (head_bytes // arrays[f"{head}.weight"].shape[0] + 4)
    assert bytes_per_token(model) == dense - head_bytes + stage1 + probed


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_mac_configurations_by_hand(tied, tmp_path):
    """The tiny llama (2 layers; d = 64, MLP 128, 4 query and 2 key/value heads of 16) as a 4-bit
    body: every projection 0.5 bytes a value plus a bf16 scale and bias per 64 (0.5625), norms
    in bf16; the head at 4 bits or in bf16, its FlashHead's 4-bit centroids and bf16 biases."""
    dense, _ = mlx_lm.load(str(make_tiny_model(tmp_path / "tiny", tied=tied)))
    module = head_module(dense)
    head = FlashHead.from_module(module, make_assets(make_clusters(np.array(module.weight)), 5))
    projections = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128
    body = 2 * (projections * 0.5625 + 2 * 64 * 2) + 64 * 2
    clusters, probed = head.n_clusters, 5 * head.cluster_size
    stage1 = clusters * (64 // 2 + 2 * 2) + 2 * clusters
    for name, row in (("4-bit head", 64 * 0.5625), ("bf16 head", 64 * 2)):
        lookup = row if tied else 64 * 0.5625  # the embedding's row: the head's, or 4-bit
        dense_bytes = body + lookup + VOCAB * row
        flash_bytes = body + lookup + stage1 + probed * (row + 4)
        assert mac_configurations(dense, head)[name] == {
            "bytes_per_token_dense": round(dense_bytes),
            "bytes_per_token_flash": round(flash_bytes),
            "bandwidth_bound_speedup": pytest.approx(dense_bytes / flash_bytes),
        }


def test_each_alternated_run_starts_after_the_work_before_it(monkeypatch):
    """mlx-lm's ``generate_step`` leaves one step evaluating asynchronously on its stream when a
    generator ends; the next run timed must not count it: each call starts after both streams
    were synchronized and the buffer cache emptied (the prefill of whichever model ran second
    looked 25-40% slower), and the order reverses by turns, so no call always follows the same
    one."""
    events = []
    monkeypatch.setattr(timing.mx, "synchronize", lambda stream=None: events.append(
        "generation" if stream is timing.GENERATION_STREAM else stream))
    monkeypatch.setattr(timing.mx, "clear_cache", lambda: events.append("clear"))
    results = timing.alternated_runs(
        {name: (lambda n=name: events.append(n) or n) for name in "abc"}, 4)
    assert results == {name: [name] * 4 for name in "abc"}
    calls = [i for i, e in enumerate(events) if e in ("a", "b", "c")]
    assert len(calls) == 15
    for i in calls:
        assert events[i - 3 : i] == ["generation", None, "clear"], events[: i + 1]
    timed = [events[i] for i in calls][3:]
    rounds = ["".join(timed[i : i + 3]) for i in range(0, 12, 3)]
    assert rounds == ["abc", "cba", "abc", "cba"]


def test_prefill_script_times_each_prompt_length(converted, tmp_path):
    out = tmp_path / "prefill.json"
    script = Path(__file__).parents[1] / "scripts" / "prefill.py"
    result = subprocess.run(
        [sys.executable, str(script), str(converted), "--prompt-tokens", "3,6",
         "--gen-tokens", "2", "--runs", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "6-token prompt" in result.stdout and "FlashHead / dense" in result.stdout
    times = json.loads(out.read_text())
    assert set(times) == {"3", "6"}
    for steps in times.values():
        assert set(steps) == {"dense", "FlashHead", "free head"}
        assert all(t["prefill_ms"] > 0 and t["decode_ms"] > 0 for t in steps.values())
