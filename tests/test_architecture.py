"""The package's layers run one way: every import (top-level or inside a function) goes to the same
or a lower layer, the kernels import nothing of cachequant, and there is no import cycle."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cachequant"

# lowest first; a module belongs to the first layer one of whose prefixes it starts with
LAYERS = [
    ("cachequant.kernels",),
    ("cachequant.errors", "cachequant.config", "cachequant.plan", "cachequant.utils", "cachequant.version"),
    ("cachequant.pipecall", "cachequant.runtime", "cachequant.distributed"),
    ("cachequant.cache", "cachequant.quant", "cachequant.correction"),
    ("cachequant.backends", "cachequant.models"),
    ("cachequant.session",),
    ("cachequant.calibration", "cachequant.api"),
    ("cachequant.metrics", "cachequant.search", "cachequant.zoo", "cachequant.cli", "cachequant.__main__",
     "cachequant"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _layer(name: str) -> int:
    if name == "cachequant":  # the package's public face sits on top
        return len(LAYERS) - 1
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes if p != "cachequant"):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The cachequant modules ``name`` imports (resolved to modules, not attributes)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = name.split(".")
            if node.level:
                parts = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("cachequant"):
                found.add(t)
    return found


def test_imports_run_down_the_layers_and_kernels_are_leaves():
    modules = _modules()
    upward = []
    for name, path in sorted(modules.items()):
        for target in _imports(name, path, modules):
            if name.startswith("cachequant.kernels") and not target.startswith("cachequant.kernels"):
                upward.append(f"{name} -> {target} (kernels import nothing of cachequant)")
            elif _layer(target) > _layer(name):
                upward.append(f"{name} (layer {_layer(name)}) -> {target} (layer {_layer(target)})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    modules = _modules()
    edges = {n: _imports(n, p, modules) for n, p in modules.items()}
    # a cycle is an edge whose target reaches back to its source
    for src, targets in edges.items():
        for dst in targets:
            seen, stack = set(), [dst]
            while stack:
                cur = stack.pop()
                if cur == src:
                    raise AssertionError(f"import cycle through {src} -> {dst}")
                if cur not in seen:
                    seen.add(cur)
                    stack.extend(edges.get(cur, ()))
