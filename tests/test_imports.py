"""The package's modules import each other without a cycle, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "gpt2_jax"


def _module_of(path: Path) -> str:
    return "gpt2_jax" if path.name == "__init__.py" else f"gpt2_jax.{path.stem}"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (top level or inside functions)."""
    modules = {_module_of(p) for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "gpt2_jax":  # `from gpt2_jax import x`: a submodule, else the package
                    edges |= {f"gpt2_jax.{a.name}" if f"gpt2_jax.{a.name}" in modules else "gpt2_jax"
                              for a in node.names}
                elif node.module in modules:
                    edges.add(node.module)
        graph[_module_of(path)] = edges - {_module_of(path)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"gpt2_jax.model", "gpt2_jax.steps", "gpt2_jax.loop"} <= set(graph)
    assert "gpt2_jax.model" in graph["gpt2_jax.rundir"]  # the walk sees imports (and function-local ones)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_function_local_cycle(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from gpt2_jax.b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from gpt2_jax import a\n")
    (tmp_path / "c.py").write_text("import gpt2_jax.a\n")
    assert find_cycle(import_graph(tmp_path)) == ["gpt2_jax.a", "gpt2_jax.b", "gpt2_jax.a"]


def test_help_and_the_tokenizer_do_not_start_jax():
    # `gpt2-jax --help` and the encoder (its parallel workers import it) stay quick: no JAX imported.
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom gpt2_jax.cli import main\nimport gpt2_jax.encoder\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr[-2000:]


def test_launch_list_does_not_start_jax():
    # `python launch.py --list` loads every experiment file: none of them imports JAX at its top.
    import subprocess
    import sys

    code = ("import sys, launch\nprint(len(launch.list_experiments().splitlines()))\n"
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and int(lines[0]) > 10 and lines[-1] == "[]", done.stdout + done.stderr[-2000:]
