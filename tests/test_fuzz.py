"""Fuzzing the loaders of untrusted files with hypothesis: GGUF files (header, metadata, tensor
table), a converted folder's assets file and its config's ``flashhead`` section, and the vLLM
clustering that ``import-assets`` reads.

Each case mutates a small valid file (truncations, bit flips, overwritten bytes, the numbers the
layout declares set to wrong counts, types and sizes far beyond the file, safetensors headers
edited, arrays rewritten with a consistent digest) and loads it in a worker process
(tests/fuzz_worker.py) under an address-space limit. Every case must end in the loader's clear
error (a ``ValueError``, ``GGUFError`` for GGUF files, with a one-line message naming the file or
folder) or in a load checked to be correct (what the reference reader reads, a model mlx-lm runs,
the very arrays of the file, the dense argmax when every cluster is probed). A crash of the
worker, a hang (no answer within ``TIMEOUT`` seconds), another exception type or a wrong load
fails the case, and hypothesis shrinks it.

Two profiles. CI (the default): a fixed set of examples per target (``derandomize``), some
tens of seconds in all. Long: ``FLASHHEAD_FUZZ=long python -m pytest tests/test_fuzz.py``, 25
times as many, drawn at random each run. ``FLASHHEAD_FUZZ_REPORT=FILE`` writes the examples run
per target and every distinct message seen (docs/setup.md, "Fuzzing").
"""

import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from conftest import make_clusters, make_tiny_model
from flashhead_mlx.assets import save_assets, write_assets
from flashhead_mlx.gguf_file import SCALAR_FORMATS
from flashhead_mlx.import_assets import CACHE_FILE, META_FILE
from flashhead_mlx.model_head import head_module, head_rows
from test_gguf import write_gguf

LONG = os.environ.get("FLASHHEAD_FUZZ", "") == "long"
SCALE = 25 if LONG else 1
TIMEOUT = 60 if LONG else 30
WORKER = Path(__file__).with_name("fuzz_worker.py")
COUNTS = Counter()
# target -> message with numbers as N -> the first such message (paths as DIR), its case, count
MESSAGES = defaultdict(dict)


