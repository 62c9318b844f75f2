"""A griffe extension for the API reference: the public names that `featurize` and `classify`
load on first use (a module-level `__getattr__`) become aliases of the objects that define
them, so mkdocstrings documents `featurize.Embedder` or `classify.train` by reading the source,
without importing the packages (nor Keras, nor the `python -m` entry points).

Where each name lives is read from the package's own `__init__.py`: its `_EXPORTS` mapping
(public name -> submodule, relative to the package), built by the top-level statements that
assign or update `_EXPORTS` (evaluated on their own, with nothing imported). Subfolders without
an `__init__.py` (namespace packages) are read too, so that their modules can be targets.
"""

from __future__ import annotations

import ast
from pathlib import Path

import griffe

PACKAGES = ("featurize", "classify")
TABLE = "_EXPORTS"


def _is_table(node) -> bool:
    return isinstance(node, ast.Name) and node.id == TABLE


def _touches_table(node: ast.stmt) -> bool:
    """`_EXPORTS = ...`, `_EXPORTS[...] = ...` or `_EXPORTS.update(...)` at the top level."""
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(_is_table(t) or (isinstance(t, ast.Subscript) and _is_table(t.value))
                   for t in targets)
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func = node.value.func
        return isinstance(func, ast.Attribute) and _is_table(func.value)
    return False


def exports(init_source: str) -> dict[str, str]:
    tree = ast.parse(init_source)
    body = [node for node in tree.body if _touches_table(node)]
    namespace: dict = {}
    code = compile(ast.Module(body=body, type_ignores=[]), "<exports>", "exec")
    exec(code, {"__builtins__": {"dict": dict, "tuple": tuple, "list": list}}, namespace)
    return dict(namespace.get(TABLE, {}))


def _load_namespace_folders(module: griffe.Module, folder: Path, loader: griffe.GriffeLoader):
    """Read the subfolders of `folder` that hold modules but no __init__.py."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name in module.members or (sub / "__init__.py").exists():
            continue
        files = sorted(sub.glob("*.py"))
        if not files and not any(p.is_dir() for p in sub.iterdir()):
            continue
        child = griffe.Module(sub.name, filepath=[sub], parent=module)
        module.set_member(sub.name, child)
        for path in files:
            child.set_member(path.stem, griffe.visit(
                path.stem, path, path.read_text(), parent=child,
                docstring_parser=loader.docstring_parser,
                docstring_options=loader.docstring_options))
        _load_namespace_folders(child, sub, loader)


class LazyExports(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name not in PACKAGES or not isinstance(pkg.filepath, Path):
            return
        _load_namespace_folders(pkg, pkg.filepath.parent, loader)
        for name, module in exports(pkg.filepath.read_text()).items():
            target = f"{pkg.name}.{module.lstrip('.')}.{name}"
            pkg.set_member(name, griffe.Alias(name, target, parent=pkg))
