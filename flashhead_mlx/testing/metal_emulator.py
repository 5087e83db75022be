"""Run ``mx.fast.metal_kernel`` sources on the CPU.

:func:`metal_kernel` takes the same arguments as ``mx.fast.metal_kernel`` and returns a kernel
that takes the same call arguments. It builds the kernel source exactly as MLX does (the
signature from the input and output names, the ``<name>_shape/_strides/_ndim`` and
thread-position attributes the source mentions, and the template arguments), compiles it as
C++ after ``metal_prelude.h`` (the Metal subset, MSL 3.2 or 3.1) with the system compiler, links
the scheduler ``metal_runtime.cpp``, and runs the grid: the threads of a threadgroup as fibers
that switch only at barriers and SIMD-group functions (32 lanes per SIMD group; a collective
acts on the lanes waiting at it). Threadgroup variables become references into the running
threadgroup's own memory, poisoned with 0xff bytes at its start. Compiled kernels are cached by
source hash under ``~/.cache/flashhead-mlx/emulator`` (``FLASHHEAD_EMULATOR_CACHE`` overrides it).

Checks that real hardware does not make, each an :class:`EmulatorError`, by mode (:data:`MODES`):
- "fast": reads and writes past the end of a buffer (each buffer ends at a guard page), divergent
  SIMD-group collectives, barriers that not every thread reaches, shuffles from inactive lanes,
  spin-waits, more than 1024 threads or 32 KiB of threadgroup memory per threadgroup.
- "check": also every load and store (the kernel is compiled with ``-fsanitize=thread``; the
  scheduler implements the hooks): races on threadgroup memory and on outputs, reads of
  threadgroup memory that no thread wrote, accesses outside a threadgroup array or a buffer.
- "sanitize": AddressSanitizer and UndefinedBehaviorSanitizer, in a harness executable run as a
  child process (``metal_harness.cpp``).
Not checked: address spaces (they are plain memory, so a device/constant pointer mix-up that Metal
rejects compiles here), the ordering of memory between threadgroups (every access is sequentially
consistent, fences are no-ops); half arithmetic may keep float precision between operations.
Outputs start filled with 0xff bytes (NaN for floats) unless ``init_value`` is given, so unwritten
elements show. With ``shuffle=True`` threadgroups (up to 4 at once, interleaved) and threads run
in a random order (a correct kernel gives the same result).

:func:`emulate` patches ``mx.fast.metal_kernel`` and ``mx.metal.is_available`` so that
unmodified code (ours or mlx-lm's) runs its Metal path through the emulator.
"""

import contextlib
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
PRELUDE = HERE / "metal_prelude.h"
RUNTIME = HERE / "metal_runtime.cpp"
HARNESS = HERE / "metal_harness.cpp"
CXX = os.environ.get("CXX", "g++")
FLAGS = (
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-Wno-attributes",
    "-Wno-unknown-pragmas",
)
# AddressSanitizer and UndefinedBehaviorSanitizer, for the harness executable.
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer", "-g")
TIMEOUT_S = 300
# "fast": the kernel as compiled; "check": every load and store checked (races, uninitialised
# threadgroup memory, bounds); "sanitize": AddressSanitizer and UndefinedBehaviorSanitizer in
# a harness executable (see the module docstring).
MODES = ("fast", "check", "sanitize")
MSL_VERSIONS = ("3.1", "3.2")

# Inputs with fewer elements go to the constant address space (MLX's max_constant_array_size).
MAX_CONSTANT_ARRAY_SIZE = 8

# MLX's thread-position attributes, in MLX's order, with their types.
ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": "uint",
    "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3",
    "grid_origin": "uint3",
    "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint",
    "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
    "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint",
    "thread_index_in_quadgroup": "uint",
    "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
}

# MLX dtype -> (Metal type name, numpy dtype of the bytes).
DTYPES = {
    mx.bool_: ("bool", np.bool_),
    mx.uint8: ("uint8_t", np.uint8),
    mx.uint16: ("uint16_t", np.uint16),
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint64: ("uint64_t", np.uint64),
    mx.int8: ("int8_t", np.int8),
    mx.int16: ("int16_t", np.int16),
    mx.int32: ("int32_t", np.int32),
    mx.int64: ("int64_t", np.int64),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.float32: ("float", np.float32),
}


class EmulatorError(RuntimeError):
    """A kernel the emulator cannot compile, or that did something wrong while it ran."""


