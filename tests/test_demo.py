"""The demo command: converts, caches, and generates with both heads."""

import json

import mlx_lm

from flashhead_mlx import demo as demo_module


def test_demo_on_a_tiny_model(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_module, "CACHE_DIR", tmp_path)
    result = demo_module.demo(model=str(tiny_llama), prompt="It is a truth", max_tokens=8)
    printed = capsys.readouterr().out
    model, tokenizer = mlx_lm.load(str(tiny_llama))
    dense_text = mlx_lm.generate(model, tokenizer, "It is a truth", max_tokens=8)
    assert dense_text in printed
    assert result["dense_tps"] > 0 and result["flash_tps"] > 0
    assert "FlashHead / dense decode speed" in printed
    assert f"calibrated on {demo_module.DEMO_CALIBRATION_TOKENS} tokens to save time (flashhead-mlx convert's default: 16384" in printed
    folder = demo_module.converted_folder(str(tiny_llama))
    assets = folder / json.loads((folder / "config.json").read_text())["flashhead"]["assets_file"]
    stamp = assets.stat().st_mtime
    demo_module.demo(model=str(tiny_llama), prompt="It is a truth", max_tokens=2)
    assert assets.stat().st_mtime == stamp, "the cached conversion is reused"
    assert f"Using the cached conversion {folder}" in capsys.readouterr().out