def profile(ci_examples: int):
    """The hypothesis settings of a target with ``ci_examples`` examples in the CI profile."""
    return settings(
        max_examples=ci_examples * SCALE,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


class Worker:
    """tests/fuzz_worker.py, restarted after a crash or a hang."""

    def __init__(self):
        self.process = None
        self.init = []  # requests replayed after a restart

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.read(120)["outcome"] == "ready"
        for request in self.init:
            assert self.ask(request)["outcome"] == "ok"

    def read(self, timeout: float):
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if ready:  # end of file: the worker died
            returncode = self.process.wait()
            stderr = self.process.stderr.read()[-2000:]
            self.process = None
            return {"outcome": "crash", "detail": f"exit status {returncode}: {stderr}"}
        self.stop()
        return {"outcome": "hang", "detail": f"no answer in {timeout} s"}

    def ask(self, request: dict, timeout: float = TIMEOUT) -> dict:
        if self.process is None:
            self.start()
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.read(timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture(scope="module")
def worker():
    worker = Worker()
    yield worker
    worker.stop()
    report = os.environ.get("FLASHHEAD_FUZZ_REPORT")
    if report:
        previous = json.loads(Path(report).read_text()) if Path(report).is_file() else {}
        previous.setdefault("examples", {}).update(COUNTS)
        previous.setdefault("messages", {}).update({k: v for k, v in MESSAGES.items()})
        Path(report).write_text(json.dumps(previous, indent=1, sort_keys=True))


def check(answer: dict, target: str, case, clear: str, names: list, root: Path) -> None:
    """The case ended in the clear error (type ``clear`` or a subclass the worker recognised,
    one line naming one of ``names``) or in a correct load."""
    COUNTS[target] += 1
    outcome = answer["outcome"]
    assert outcome in ("ok", "error"), f"{outcome}: {answer.get('detail')} for {case!r}"
    if outcome == "ok":
        return
    message = answer["message"]
    assert answer["clear"] and answer["type"] in (clear, "StorageError"), (
        f"{answer['type']} for {case!r}:\n{answer['traceback']}"
    )
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert any(name in message for name in names), f"names no file: {message!r}"
    shown = message.replace(str(root), "DIR")
    kind = MESSAGES[target].setdefault(
        re.sub(r"\d+", "N", shown), {"message": shown, "case": repr(case)[:300], "count": 0}
    )
    kind["count"] += 1


# Mutations of bytes: ("truncate", n), ("flip", position, bit), ("write", position, bytes),
# ("delete", position, n), ("insert", position, bytes), ("number", offset, width, value).
def byte_mutations(size: int, hot: int, numbers=None):
    """Up to 4 mutations of a file of ``size`` bytes, most in its first ``hot`` bytes (the
    header and tables), and of the numbers at ``numbers`` (``(what, offset, width)``)."""
    position = st.one_of(st.integers(0, hot - 1), st.integers(0, hot - 1), st.integers(0, size - 1))
    single = [
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("write"), position, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), position, st.integers(1, 16)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
    ]
    if numbers:
        single += [numbers_mutation(numbers, size)] * 3
    return st.lists(st.one_of(single), min_size=1, max_size=4)


def numbers_mutation(numbers: list, size: int):
    """One declared number (a count, a length, a type code, a dimension, an offset) set to a
    wrong value: small, off by one, or far beyond the file."""

    @st.composite
    def mutation(draw):
        what, offset, width = draw(st.sampled_from(numbers))
        limit = (1 << (8 * width)) - 1
        value = draw(st.one_of(
            st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 64, 255, 256, size,
                             size + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1,
                             2**63, 2**64 - 1]),
            st.integers(0, limit),
        ))
        return ("number", offset, width, value & limit, what)

    return mutation()


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for mutation in mutations:
        kind, at = mutation[0], mutation[1] % max(len(out), 1)
        if kind == "truncate":
            del out[mutation[1]:]
        elif kind == "flip" and out:
            out[at] ^= 1 << mutation[2]
        elif kind == "write":
            out[at : at + len(mutation[2])] = mutation[2]
        elif kind == "delete":
            del out[at : at + mutation[2]]
        elif kind == "insert":
            out[at:at] = mutation[2]
        elif kind == "number" and mutation[1] + mutation[2] <= len(out):
            offset, width, value = mutation[1:4]
            out[offset : offset + width] = value.to_bytes(width, "little")
    return bytes(out)