def type_string(dtype: mx.Dtype) -> str:
    if dtype not in DTYPES:
        raise EmulatorError(f"the emulator has no Metal type for {dtype}")
    return DTYPES[dtype][0]


def rewrite_threadgroup(source: str) -> str:
    """Turn each ``threadgroup`` variable declaration into a reference to its storage in the
    running threadgroup's memory (``emu::threadgroup_memory``, keyed by a static tag of the
    declaration); ``threadgroup`` qualifiers of pointers and references stay (an empty macro).
    Raises on a use of ``threadgroup`` that is neither, and on an initializer (Metal has none)."""

    def blank(comment: re.Match) -> str:  # keeps the line numbers
        return re.sub(r"[^\n]", " ", comment.group(0))

    source = re.sub(r"//[^\n]*|/\*.*?\*/", blank, source, flags=re.S)
    pieces, pos = [], 0
    for match in re.finditer(r"\bthreadgroup\b", source):
        declarator = re.compile(r"[^;(){}]*").match(source, match.end()).group(0)
        if "*" in declarator.split("[")[0] or "&" in declarator.split("[")[0]:
            continue
        line = source.count("\n", 0, match.start()) + 1
        if "=" in declarator:
            raise EmulatorError(f"line {line}: a threadgroup variable cannot have an initializer "
                                f"in Metal: {declarator.strip()!r}")
        parts = re.fullmatch(r"\s*((?:const\s+)?[\w:]+(?:\s*<[^;]*>)?)\s+(\w+)\s*(\[[^;]*\])?\s*",
                             declarator)
        if not parts or source[match.end() + len(declarator):][:1] != ";":
            raise EmulatorError(f"line {line}: cannot tell a threadgroup declaration in "
                                f"{declarator!r}")
        kind, name, dims = parts.group(1), parts.group(2), parts.group(3) or ""
        t = f"emu_type_{name}"
        pieces += [
            source[pos:match.start()],
            f"static char emu_tag_{name}; typedef {kind} {t}{dims}; "
            f"{t}& {name} = *static_cast<{t}*>(emu::threadgroup_memory(&emu_tag_{name}, "
            f"sizeof({t}), alignof({t}), \"{name}\", __LINE__))",
        ]
        pos = match.end() + len(declarator)
    return "".join(pieces) + source[pos:]


def kernel_name(name: str, inputs: Sequence[mx.array], output_dtypes, template) -> Tuple[str, str]:
    """MLX's host name of an instantiation, and its template argument list (or "")."""
    full = "custom_kernel_" + name
    template_def = ""
    if template:
        args = []
        for _, value in template:
            if isinstance(value, bool):
                args.append(str(int(value)))
            elif isinstance(value, int):
                args.append(str(value))
            elif isinstance(value, mx.Dtype):
                args.append(type_string(value))
            else:
                raise EmulatorError("template arguments must be mx.Dtype, int or bool")
        template_def = "<" + ", ".join(args) + ">"
        full += "_" + template_def.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    for x in inputs:
        full += "_" + type_string(x.dtype)
        full += "s" if x.ndim == 0 else "c" if x.size < MAX_CONSTANT_ARRAY_SIZE else ""
    for dtype in output_dtypes:
        full += "_" + type_string(dtype)
    return full, template_def


