"""The calibration mix and the development-suite tuning: the mix is deterministic for a seed and
holds no suite prompt, a conversion with it writes the same assets twice, and tuning on the
development suite keeps the fewest probes that meet the target on every domain."""

import json
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tiny_model
from flashhead_mlx import calibration_mix, flash_head, load, suite
from flashhead_mlx.clustering import CLUSTER_SIZE, most_probes, scored_fraction
from flashhead_mlx.containment import TARGET_CONTAINMENT, suite_n_probes
from flashhead_mlx.pipeline import convert
from flashhead_mlx.recent import RECENT_TOKENS, reading
from flashhead_mlx.tune import tune

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def with_chat_template(source: Path) -> Path:
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    return source


@pytest.fixture(scope="module")
def chat_source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calib")
    return with_chat_template(make_tiny_model(folder / "tiny", tied=False, seed=4))


def set_reply_tokens(monkeypatch, tokens: int) -> None:
    """The calibration mix's replies to its chat prompts are ``tokens`` long."""
    path, _, prompt_tokens = calibration_mix.GENERATED_SOURCES["chat"]
    monkeypatch.setitem(calibration_mix.GENERATED_SOURCES, "chat", (path, tokens, prompt_tokens))


@pytest.fixture(autouse=True)
def small_conversions(monkeypatch):
    """The tiny model's conversions and tunings on a few short replies and positions per domain:
    what each test checks does not depend on the sizes, which are the product's for real models."""
    monkeypatch.setattr(calibration_mix, "CALIBRATION_REPLIES", 4)
    set_reply_tokens(monkeypatch, 16)
    monkeypatch.setattr(calibration_mix, "TUNING_REPLY_TOKENS", 16)
    monkeypatch.setattr(calibration_mix, "TUNING_DOMAIN_TOKENS", 64)


def normalised(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def test_calibration_prompts_are_no_suite_prompts_and_follow_the_seed():
    prompts = calibration_mix.calibration_prompts(0)
    assert prompts == calibration_mix.calibration_prompts(0)
    assert prompts != calibration_mix.calibration_prompts(1)
    assert sorted(prompts) == sorted(calibration_mix.calibration_prompts(1))
    assert len(set(map(normalised, prompts))) == len(prompts) >= 80
    every = suite.suite_files("all")[suite.CHAT]
    assert not set(map(normalised, prompts)) & set(map(normalised, suite.read_prompts(every)))


def test_mix_budget():
    assert calibration_mix.mix_budget(16384) == {
        "chat": 4096, "code": 4096, "languages": 2048, "prose": 6144
    }
    assert calibration_mix.mix_budget(10, {"a": 1, "b": 1, "c": 1}) == {"a": 3, "b": 3, "c": 4}
    with pytest.raises(ValueError, match="calibration mix"):
        calibration_mix.mix_budget(0)


def test_mix_is_deterministic_for_a_seed(chat_source, capsys):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(chat_source))
    first = calibration_mix.mix_hidden_states(model, tokenizer, 96, seed=0)
    again = calibration_mix.mix_hidden_states(model, tokenizer, 96, seed=0)
    other = calibration_mix.mix_hidden_states(model, tokenizer, 96, seed=1)
    assert first.shape == (96, 64)
    assert mx.array_equal(first, again).item()
    assert not mx.array_equal(first, other).item()  # other prompts come first
    # Replies short of their share: the novel takes the rest.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(calibration_mix, "CALIBRATION_REPLIES", 1)
        set_reply_tokens(patch, 4)
        short = calibration_mix.mix_hidden_states(model, tokenizer, 96, seed=0)
    # One reply of 4 positions, 24 of code, 12 of continuations, the novel's 56.
    assert short.shape == (96, 64)
    assert "56 positions of prose" in capsys.readouterr().out.splitlines()[-1]
    # Without a chat template the other sources share the replies' positions.
    tokenizer._tokenizer.chat_template = None
    assert calibration_mix.mix_hidden_states(model, tokenizer, 96).shape == (96, 64)


def test_conversion_with_the_mix_gives_the_same_assets_twice(chat_source, tmp_path, monkeypatch):
    folders = []
    for run in ("a", "b"):  # each run generates its replies (no shared cache)
        monkeypatch.setattr(suite, "CHAT_CACHE_DIR", tmp_path / f"cache-{run}")
        folders.append(convert(str(chat_source), str(tmp_path / run), calibration_tokens=256))
        assert list((tmp_path / f"cache-{run}").rglob("*.json"))
    configs = [json.loads((f / "config.json").read_text())["flashhead"] for f in folders]
    assert configs[0] == configs[1]
    files = [f / c["assets_file"] for f, c in zip(folders, configs)]
    assert files[0].read_bytes() == files[1].read_bytes()


