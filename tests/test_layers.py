"""The house's floors: imports point down, and no module imports itself back through a cycle.

Floors, bottom to top: the core (``speckv_env`` without ``speckv_env.app``), ``replay``,
``agents``, the application layer ``speckv_env.app``. Every import counts, including the ones
inside functions (they are how a cycle hides).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("speckv_env", "replay", "agents")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _floor(module: str) -> int:
    if module == "speckv_env.app" or module.startswith("speckv_env.app."):
        return 3
    return {"speckv_env": 0, "replay": 1, "agents": 2}[module.split(".")[0]]


def _imports(path: Path, module: str) -> set[str]:
    """Project modules imported anywhere in ``path`` (absolute names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in PACKAGES:
                out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        for n in _imports(path, mod):
            # "from pkg import name" names a module only when that module exists
            while n and n not in files:
                n = n.rpartition(".")[0]
            if n and n != mod:
                deps.add(n)
        graph[mod] = deps
    return graph


def test_imports_point_down():
    wrong = [
        f"{mod} (floor {_floor(mod)}) imports {dep} (floor {_floor(dep)})"
        for mod, deps in _graph().items()
        for dep in deps
        if _floor(dep) > _floor(mod)
    ]
    assert not wrong, "imports that point up:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages export: not a cycle edge
    edges = {m: {d for d in deps if not m or not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The floor test can fail: a core module importing the app layer is reported."""
    p = ROOT / "speckv_env" / "_layer_probe.py"
    assert not p.exists()
    p.write_text("def f():\n    from .app import cli\n")
    try:
        graph = _graph()
        assert "speckv_env.app.cli" in graph["speckv_env._layer_probe"]
        assert _floor("speckv_env.app.cli") > _floor("speckv_env._layer_probe")
    finally:
        p.unlink()
