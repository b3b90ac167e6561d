"""The package's layering and shape, enforced (see docs/architecture.md).

import-linter checks the layers declared in pyproject.toml; the rest is read from the
source with ``ast``: no module uses another module's underscore names, no import cycles
(imports inside functions count), deferred imports say why, functions stay short, and
production code holds no private Ray APIs or test-only fault injection.
"""

from __future__ import annotations

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "pipeline"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path):
    """Yields (node, target module, imported names) for each import of a package module."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "pipeline":
                    yield node, a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "pipeline":
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in MODULES:
                    yield node, full, []
                else:
                    yield node, base, [a.name]


def test_import_linter_layers():
    exe = shutil.which("lint-imports") or str(pathlib.Path(sys.executable).parent / "lint-imports")
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_no_module_uses_another_modules_private_names():
    found = []
    for name, path in MODULES.items():
        aliases = {}
        for node, target, names in _imports(name, path):
            if target == name:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}.{n}")
            if not names:
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[-1]] = target
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != name
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_no_import_cycles():
    edges = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for _, target, _names in _imports(name, path):
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != name and not name.startswith(target + "."):
                edges[name].add(target)
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in edges[m]:
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles[:5]


def test_deferred_imports_say_why():
    """Imports belong at the top of a module; one inside a function carries a comment."""
    found = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        text = lines[inner.lineno - 1] + " " + lines[inner.lineno - 2]
                        if "#" not in text:
                            found.append(f"{path.relative_to(ROOT)}:{inner.lineno} {lines[inner.lineno - 1].strip()}")
    assert not found, "\n".join(sorted(set(found)))


def test_functions_are_short():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("pattern", [r"ray\._private", r"ray\._raylet", r"_connect_and_get_accessor",
                                     r"PyThreadState_SetAsyncExc", r"\bctypes\b", r"os\._exit\("])
def test_no_private_ray_apis_or_fault_injection(pattern):
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in MODULES.values()
            for i, line in enumerate(p.read_text().splitlines()) if re.search(pattern, line)]
    assert not hits, hits
