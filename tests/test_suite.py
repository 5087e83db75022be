"""The frozen evaluation suite: its files and split are what the manifest says and the held-out
part leaks nowhere; Wilson intervals against published values and a brute-force search; pooled
rows against one measurement of the pooled positions; ``eval`` with several texts, ``--suite``
and ``--chat`` on a tiny model, the chat replies against mlx-lm's own dense generation."""

import hashlib
import json
import math
import re
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_clusters, make_tiny_model, run_cli
from flashhead_mlx import evaluate, flash_head, suite
from flashhead_mlx.assets import make_assets
from flashhead_mlx.calibration import CALIBRATION_TEXT, TUNING_TEXT
from flashhead_mlx.calibration_mix import (
    CALIBRATION_CODE,
    CALIBRATION_OPENINGS,
    CALIBRATION_PROMPTS,
)
from flashhead_mlx.head import FlashHead
from flashhead_mlx.metrics import (
    evaluate as evaluate_head,
    pool_rows,
    wilson_interval,
)
from flashhead_mlx.pipeline import convert

MANIFEST = suite.manifest()
FILES = MANIFEST["files"]


def entries(split: str, domain: str = None) -> dict:
    return {
        name: e
        for name, e in FILES.items()
        if e["split"] == split and domain in (None, e["domain"])
    }


