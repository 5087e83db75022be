"""How the frozen evaluation suite (``flashhead_mlx/data/suite``) was made: provenance, not a
step of the package. Run once on the machine whose installed files it reads; the suite is then
frozen (``manifest.json`` records every file's digest, and ``tests/test_suite.py`` checks them).

    python scripts/make_suite.py --tokenizer DIR [--collect]

``--collect`` gathers the collected domains (code, technical prose, non-English prose, English
prose) and the generated math from installed files; the texts written for the suite (verse and
dialogue, math exposition, chat prompts) are edited by hand in the suite folder. Every run
rewrites ``manifest.json`` (digests, token counts with ``--tokenizer``'s tokenizer).
"""

import argparse
import gzip
import hashlib
import html
import json
import random
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "flashhead_mlx" / "data" / "suite"
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
PYTHON = Path("/root/.pyenv/versions/3.11.7")
RUST_DOC = Path.home() / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust"
NPM = Path("/usr/lib/node_modules/npm")
PERL = Path("/usr/share/perl/5.36")
SPLITS = ("dev", "held-out")
# Tokens (SmolLM2's tokenizer) per collected file and split.
TARGET = {"code": 4600, "technical": 11500, "non-english": 4000, "english": 22000, "math": 22000}

LICENCES = {
    "PSF-2.0": "Python Software Foundation License 2.0 (CPython's LICENSE, installed as "
    f"{PYTHON}/lib/python3.11/LICENSE.txt)",
    "MIT OR Apache-2.0": "The Rust Project's licence (COPYRIGHT.html and licenses/ in "
    f"{RUST_DOC})",
    "Artistic-1.0-Perl OR GPL-1.0-or-later": "Perl's terms (/usr/share/doc/perl/copyright)",
    "BSD-3-Clause": "Shadow's licence (/usr/share/doc/passwd/copyright)",
    "MIT": "MIT (the licence file of each package; the janeaustenr data package for Austen; "
    "flashhead-mlx's own licence for the texts written for the suite)",
    "ISC": "ISC (the LICENSE file of each package)",
}


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def paragraphs(text: str) -> list:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def fill(tokenizer, docs, target: int) -> tuple:
    """Whole paragraphs of ``docs`` [(origin, text)], in order, up to ``target`` tokens: the text
    and the origins used."""
    out, used, count = [], [], 0
    for origin, text in docs:
        kept = []
        for para in paragraphs(text):
            if count >= target:
                break
            kept.append(para.rstrip())
            count += tokens(tokenizer, para) + 1
        if kept:
            out.append("\n\n".join(kept))
            used.append(origin)
        if count >= target:
            break
    return "\n\n".join(out) + "\n", used


def split_of(origin: str) -> str:
    """A fixed split for a source document: by the parity of its file name's digest (so a manual
    page is in the same split in every language)."""
    return SPLITS[hashlib.sha256(Path(origin).name.encode()).digest()[0] % 2]


def python_docs():
    lib = PYTHON / "lib" / "python3.11"
    for path in sorted(lib.glob("*.py")):
        if not path.name.startswith(("_", "test")):
            yield str(path), path.read_text(errors="replace")


def c_docs():
    for path in sorted((PYTHON / "include" / "python3.11").rglob("*.h")):
        yield str(path), path.read_text(errors="replace")


def rust_source(path: Path) -> str:
    page = path.read_text()
    code = page[page.index("<code>") + 6 : page.rindex("</code>")]
    code = re.sub(r"<a [^>]*data-nosnippet>\d+</a>", "", code)
    return html.unescape(re.sub(r"<[^>]+>", "", code))


def rust_docs():
    for path in sorted((RUST_DOC / "html" / "src").rglob("*.rs.html")):
        if path.stat().st_size < 200_000:
            yield str(path), rust_source(path)


def javascript_docs():
    for package in sorted((NPM / "node_modules").iterdir()):
        meta = package / "package.json"
        if not meta.is_file():
            continue
        licence = json.loads(meta.read_text()).get("license")
        if licence not in ("MIT", "ISC") or not list(package.glob("LICENSE*")):
            continue
        for path in sorted(package.rglob("*.js")):
            if "node_modules" not in path.relative_to(package).parts and ".min." not in path.name:
                yield f"{path} ({licence})", path.read_text(errors="replace")


def perl_docs():
    for path in sorted(PERL.rglob("*.pm")):
        text = path.read_text(errors="replace")
        if "same terms as Perl" in text or "same terms as the Perl" in text:
            yield str(path), text


