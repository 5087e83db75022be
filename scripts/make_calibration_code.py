"""How the calibration mix's code (``flashhead_mlx/data/calibration_code.txt``) was made:
provenance, not a step of the package. It concatenates the start of installed source files that
the evaluation suite does not use (neither split: ``manifest.json``'s ``origins``), under the
licences the suite already records (docs/clustering.md).

    python scripts/make_calibration_code.py
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "flashhead_mlx" / "data" / "calibration_code.txt"
MANIFEST = ROOT / "flashhead_mlx" / "data" / "suite" / "manifest.json"
PYTHON = Path("/root/.pyenv/versions/3.11.7")
SOURCES = [  # (file, licence)
    *((PYTHON / "lib/python3.11" / n, "PSF-2.0") for n in (
        "textwrap.py", "fractions.py", "heapq.py", "csv.py", "graphlib.py", "shlex.py")),
    *((PYTHON / "include/python3.11" / n, "PSF-2.0") for n in (
        "listobject.h", "dictobject.h", "longobject.h", "setobject.h")),
    *((Path("/usr/lib/node_modules/npm/node_modules/semver/classes") / n, "ISC") for n in (
        "range.js", "comparator.js")),
    *((Path("/usr/share/perl/5.36/Text") / n, "Artistic-1.0-Perl OR GPL-1.0-or-later") for n in (
        "Wrap.pm", "ParseWords.pm")),
]
# Characters kept from the start of each file (cut at a line end).
MAX_CHARS = 6000


def head(path: Path) -> str:
    """The first :data:`MAX_CHARS` characters of ``path``, cut after the last whole line."""
    text = path.read_text()
    return text if len(text) <= MAX_CHARS else text[: text.rindex("\n", 0, MAX_CHARS) + 1]


def main() -> None:
    files = json.loads(MANIFEST.read_text())["files"].values()
    used = {o.split(" (")[0] for entry in files for o in entry.get("origins", [])}
    clash = [str(p) for p, _ in SOURCES if str(p) in used]
    if clash:
        raise SystemExit(f"used by the suite: {', '.join(clash)}")
    OUT.write_text("\n\n".join(head(p).strip("\n") for p, _ in SOURCES) + "\n")
    for path, licence in SOURCES:
        print(f"{path} ({licence})")


if __name__ == "__main__":
    main()
