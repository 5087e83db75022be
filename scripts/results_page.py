"""Regenerate docs/results.md: `flashhead-mlx eval`, `tune` and `bench` for SmolLM2-135M and
Gemma-3-270M on this machine, tables and plots.

    python scripts/results_page.py [--models smollm2 gemma3] [--parts fidelity speed]
                                   [--render-only]

The models are the float32 FlashHead folders of scripts/decode_table.py under --models-dir
(converted from the GGUF files of ../shared/models/fetch_models.sh on first use). Each run saves
its measurements as docs/results/<device>-<model>-{eval,bench,tune}.json, stamped with the machine
and the date, and the page is rendered from every file there: a run on the CPU fills the CPU
section, a run on the GPU machine (MLX's CUDA backend, ../shared/device/README.md) the GPU one.
The speed part took 43 minutes for both models on an idle 2-core CPU (2026-12-02).
"""

import argparse
import json
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx_lm

from decode_table import AUSTEN, ROOT, model_folder
from flashhead_mlx import __version__, bench, evaluate, metrics
from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx.report import device_description
from flashhead_mlx.tune import tune

DOCS = ROOT / "docs"
OUT = DOCS / "results"
NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}
EVAL_TEXT = AUSTEN / "emma.txt"
TARGET = 0.999


def stamp(result: dict) -> dict:
    """``result`` with the machine and the date it was measured on."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {**result, "machine": device_description(), "date": date}


def scratch_copy(folder: Path, into: Path) -> Path:
    """A copy of a FlashHead folder for tune to write into: links to its files, a copy of
    config.json (tune writes a new assets file beside the link to the old one and removes that
    link)."""
    copy = into / folder.name
    copy.mkdir()
    for path in folder.iterdir():
        if path.name == "config.json":
            shutil.copyfile(path, copy / path.name)
        elif path.is_file():
            (copy / path.name).symlink_to(path.resolve())
    return copy


# bench's verified blocks (fixed K and the adaptive 4-32) and batch sizes on the page.
VERIFY_BLOCKS = (4, 8, 16, 32, (4, 32))
BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def measure_fidelity(name: str, folder: Path, device: str, args) -> None:
    """Tune (on a scratch copy) and eval one model; save the JSON files and the eval plot.
    Counts only, so they may run while the machine is busy."""
    prefix = OUT / f"{device}-{name}"
    with tempfile.TemporaryDirectory() as scratch:
        rows = tune(str(scratch_copy(folder, Path(scratch))), target=TARGET)
    tuned = {"target": TARGET, "text": "the development suite", **rows}
    Path(f"{prefix}-tune.json").write_text(json.dumps(stamp(tuned), indent=2) + "\n")

    before, after = rows["before"], rows["after"]["n_probes"]
    probes = sorted({*metrics.default_n_probes(before["n_probes"], before["n_clusters"]), after})
    result = evaluate.run(
        str(folder), str(EVAL_TEXT), 4096, probes, args.tv_positions, f"{prefix}-eval.png"
    )
    Path(f"{prefix}-eval.json").write_text(json.dumps(stamp(result), indent=2) + "\n")


def measure_speed(name: str, folder: Path, device: str, args) -> None:
    """bench one model (verified blocks and batch sizes included); save the JSON and the plot.
    Timings: run on an otherwise idle machine."""
    prefix = OUT / f"{device}-{name}"
    result = bench.bench(str(folder), runs=args.runs, verify_blocks=VERIFY_BLOCKS,
                         batch_sizes=BATCH_SIZES)
    bench.plot(result, f"{prefix}-bench.png", f"{NAMES[name]}: {result['head']}")
    Path(f"{prefix}-bench.json").write_text(json.dumps(stamp(result), indent=2) + "\n")


PARTS = {"fidelity": measure_fidelity, "speed": measure_speed}


def fidelity_lines(prefix: Path, device: str, name: str) -> list:
    """The eval and tune part of a model's section (empty when not measured for this folder:
    ``--parts fidelity`` writes them)."""
    if not Path(f"{prefix}-eval.json").is_file():
        return ["No eval or tune of these conversions yet: `python scripts/results_page.py "
                "--parts fidelity` (their held-out containment is in the README).", ""]
    evaluation = json.loads(Path(f"{prefix}-eval.json").read_text())
    tuned = json.loads(Path(f"{prefix}-tune.json").read_text())
    rows = evaluation["results"]
    return [
        f"**eval** on {Path(evaluation['text']).name} ({evaluation['tokens']} positions; "
        f"{evaluation['machine']}, {evaluation['date']}). Sampling distances: mean over "
        f"{rows[0]['sampling_positions']} positions of the second half ± standard error.",
        "",
        metrics.format_rows(rows),
        "",
        f"![eval plot](results/{device}-{name}-eval.png)",
        "",
        f"**tune** at {tuned['target']} on {tuned['text']} ({tuned['machine']}, "
        f"{tuned['date']}): n_probes {tuned['before']['n_probes']} -> "
        f"{tuned['after']['n_probes']}.",
        "",
        metrics.format_rows([tuned["before"], tuned["after"]], labels=["before", "after"]),
        "",
    ]


def model_section(device: str, name: str) -> list:
    """The page's section of one model measured on ``device``, from its JSON files."""
    prefix = OUT / f"{device}-{name}"
    if not Path(f"{prefix}-bench.json").is_file():
        return []
    result = json.loads(Path(f"{prefix}-bench.json").read_text())
    return [
        f"### {NAMES[name]}",
        "",
        f"{result['head']}; kernels: {result['kernels']}.",
        "",
        *fidelity_lines(prefix, device, name),
        f"**bench** ({result['machine']}, {result['date']}; {result['prompt_tokens']}-token "
        f"prompt, {result['gen_tokens']} tokens generated, medians of {result['runs']} "
        "alternated runs):",
        "",
        bench.format_result(result),
        "",
        f"![bench plot](results/{device}-{name}-bench.png)",
        "",
    ]


