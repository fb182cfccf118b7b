"""The package's layering contract (docs/architecture.md), checked on the source text.

Every `import` counts, including those inside functions (lazy imports) and under `TYPE_CHECKING`: a layer
may import only itself and the layers below it, and no two modules may import each other, directly or
through others. import-linter's `layers` contract says the same; this test needs no extra tool.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
PACKAGE = SRC / "lmcompress"

# lowest first; a module may import from its own layer and any layer listed before it
LAYERS = [
    "lmcompress.errors",
    "lmcompress.core",
    "lmcompress.tasks",
    "lmcompress.kernels",
    "lmcompress.layers",
    "lmcompress.calibration",
    "lmcompress.io",
    "lmcompress.evaluation",
    "lmcompress.training",
    "lmcompress.methods",
    "lmcompress.engine",
    "lmcompress.entrypoints",
    "lmcompress.sweep",
    "lmcompress.auto",
    "lmcompress.cli",
]
# the package root only maps public names to modules (lazily, by string); it is above every layer
TOP = {"lmcompress"}
MAX_TOP_LEVEL_MODULES = 5


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every lmcompress module `name` imports, anywhere in its body (a `from X import y` where y is a
    submodule counts as importing the submodule)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("lmcompress") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(name: str) -> int | None:
    for index, prefix in enumerate(LAYERS):
        if name == prefix or name.startswith(prefix + "."):
            return index
    return None


def test_every_module_belongs_to_a_layer():
    orphans = [m for m in _modules() if m not in TOP and _layer(m) is None]
    assert not orphans, f"modules outside every layer (add them to a package, or a layer here): {orphans}"


def test_no_layer_imports_a_layer_above_it():
    upward = [f"{importer} -> {imported}" for importer, targets in _graph().items() if importer not in TOP
              for imported in targets if imported not in TOP and _layer(imported) > _layer(importer)]
    assert not upward, "imports that go up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_few_modules_at_the_top_of_the_package():
    top = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_the_contract_sees_lazy_imports(tmp_path):
    """The checker counts an import inside a function: the kind of import that hid the old cycles."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from lmcompress.cli import main\n")
    assert _imports("lmcompress.core.x", path, {"lmcompress.cli", "lmcompress.core.x"}) == {"lmcompress.cli"}


def test_layer_order_is_documented():
    """docs/architecture.md names every layer of this contract."""
    text = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    missing = [layer for layer in LAYERS if f"`{layer.split('.', 1)[1]}" not in text]
    assert not missing, missing