def domain_containment(folder: Path, states: dict, n_probes: int) -> dict:
    """Each domain's share of positions whose dense argmax the head scores exactly at a greedy
    decode step: its own candidates and the position's recent tokens."""
    model, _ = load(str(folder), n_probes=n_probes)
    head = flash_head(model)
    shares = {}
    for domain, (hidden, contexts) in states.items():
        with reading(contexts[None]):
            scored = np.isfinite(np.array(head.greedy_logits(hidden[None]))[0])
        argmax = np.array(mx.argmax(head.dense_logits(hidden), axis=-1))
        shares[domain] = float(np.mean(scored[np.arange(argmax.size), argmax]))
    return shares


@pytest.mark.parametrize("target", [0.9, TARGET_CONTAINMENT])
def test_tuning_on_the_development_suite_meets_the_target_on_every_domain(
    chat_source, tmp_path, monkeypatch, target
):
    monkeypatch.setattr(suite, "CHAT_CACHE_DIR", tmp_path / "cache")
    converted = convert(str(chat_source), str(tmp_path / "out"), calibration_tokens=256, n_probes=1)
    rows = tune(str(converted), target=target, max_tokens=64, max_scored_fraction=2)
    n_probes = json.loads((converted / "config.json").read_text())["flashhead"]["n_probes"]
    assert rows["after"]["n_probes"] == n_probes > 1
    assert set(rows["domains"]) == set(suite.suite_files("dev"))
    model, tokenizer = load(str(converted))
    states = calibration_mix.dev_suite_states(
        model, tokenizer, suite.model_fingerprint(converted), 64, RECENT_TOKENS
    )
    shares = domain_containment(converted, states, n_probes)
    assert min(shares.values()) >= target, shares
    assert min(domain_containment(converted, states, n_probes - 1).values()) < target


def test_convert_tunes_on_the_development_suite_by_default(chat_source, tmp_path, monkeypatch):
    """A conversion without --n-probes or --tuning-text keeps what tune finds on the development
    suite: tuning the converted folder again changes nothing."""
    monkeypatch.setattr(suite, "CHAT_CACHE_DIR", tmp_path / "cache")
    converted = convert(str(chat_source), str(tmp_path / "out"), calibration_tokens=256)
    before = (converted / "config.json").read_bytes()
    rows = tune(str(converted))
    assert rows["after"]["n_probes"] == rows["before"]["n_probes"]
    assert (converted / "config.json").read_bytes() == before


def test_most_probes_is_the_cap_on_the_scored_fraction():
    for n_clusters, size, vocab in [(3072, 16, 49152), (16384, 16, 262144), (63, 16, 1000)]:
        for fraction in (0.10, 0.12, 0.15, scored_fraction(n_clusters, size, 7, vocab)):
            for extra in (0, 128):
                p = most_probes(fraction, n_clusters, size, vocab, extra)
                assert p == 1 or scored_fraction(n_clusters, size, p, vocab, extra) <= fraction
                assert scored_fraction(n_clusters, size, p + 1, vocab, extra) > fraction
    assert most_probes(0.12, 3072, 16, 49152) == 176 and most_probes(0.15, 3072, 16, 49152) == 268
    assert most_probes(0.12, 3072, 16, 49152, 128) == 168
    assert most_probes(0.01, 63, 16, 1000) == 1 and most_probes(2, 63, 16, 1000) == 63


def test_tuning_keeps_the_cap_where_a_domain_needs_more_and_says_so():
    head = SimpleNamespace(n_clusters=63, cluster_size=16, vocab_size=1000, recent_tokens=0)
    easy, hard = np.zeros(1000, dtype=int), np.arange(1000) % 63  # hard: rank 62 needs 63 probes
    ranks = {"easy": easy, "hard": hard}
    n_probes, line = suite_n_probes(head, ranks, 0.999, None)
    assert n_probes == 63 and "capped" not in line
    n_probes, line = suite_n_probes(head, ranks, 0.999, 0.15)
    assert n_probes == most_probes(0.15, 63, 16, 1000) == 5
    assert "capped at 15% of the vocabulary scored" in line and "(hard 63)" in line
    assert suite_n_probes(head, {"easy": easy}, 0.999, 0.15)[0] == 1  # under the cap: the fewest


def test_tune_on_the_development_suite_keeps_the_cap(chat_source, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "CHAT_CACHE_DIR", tmp_path / "cache")
    converted = convert(str(chat_source), str(tmp_path / "out"), calibration_tokens=256, n_probes=1)
    uncapped = tune(str(converted), target=1.0, max_tokens=64, max_scored_fraction=2)
    n_clusters = -(-1000 // CLUSTER_SIZE)
    cap = most_probes(0.25, n_clusters, CLUSTER_SIZE, 1000, RECENT_TOKENS)  # recent tokens count
    assert uncapped["after"]["n_probes"] > cap  # the tiny random model needs more for 100%
    rows = tune(str(converted), target=1.0, max_tokens=64, max_scored_fraction=0.25)
    assert rows["after"]["n_probes"] == cap > 1
    assert "capped at 25% of the vocabulary scored" in capsys.readouterr().out