def render() -> None:
    """Write docs/results.md from the JSON files in docs/results/."""
    lines = [
        "# Measured results",
        "",
        "Generated by `python scripts/results_page.py` (flashhead-mlx "
        f"{__version__}, MLX {mx.__version__}, mlx-lm {mlx_lm.__version__}) from the float32 "
        "FlashHead folders that `flashhead-mlx convert` makes of the GGUF files of "
        "`../shared/models/fetch_models.sh`, with their default `n_probes` (convert's: tuned "
        "on the development suite within its cap on the vocabulary scored). Each figure states "
        "the machine "
        "and the date it was measured on; the JSON files behind them are in `docs/results/`.",
        "",
        "`eval` measures on Emma (held out: conversion calibrates on its calibration mix, "
        "`tune` on the development suite) the folder's `n_probes`, half and twice it, and the "
        f"one `tune` picks for {TARGET} top-1 containment on every domain of the development "
        "suite.",
        "",
    ]
    missing = {
        "cpu": "Not measured yet: run `python scripts/results_page.py`.",
        "gpu": "No GPU machine was lent to the sessions that generated this page. A session "
        "that has one fills this section by running `python scripts/results_page.py --parts "
        "speed` there, with what that bare machine lacks carried to it: MLX's CUDA build "
        "(../shared/device/README.md), mlx-lm's own dependencies (transformers, tokenizers, "
        "sentencepiece, protobuf, jinja2, pyyaml: that recipe carries mlx-lm without them) and "
        "the two GGUF files (351 MB, over the 64 MiB one call carries: in parts over "
        "consecutive calls while the machine is warm, as the recipe does with the CUDA wheel).",
    }
    for device, title in (("cpu", "CPU"), ("gpu", "GPU (MLX's CUDA backend)")):
        sections = [line for name in NAMES for line in model_section(device, name)]
        lines += [f"## {title}", "", *(sections or [missing[device], ""])]
    (DOCS / "results.md").write_text("\n".join(lines))
    print(f"Wrote {DOCS / 'results.md'}")


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--models-dir", default=str(ROOT / "results" / "models"))
    parser.add_argument("--tv-positions", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS),
                        help="What to measure: tune and eval (counts), bench (timings).")
    parser.add_argument("--render-only", action="store_true", help="Only render the saved JSON.")
    args = parser.parse_args()
    if not args.render_only:
        OUT.mkdir(parents=True, exist_ok=True)
        device = "gpu" if mx.default_device().type == mx.gpu else "cpu"
        for name in args.models:
            folder = model_folder(name, Path(args.models_dir))
            for part in args.parts:
                PARTS[part](name, folder, device, args)
    render()


if __name__ == "__main__":
    main()
