"""Size limits on the package code: no function longer than 60 lines, none with more than
8 parameters. A long function or a long parameter list is where bugs hide; split it instead.

Length is `end_lineno - lineno + 1` of the `def` node (the def line counts, decorators do not;
a nested function counts towards its parent too). Parameters are positional-only, ordinary and
keyword-only ones plus one each for `*args` and `**kwargs`, leaving out a leading `self`/`cls`.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featurize", "classify")
MAX_LINES = 60
MAX_PARAMS = 8
# Functions allowed more parameters, and why.
MORE_PARAMS = {
    "EmbeddingTransformer.__init__": "scikit-learn reads an estimator's parameters from its "
                                     "__init__ signature, one keyword each",
}


def _count_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)


def _qualified(tree: ast.AST):
    """Yield (qualified name, function node) for every function and method, nested included."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)
    yield from walk(tree, "")


def offenders(files, base: Path | None = None) -> list[str]:
    """One line per function over a limit: `path:line name: what`."""
    found = []
    for path in sorted(files):
        path = Path(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        shown = path.relative_to(base) if base else path
        for name, fn in _qualified(tree):
            problems = []
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_LINES:
                problems.append(f"{length} lines > {MAX_LINES}")
            n = _count_params(fn)
            if n > MAX_PARAMS and name not in MORE_PARAMS:
                problems.append(f"{n} parameters > {MAX_PARAMS}")
            if problems:
                found.append(f"{shown}:{fn.lineno} {name}: {', '.join(problems)}")
    return found


def _package_files():
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]


def test_package_functions_are_small():
    files = _package_files()
    assert files, f"no .py files found under {PACKAGES} in {ROOT}"
    found = offenders(files, base=ROOT)
    assert not found, (f"{len(found)} function(s) over the size limits "
                       f"({MAX_LINES} lines, {MAX_PARAMS} parameters):\n" + "\n".join(found))


def _write(tmp_path, source: str) -> Path:
    path = tmp_path / "synthetic.py"
    path.write_text(source, encoding="utf-8")
    return path


def _body(n_lines: int) -> str:
    """A function whose def node spans exactly `n_lines` lines, behind a decorator."""
    body = "".join(f"    x{i} = {i}\n" for i in range(n_lines - 1))
    return f"@staticmethod\ndef long_one():\n{body}"


def test_walker_flags_a_61_line_function(tmp_path):
    path = _write(tmp_path, _body(61) + "\n\n" + _body(60).replace("long_one", "just_fits"))
    found = offenders([path], base=tmp_path)
    assert found == [f"synthetic.py:2 long_one: 61 lines > {MAX_LINES}"]


def test_walker_flags_nine_parameters(tmp_path):
    path = _write(tmp_path, (
        "def nine(a, b, /, c, d, *args, e, f, g, **kw):\n    pass\n"
        "def eight(a, b, c, d, e, f, g, h):\n    pass\n"
        "class K:\n"
        "    def method(self, a, b, c, d, e, f, g, h):\n        pass\n"
        "    @classmethod\n"
        "    def build(cls, a, b, c, d, e, f, g, h, i):\n        pass\n"
        "    async def later(self, *, a, b, c, d, e, f, g, h, i):\n        pass\n"
    ))
    found = offenders([path], base=tmp_path)
    assert found == [
        f"synthetic.py:1 nine: 9 parameters > {MAX_PARAMS}",
        f"synthetic.py:9 K.build: 9 parameters > {MAX_PARAMS}",
        f"synthetic.py:11 K.later: 9 parameters > {MAX_PARAMS}",
    ]


@pytest.mark.parametrize("limit_hit", [True, False])
def test_walker_finds_nested_functions(tmp_path, limit_hit):
    params = ", ".join(f"p{i}" for i in range(9 if limit_hit else 8))
    path = _write(tmp_path, f"def outer():\n    def inner({params}):\n        pass\n")
    found = offenders([path], base=tmp_path)
    assert found == ([f"synthetic.py:2 outer.inner: 9 parameters > {MAX_PARAMS}"]
                     if limit_hit else [])
