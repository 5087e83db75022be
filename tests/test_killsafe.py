"""Commands killed (SIGKILL) at the named stages of their writers (``flashhead_mlx.durable.
KILL_POINTS``, through ``FLASHHEAD_TEST_KILL_AT``): ``convert`` leaves nothing that looks finished
or loads, ``tune`` and ``import-assets`` leave the folder they rewrite in place as before or as
after; the next run reclaims the leftovers and succeeds.

The default run kills each command at the stages that leave different states;
``FLASHHEAD_KILL_POINTS=all`` kills ``tune`` and ``import-assets`` at every writing stage.
"""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import TINY_TEXT, make_tiny_model, run_cli
from flashhead_mlx import flash_head, load
from flashhead_mlx.assets import is_assets_file
from flashhead_mlx.model_card import CARD_FILE
from flashhead_mlx.durable import KILL_ENV, KILL_POINTS, STAGE_SUFFIX, reclaim_stages
from flashhead_mlx.pipeline import convert
from test_import_assets import export_vllm

ALL = os.environ.get("FLASHHEAD_KILL_POINTS") == "all"
CONVERT_KILLS = ("calibration", "clustering", "assets-named", "folder-staged") if ALL else (
    "clustering",
    "folder-staged",
)
# Stages of a rewrite in place, and whether the folder is as after once killed there.
REWRITE_KILLS = {"assets-staged": False, "assets-named": False, "config-replaced": True}


def run(*args: str, kill: str = None):
    """``flashhead-mlx *args``, killed at the stage ``kill``: checked to die there, or to
    succeed."""
    env = {KILL_ENV: kill} if kill else {}
    os.environ.pop(KILL_ENV, None)
    result = run_cli(*args, env=env)
    if kill:
        assert result.returncode == -signal.SIGKILL, f"not killed at {kill}:\n{result.stderr}"
    else:
        assert result.returncode == 0, result.stderr
    return result


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def visible(folder: Path) -> dict:
    """The folder as a reader sees it: its files but the hidden ones and the assets files
    ``config.json`` does not name, with their bytes."""
    named = (config_of(folder).get("flashhead") or {}).get("assets_file")
    return {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if not p.name.startswith(".") and (not is_assets_file(p.name) or p.name == named)
    }


def stages(parent: Path, name: str) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_kill_points_are_documented():
    text = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
    assert KILL_ENV in text
    for stage in KILL_POINTS:
        assert f"`{stage}`" in text, stage


def test_convert_killed_at_each_stage(tmp_path):
    """Killed at the stages of :data:`CONVERT_KILLS` (calibrating, clustering, writing the assets,
    the folder finished but not renamed): no output (loading it says so), one stage folder (the
    last run's: the earlier ones were reclaimed); the next run succeeds and leaves no stage.
    Killed between the two renames of --force, the next run first gives the old output back."""
    source = make_tiny_model(tmp_path / "tiny", tied=False)
    out = tmp_path / "out"
    args = ("convert", "--model", str(source), "--output", str(out), "--calibration-tokens",
            "256", "--n-probes", "4")
    for stage in CONVERT_KILLS:
        run(*args, kill=stage)
        assert not out.exists(), stage
        with pytest.raises(ValueError, match="does not exist"):
            load(str(out))
        assert len(stages(tmp_path, "out")) == 1, stage
        assert all(name.endswith(STAGE_SUFFIX) for name in stages(tmp_path, "out"))
    run(*args)
    assert stages(tmp_path, "out") == []
    before = visible(out)
    assert flash_head(load(str(out))[0]).n_probes == 4

    run(*args, "--force", "--n-probes", "5", kill="output-moved")
    assert not out.exists() and len(stages(tmp_path, "out")) == 1
    reclaim_stages(out)  # what the next run does first: the old output is back
    assert visible(out) == before and stages(tmp_path, "out") == []
    if ALL:
        run(*args, "--force", "--n-probes", "5")
        assert flash_head(load(str(out))[0]).n_probes == 5 and stages(tmp_path, "out") == []


def check_rewrite_kills(original: Path, tmp_path: Path, args, kills) -> None:
    """Kill ``flashhead-mlx *args(folder)``'s rewrite of a copy of ``original`` at each stage of
    ``kills``: the folder is as before or as after (:data:`REWRITE_KILLS`; its visible files and
    what loads), and the next run reclaims the leftovers and ends as after."""
    before = visible(original)
    for stage in kills:
        folder = Path(shutil.copytree(original, tmp_path / stage / original.name))
        run(*args(folder), kill=stage)
        killed, n_probes = visible(folder), flash_head(load(str(folder))[0]).n_probes
        staged_cards = [p.read_bytes() for p in folder.glob(f".{CARD_FILE}.*.next")]
        run(*args(folder))  # the next run, from the killed state
        after = visible(folder)
        assert after != before and set(os.listdir(folder)) == set(after), stage  # no leftovers
        expected = after if REWRITE_KILLS[stage] else before
        if REWRITE_KILLS[stage] and staged_cards:
            # The card follows the switch: the old one until the next writer puts it in place.
            assert killed[CARD_FILE] == before[CARD_FILE] and staged_cards == [after[CARD_FILE]]
            expected = {**after, CARD_FILE: before[CARD_FILE]}
        assert killed == expected, stage
        assert n_probes == json.loads(expected["config.json"])["flashhead"]["n_probes"], stage


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("killsafe")
    source = make_tiny_model(folder / "tiny", tied=False, vocab_size=1024)
    return convert(str(source), str(folder / "converted"), calibration_tokens=256, n_probes=8)


def test_tune_killed_while_writing(converted, tmp_path):
    """Killed after naming its new assets file: as before (an unnamed assets file left over)."""
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT)

    def args(folder):
        return ("tune", "--model", str(folder), "--text", str(text), "--max-tokens", "64",
                "--target-containment", "1.0")

    if ALL:
        folder = Path(shutil.copytree(converted, tmp_path / "tuning"))
        run(*args(folder), kill="tuning")  # nothing written yet
        assert visible(folder) == visible(converted)
    check_rewrite_kills(converted, tmp_path, args, REWRITE_KILLS if ALL else ["assets-named"])


def test_import_assets_killed_while_rewriting(converted, tmp_path):
    """Killed after the switch to its config.json: as after (the staged card put in place)."""
    published = export_vllm(converted, tmp_path / "published")

    def args(folder):
        return ("import-assets", "--model", str(folder), "--assets", str(published),
                "--calibration-tokens", "256", "--n-probes", "9", "--force")

    if ALL:
        folder = Path(shutil.copytree(converted, tmp_path / "calibration"))
        run(*args(folder), kill="calibration")  # nothing written yet
        assert visible(folder) == visible(converted)
    check_rewrite_kills(converted, tmp_path, args, REWRITE_KILLS if ALL else ["config-replaced"])