def parameters(
    input_names: Sequence[str],
    inputs: Sequence[mx.array],
    shape_infos: Sequence[Tuple[bool, bool, bool]],
    output_names: Sequence[str],
    output_dtypes: Sequence[mx.Dtype],
    attributes: Sequence[str],
    atomic_outputs: bool,
) -> List[Tuple[str, str, Optional[Tuple[str, int]]]]:
    """The kernel's parameters as MLX declares them (mlx/backend/common/metal_kernel.cpp,
    write_signature), each with the C++ expression the emulator passes (buffer i is
    ``emu_buffers[i]``, attributes come from the running thread) and what buffer i holds:
    ``("input" | "shape" | "strides" | "ndim", input index)``, ``("output", output index)``,
    or None for an attribute."""
    params = []

    def buffer(declaration: str, t: str, ref: bool, holds: Tuple[str, int]) -> None:
        i = len(params)
        expr = f"*({t}*)emu_buffers[{i}]" if ref else f"({t}*)emu_buffers[{i}]"
        params.append((f"  {declaration} [[buffer({i})]]", expr, holds))

    for k, (name, x, uses) in enumerate(zip(input_names, inputs, shape_infos)):
        location = "constant" if x.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        t = type_string(x.dtype)
        buffer(f"const {location} {t}{'&' if x.ndim == 0 else '*'} {name}", "const " + t,
               x.ndim == 0, ("input", k))
        for used, kind, t, ref in zip(uses, ("shape", "strides", "ndim"),
                                      ("int", "int64_t", "int"), ("*", "*", "&")):
            if used and x.ndim > 0:
                declaration = f"const constant {t}{ref} {name}_{kind}"
                buffer(declaration, "const " + t, ref == "&", (kind, k))
    for k, (name, dtype) in enumerate(zip(output_names, output_dtypes)):
        t = f"atomic<{type_string(dtype)}>" if atomic_outputs else type_string(dtype)
        buffer(f"device {t}* {name}", t, False, ("output", k))
    params += [(f"  {ATTRIBUTES[a]} {a} [[{a}]]", f"emu::{a}()", None) for a in attributes]
    return params


def write_signature(func_name: str, header: str, source: str, template: Sequence[tuple],
                    params: Sequence[tuple]) -> str:
    """The kernel source MLX compiles: header, template, signature, body."""
    text = header
    if template:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
                 for _, v in template]
        text += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
    text += f"[[kernel]] void {func_name}(\n" + ",\n".join(p[0] for p in params) + ") {\n"
    return text + source + "\n}\n"


@lru_cache(maxsize=None)
def _compiler_id() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "flashhead-mlx" / "emulator"
    path = Path(os.environ.get("FLASHHEAD_EMULATOR_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compile(command: List[str], output: Path, what: str) -> None:
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        target = Path(tmp) / output.name
        result = subprocess.run(command + ["-o", str(target)], capture_output=True, text=True)
        if result.returncode:
            raise EmulatorError(f"{what} does not compile:\n{result.stderr[-6000:]}")
        os.replace(target, output)


def _cached(suffix: str, text: str, build) -> Path:
    """The file ``cache_dir()/<hash of text><suffix>``, built by ``build(path)`` if missing."""
    key = hashlib.sha256((_compiler_id() + text).encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}{suffix}"
    if not path.exists():
        build(path)
    return path


@lru_cache(maxsize=None)
def _object(source: Path, flags: Tuple[str, ...]) -> Path:
    """``source`` (the scheduler or the harness) compiled with ``flags``."""
    text = " ".join(flags) + PRELUDE.read_text() + source.read_text()
    return _cached(f"-{source.stem}.o", text, lambda path: _compile(
        [CXX, *flags, "-I", str(HERE), "-c", str(source)], path, source.name))


def _build(cpp: str, mode: str, msl: str) -> Path:
    """The kernel translation unit ``cpp`` built for ``mode``: a shared library with the
    scheduler ("fast"; "check": the kernel instrumented, see metal_runtime.cpp), or the
    sanitizer harness executable ("sanitize")."""
    runtime_flags = FLAGS + (SANITIZE_FLAGS if mode == "sanitize" else ())
    flags = (*runtime_flags, f"-DEMU_MSL={msl.replace('.', '')}0")
    sources = [RUNTIME, HARNESS] if mode == "sanitize" else [RUNTIME]
    objects = [_object(source, runtime_flags) for source in sources]

    def build(path: Path) -> None:
        source = path.with_suffix(".cpp")
        source.write_text(cpp)
        what = f"the kernel (generated C++ in {source})"
        kernel = path.with_suffix(".o")
        extra = ["-fsanitize=thread"] if mode == "check" else []
        _compile([CXX, *flags, *extra, "-I", str(HERE), "-c", str(source)], kernel, what)
        link = [] if mode == "sanitize" else ["-shared"]
        _compile([CXX, *flags, *link, str(kernel), *map(str, objects)], path, what)

    suffix = {"fast": ".so", "check": "-check.so", "sanitize": "-sanitize.exe"}[mode]
    return _cached(suffix, " ".join(flags) + mode + "".join(o.name for o in objects) + cpp, build)


@lru_cache(maxsize=None)
def _library(cpp: str, mode: str, msl: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build(cpp, mode, msl)))
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                               ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
    lib.emu_alloc.restype = ctypes.c_void_p
    lib.emu_alloc.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.emu_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


class _Buffer:
    """A guarded copy of one input or output."""

    def __init__(self, lib: ctypes.CDLL, name: str, data: np.ndarray):
        self.lib, self.name, self.nbytes = lib, name, data.nbytes
        mapped = ctypes.c_size_t()
        self.ptr = lib.emu_alloc(max(self.nbytes, 1), ctypes.byref(mapped))
        if not self.ptr:
            raise MemoryError(f"cannot map {self.nbytes} bytes for {name}")
        self.mapped = mapped.value
        self.view()[:] = data

    def view(self) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))

    def free(self) -> None:
        self.lib.emu_free(self.ptr, self.mapped)

    def extent(self) -> Tuple[int, int]:
        """The addresses around the buffer whose accesses :meth:`describe` names."""
        return self.ptr - 4096, self.ptr + (self.nbytes + 15) // 16 * 16 + 4096

    def describe(self, address: int) -> Optional[str]:
        low, high = self.extent()
        if self.ptr + self.nbytes <= address < high:
            past = address - self.ptr - self.nbytes
            return f"{past} bytes past the end of {self.name} ({self.nbytes} bytes)"
        if low <= address < self.ptr:
            return f"{self.ptr - address} bytes before the start of {self.name}"
        return None


