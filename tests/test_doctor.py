"""``flashhead-mlx doctor`` on a tiny converted folder: its JSON keys, the kernels' self-test
through the emulator reported as emulated, and a broken kernel reported with its error."""

import json
import sys

import pytest

from conftest import broken_kernels
from flashhead_mlx import doctor, flash_head, load

KEYS = {"machine", "model", "kernels_forced", "emulated", "head", "kernels", "head_ms", "decode",
        "path"}
MACHINE_KEYS = {"chip", "architecture", "memory_gb", "os", "python", "mlx", "mlx_lm", "blas",
                "device", "metal"}
KERNEL_KEYS = {"stage", "rows", "emulated", "compiled", "error", "mismatch", "kernel_ms", "mlx_ms",
               "path", "reason"}


def test_doctor_json_and_report(tiny_converted, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLASHHEAD_KERNELS", raising=False)
    monkeypatch.setattr(doctor, "RUNS", 1)
    monkeypatch.setattr(doctor, "GEN_TOKENS", 8)
    out = tmp_path / "doctor.json"
    monkeypatch.setattr(sys, "argv", ["flashhead-mlx doctor", "--model", str(tiny_converted),
                                      "--json", str(out)])
    doctor.main()
    result = json.loads(out.read_text())
    assert KEYS <= set(result) and MACHINE_KEYS <= set(result["machine"])
    assert result["emulated"] and not result["machine"]["metal"]  # this machine has no Metal
    assert {(t["stage"], t["rows"]) for t in result["kernels"]} == {
        (stage, b) for stage in ("centroid_topk", "cluster_argmax") for b in (1, 4)}
    for test in result["kernels"]:
        assert KERNEL_KEYS <= set(test)
        assert test["emulated"] and test["compiled"] and test["mismatch"] is None, test
        assert test["kernel_ms"] is None and test["mlx_ms"] is None  # no speed when emulated
    assert set(result["head_ms"]) == {"1", "4"}
    assert all(r["dense"] > 0 and r["mlx"] > 0 and r["kernels"] is None
               for r in result["head_ms"].values())
    assert result["decode"]["dense_tok_s"] > 0 and result["decode"]["flash_tok_s"] > 0
    assert result["path"] == {s: {"1": "mlx (no Metal)", "4": "mlx (no Metal)"}
                              for s in ("centroid_topk", "cluster_argmax")}
    text = capsys.readouterr().out
    assert doctor.EMULATED in text and "FlashHead" in text and "Decode" in text


def test_broken_kernels_are_reported(tiny_converted, monkeypatch):
    """A kernel that does not compile (in the emulator) is reported with the compiler's error."""
    monkeypatch.setattr(doctor, "emulated_kernels", broken_kernels)
    model, _ = load(str(tiny_converted))
    results = doctor.kernel_results(flash_head(model), emulated=True)
    assert len(results) == 4
    assert all(not t["compiled"] and "forced by the test" in t["error"] for t in results)