def gguf_numbers(data: bytes) -> tuple:
    """``(what, offset, width)`` of every number a GGUF file's layout declares (the items of
    arrays of numbers aside), and where its tensor data starts."""
    numbers = [("version", 4, 4), ("tensor count", 8, 8), ("field count", 16, 8)]
    n_tensors, n_fields = struct.unpack_from("<QQ", data, 8)
    offset = 24

    def number(what, fmt):
        nonlocal offset
        numbers.append((what, offset, struct.calcsize(fmt)))
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def value(value_type, what):
        nonlocal offset
        if value_type == 8:
            length = number(f"{what} length", "<Q")  # (offset += number(...) reads offset first)
            offset += length
        elif value_type == 9:
            item_type, count = number(f"{what} item type", "<I"), number(f"{what} count", "<Q")
            if item_type in SCALAR_FORMATS:
                skipped = count * struct.calcsize(SCALAR_FORMATS[item_type])
                offset += skipped
            else:
                for index in range(count):
                    value(item_type, f"{what} item {index}")
        else:
            offset += struct.calcsize(SCALAR_FORMATS[value_type])

    for index in range(n_fields):
        value(8, f"field {index} key")
        value(number(f"field {index} type", "<I"), f"field {index}")
    for index in range(n_tensors):
        value(8, f"tensor {index} name")
        for dim in range(number(f"tensor {index} dimensions", "<I")):
            number(f"tensor {index} dimension {dim}", "<Q")
        number(f"tensor {index} type", "<I")
        number(f"tensor {index} offset", "<Q")
    return numbers, -(-offset // 32) * 32


# -- GGUF files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> tuple:
    """A tiny llama (Q8_0 matrices, F32 norms, its byte-level BPE vocabulary) as llama.cpp
    writes it: its bytes, its declared numbers, where its data starts."""
    root = tmp_path_factory.mktemp("fuzz-gguf")
    model_dir = make_tiny_model(root / "tiny", vocab_size=320, hidden_size=64, tied=False)
    model, _ = mlx_lm.load(str(model_dir))
    write_gguf(root / "base.gguf", model_dir, model, gguf.GGMLQuantizationType.Q8_0)
    data = (root / "base.gguf").read_bytes()
    numbers, data_start = gguf_numbers(data)
    return root, data, numbers, data_start


def string_lengths_first(numbers: list) -> list:
    """The declared numbers, vocabulary items thinned out (a few hundred string lengths would
    otherwise drown the counts and types)."""
    return [n for n in numbers if not re.search(r"item (\d+) length", n[0])
            or int(re.search(r"item (\d+)", n[0])[1]) < 3]


@given(data=st.data())
@profile(150)
def test_gguf_reader(worker, base_gguf, data):
    root, base, numbers, data_start = base_gguf
    case = data.draw(byte_mutations(len(base), data_start, string_lengths_first(numbers)))
    path = root / "case.gguf"
    path.write_bytes(mutate(base, case))
    answer = worker.ask({"target": "gguf_read", "path": str(path)})
    check(answer, "gguf_read", case, "GGUFError", [str(path)], root)


@given(data=st.data())
@profile(30)
def test_gguf_import(worker, base_gguf, data):
    root, base, numbers, data_start = base_gguf
    case = data.draw(byte_mutations(len(base), data_start, string_lengths_first(numbers)))
    path, out = root / "import.gguf", root / "imported"
    path.write_bytes(mutate(base, case))
    shutil.rmtree(out, ignore_errors=True)
    answer = worker.ask({"target": "gguf_import", "path": str(path), "out": str(out)})
    check(answer, "gguf_import", case, "GGUFError", [str(path)], root)


# -- A converted folder: its assets file and its config's flashhead section --------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory, worker) -> tuple:
    """A tiny model with FlashHead assets (random clusters, 4-bit centroids, mass offsets), and
    the worker holding it as the reference."""
    root = tmp_path_factory.mktemp("fuzz-assets")
    folder = make_tiny_model(root / "base", vocab_size=300, hidden_size=64)
    model, _ = mlx_lm.load(str(folder))
    clusters = make_clusters(np.array(head_rows(head_module(model))))
    mass_bias = mx.arange(clusters["centroids"].shape[0], dtype=mx.float32)
    save_assets(folder, clusters, 3, 4, mass_bias, head_module=head_module(model))
    request = {"target": "assets_init", "folder": str(folder)}
    worker.init.append(request)
    assert worker.ask(request, timeout=120)["outcome"] == "ok"
    return root, folder


def fresh_copy(converted) -> tuple:
    """A copy of the converted folder to mutate, its config and its assets file's name."""
    root, base = converted
    folder = root / "case"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    return folder, config, config["flashhead"]["assets_file"]


def safetensors_hot(data: bytes) -> int:
    """Where a safetensors file's data starts (its length field and JSON header before)."""
    return 8 + struct.unpack_from("<Q", data)[0]


@st.composite
def header_edit(draw, data: bytes):
    """A safetensors file with its JSON header edited: an entry's dtype, shape or data offsets
    set to another value, an entry dropped, or the header's length field off."""
    length = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8 : 8 + length])
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "length"]))
    size = len(data)
    ints = st.one_of(st.sampled_from([-1, 0, 1, 2, 3, size, 2**31, 2**32, 2**63, 2**64 - 1]),
                     st.integers(0, size))
    if field == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(
            ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "U32", "U64", "BOOL",
             "F8_E4M3", "Q4", ""]))
    elif field == "shape":
        header[name]["shape"] = draw(st.lists(ints, max_size=4))
    elif field == "data_offsets":
        header[name]["data_offsets"] = draw(st.lists(ints, min_size=0, max_size=3))
    elif field == "drop":
        del header[name]
    text = json.dumps(header).encode()
    delta = draw(st.integers(-16, 16)) if field == "length" else 0
    return struct.pack("<Q", max(len(text) + delta, 0)) + text + data[8 + length :], (name, field)


