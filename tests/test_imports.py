"""The package imports cleanly: no load-time import cycle between its modules, every public module
imports on its own in a fresh interpreter, and the core for toy LMs does not import transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ppl_lm
import ppl_lm.inference

ROOTS = {"ppl_lm": Path(ppl_lm.__file__).parent, "ppl_lm.inference": Path(ppl_lm.inference.__path__[0])}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in ROOTS.items():
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).with_suffix("")
            if pkg == "ppl_lm" and rel.parts[0] in ("inference", "models"):
                continue  # ppl_lm.inference maps to inference/ (its own root); models are scripts
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def load_time_imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports at load time (module level, not inside functions;
    ``if TYPE_CHECKING`` blocks excluded). Importing ``a.b`` imports ``a`` first."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        tree = ast.parse(path.read_text())

        def visit(body):
            for node in body:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                if isinstance(node, (ast.If, ast.Try, ast.With)):
                    for field in ("body", "orelse", "finalbody", "handlers"):
                        for sub in getattr(node, field, []):
                            visit(sub.body if isinstance(sub, ast.ExceptHandler) else [sub])
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    target = _resolve(name, is_pkg, node)
                    deps.add(target)
                    deps.update(f"{target}.{a.name}" for a in node.names)

        visit(tree.body)
        known = set()
        for d in deps:
            while d:
                if d in modules and d != name:
                    known.add(d)
                d = d.rpartition(".")[0]
        graph[name] = {d for d in known if not name.startswith(d + ".")}  # a package's parents load first
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_no_load_time_import_cycle():
    cycle = find_cycle(load_time_imports(_modules()))
    assert cycle is None, "load-time import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


PUBLIC = sorted(m for m in _modules() if not any(p.startswith("_") for p in m.split(".")) and "TEMPLATE" not in m)


def test_every_public_module_imports_alone_in_a_fresh_interpreter():
    code = ("import importlib, sys\nbad = []\n"
            f"for m in {PUBLIC!r}:\n"
            "    for k in [k for k in sys.modules if k.startswith('ppl_lm')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_the_core_for_toy_lms_does_not_import_transformers():
    code = ("import sys, torch, pyro, ppl_lm\n"
            "lm = ppl_lm.MarkovLM.random(4, eos_id=0, seed=0)\n"
            "def model():\n    x = pyro.sample('x', lm.sequence([], max_new_tokens=2))\n"
            "ppl_lm.infer(model, method='exact')\n"
            "print('transformers' in sys.modules, 'peft' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], out.stdout


@pytest.mark.parametrize("name", ["ppl_lm.posterior", "ppl_lm.distribution", "ppl_lm.diagnostics"])
def test_named_modules_are_in_the_graph(name):
    assert name in load_time_imports(_modules())
