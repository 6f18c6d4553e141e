"""No module global of llmopt is assigned from outside its module (issue 13, point 2).

Benchmarks and tests choose kernels, arithmetic and fallbacks through options
and arguments, never by overwriting a module's global: such a swap leaks into
every later caller in the process and hides which choice a graph was compiled
with. This reads every file of ``llmopt/``, ``tests/``, ``bench/`` and
``examples/`` with :mod:`ast` and fails on any of these aimed at an llmopt
module (``m`` below is a name bound to one by an import, or an attribute path
such as ``llmopt.models``), from a file that is not that module:

* ``m.NAME = ...`` (also augmented and annotated assignments, ``del m.NAME``);
* ``setattr(m, "NAME", ...)`` / ``delattr(m, "NAME")``;
* ``monkeypatch.setattr(m, "NAME", ...)``, ``monkeypatch.setattr("llmopt.x.NAME", ...)``
  (and ``delattr``), ``mock.patch("llmopt.x.NAME")``, ``mock.patch.object(m, "NAME")``.

Attributes of classes and instances are not module globals and are not checked.
"""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("llmopt", "tests", "bench", "examples")


def _llmopt_modules() -> set[str]:
    names = set()
    for path in (REPO / "llmopt").rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.add(".".join(parts))
    return names


MODULES = _llmopt_modules()

# (file relative to the repository, module, attribute) that may stay, each with its reason.
ALLOWED: dict[tuple[str, str, str], str] = {  # nothing may stay today
}


def _own_module(path: pathlib.Path) -> str | None:
    rel = path.relative_to(REPO)
    if rel.parts[0] != "llmopt":
        return None
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _bindings(tree: ast.AST, package: str | None) -> dict[str, str]:
    """Names bound to llmopt modules anywhere in the file (module, function and class scopes)."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "llmopt" or alias.name.startswith("llmopt."):
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound["llmopt"] = "llmopt"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and package:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            if not (base == "llmopt" or base.startswith("llmopt.")):
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    return bound


def _module_of(expr: ast.expr, bound: dict[str, str]) -> str | None:
    """The llmopt module ``expr`` names (a bound name, or an attribute path from one)."""
    if isinstance(expr, ast.Name):
        return bound.get(expr.id)
    if isinstance(expr, ast.Attribute):
        parent = _module_of(expr.value, bound)
        if parent is not None and f"{parent}.{expr.attr}" in MODULES:
            return f"{parent}.{expr.attr}"
    return None


def _dotted_target(text: str) -> tuple[str, str] | None:
    """``"llmopt.models.load"`` -> ("llmopt.models", "load"), when the prefix is a module."""
    module, _, attr = text.rpartition(".")
    return (module, attr) if module in MODULES else None


def _const_str(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _findings(path: pathlib.Path, text: str | None = None) -> list[tuple[int, str, str]]:
    """(line, module, attribute) for every assignment to another llmopt module's global in ``path``
    (read from ``text`` when given)."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    own = _own_module(path)
    is_package = path.name == "__init__.py"
    package = own if is_package else (own.rpartition(".")[0] if own else None)
    bound = _bindings(tree, package)
    found: list[tuple[int, str, str]] = []

    def attribute_target(target: ast.expr, line: int) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                attribute_target(element, line)
        elif isinstance(target, ast.Attribute):
            module = _module_of(target.value, bound)
            if module is not None:
                found.append((line, module, target.attr))

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                attribute_target(target, node.lineno)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            attribute_target(node.target, node.lineno)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                attribute_target(target, node.lineno)
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            args = node.args
            name = func.rpartition(".")[2]
            if name in ("setattr", "delattr") and args:
                dotted = _dotted_target(_const_str(args[0]) or "")
                if dotted:  # monkeypatch.setattr("llmopt.x.NAME", value)
                    found.append((node.lineno, *dotted))
                elif len(args) >= 2:
                    module = _module_of(args[0], bound)
                    attr = _const_str(args[1])
                    if module is not None:
                        found.append((node.lineno, module, attr or ast.unparse(args[1])))
            elif func.endswith("patch.object") and len(args) >= 2:
                module = _module_of(args[0], bound)
                if module is not None:
                    found.append((node.lineno, module, _const_str(args[1]) or ast.unparse(args[1])))
            elif (func.endswith("mock.patch") or func == "patch") and args:
                dotted = _dotted_target(_const_str(args[0]) or "")
                if dotted:
                    found.append((node.lineno, *dotted))
    return [(line, module, attr) for line, module, attr in found if module != own]


def _files():
    for top in SCANNED:
        yield from sorted((REPO / top).rglob("*.py"))


def test_the_checker_sees_each_way_of_assigning():
    """The checker itself, on planted code (so a broken checker cannot pass silently)."""
    planted = REPO / "tests" / "planted.py"  # never written: the code is passed as text
    code = (
        "import llmopt\n"
        "import llmopt.kernels.triton_paged as tp\n"
        "from llmopt.kernels import native\n"
        "from unittest import mock\n"
        "def test(monkeypatch):\n"
        "    from llmopt.kernels import quantized_linear as ql\n"
        "    tp.INTERPRET_SPLIT_TOKENS = 32\n"
        "    llmopt.models.load = None\n"
        "    monkeypatch.setattr(native, 'load', None)\n"
        "    monkeypatch.setattr('llmopt.models.load', None)\n"
        "    setattr(ql, '_NATIVE_INT4', [])\n"
        "    mock.patch.object(ql, 'linear_int4')\n"
        "    mock.patch('llmopt.kernels.native.load')\n"
        "    ql.X += 1\n"
        "    obj = object(); obj.load = 1; monkeypatch.setattr(obj, 'load', 2)\n"  # not modules
    )
    got = sorted((module, attr) for _, module, attr in _findings(planted, code))
    # the module itself may assign its own globals
    assert _findings(REPO / "llmopt" / "kernels" / "native" / "__init__.py", "from llmopt.kernels import native\n"
                     "native.load = None\nimport llmopt.models\nllmopt.models.load = None\n") == [
        (4, "llmopt.models", "load")]
    assert got == sorted([
        ("llmopt.kernels.triton_paged", "INTERPRET_SPLIT_TOKENS"), ("llmopt.models", "load"),
        ("llmopt.kernels.native", "load"), ("llmopt.models", "load"),
        ("llmopt.kernels.quantized_linear", "_NATIVE_INT4"), ("llmopt.kernels.quantized_linear", "linear_int4"),
        ("llmopt.kernels.native", "load"), ("llmopt.kernels.quantized_linear", "X"),
    ])


def test_no_llmopt_module_global_is_assigned_from_outside_it():
    found, allowed_seen = [], set()
    for path in _files():
        rel = str(path.relative_to(REPO))
        for line, module, attr in _findings(path):
            if (rel, module, attr) in ALLOWED:
                allowed_seen.add((rel, module, attr))
            else:
                found.append(f"{rel}:{line}: {module}.{attr}")
    # an entry whose assignment is gone goes too, so the list cannot rot
    assert allowed_seen == set(ALLOWED), f"stale allowlist entries: {set(ALLOWED) - allowed_seen}"
    assert not found, ("llmopt module globals assigned from outside their module (pass an option or an "
                       "argument instead):\n  " + "\n  ".join(found))
