"""The packages' shape: layers that import only from the layers below them, and no import
circle. Every import counts, also those inside functions (they run too), read with `ast`.

featurize:  settings, errors, atomic -> data -> models, reporting -> runtimes -> cache ->
            engines -> jobs -> api, cli, estimators, vggface, datasets (the public modules)
classify:   everything of featurize -> _heads, _report, _data, _openset -> _options ->
            _runs -> _predict, _train, _search, _html -> _verify, _finetune -> _api -> cli, _serve
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featurize", "classify")

# Each entry: the modules (and packages, with everything in them) of one layer, bottom first.
LAYERS = [
    ("featurize.settings", "featurize.errors", "featurize.atomic", "featurize._moved"),
    ("featurize.data",),
    ("featurize.models", "featurize.reporting"),
    ("featurize.runtimes",),
    ("featurize.cache",),
    ("featurize.engines",),
    ("featurize.jobs",),
    ("featurize.api", "featurize.cli", "featurize.estimators", "featurize.vggface",
     "featurize.datasets", "featurize.__main__", "featurize"),
    ("classify._heads", "classify._report", "classify._data", "classify._openset"),
    ("classify._options",),
    ("classify._runs",),
    ("classify._predict", "classify._train", "classify._search", "classify._html"),
    ("classify._verify", "classify._finetune"),
    ("classify._api",),
    ("classify.cli", "classify._serve", "classify.__main__", "classify"),
]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str, known) -> str | None:
    """The module of ours that `name` (a module, or a name in one) is, or lives in."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, module: str, known) -> set[str]:
    """The modules of ours that the file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(filter(None, (_owner(a.name, known) for a in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else _owner(base, known))
    out.discard(None)
    out.discard(module)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, m, known) for m, p in known.items()}


def layer(module: str) -> int:
    """The layer of `module`: the layer whose entry is its longest prefix."""
    best = None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                if best is None or len(entry) > best[1]:
                    best = (i, len(entry))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                  for m, deps in edges.items() for d in deps if layer(d) > layer(m))


def test_every_module_is_in_a_layer():
    for module in modules():
        layer(module)


def test_no_module_imports_from_a_layer_above_it():
    assert upward(graph()) == []


def test_no_import_circle():
    assert cycles(graph()) == []


def test_the_checks_find_a_circle_and_an_upward_import():
    edges = {"featurize.data.images": {"featurize.cache"}, "featurize.cache": {"featurize.data.images"},
             "featurize.settings": set()}
    assert cycles(edges) == [["featurize.cache", "featurize.data.images"]]
    assert upward(edges) == ["featurize.data.images (layer 1) imports featurize.cache (layer 4)"]


def test_imports_are_read_anywhere_in_a_file(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ..cache import schema\n    import featurize.jobs.run\n")
    known = {"featurize.cache", "featurize.cache.schema", "featurize.jobs.run", "featurize.data.mod"}
    assert imports(source, "featurize.data.mod", known) == {"featurize.cache.schema",
                                                            "featurize.jobs.run"}


@pytest.mark.parametrize("old, name", [("featurize.extractor", "EmbeddingSettings"),
                                       ("featurize.run", "featurize"),
                                       ("featurize.images", "list_dataset"),
                                       ("classify.runs", "Run")])
def test_old_module_paths_still_import_with_a_deprecation_warning(old, name):
    import subprocess
    import sys
    code = (f"import warnings, featurize, classify\nwarnings.simplefilter('error')\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print('warned', w)\n"
            f"warnings.simplefilter('ignore')\nimport {old} as m\nprint(callable(m.{name}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"warned {old} is deprecated") and lines[-1] == "True"
