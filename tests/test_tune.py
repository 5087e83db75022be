"""``flashhead-mlx tune``: the search against a brute-force scan, and the folder it writes: the
chosen n_probes meets the target through what the head scores exactly at greedy decode steps
(its candidates and each position's recent tokens), one fewer does not."""

import bisect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_TEXT, make_tiny_model, run_cli
from flashhead_mlx import decoding, flash_head, load
from flashhead_mlx.calibration import text_windows
from flashhead_mlx.pipeline import convert
from flashhead_mlx.containment import TARGET_CONTAINMENT, smallest_n_probes
from flashhead_mlx.tune import tune


def brute_force_n_probes(ranks, target, n_clusters):
    return next(p for p in range(1, n_clusters + 1) if np.mean(ranks < p) >= target)


def test_search_matches_a_scan():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_clusters = int(rng.integers(1, 200))
        ranks = np.minimum(
            rng.geometric(rng.uniform(0.02, 0.9), rng.integers(1, 300)) - 1, n_clusters - 1
        )
        # Targets at the achievable values themselves, where a rounding slip would show.
        targets = [1.0, rng.uniform(), *(np.arange(1, ranks.size + 1) / ranks.size)[-3:]]
        for target in targets:
            assert smallest_n_probes(ranks, target, n_clusters) == brute_force_n_probes(
                ranks, target, n_clusters
            )


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tune")
    source = make_tiny_model(folder / "tiny", tied=False)
    return convert(str(source), str(folder / "tiny-flashhead"), calibration_tokens=256)


def containment(
    folder: Path, text: str, n_probes: int, n_tokens: int, seq_len=None, recent_tokens=None
) -> float:
    """Share of the text's positions (windows as tuning reads them) whose dense argmax the head
    scores exactly at a greedy decode step: a forward pass of each window in a decode context,
    each position with its own recent tokens (``recent_tokens``: default the head's)."""
    options = {"n_probes": n_probes}
    if recent_tokens is not None:
        options["recent_tokens"] = recent_tokens
    model, tokenizer = load(str(folder), flashhead=options)
    seq_len = seq_len or n_tokens
    windows = text_windows(tokenizer, text, n_tokens, seq_len)
    contained = []
    for window in windows:
        dense = np.array(model(window[None]))[0, -seq_len:]
        with decoding(temperatures=[0.0]):
            scored = np.isfinite(np.array(model(window[None]))[0, -seq_len:])
        contained += list(scored[np.arange(seq_len), dense.argmax(axis=-1)])
    return float(np.mean(contained[:n_tokens]))


@pytest.mark.parametrize("target", [0.9, 1.0])
def test_tune_writes_the_smallest_n_probes_meeting_the_target(converted, tmp_path, target):
    folder = Path(shutil.copytree(converted, tmp_path / "model"))
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT)
    rows = tune(str(folder), str(text), target, max_tokens=128)
    config = json.loads((folder / "config.json").read_text())["flashhead"]
    after = config["n_probes"]
    assert rows["after"]["n_probes"] == after and rows["after"]["top1_containment"] >= target
    assert containment(folder, TINY_TEXT, after, 128) >= target
    if after > 1:
        assert containment(folder, TINY_TEXT, after - 1, 128) < target
    # The probes alone (no recent tokens scored) need more: tune counted the recent tokens.
    n_clusters = config["n_clusters"]
    alone = bisect.bisect_left(
        range(1, n_clusters + 1),
        True,
        key=lambda p: containment(folder, TINY_TEXT, p, 128, recent_tokens=0) >= target,
    ) + 1
    assert after <= alone
    model, _ = load(str(folder))  # the assets stay consistent and load
    head = flash_head(model)
    assert head.n_probes == after and head.mass_bias.shape == (2, config["n_clusters"])
    # The assets were replaced: a new file named in config.json, the old one removed.
    old = json.loads((converted / "config.json").read_text())["flashhead"]["assets_file"]
    assert config["assets_file"] != old
    names = {p.name for p in converted.iterdir()} - {old} | {config["assets_file"]}
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_cli_and_errors(converted, tmp_path):
    folder = Path(shutil.copytree(converted, tmp_path / "model"))
    files = {p.name: p.read_bytes() for p in folder.iterdir()}

    def run(*args):
        return run_cli("tune", "--model", str(folder), *args)

    result = run("--target-containment", "1.5")
    assert result.returncode != 0
    assert "flashhead-mlx tune: error: the target containment must be in (0, 1]" in result.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    result = run("--target-containment", "1.0", "--max-tokens", "64")
    assert result.returncode == 0, result.stderr
    assert "| overall before " in result.stdout and "| overall after " in result.stdout


def test_convert_tunes_n_probes_on_the_tuning_text(tmp_path):
    """Without --n-probes a conversion keeps the fewest probes with 99.9% top-1 containment on
    the tuning text: all of its positions, in windows of 512 tokens."""
    source = make_tiny_model(tmp_path / "tiny", tied=False, seed=1)
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT)
    folder = convert(
        str(source), str(tmp_path / "out"), calibration_tokens=256, tuning_text=str(text)
    )
    n_probes = json.loads((folder / "config.json").read_text())["flashhead"]["n_probes"]
    _, tokenizer = load(str(folder))
    n_tokens = len(tokenizer.encode(TINY_TEXT, add_special_tokens=False))
    assert n_tokens > 512
    assert containment(folder, TINY_TEXT, n_probes, n_tokens, seq_len=512) >= TARGET_CONTAINMENT
    if n_probes > 1:
        assert containment(folder, TINY_TEXT, n_probes - 1, n_tokens, seq_len=512) < 0.999
    assert f"| `n_probes` | {n_probes} " in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="is not a file"):
        convert(str(source), str(tmp_path / "other"), tuning_text=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="not both"):
        convert(str(source), str(tmp_path / "other"), n_probes=2, tuning_text=str(text))