def html_text(page: str) -> str:
    """The readable text of an mdBook page's ``<main>``."""
    main = page[page.index("<main>") + 6 : page.index("</main>")]
    main = re.sub(r"(?s)<(script|style|nav).*?</\1>", "", main)
    main = re.sub(r"</(p|h\d|li|pre|div|tr|blockquote)>", "\n\n", main)
    main = re.sub(r"<br\s*/?>", "\n", main)
    text = html.unescape(re.sub(r"<[^>]+>", "", main))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def book_docs(book: str):
    for path in sorted((RUST_DOC / "html" / book).rglob("*.html")):
        page = path.read_text(errors="replace")
        stub = "no longer distributed with Rust"  # the old editions' placeholder pages
        if "<main>" in page and "print.html" not in path.name and stub not in page:
            yield str(path), html_text(page)


ENGLISH = re.compile(r"\b(the|and|of|is|are|to|this|that|with|be|for)\b", re.I)


def shadow_man_docs(language: str):
    """Shadow's translated manual pages (BSD-3-Clause), the paragraphs left in English dropped."""
    listing = subprocess.run(["dpkg", "-L", "passwd", "login"], capture_output=True, text=True)
    for name in sorted(set(listing.stdout.split())):
        if f"/man/{language}/" not in name or not name.endswith(".gz"):
            continue
        source = gzip.decompress(Path(name).read_bytes())
        text = subprocess.run(
            ["groff", "-k", "-mandoc", "-Tutf8", "-P-cbou"], input=source, capture_output=True
        ).stdout.decode()
        kept = [
            re.sub(r"(?m)^ {1,7}", "", p)
            for p in paragraphs(text)
            if len(ENGLISH.findall(p)) < 0.06 * len(p.split()) + 1
            and not re.match(r"^\S.*\(\d\)\s", p)
        ]
        yield name, "\n\n".join(kept)


def austen_doc(novel: str):
    text = (AUSTEN / f"{novel}.txt").read_text()
    yield str(AUSTEN / f"{novel}.txt"), text[len(text) // 3 :]


# (domain, name, licence, source, documents); split by document unless fixed_split is given.
def collected():
    yield "code", "python", "PSF-2.0", "CPython 3.11 standard library", python_docs(), None
    yield "code", "c", "PSF-2.0", "CPython 3.11 C headers", c_docs(), None
    yield "code", "rust", "MIT OR Apache-2.0", "Rust standard library sources", rust_docs(), None
    yield "code", "javascript", "MIT/ISC", "npm's dependencies", javascript_docs(), None
    yield "code", "perl", "Artistic-1.0-Perl OR GPL-1.0-or-later", "Perl 5.36 core modules", perl_docs(), None
    yield "technical", "rust-book", "MIT OR Apache-2.0", "The Rust Programming Language", book_docs("book"), None
    yield "technical", "cargo-book", "MIT OR Apache-2.0", "The Cargo Book", book_docs("cargo"), None
    for language in ("de", "fr", "it", "ru", "zh_CN", "ja"):
        yield "non-english", f"shadow-man-{language}", "BSD-3-Clause", f"shadow's manual pages ({language})", shadow_man_docs(language), None
    yield "english", "persuasion", "MIT", "Persuasion (Austen)", austen_doc("persuasion"), "dev"
    yield "english", "mansfield-park", "MIT", "Mansfield Park (Austen)", austen_doc("mansfield_park"), "held-out"


def written() -> dict:
    """Manifest entries (without digests) of the texts written for the suite."""
    entries = {}
    for split in SPLITS:
        entries[f"chat/{split}/prompts.txt"] = {
            "domain": "chat", "split": split, "licence": "MIT", "origins": [],
            "source": "instructions written for the suite, one per line (the positions are "
            "the model's own dense replies)",
        }
        for kind in ("verse", "dialogue"):
            entries[f"verse-dialogue/{split}/{kind}.txt"] = {
                "domain": "verse-dialogue", "split": split, "licence": "MIT", "origins": [],
                "source": f"{kind} written for the suite",
            }
    return entries


def collect(tokenizer) -> dict:
    """Write the collected files; their manifest entries (without digests) by path."""
    import math_problems

    entries = {}
    dev_text = ""
    for split in SPLITS:  # dev first: held-out paragraphs found in dev are dropped
        for domain, name, licence, source, docs, fixed in collected():
            if fixed not in (None, split):
                continue
            docs = [(o, t) for o, t in docs if fixed or split_of(o) == split]
            if split == "held-out":
                docs = [(o, "\n\n".join(p for p in paragraphs(t) if p not in dev_text)) for o, t in docs]
            random.Random(name).shuffle(docs)
            text, used = fill(tokenizer, docs, TARGET[domain])
            path = SUITE / domain / split / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            dev_text += text if split == "dev" else ""
            entries[str(path.relative_to(SUITE))] = {
                "domain": domain, "split": split, "source": source, "licence": licence,
                "origins": used,
            }
        text = math_problems.problems(split, tokenizer, TARGET["math"])
        path = SUITE / "math" / split / "worked-problems.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        entries[str(path.relative_to(SUITE))] = {
            "domain": "math", "split": split, "licence": "MIT",
            "source": "worked problems generated by scripts/math_problems.py (written for the suite)",
            "origins": [f"scripts/math_problems.py, {split} problem kinds"],
        }
    return entries