def test_manifest_lists_every_file_with_its_digest_and_licence():
    on_disk = {str(p.relative_to(suite.SUITE_DIR)) for p in suite.SUITE_DIR.rglob("*.txt")}
    assert on_disk == set(FILES)
    for name, entry in FILES.items():
        data = (suite.SUITE_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert entry["split"] in suite.SPLITS and entry["source"], name
        for licence in re.split(r"/", entry["licence"]):
            assert licence in MANIFEST["licences"], (name, licence)
    licences = (suite.SUITE_DIR / "LICENSES.md").read_text()
    for licence in MANIFEST["licences"]:
        assert licence in licences


def test_every_domain_has_both_splits_and_its_size():
    domains = {e["domain"] for e in FILES.values()}
    assert {"chat", "code", "non-english", "verse-dialogue", "technical", "math"} <= domains
    for domain in domains:
        per_split = {
            split: sum(e.get("tokens_smollm2", e.get("prompts", 0)) for e in files.values())
            for split, files in ((s, entries(s, domain)) for s in suite.SPLITS)
        }
        assert min(per_split.values()) > 0, domain
        if domain == suite.CHAT:
            assert sum(per_split.values()) >= 200
        else:
            assert sum(per_split.values()) >= 20_000, (domain, per_split)
    assert len(entries("dev", "code")) >= 4  # several languages


def held_out_paragraphs():
    for name in entries("held-out"):
        text = (suite.SUITE_DIR / name).read_text()
        for paragraph in re.split(r"\n\s*\n", text):
            if len(paragraph.strip()) >= 200:
                yield name, paragraph.strip()


def test_held_out_text_is_not_in_dev_calibration_or_tuning_text():
    """Nor in any source of the calibration mix (novel, code, prompts, openings)."""
    dev = "\n".join((suite.SUITE_DIR / n).read_text() for n in entries("dev"))
    others = {
        "dev": dev,
        "calibration": CALIBRATION_TEXT.read_text(),
        "calibration code": CALIBRATION_CODE.read_text(),
        "calibration prompts": CALIBRATION_PROMPTS.read_text(),
        "calibration openings": CALIBRATION_OPENINGS.read_text(),
        "tuning": TUNING_TEXT.read_text(),
    }
    checked = 0
    for name, paragraph in held_out_paragraphs():
        for where, text in others.items():
            assert paragraph not in text, f"{name} has a paragraph of the {where} text"
        checked += 1
    assert checked > 400


def test_held_out_prompts_and_sources_are_not_in_dev():
    def prompts(split):
        lines = suite.read_prompts([suite.SUITE_DIR / n for n in entries(split, "chat")])
        return {" ".join(p.lower().split()) for p in lines}

    dev, held_out = prompts("dev"), prompts("held-out")
    assert len(held_out) >= 100 and not dev & held_out
    calibration = {" ".join(p.lower().split()) for p in suite.read_prompts([CALIBRATION_PROMPTS])}
    assert len(calibration) >= 80 and not calibration & held_out
    every_text = "\n".join((suite.SUITE_DIR / n).read_text() for n in FILES)
    openings = suite.read_prompts([CALIBRATION_OPENINGS])
    assert len(openings) >= 40 and not [o for o in openings if o in every_text]
    for domain in {e["domain"] for e in FILES.values()}:
        dev_origins = {o for e in entries("dev", domain).values() for o in e["origins"]}
        held_origins = {o for e in entries("held-out", domain).values() for o in e["origins"]}
        assert not dev_origins & held_origins, domain


def test_suite_files_by_split():
    held_out, dev, every = (suite.suite_files(s) for s in ("held-out", "dev", "all"))
    assert list(held_out)[-1] == "chat" and set(held_out) == set(dev) == set(every)
    for domain in every:
        assert sorted(every[domain]) == sorted(dev[domain] + held_out[domain])
    with pytest.raises(ValueError, match="unknown split 'test'"):
        suite.suite_files("test")


@pytest.mark.parametrize(
    "successes, n, low, high",
    [  # Newcombe (1998), Statistics in Medicine 17:857, table II, method 3 (score interval)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_published_values(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def score_test_accepts(successes: int, n: int, p: float, z: float = 1.959963984540054) -> bool:
    return abs(successes / n - p) <= z * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize(
    "successes, n", [(0, 7), (3, 7), (7, 7), (999, 1000), (9990, 10000), (40, 97)]
)
def test_wilson_interval_is_the_score_tests_acceptance_region(successes, n):
    """Brute force: the proportions the score test accepts, on a grid of 200001 values."""
    grid = np.linspace(0, 1, 200_001)
    accepted = grid[[score_test_accepts(successes, n, p) for p in grid]]
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(accepted.min(), abs=1e-5)
    assert high == pytest.approx(accepted.max(), abs=1e-5)
    assert low <= successes / n <= high


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_pooled_rows_equal_one_measurement_of_all_positions():
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.3, (1000, 32)).astype(np.float32)
    clusters = make_clusters(weight)
    n_clusters = clusters["centroids"].shape[0]
    assets = make_assets(clusters, 8, None, mass_bias=mx.zeros((2, n_clusters)))
    head = FlashHead(assets, mx.array(weight))
    picks = weight[rng.integers(0, 1000, 150)]
    hidden = mx.array((2.5 * picks + rng.normal(0, 0.4, picks.shape)).astype(np.float32))
    probes = [2, 8, 20]
    parts = [
        evaluate_head(head, hidden[a:b], probes, tv_positions=0)[0] for a, b in ((0, 40), (40, 150))
    ]
    whole, _ = evaluate_head(head, hidden, probes, tv_positions=0)
    for pooled, row in zip(pool_rows(parts), whole):
        for key in ("positions", "top1_contained", "top5_contained", "top1_containment"):
            assert pooled[key] == row[key], key
        assert pooled["top5_interval"] == row["top5_interval"]
        for key in ("greedy_agreement", "candidate_mass"):
            assert pooled[key] == pytest.approx(row[key], abs=1e-6), key
    assert 0 < whole[0]["top1_containment"] < 1
    low, high = whole[0]["top1_interval"]
    assert low < whole[0]["top1_containment"] < high


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random llama with a chat template (its dense source) and its conversion."""
    folder = tmp_path_factory.mktemp("chat")
    source = make_tiny_model(folder / "tiny", tied=False, seed=3)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    return source, convert(str(source), str(folder / "tiny-flashhead"), calibration_tokens=256)


PROMPTS = ["What is the capital of France?", "Write a haiku.", "a truth universally acknowledged"]


def test_chat_replies_are_mlx_lms_dense_greedy_generation(chat_model, tmp_path, monkeypatch):
    import mlx_lm
    from flashhead_mlx.metrics import load_head
    from flashhead_mlx.model_head import head_module, head_rows

    source, converted = chat_model
    lm, tokenizer, _ = load_head(str(converted))
    fingerprint = suite.model_fingerprint(converted)
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    config = json.loads((copy / "config.json").read_text())
    config["flashhead"]["n_probes"] = 7  # FlashHead's entries do not change the replies
    (copy / "config.json").write_text(json.dumps(config))
    assert suite.model_fingerprint(copy) == fingerprint
    (copy / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("<assistant>", "<bot>"))
    assert suite.model_fingerprint(copy) != fingerprint
    replies, stopped = suite.dense_replies(lm, tokenizer, PROMPTS, fingerprint, 20, tmp_path)
    dense, dense_tokenizer = mlx_lm.load(str(source))
    for prompt, reply, stop in zip(PROMPTS, replies, stopped):
        tokens = suite.chat_prompt_tokens(dense_tokenizer, prompt)
        expected = [
            r.token for r in mlx_lm.stream_generate(dense, dense_tokenizer, tokens, max_tokens=20)
        ]
        if expected[-1] in dense_tokenizer.eos_token_ids:
            expected = expected[:-1]
        assert reply == expected and stop == (len(reply) < 20)
    # The FlashHead is back on, and a second call reads the cache.
    stored = json.loads((converted / "config.json").read_text())["flashhead"]["n_probes"]
    assert flash_head(lm).n_probes == stored
    monkeypatch.setattr("mlx_lm.batch_generate", lambda *a, **k: pytest.fail("not cached"))
    again = suite.dense_replies(lm, tokenizer, PROMPTS, fingerprint, 20, tmp_path)
    assert again == (replies, stopped)
    # Each position's dense argmax is the token the model decoded there.
    hidden = suite.chat_hidden_states(lm, tokenizer, PROMPTS, replies, stopped)
    weight = np.array(head_rows(head_module(dense)))
    counts = [len(reply) + stop for reply, stop in zip(replies, stopped)]  # + the stop token
    assert hidden.shape[0] == sum(counts)
    argmax = np.argmax(np.array(hidden) @ weight.T, axis=1)
    mask = np.ones(hidden.shape[0], bool)
    for end, stop in zip(np.cumsum(counts), stopped):
        mask[end - 1] = not stop  # that position predicts the stop token
    assert argmax[mask].tolist() == [t for reply in replies for t in reply]
    # Each position's recent tokens: the last 8 of the prompt and the reply up to it.
    expected = []
    for prompt, reply, stop in zip(PROMPTS, replies, stopped):
        tokens = suite.chat_prompt_tokens(tokenizer, prompt) + reply
        for end in range(len(tokens) - len(reply), len(tokens) + stop):
            expected.append([-1] * max(0, 8 - end) + tokens[max(0, end - 8) : end])
    contexts = suite.chat_contexts(tokenizer, PROMPTS, replies, stopped, 8)
    assert np.array(contexts).tolist() == expected


def test_plain_continuations_are_mlx_lms_dense_greedy_generation(chat_model, tmp_path):
    """The calibration's ``languages`` source: continuations of plain text, cached apart from
    the chat replies to the same prompts."""
    import mlx_lm
    from flashhead_mlx.metrics import load_head
    from flashhead_mlx.model_head import head_module, head_rows

    source, converted = chat_model
    lm, tokenizer, _ = load_head(str(converted))
    fingerprint = suite.model_fingerprint(converted)
    plain = suite.plain_prompt_tokens
    suite.dense_replies(lm, tokenizer, PROMPTS, fingerprint, 12, tmp_path)
    replies, stopped = suite.dense_replies(
        lm, tokenizer, PROMPTS, fingerprint, 12, tmp_path, prompt_tokens=plain
    )
    assert len(list((tmp_path / fingerprint).glob("*.json"))) == 2
    dense, dense_tokenizer = mlx_lm.load(str(source))
    for prompt, reply, stop in zip(PROMPTS, replies, stopped):
        tokens = dense_tokenizer.encode(prompt)
        expected = [
            r.token for r in mlx_lm.stream_generate(dense, dense_tokenizer, tokens, max_tokens=12)
        ]
        if expected[-1] in dense_tokenizer.eos_token_ids:
            expected = expected[:-1]
        assert reply == expected and stop == (len(reply) < 12)
    hidden = suite.chat_hidden_states(lm, tokenizer, PROMPTS, replies, stopped, prompt_tokens=plain)
    weight = np.array(head_rows(head_module(dense)))
    argmax = np.argmax(np.array(hidden) @ weight.T, axis=1)
    starts = np.cumsum([0] + [len(r) + s for r, s in zip(replies, stopped)])[:-1]
    for start, reply in zip(starts, replies):
        assert argmax[start : start + len(reply)].tolist() == reply


def run_eval(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["flashhead-mlx eval", *args])
    evaluate.main()
    return capsys.readouterr().out


def test_eval_suite_prints_one_row_per_domain_and_overall(
    chat_model, tmp_path, monkeypatch, capsys
):
    _, converted = chat_model
    monkeypatch.setattr(suite, "CHAT_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(suite, "REPLY_TOKENS", 12)
    out = tmp_path / "suite.json"
    stdout = run_eval(
        monkeypatch, capsys, "--model", str(converted), "--suite", "--max-tokens", "48",
        "--n-probes", "3", "--json", str(out),
    )
    domains = list(suite.suite_files("held-out"))
    lines = stdout.splitlines()
    table = [line for line in lines if line.startswith("| ") and "n_probes" not in line]
    assert [line.split("|")[1].split(" (")[0].strip() for line in table] == [*domains, "overall"]
    report = json.loads(out.read_text())
    assert [d["name"] for d in report["domains"]] == domains
    assert all(d["tokens"] == 48 for d in report["domains"])
    assert report["tokens"] == 48 * len(domains) == report["results"][0]["positions"]
    assert "sampling_tv_t1" not in report["results"][0]  # off by default for several texts
    assert list((tmp_path / "cache").rglob("*.json"))  # the chat replies were cached


def test_eval_with_several_texts_equals_single_text_runs(chat_model, tmp_path):
    _, converted = chat_model
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("verse.txt", "code.txt"):
        domain = "verse-dialogue" if name == "verse.txt" else "code"
        (texts / name).write_text(suite.read_text(suite.suite_files("dev")[domain])[:3000])
    several = tmp_path / "several.json"
    args = ["eval", "--model", str(converted), "--max-tokens", "96", "--n-probes", "2,5"]
    result = run_cli(*args, "--text", str(texts), "--json", str(several))
    assert result.returncode == 0, result.stderr
    report = json.loads(several.read_text())
    assert [Path(d["name"]).name for d in report["domains"]] == ["code.txt", "verse.txt"]
    for domain in report["domains"]:
        single = tmp_path / "single.json"
        no_tv = ("--tv-positions", "0")  # the default of several texts
        result = run_cli(*args, *no_tv, "--text", domain["name"], "--json", str(single))
        assert result.returncode == 0, result.stderr
        alone = json.loads(single.read_text())
        assert alone["domains"][0]["results"] == domain["results"] == alone["results"]
    overall = report["results"]
    assert overall[0]["positions"] == 192
    counts = [d["results"][0]["top1_contained"] for d in report["domains"]]
    assert overall[0]["top1_contained"] == sum(counts)


def test_eval_errors(chat_model, tmp_path, monkeypatch, capsys):
    _, converted = chat_model

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["flashhead-mlx eval", "--model", str(converted), *args])
        with pytest.raises(SystemExit) as error:
            evaluate.main()
        return str(error.value.code) + capsys.readouterr().err

    assert "--suite and --text cannot be combined" in run("--suite", "--text", str(TUNING_TEXT))
    assert "invalid choice: 'test'" in run("--suite", "test")
    assert f"{tmp_path} has no files" in run("--text", str(tmp_path))
    assert "is not a file" in run("--chat", str(tmp_path / "absent.txt"))
