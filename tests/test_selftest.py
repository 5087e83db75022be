"""The kernels' first-use self-test (flashhead_mlx.kernels.selftest), through the CPU emulator
with an injected clock: broken, wrong, slower and faster kernels, the cache, the forced paths;
each head's output checked against the pure-MLX path's."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import broken_kernels, make_clusters
from flashhead_mlx.assets import make_assets
from flashhead_mlx.bench import kernels_label, kernels_ran
from flashhead_mlx.doctor import decode_step_of
from flashhead_mlx.head import FlashHead
from flashhead_mlx.kernels import kernel_path, selftest
from flashhead_mlx.testing.metal_emulator import emulate

VOCAB, DIMS, N_PROBES = 200, 64, 4
STAGES = ("centroid_topk", "cluster_argmax")


def stage_calls(launches: list) -> list:
    """The stages whose kernels ran, once per call (each call's first dispatch scores)."""
    return sorted(name.removesuffix("_score") for name in launches if name.endswith("_score"))


class FakeClock:
    """Seconds that advance by ``kernel_s`` from one reading to the next when a kernel launched
    in between (``launches``, the emulator's list), else by ``mlx_s``."""

    def __init__(self, launches: list, kernel_s: float, mlx_s: float):
        self.launches, self.kernel_s, self.mlx_s = launches, kernel_s, mlx_s
        self.seen, self.now = 0, 0.0

    def __call__(self) -> float:
        self.now += self.kernel_s if len(self.launches) > self.seen else self.mlx_s
        self.seen = len(self.launches)
        return self.now


@pytest.fixture(scope="module")
def head():
    weight = mx.random.normal((VOCAB, DIMS), key=mx.random.key(1))
    return FlashHead(make_assets(make_clusters(weight), N_PROBES), weight)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache file and no decision in this process; the path not forced."""
    monkeypatch.setenv("FLASHHEAD_SELFTEST_CACHE", str(tmp_path / "selftest.json"))
    monkeypatch.delenv("FLASHHEAD_KERNELS", raising=False)
    monkeypatch.setattr(selftest, "_decisions", {})
    monkeypatch.setattr(selftest, "RUNS", 2)  # the clock is fake: few runs decide
    monkeypatch.setattr(selftest, "CALLS", 1)
    return tmp_path / "selftest.json"


def mlx_path(head, h):
    """The head's greedy tokens and candidates' logits on the pure-MLX path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHHEAD_KERNELS", "mlx")
        return run_head(head, h)


def run_head(head, h):
    tokens, logits = head.candidates(h)
    return np.array(head.greedy(h)), np.array(tokens), np.array(logits)


def assert_same_as_mlx(head, h, got):
    """The head's outputs ``got`` are the MLX path's: the same candidates, logits within float32
    rounding, the same greedy token."""
    greedy, tokens, logits = mlx_path(head, h)
    np.testing.assert_array_equal(got[1], tokens)
    np.testing.assert_allclose(got[2], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[0], greedy)


def decisions(cache) -> dict:
    """The cached decisions: stage and rows -> path."""
    data = json.loads(cache.read_text())
    assert data["format"] == selftest.CACHE_FORMAT
    return {(d["key"]["stage"], d["key"]["rows"]): d for d in data["decisions"].values()}


def h_rows(rows: int) -> mx.array:
    return mx.random.normal((rows, DIMS), key=mx.random.key(rows + 7))


@pytest.mark.parametrize("faster", [True, False], ids=["faster", "slower"])
def test_kernels_run_only_when_faster(head, fresh, monkeypatch, capfd, faster):
    h = h_rows(3)
    with emulate() as launches:
        kernel_s, mlx_s = (1.0, 2.0) if faster else (2.0, 1.0)
        monkeypatch.setattr(selftest, "clock", FakeClock(launches, kernel_s, mlx_s))
        first = run_head(head, h)
        del launches[:]
        again = run_head(head, h)
    saved = decisions(fresh)
    assert set(saved) == {(stage, 4) for stage in STAGES}  # 3 rows: the self-test's 4
    for stage in STAGES:
        entry = saved[stage, 4]
        assert entry["path"] == ("metal" if faster else "mlx"), entry["reason"]
        assert entry["compiled"] and entry["mismatch"] is None
        assert (entry["kernel_ms"] < entry["mlx_ms"]) == faster
        assert {"chip", "os", "mlx", "kernels"} <= set(entry["key"])
    # The decision holds: the kernels launch at every call, or never (the MLX path's own).
    expected = ["centroid_topk", "cluster_argmax"] * 2 if faster else []
    assert stage_calls(launches) == sorted(expected)
    lines = capfd.readouterr().err.splitlines()
    assert len([line for line in lines if "not faster" in line]) == (0 if faster else 2)
    assert_same_as_mlx(head, h, first)
    assert_same_as_mlx(head, h, again)


def test_compile_failure_falls_back(head, fresh, monkeypatch, capfd):
    h = h_rows(1)
    with broken_kernels() as launches:
        monkeypatch.setattr(selftest, "clock", FakeClock(launches, 1.0, 2.0))
        got = run_head(head, h)
    for stage in STAGES:
        entry = decisions(fresh)[stage, 1]
        assert entry["path"] == "mlx" and not entry["compiled"]
        assert "does not compile" in entry["error"] and "forced by the test" in entry["error"]
    lines = [line for line in capfd.readouterr().err.splitlines() if "FlashHead" in line]
    assert len(lines) == 2 and all("the kernels failed" in line for line in lines)
    assert_same_as_mlx(head, h, got)


def flipped(out: mx.array) -> mx.array:
    """``out`` with a high mantissa bit of every element flipped (any 2- or 4-byte dtype)."""
    bits, mask = {4: (mx.uint32, 0x00400000), 2: (mx.uint16, 0x0040)}[out.dtype.size]
    return (out.view(bits) ^ mask).view(out.dtype)


@pytest.mark.parametrize("wrong", STAGES)
def test_mismatch_falls_back(head, fresh, monkeypatch, capfd, wrong):
    """A stage whose kernels' outputs are corrupted (a high mantissa bit of every element
    flipped) is refused; the other stage keeps its kernels."""
    h = h_rows(2)

    def corrupting(**kw):
        kernel = factory(**kw)
        if not kw["name"].startswith(wrong):
            return kernel
        return lambda **call: [flipped(out) for out in kernel(**call)]

    with emulate() as launches, pytest.MonkeyPatch.context() as mp:
        factory = mx.fast.metal_kernel
        mp.setattr(mx.fast, "metal_kernel", corrupting)
        monkeypatch.setattr(selftest, "clock", FakeClock(launches, 1.0, 2.0))
        got = run_head(head, h)
    saved = decisions(fresh)
    for stage in STAGES:
        entry = saved[stage, 2]
        if stage == wrong:
            assert entry["path"] == "mlx" and entry["compiled"] and entry["mismatch"]
        else:
            assert entry["path"] == "metal", entry["reason"]
    lines = [line for line in capfd.readouterr().err.splitlines() if "FlashHead" in line]
    assert len(lines) == 1 and wrong in lines[0] and "disagree" in lines[0]
    assert_same_as_mlx(head, h, got)


def test_cache_hit_and_source_hash(head, fresh, monkeypatch):
    """A new process finds the decisions in the cache and tests nothing; kernels whose sources
    changed are tested again."""
    h = h_rows(1)
    tested = []
    real, source = selftest.self_test, selftest.kernel_source_hash()
    monkeypatch.setattr(selftest, "self_test", lambda *a, **k: tested.append(1) or real(*a, **k))
    with emulate() as launches:
        monkeypatch.setattr(selftest, "clock", FakeClock(launches, 1.0, 2.0))
        run_head(head, h)
        assert len(tested) == 2
        monkeypatch.setattr(selftest, "_decisions", {})  # a new process
        monkeypatch.setattr(selftest, "clock", FakeClock(launches, 2.0, 1.0))  # would be slower
        del launches[:]
        run_head(head, h)
        assert len(tested) == 2 and stage_calls(launches) == sorted(STAGES * 2)  # still the kernels
        monkeypatch.setattr(selftest, "_decisions", {})
        monkeypatch.setattr(selftest, "kernel_source_hash", lambda: "0123456789abcdef")
        run_head(head, h)
    assert len(tested) == 4
    saved = json.loads(fresh.read_text())["decisions"].values()
    assert sorted(d["key"]["kernels"] for d in saved) == sorted([source, "0123456789abcdef"] * 2)
    assert {d["path"] for d in saved if d["key"]["kernels"] != source} == {"mlx"}  # slower now


def test_source_hash_follows_the_sources(tmp_path):
    files = [tmp_path / "a.metal", tmp_path / "b.py"]
    for f in files:
        f.write_text(f.name)
    before = selftest.source_hash(files)
    assert selftest.source_hash(files[::-1]) == before
    files[0].write_text("a.metal, changed")
    assert selftest.source_hash(files) != before


@pytest.mark.parametrize("by", ["env", "block"])
@pytest.mark.parametrize("forced", ["metal", "mlx"])
def test_forced_path_skips_the_self_test(head, fresh, monkeypatch, forced, by):
    """FLASHHEAD_KERNELS, or a kernel_path block (doctor's timing of each path), forces a path."""
    if by == "env":
        monkeypatch.setenv("FLASHHEAD_KERNELS", forced)
    monkeypatch.setattr(selftest, "self_test", lambda *a, **k: pytest.fail("self-tested"))
    h = h_rows(1)
    with emulate() as launches, kernel_path(forced if by == "block" else None):
        got = run_head(head, h)
    assert stage_calls(launches) == (sorted(STAGES * 2) if forced == "metal" else [])
    assert not fresh.exists()
    assert_same_as_mlx(head, h, got)


def test_many_rows_take_the_mlx_path_untested(head, fresh, monkeypatch):
    monkeypatch.setattr(selftest, "self_test", lambda *a, **k: pytest.fail("self-tested"))
    h = h_rows(selftest.MAX_ROWS + 1)
    with emulate() as launches:
        got = run_head(head, h)
    assert launches == []
    assert_same_as_mlx(head, h, got)


def test_checks_are_tie_aware():
    """Ids may differ from the MLX path's only at near-ties; NaN never agrees."""
    exact = np.array([[0.0, 1.0, 2.0, 2.0 + 1e-7, 3.0]], np.float32)
    ids = np.array([[2, 4]])
    assert selftest.selection_mismatch(ids, exact[:, [2, 4]], exact, 2) is None  # tie 2 vs 3
    assert selftest.selection_mismatch(np.array([[1, 4]]), exact[:, [1, 4]], exact, 2)
    assert selftest.selection_mismatch(ids, np.array([[2.0, np.nan]]), exact, 2)
    tokens = np.array([[10, 11, 12, -1]])
    logits = np.array([[1.0, 3.0, 3.0 + 1e-7, -np.inf]], np.float32)
    argmax = selftest.argmax_mismatch
    assert argmax(np.array([11]), logits, np.array([12]), logits, tokens) is None
    assert argmax(np.array([10]), logits, np.array([12]), logits, tokens)
    assert argmax(np.array([12]), logits + [[0, 0, 0.1, 0]], np.array([12]), logits, tokens)
    moved = np.array([[1.0, 3.0, -np.inf, 3.0]], np.float32)
    assert "padding" in argmax(np.array([12]), moved, np.array([12]), logits, tokens)


def test_a_bad_cache_file_is_replaced(fresh):
    fresh.write_text("{not json")
    assert selftest.read_cache() == {}
    selftest.save_decision("a key", {"path": "mlx"})
    assert json.loads(fresh.read_text()) == {"format": selftest.CACHE_FORMAT,
                                            "decisions": {"a key": {"path": "mlx"}}}
    fresh.write_text(json.dumps({"format": selftest.CACHE_FORMAT + 1, "decisions": {"k": {}}}))
    assert selftest.read_cache() == {}


@pytest.mark.parametrize("faster", [True, False], ids=["faster", "slower"])
def test_bench_reports_what_ran(head, fresh, monkeypatch, faster):
    """bench's label of a decode step (kernels_ran) is the self-test's decision for the shape:
    a shape whose kernels it rejected is reported as the MLX path, though Metal is available."""
    with emulate() as launches:
        monkeypatch.setattr(selftest, "clock", FakeClock(launches, *((1.0, 2.0) if faster
                                                                     else (2.0, 1.0))))
        ran = kernels_ran(decode_step_of(head), h_rows(1)[:, None])
        del launches[:]
        ran_again = kernels_ran(decode_step_of(head), h_rows(1)[:, None])
    path = "metal" if faster else "mlx"
    assert ran == ran_again == {"centroid_topk": path, "cluster_argmax": path, "batch_path": "rows"}
    assert kernels_label(ran) == f"centroid_topk {path}, cluster_argmax {path}"
    assert stage_calls(launches) == (sorted(STAGES * 2) if faster else [])  # what really ran
    for stage in STAGES:
        assert decisions(fresh)[stage, 1]["path"] == path