@given(data=st.data())
@profile(60)
def test_assets_file_bytes(worker, converted, data):
    folder, config, name = fresh_copy(converted)
    base = (folder / name).read_bytes()
    if data.draw(st.booleans()):
        case = data.draw(byte_mutations(len(base), safetensors_hot(base)))
        mutated = mutate(base, case)
    else:
        mutated, case = data.draw(header_edit(base))
    (folder / name).write_bytes(mutated)
    answer = worker.ask({"target": "assets_load", "folder": str(folder)})
    check(answer, "assets_file", case, "ValueError", [str(folder)], converted[0])


@st.composite
def array_edit(draw, arrays: dict):
    """The assets' arrays with one changed, then written with a consistent digest: another
    dtype, another shape, a value set to an edge (out of range, NaN, ...), dropped or added."""
    arrays = dict(arrays)
    name = draw(st.sampled_from(sorted(arrays) + ["extra"]))
    kind = draw(st.sampled_from(["dtype", "shape", "value", "drop"]))
    if name == "extra":
        arrays["extra"] = mx.zeros((3,))
        return arrays, (name, kind)
    array = arrays[name]
    if kind == "dtype":
        dtypes = [mx.float32, mx.float16, mx.int32, mx.int64, mx.uint32, mx.uint8, mx.bool_]
        dtype = draw(st.sampled_from(dtypes))
        arrays[name] = array.astype(dtype)
    elif kind == "shape":
        choice = draw(st.sampled_from(["flat", "row", "cut", "empty"]))
        arrays[name] = {"flat": array.reshape(-1), "row": array.reshape(1, -1),
                        "cut": array.reshape(-1)[1:], "empty": array.reshape(-1)[:0]}[choice]
        kind = f"shape {choice}"
    elif kind == "value":
        flat = np.array(array).reshape(-1).copy()
        index = draw(st.integers(0, flat.size - 1))
        edges = [-1, 0, 1, 299, 300, 301, -(2**31), 2**31 - 1]
        if flat.dtype.kind == "f":
            edges += [float("nan"), float("inf"), -float("inf"), 1e30]
        value = draw(st.sampled_from(edges))
        if flat.dtype.kind == "u":  # unsigned: a finite edge, wrapped
            finite = value == value and abs(value) != float("inf")
            value = abs(int(value)) % (np.iinfo(flat.dtype).max + 1) if finite else 0
        flat[index] = value
        arrays[name] = mx.array(flat.reshape(array.shape))
        kind = f"{name}[{index}] = {value}"
    else:
        del arrays[name]
    return arrays, (name, kind)


@given(data=st.data())
@profile(40)
def test_assets_arrays_rewritten(worker, converted, data):
    folder, config, name = fresh_copy(converted)
    arrays, case = data.draw(array_edit(dict(mx.load(str(folder / name)))))
    written = write_assets(folder, arrays, config["flashhead"])["flashhead"]["assets_file"]
    request = {"target": "assets_load", "folder": str(folder), "written": str(folder / written)}
    answer = worker.ask(request)
    check(answer, "assets_arrays", case, "ValueError", [str(folder)], converted[0])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


@st.composite
def section_edit(draw, config: dict):
    """config.json with its flashhead section edited: an entry set to another JSON value (near
    its own, of another type, or anything), dropped, or the section replaced."""
    config = json.loads(json.dumps(config))
    section = config["flashhead"]
    key = draw(st.sampled_from(sorted(section) + ["unknown"]))
    old = section.get(key)
    near = [old]
    if type(old) is int:
        near = [old - 1, old + 1, 2 * old, -old, 0, float(old), str(old), True, 2**31, 2**63]
    elif isinstance(old, str):
        near = [old[:-1], old + "0", old.upper(), "", None, 0]
    kind = draw(st.sampled_from(["near", "any", "drop", "section"]))
    if kind == "near":
        section[key] = draw(st.sampled_from(near))
    elif kind == "any":
        section[key] = draw(JSON_VALUES)
    elif kind == "drop":
        section.pop(key, None)
    else:
        config["flashhead"] = draw(JSON_VALUES)
    return config, (key, kind, section.get(key) if kind != "section" else config["flashhead"])


