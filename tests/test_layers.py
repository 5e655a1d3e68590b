"""The package's import graph: no cycles, and no import up the layers the README names.

Every `import` / `from ... import` of a quantscale module counts, at module level or inside a
function (a lazy import is still a dependency). A module may import its own layer and those
below it; `LAYERS` lists them bottom first, by package or module prefix.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "quantscale"

LAYERS: list[tuple[str, ...]] = [
    ("version", "errors", "progress", "cache", "naming", "distributed"),
    ("formats",),
    ("scheme", "qdq"),
    ("observers",),
    ("checkpoint",),
    ("data",),
    ("runtime",),
    ("models",),
    ("eval",),
    ("calibration",),
    ("algorithms",),
    ("export",),
    ("mamba",),
    ("orchestrator", "streaming"),
    ("analysis",),
    ("api",),
    ("commands", "demo", "cli", "__main__", ""),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """quantscale modules (relative names) that the module imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                if not (node.module or "").startswith("quantscale"):
                    continue
                mod = node.module.removeprefix("quantscale").lstrip(".")
            # `from pkg import submodule` depends on the submodule
            subs = [f"{mod}.{a.name}".lstrip(".") for a in node.names]
            out.update([t for t in subs if t in known] or ([mod] if mod in known else []))
            continue
        else:
            continue
        out.update(
            t.removeprefix("quantscale").lstrip(".")
            for t in targets
            if t.split(".")[0] == "quantscale" and t.removeprefix("quantscale").lstrip(".") in known
        )
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(name, path, known) for name, path in mods.items()}


def layer_of(name: str) -> int:
    """Index in LAYERS of the longest matching prefix (package or module)."""
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            hit = name == prefix or name.startswith(prefix + ".")
            if hit and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"quantscale.{name} is in no layer of LAYERS: place it there")
    return best


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    """Modules reachable from `start` by one or more imports."""
    seen: set[str] = set()
    todo = list(g[start])
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(g.get(v, ()))
    return seen


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others."""
    reach = {v: reachable(g, v) for v in g}
    groups = {tuple(sorted(w for w in reach[v] if v in reach[w])) for v in g if v in reach[v]}
    return sorted(list(c) for c in groups)


def test_graph_sees_imports():
    g = graph()
    # a module-level import, a lazy one and a relative-free `from pkg import module`
    assert "scheme" in g["qdq"]
    assert "formats.fp8" in g["qdq"]
    assert "errors" in g["scheme"]
    assert len(g) > 50


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_upward_imports():
    bad = [
        f"quantscale.{a} ({'/'.join(LAYERS[layer_of(a)]) or 'quantscale'}) imports "
        f"quantscale.{b} ({'/'.join(LAYERS[layer_of(b)])})"
        for a, deps in sorted(graph().items())
        for b in sorted(deps)
        if layer_of(b) > layer_of(a)
    ]
    assert not bad, "imports up the layers:\n" + "\n".join(bad)


def test_checker_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_checker_fails_on_a_back_edge():
    # formats importing the orchestrator would be an upward edge
    assert layer_of("orchestrator") > layer_of("formats.fp8")
    assert layer_of("commands.quantize") > layer_of("orchestrator")
    assert layer_of("checkpoint.read") < layer_of("export.base")
