"""The package's layout: modules import downward only (runtime < library < commands), with no
import cycle even through imports inside functions, and each module imports on its own in a
fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flashhead_mlx"

# The commands: one per ``flashhead-mlx`` subcommand, plus the dispatcher. Nothing imports them.
COMMANDS = {
    "cli", "convert", "demo", "generate_command", "server", "upload", "import_assets", "evaluate",
    "tune", "bench", "doctor",
}
# The offline pipeline and the measurements: libraries the commands call.
LIBRARY = {
    "pipeline", "containment", "metrics", "calibration", "hub", "arguments", "gguf", "suite",
    "mlx_lm_commands", "calibration_mix", "speed",
}
# What a FlashHead needs at run time: it knows nothing of the pipeline or the commands. The
# loader clusters on the fly through the pipeline (``load(flashhead={"convert": True})``).
RUNTIME_EXCEPTIONS = {("loading", "pipeline")}


def module_files() -> dict:
    """Every module's dotted name (relative to the package; ``__init__`` for the package itself)
    and file, ``testing`` excepted."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] != "testing":
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"] = path
    return files


def module_names() -> list:
    return list(module_files())


def imported_modules(name: str) -> set:
    """The package modules ``name`` imports anywhere in its source (functions included)."""
    files = module_files()
    path = files[name]
    package = list(path.relative_to(PACKAGE).parts[:-1])
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".") if node.module else []
            if node.level:
                base = package[: len(package) - node.level + 1] + module
            elif module[0] == "flashhead_mlx":
                base = module[1:]
            else:
                continue
            for alias in node.names:  # ``from .x import y``: the module x.y, or a name in x
                submodule = ".".join([*base, alias.name])
                targets.add(submodule if submodule in files else ".".join(base) or "__init__")
        elif isinstance(node, ast.Import):
            targets |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("flashhead_mlx.")}
    return {t for t in targets if t in files and t != name}


def import_graph() -> dict:
    return {name: imported_modules(name) for name in module_names()}


def find_cycle(graph: dict):
    """A cycle of ``graph`` as a list of modules, or ``None``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer(name: str) -> int:
    top = name.split(".")[0]
    return 2 if top in COMMANDS else 1 if top in LIBRARY else 0


def test_the_graph_sees_imports_inside_functions():
    """The checker itself: a function-level relative import and an absolute one are edges."""
    assert "pipeline" in imported_modules("loading")
    assert {"head", "decode"} <= import_graph()["__init__"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    graph.pop("__init__")  # the package's front door imports its public names; nothing imports it
    for edges in graph.values():
        edges.discard("__init__")
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_modules_import_downward_only():
    wrong = []
    for name, edges in import_graph().items():
        if name in ("__init__", "cli"):
            continue
        for target in edges:
            if target == "__init__" or (name, target) in RUNTIME_EXCEPTIONS:
                continue
            if layer(target) > layer(name) or (layer(name) == 2 and layer(target) == 2):
                wrong.append(f"{name} -> {target}")
    assert not wrong, f"upward or command-to-command imports: {wrong}"


@pytest.mark.parametrize("name", [n for n in module_names() if n != "__init__"])
def test_each_module_imports_in_a_fresh_interpreter(name):
    result = subprocess.run(
        [sys.executable, "-c", f"import flashhead_mlx.{name}"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