def licence_texts(files: dict) -> str:
    """LICENSES.md: which licence covers which file, then the notices and licence texts."""
    rust = RUST_DOC / "licenses"
    shadow = Path("/usr/share/doc/passwd/copyright").read_text()
    bsd = shadow[shadow.index("License: BSD-3-clause\n") :].split("\n\n")[0]
    packages = sorted({
        o.split("/node_modules/")[2].split("/")[0]
        for e in files.values() for o in e["origins"] if "/node_modules/" in o
    })
    lines = [
        "# Licences of the evaluation suite's texts", "",
        "Every file below is redistributed under the licence of its source, recorded per file in "
        "`manifest.json` (`licence`, `source`, `origins`). Texts written for the suite are MIT, "
        "as flashhead-mlx. Nothing whose licence was unclear was kept.", "",
        "| file | licence | source |", "|---|---|---|",
        *(f"| `{n}` | {e['licence']} | {e['source']} |" for n, e in sorted(files.items())), "",
        "## PSF-2.0: CPython 3.11 (standard library modules, C headers)", "",
        "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.", "",
        "```", (PYTHON / "lib/python3.11/LICENSE.txt").read_text().strip(), "```", "",
        "## MIT OR Apache-2.0: the Rust standard library, The Rust Programming Language, The Cargo Book", "",
        "Copyright (c) The Rust Project Contributors. Used under the MIT licence (the Apache-2.0 "
        f"alternative is in the Rust toolchain's `licenses/Apache-2.0.txt`).", "",
        "```", (rust / "MIT.txt").read_text().strip(), "```", "",
        "## MIT / ISC: npm's dependencies (JavaScript)", "",
    ]
    for package in packages:
        licence = sorted((NPM / "node_modules" / package).glob("LICENSE*"))[0]
        lines += [f"### {package}", "", "```", licence.read_text().strip(), "```", ""]
    lines += [
        "## Artistic-1.0-Perl OR GPL-1.0-or-later: Perl 5.36 core modules", "",
        "Perl is Copyright (C) 1987-2022 by Larry Wall and others; each module is distributed "
        "under the same terms as Perl itself. Used under the Artistic License:", "",
        "```", Path("/usr/share/common-licenses/Artistic").read_text().strip(), "```", "",
        "## BSD-3-Clause: shadow's manual pages (German, French, Italian, Russian, Chinese, Japanese)", "",
        "Copyright 1989-1994, Julianne Frances Haugh; 2016-2022, Serge Hallyn; translations "
        "1999-2015, Free Software Foundation, Inc., and the Debian l10n teams "
        "(`/usr/share/doc/passwd/copyright`).", "",
        "```", bsd.replace("\n .\n", "\n\n").strip(), "```", "",
        "## MIT: Jane Austen's novels (public domain text, packaged by janeaustenr)", "",
        "Persuasion and Mansfield Park, from the janeaustenr data package (MIT), as in "
        "`../shared/data/austen`.", "",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="An mlx-lm folder of SmolLM2-135M.")
    parser.add_argument("--collect", action="store_true", help="Collect from installed files.")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    manifest_path = SUITE / "manifest.json"
    old = json.loads(manifest_path.read_text())["files"] if manifest_path.exists() else {}
    entries = {**old, **written(), **(collect(tokenizer) if args.collect else {})}
    files = {}
    for path in sorted(p for p in SUITE.rglob("*.txt")):
        key = str(path.relative_to(SUITE))
        if key not in entries:
            raise SystemExit(f"{key} has no manifest entry: add its domain, source and licence")
        text = path.read_text()
        entry = dict(entries[key], sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        if entry["domain"] == "chat":
            entry["prompts"] = len([line for line in text.splitlines() if line.strip()])
        else:
            entry["tokens_smollm2"] = tokens(tokenizer, text)
        files[key] = entry
    manifest = {
        "description": "flashhead-mlx's frozen evaluation suite (docs/suite.md): tune and "
        "decide on the dev split, report on the held-out split, never tune on it.",
        "splits": list(SPLITS),
        "licences": LICENCES,
        "files": files,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (SUITE / "LICENSES.md").write_text(licence_texts(files))
    for split in SPLITS:
        counts = {}
        for entry in files.values():
            if entry["split"] == split:
                counts[entry["domain"]] = counts.get(entry["domain"], 0) + entry.get("tokens_smollm2", entry.get("prompts", 0))
        print(split, counts)


if __name__ == "__main__":
    main()