@given(data=st.data())
@profile(80)
def test_config_section(worker, converted, data):
    folder, config, _ = fresh_copy(converted)
    if data.draw(st.integers(0, 4)) == 0:  # config.json itself damaged
        text = json.dumps(config).encode()
        case = data.draw(byte_mutations(len(text), len(text)))
        (folder / "config.json").write_bytes(mutate(text, case))
    else:
        edited, case = data.draw(section_edit(config))
        (folder / "config.json").write_text(json.dumps(edited))
    answer = worker.ask({"target": "assets_load", "folder": str(folder)})
    check(answer, "config_section", case, "ValueError", [str(folder)], converted[0])


# -- The vLLM clustering of import-assets -----------------------------------------------------

VOCAB, HIDDEN, N_CLUSTERS = 1000, 64, 50


@pytest.fixture(scope="module")
def clustering(tmp_path_factory) -> tuple:
    """A valid clustering in vLLM's layout for a head of VOCAB x HIDDEN: its cache file's bytes
    and its config."""
    root = tmp_path_factory.mktemp("fuzz-vllm")
    rng = np.random.default_rng(0)
    arrays = {
        "centroids": rng.normal(size=(1, 1, HIDDEN, N_CLUSTERS)).astype(np.float32),
        "cluster_assignments": (rng.permutation(VOCAB) % N_CLUSTERS).astype(np.int64),
    }
    save_file(arrays, str(root / "base.safetensors"))
    meta = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "n_clusters": N_CLUSTERS}
    return root, (root / "base.safetensors").read_bytes(), meta, arrays


@given(data=st.data())
@profile(80)
def test_vllm_clustering(worker, clustering, data):
    root, base, meta, arrays = clustering
    folder = root / "case"
    folder.mkdir(exist_ok=True)
    kind = data.draw(st.sampled_from(["bytes", "header", "meta", "labels"]))
    cache, meta = base, dict(meta)
    if kind == "bytes":
        case = data.draw(byte_mutations(len(base), safetensors_hot(base)))
        cache = mutate(base, case)
    elif kind == "header":
        cache, case = data.draw(header_edit(base))
    elif kind == "meta":
        key = data.draw(st.sampled_from(sorted(meta) + ["format"]))
        edges = [0, 1, -1, 7, 20, 999, 1001, 2000, True, 50.0, "50"]
        meta[key] = data.draw(st.one_of(st.sampled_from(edges), JSON_VALUES))
        case = (key, meta[key])
    else:
        labels = arrays["cluster_assignments"].copy()
        index = data.draw(st.integers(0, VOCAB - 1))
        labels[index] = data.draw(st.sampled_from([-1, N_CLUSTERS, 2**40, labels[index - 1]]))
        dtype = data.draw(st.sampled_from([np.int64, np.int32, np.uint8, np.float32, np.bool_]))
        shape = data.draw(st.sampled_from([(VOCAB,), (1, VOCAB), (2, VOCAB // 2), (VOCAB, 1)]))
        edited = {**arrays, "cluster_assignments": labels.astype(dtype).reshape(shape)}
        save_file(edited, str(root / "edited.safetensors"))
        cache = (root / "edited.safetensors").read_bytes()
        case = (index, int(labels[index]), np.dtype(dtype).name, shape)
    (folder / CACHE_FILE).write_bytes(cache)
    (folder / META_FILE).write_text(json.dumps(meta))
    answer = worker.ask({"target": "clustering_read", "path": str(folder / CACHE_FILE),
                         "vocab_size": VOCAB, "hidden_size": HIDDEN})
    check(answer, "vllm_clustering", case, "ValueError", [str(folder)], root)