def _host(x: mx.array) -> np.ndarray:
    """The elements of x as numpy, with MLX's strides (bfloat16 as its uint16 bits)."""
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.asarray(memoryview(x))


def _span(host: np.ndarray) -> Tuple[np.ndarray, int]:
    """The bytes that host's elements span, and the offset of element 0 in them."""
    if host.size == 0:
        return np.zeros(0, np.uint8), 0
    offsets = [(n - 1) * s for n, s in zip(host.shape, host.strides)]
    low = sum(o for o in offsets if o < 0)
    high = sum(o for o in offsets if o > 0) + host.itemsize
    address = host.__array_interface__["data"][0] + low
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * (high - low)).from_address(address))
    return raw.copy(), -low


def _output_bytes(shape, dtype: mx.Dtype, init_value) -> np.ndarray:
    """An output's initial bytes: init_value, or else 0xff bytes."""
    type_string(dtype)  # raises for a dtype without a Metal type
    np_dtype = DTYPES[dtype][1]
    count = int(np.prod(shape, dtype=np.int64))
    if init_value is None:
        return np.full(count * np.dtype(np_dtype).itemsize, 0xFF, np.uint8)
    return np.full(count, _host(mx.array(init_value, dtype=dtype)), np_dtype).view(np.uint8)


class EmulatedKernel:
    """A kernel made by :func:`metal_kernel`; call it like an ``mx.fast.metal_kernel``."""

    def __init__(self, name, input_names, output_names, source, header, ensure_row_contiguous,
                 atomic_outputs, shuffle, seed, mode, msl, launches):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if mode not in MODES or msl not in MSL_VERSIONS:
            raise ValueError(f"mode must be one of {MODES} and msl one of {MSL_VERSIONS}")
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.ensure_row_contiguous, self.atomic_outputs = ensure_row_contiguous, atomic_outputs
        self.shuffle, self.seed, self.mode, self.msl = shuffle, seed, mode, msl
        self.launches = launches
        self.shape_infos = [
            (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
            for n in self.input_names
        ]
        self.attributes = [a for a in ATTRIBUTES if a in source]

    def cpp_source(self, inputs, output_dtypes, template) -> Tuple[str, str, list]:
        """The kernel source MLX would compile, the C++ translation unit that runs it, and the
        kernel's parameters (see :func:`parameters`)."""
        func, template_def = kernel_name(self.name, inputs, output_dtypes, template)
        params = parameters(self.input_names, inputs, self.shape_infos, self.output_names,
                            output_dtypes, self.attributes, self.atomic_outputs)
        metal = write_signature(func, self.header, self.source, template, params)
        if template:
            inst = func + template_def
            metal += f'\ntemplate [[host_name("{func}")]] [[kernel]] decltype({inst}) {inst};\n'
        args = [p[1] for p in params]
        cpp = (
            '#include "metal_prelude.h"\n'
            "static void** emu_buffers;\n"
            '#line 1 "kernel.metal"\n'
            + rewrite_threadgroup(metal)
            + '\n#line 1 "emulator_driver.cpp"\n'
            + f"static void emu_entry() {{\n  {func}{template_def}(\n    "
            + ",\n    ".join(args)
            + ");\n}\n"
            + "EMU_EXPORT int emu_launch(void** buffers, const int64_t* config,\n"
            + "                          const int64_t* ranges, int n_ranges, char* message,\n"
            + "                          int size, void** fault) {\n"
            + "  emu_buffers = buffers;\n"
            + "  return emu::launch(emu_entry, config, ranges, n_ranges, message, size, fault);\n"
            + "}\n"
        )
        return metal, cpp, params

    def __call__(
        self,
        *,
        inputs: Sequence[Union[mx.array, np.ndarray, int, float, bool]],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: Tuple[int, int, int],
        threadgroup: Tuple[int, int, int],
        template: Optional[Sequence[tuple]] = None,
        init_value: Optional[float] = None,
        verbose: bool = False,
        stream=None,
    ) -> List[mx.array]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected {len(self.input_names)} inputs")
        n_outputs = len(self.output_names)
        if len(output_shapes) != n_outputs or len(output_dtypes) != n_outputs:
            raise ValueError(f"[metal_kernel] Expected {n_outputs} output shapes and dtypes")
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        mx.eval(inputs)
        metal, cpp, params = self.cpp_source(inputs, output_dtypes, template or [])
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{metal}\n```")
        hosts = [_host(x) for x in inputs]
        if self.ensure_row_contiguous:
            hosts = [np.ascontiguousarray(x) for x in hosts]
        # The buffers in parameter order: (name, bytes, offset of element 0, output index or
        # None, whether it is an input or output, which get guard pages).
        operands = []
        for _, _, holds in params:
            if holds is None:
                continue
            kind, k = holds
            if kind == "input":
                operands.append((f"input '{self.input_names[k]}'", *_span(hosts[k]), None, True))
            elif kind == "output":
                data = _output_bytes(output_shapes[k], output_dtypes[k], init_value)
                operands.append((f"output '{self.output_names[k]}'", data, 0, k, True))
            else:
                host = hosts[k]
                values = {
                    "shape": np.array(host.shape, np.int32),
                    "strides": np.array([s // host.itemsize for s in host.strides], np.int64),
                    "ndim": np.array([host.ndim], np.int32),
                }[kind]
                operands.append((f"{self.input_names[k]}_{kind}", values.view(np.uint8), 0, None,
                                 False))
        config = [*grid, *threadgroup, int(self.shuffle), self.seed, TIMEOUT_S,
                  int(self.mode == "check")]
        run = self._run_harness if self.mode == "sanitize" else self._run_in_process
        results = run(cpp, operands, config)
        if self.launches is not None:
            self.launches.append(self.name)
        return [
            self._to_mlx(results[k], shape, dtype)
            for k, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes))
        ]

    def _run_in_process(self, cpp: str, operands, config) -> List[np.ndarray]:
        """Run in this process, each input and output in a guarded buffer; the outputs' bytes."""
        lib = _library(cpp, self.mode, self.msl)
        buffers: List[_Buffer] = []
        pointers, ranges, outputs = [], [], {}
        try:
            for name, data, offset, output, guarded in operands:
                if guarded:
                    buf = _Buffer(lib, name, data)
                    buffers.append(buf)
                    pointers.append(buf.ptr + offset)
                    ranges += [buf.ptr, buf.nbytes, *buf.extent(), output is not None]
                    if output is not None:
                        outputs[output] = buf
                else:
                    pointers.append(data.ctypes.data)
            message = ctypes.create_string_buffer(512)
            fault = ctypes.c_void_p()
            status = lib.emu_launch((ctypes.c_void_p * len(pointers))(*pointers),
                                    (ctypes.c_int64 * len(config))(*config),
                                    (ctypes.c_int64 * len(ranges))(*ranges), len(buffers),
                                    message, len(message), ctypes.byref(fault))
            if status:
                text = message.value.decode()
                if status == 1:
                    where = [b.describe(fault.value or 0) for b in buffers]
                    where = [w for w in where if w]
                    text = (f"out-of-bounds access: {where[0]}" if where
                            else text + " (a wild pointer or a stack overflow)")
                names = [b.name for b in buffers]
                text = re.sub(r"\{buffer (\d+)\}", lambda m: names[int(m.group(1))], text)
                raise EmulatorError(f"[{self.name}] {text}")
            return [outputs[k].view().copy() for k in sorted(outputs)]
        finally:
            for b in buffers:
                b.free()

    def _run_harness(self, cpp: str, operands, config) -> List[np.ndarray]:
        """Run the sanitizer harness executable in a child process; the outputs' bytes."""
        exe = _build(cpp, self.mode, self.msl)
        with tempfile.TemporaryDirectory() as tmp:
            request, reply = Path(tmp) / "in", Path(tmp) / "out"
            with open(request, "wb") as f:
                f.write(np.array([len(operands), *config], np.int64).tobytes())
                for _, data, offset, output, _ in operands:
                    f.write(np.array([data.nbytes, offset, output is not None], np.int64).tobytes())
                    f.write(data.tobytes())
            env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
                       UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
            env.pop("LD_PRELOAD", None)
            result = subprocess.run([str(exe), str(request), str(reply)], capture_output=True,
                                    text=True, env=env, timeout=TIMEOUT_S + 60)
            if result.returncode or re.search(r"Sanitizer|ASan|runtime error", result.stderr):
                lines = result.stderr.splitlines()
                report = [line for line in lines if re.search(
                    r"^emulator: |ERROR: AddressSanitizer|WARNING: ASan|runtime error:|^SUMMARY:|"
                    r"^\s+#\d+ .*kernel\.metal",
                    line)]
                raise EmulatorError(f"[{self.name}] {self.mode}: " + "\n".join(
                    line.removeprefix("emulator: ") for line in (report or lines[-20:])))
            data = np.fromfile(reply, np.uint8)
        sizes = [data.nbytes for _, data, _, output, _ in operands if output is not None]
        return np.split(data, np.cumsum(sizes)[:-1])

    @staticmethod
    def _to_mlx(data: np.ndarray, shape, dtype: mx.Dtype) -> mx.array:
        array = mx.array(data.view(DTYPES[dtype][1]).reshape(shape))
        return array.view(mx.bfloat16) if dtype == mx.bfloat16 else array


def default_mode() -> str:
    """The emulator mode of kernels made without one: ``FLASHHEAD_EMULATOR_MODE`` (one of
    :data:`MODES`), else ``"fast"``."""
    mode = os.environ.get("FLASHHEAD_EMULATOR_MODE", "fast")
    if mode not in MODES:
        raise ValueError(f"FLASHHEAD_EMULATOR_MODE must be one of {MODES}, got {mode!r}")
    return mode


def metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    compile_options: Optional[dict] = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    mode: Optional[str] = None,
    msl: str = "3.2",
    launches: Optional[List[str]] = None,
) -> EmulatedKernel:
    """A drop-in for ``mx.fast.metal_kernel`` that runs on the CPU.

    Args:
        shuffle (bool): run threadgroups (up to 4 at once, interleaved) and the threads of each
            threadgroup in a random order (a race check). Default: ``False`` (in order of index).
        seed (int): seed of the random order. Default: ``0``.
        mode (str, optional): one of :data:`MODES`. Default: :func:`default_mode`.
        msl (str): the Metal Shading Language version, ``"3.1"`` (MLX on macOS 14) or ``"3.2"``.
            Default: ``"3.2"``.
        launches (list, optional): the kernel's name is appended at each launch.
    """
    return EmulatedKernel(name, input_names, output_names, source, header,
                          ensure_row_contiguous, atomic_outputs, shuffle, seed,
                          mode or default_mode(), msl, launches)


@contextlib.contextmanager
def emulate(shuffle: bool = False, seed: int = 0, mode: Optional[str] = None,
            msl: str = "3.2") -> Iterator[List[str]]:
    """Within the block, ``mx.fast.metal_kernel`` makes emulated kernels (with these options,
    see :func:`metal_kernel`) and ``mx.metal.is_available()`` is true, so code that chooses its
    Metal path runs it here. Yields the list of the names of the kernels launched."""
    launches: List[str] = []

    def factory(*args, **kwargs):
        return metal_kernel(*args, shuffle=shuffle, seed=seed, mode=mode, msl=msl,
                            launches=launches, **kwargs)

    saved = mx.fast.metal_kernel, mx.metal.is_available
    mx.fast.metal_kernel, mx.metal.is_available = factory, lambda: True
    try:
        yield launches
    finally:
        mx.fast.metal_kernel, mx.metal.is_available = saved
