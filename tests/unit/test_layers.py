"""The builder's layers, read from its source with `ast`: stages build only on the shared layer, and the
shared layer builds on neither stages nor composers. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BUILDER = Path(__file__).resolve().parents[2] / "builder"
STAGES = {"train", "prune", "quantize", "qat", "export", "engine", "evaluate", "publish", "rollout", "degrade"}
COMPOSERS = {"build", "cli", "report", "tune", "gpu_check", "__main__"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(BUILDER).with_suffix("").parts)


def builder_imports(path: Path) -> set[str]:
    """The top-level builder modules `path` imports, anywhere in the file."""
    package = _module_name(path).split(".")[:-1]  # the module's own package, below builder
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
            found.update(parts[1] for parts in names if parts[0] == "builder" and len(parts) > 1)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "builder":
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.add(parts[0])
            else:  # `from . import x`: each name is a module of the package
                found.update(alias.name for alias in node.names)
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(BUILDER.rglob("*.py")) if p.name != "__init__.py"}


def test_the_layers_are_all_present() -> None:
    names = {name.split(".")[0] for name in _modules()}
    assert STAGES | COMPOSERS <= names
    assert {"errors", "checkpoint", "onnx_meta", "transforms", "loop"} <= names


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_imports_respect_the_layers(module: str) -> None:
    top = module.split(".")[0]
    if top in COMPOSERS:
        return  # composers may import anything
    imported = builder_imports(_modules()[module]) - {top}
    kind = "stage" if top in STAGES else "shared module"
    # A stage builds on the shared layer only; the shared layer on nothing above it.
    assert not imported & (STAGES | COMPOSERS), f"{kind} {module} imports {sorted(imported & (STAGES | COMPOSERS))}"


def test_no_two_builder_modules_import_each_other_in_a_cycle() -> None:
    graph = {name.split(".")[0]: set() for name in _modules()}
    for name, path in _modules().items():
        graph[name.split(".")[0]] |= builder_imports(path) & set(graph) - {name.split(".")[0]}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node) :] + [node]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_the_import_reader_sees_function_level_imports(tmp_path: Path) -> None:
    source = tmp_path / "builder" / "sample.py"
    source.parent.mkdir()
    source.write_text("from .errors import X\n\ndef f():\n    from .train import train\n    import builder.qat\n")
    global BUILDER
    saved, BUILDER = BUILDER, tmp_path / "builder"
    try:
        assert builder_imports(source) == {"errors", "train", "qat"}
    finally:
        BUILDER = saved
