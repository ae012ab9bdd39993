"""No import circles among jaxllm's modules: every `import` and `from ... import` counts,
those inside functions too (a lazy import only hides a circle); `if TYPE_CHECKING:` ones
do not run, so they do not count."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxllm"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module and package under `package`."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that module `name` (at `path`) imports anywhere in its body,
    `if TYPE_CHECKING:` blocks aside. `from package import name` counts as the submodule
    when there is one; importing `a.b.c` also runs the packages `a.b` and `a`."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    own_packages = {name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)}
    imported = set()
    for target in targets:
        parts = target.split(".")
        for length in range(1, len(parts) + 1):
            module = ".".join(parts[:length])
            if module in modules and module != name and module not in own_packages:
                imported.add(module)
    return imported


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of `graph` (module -> the modules it imports), each as the sorted modules
    of one strongly connected component of two or more (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = lowest[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                lowest[node] = min(lowest[node], lowest[successor])
            elif successor in stack:
                lowest[node] = min(lowest[node], index[successor])
        if lowest[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_lazy_circle_and_skips_type_checking(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.c import x\n")
    (package / "c.py").write_text("import pkg.a\nfrom . import d\n")
    (package / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    modules = module_files(package)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["pkg.c"] == {"pkg.a", "pkg.d"}
    assert graph["pkg.d"] == set()
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_jaxllm_has_no_import_cycles():
    modules = module_files(PACKAGE)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 30 and "jaxllm.hf.tokenizer" in graph["jaxllm.stages.common"]
    assert import_cycles(graph) == []
