"""llmopt's import graph: no cycles, and every import points down the layers.

The graph is read from the source with :mod:`ast` (nothing is imported), so a
late import inside a function counts exactly like one at the top of a module:
a function-level import that closes a cycle is still a cycle, it only hides
it until the function runs.

What counts as an edge, and why:

* every ``import llmopt.x.y`` and ``from llmopt.x import y`` (absolute or
  relative) anywhere in a module, at module level or inside a function or
  class body, resolved to the module it names: ``from llmopt.x import y``
  is an edge to ``llmopt.x.y`` when ``y`` is a submodule, else to ``llmopt.x``;
* explicit import statements only. Importing ``llmopt.x.y`` also runs
  ``llmopt/__init__.py`` and ``llmopt/x/__init__.py``; those implicit
  parent-package imports are not edges (every module would otherwise sit in
  a cycle with the package facade). A package's ``__init__.py`` is a module
  like any other, so its own re-exports are edges from the package;
* imports under ``if TYPE_CHECKING:`` are not run, so they are not edges for
  the cycle check, but they still state a dependency: they must obey the
  layer direction like any other import;
* ``importlib.import_module`` with a computed name (the lazy attributes of
  ``llmopt/__init__.py``) is not seen; only the top-level facade does that.

The layers, lowest first (the same table is in docs/ARCHITECTURE.md): a
module may import from its own layer and the layers below it, never above.
"""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1] / "llmopt"

# (layer name, module prefixes). A module belongs to the layer of the longest
# prefix that names it or a package above it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors (a leaf: imports nothing from llmopt)", ("llmopt.errors",)),
    ("kernels", ("llmopt.kernels",)),
    # backends.tensorrt_settings and passes.paging_options: the tensorrt and paging option
    # groups, which llmopt.config composes (each beside the code it configures)
    ("options and weight transforms", ("llmopt.config", "llmopt.calibration", "llmopt.quantization", "llmopt.pruning",
                                       "llmopt.parallel",  # tensor_parallel option group and collectives
                                       "llmopt.backends.tensorrt_settings", "llmopt.passes.paging_options")),
    ("passes", ("llmopt.passes",)),
    ("rewriter and its lowering targets", ("llmopt.rewriter", "llmopt.backends")),
    ("tools over the compiler", ("llmopt.onnx", "llmopt.quality", "llmopt.training", "llmopt.models")),
    ("runtime", ("llmopt.runtime",)),
    ("entry points", ("llmopt.cli", "llmopt")),  # "llmopt": the package facade, llmopt/__init__.py
]


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    type_checking: bool

    def __str__(self) -> str:
        where = " (TYPE_CHECKING)" if self.type_checking else ""
        return f"{self.source} -> {self.target}  ({_path(self.source)}:{self.line}){where}"


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


MODULES = _modules()


def _path(module: str) -> str:
    return str(MODULES[module][0].relative_to(ROOT.parent))


def _known(name: str) -> str | None:
    """The longest llmopt module that ``name`` is or lies in (an attribute path resolves to its module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, type_checking: bool = False):
    """(node, under TYPE_CHECKING) for every import statement, at any depth."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, type_checking
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), type_checking)
        else:
            yield from _imports(child, type_checking)


def _edges(module: str) -> list[Edge]:
    path, is_package = MODULES[module]
    package = module if is_package else module.rpartition(".")[0]
    edges: dict[tuple[str, int], Edge] = {}
    for node, type_checking in _imports(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                assert base, f"{path}:{node.lineno}: relative import above the llmopt package"
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            for alias in node.names:
                submodule = f"{full}.{alias.name}"
                targets.append(submodule if submodule in MODULES else full)
        for target in targets:
            if target != "llmopt" and not target.startswith("llmopt."):
                continue
            resolved = _known(target)
            assert resolved is not None, f"{path}:{node.lineno}: imports {target}, which is not in llmopt/"
            if resolved != module:
                edges[(resolved, node.lineno)] = Edge(module, resolved, node.lineno, type_checking)
    return list(edges.values())


EDGES = [edge for module in MODULES for edge in _edges(module)]


def _layer(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)"
    return best


def _cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for edge in edges:
        graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _describe(component: list[str], edges: list[Edge]) -> str:
    members = set(component)
    inside = [str(e) for e in edges if e.source in members and e.target in members]
    return f"cycle of {len(component)} modules: " + ", ".join(component) + "\n    " + "\n    ".join(inside)


def test_the_graph_reader_sees_late_relative_and_submodule_imports():
    """The reader itself, on imports known to be in the tree (so a broken reader cannot pass silently)."""
    pairs = {(e.source, e.target) for e in EDGES}
    # module-level, absolute
    assert ("llmopt.rewriter.pipeline", "llmopt.passes.base") in pairs
    # ``from llmopt.kernels import triton_flash`` inside a function: a submodule import
    assert ("llmopt.kernels.attention", "llmopt.kernels.triton_flash") in pairs
    # the facade re-exports
    assert ("llmopt", "llmopt.rewriter.backend") in pairs
    # TYPE_CHECKING imports are marked as such
    typed = [e for e in EDGES if e.type_checking]
    assert ("llmopt.passes.base", "llmopt.config") in {(e.source, e.target) for e in typed}
    # a relative import resolves like an absolute one
    tree = ast.parse("from . import b\nfrom .b import c\nfrom .. import kernels\n")
    assert [type(n).__name__ for n, _ in _imports(tree)] == ["ImportFrom"] * 3
    # the cycle finder finds a planted cycle, and only it
    planted = EDGES + [Edge("llmopt.kernels.attention", "llmopt.cli", 0, False),
                       Edge("llmopt.cli", "llmopt.kernels.attention", 0, False)]
    found = [c for c in _cycles(planted) if "llmopt.cli" in c]
    assert found and "llmopt.kernels.attention" in found[0]


def test_no_import_cycles():
    runtime_edges = [e for e in EDGES if not e.type_checking]
    cycles = _cycles(runtime_edges)
    assert not cycles, "import cycles in llmopt/:\n" + "\n".join(_describe(c, runtime_edges) for c in cycles)


def test_imports_point_down_the_layers():
    upward = [e for e in EDGES if _layer(e.target) > _layer(e.source)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(
        f"  [{LAYERS[_layer(e.source)][0]} -> {LAYERS[_layer(e.target)][0]}] {e}" for e in upward)


def test_the_documented_chain():
    """cli -> runtime -> rewriter -> passes -> kernels, spelled out (the layer table implies it)."""
    order = ["llmopt.kernels", "llmopt.passes", "llmopt.rewriter", "llmopt.runtime", "llmopt.cli"]
    assert [_layer(m) for m in order] == sorted(_layer(m) for m in order)
    assert len({_layer(m) for m in order}) == len(order)
    forbidden = {
        "llmopt.kernels": ("llmopt.passes", "llmopt.rewriter", "llmopt.runtime", "llmopt.cli"),
        "llmopt.passes": ("llmopt.rewriter", "llmopt.runtime", "llmopt.cli"),
        "llmopt.rewriter": ("llmopt.runtime", "llmopt.cli"),
        "llmopt.runtime": ("llmopt.cli",),
    }
    bad = [e for e in EDGES for src, targets in forbidden.items()
           if (e.source + ".").startswith(src + ".")
           and any((e.target + ".").startswith(t + ".") for t in targets)]
    assert not bad, "\n".join(map(str, bad))


def test_errors_is_a_leaf():
    assert not [e for e in EDGES if e.source == "llmopt.errors"]


def test_kernels_import_nothing_above_them():
    bad = [e for e in EDGES if e.source.startswith("llmopt.kernels")
           and not e.target.startswith("llmopt.kernels") and e.target != "llmopt.errors"]
    assert not bad, "kernels/ may import only kernels/ and the leaf llmopt.errors (and torch):\n" + "\n".join(map(str, bad))


# Module-level switches kernels/ may keep: they choose arithmetic, they do not carry a step.
KERNEL_SWITCHES: set = set()  # none: every switch is an op argument, decided when a graph is compiled
STEP_STATE_NAMES = {"PagedStep", "PagedKVCache", "paged_step", "LayerSpec"}


def test_no_per_step_runtime_state_in_kernels():
    """kernels/ holds ops and kernels. A step's published state (the paged
    metadata, the KV caches, the thread-local that carries them) is the
    runtime's: ``llmopt.runtime.paged_context``, which also registers the real
    implementation of ``llmopt::paged_attention_layer`` (kernels/ holds only its
    schema and fake)."""
    found = []
    for module, (path, _) in MODULES.items():
        if not module.startswith("llmopt.kernels"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                    "threading.local", "local", "contextvars.ContextVar", "ContextVar"):
                owner = None
                for assign in ast.walk(tree):
                    if isinstance(assign, ast.Assign) and assign.value is node:
                        owner = ast.unparse(assign.targets[0])
                if (module, owner) not in KERNEL_SWITCHES:
                    found.append(f"{_path(module)}:{node.lineno}: {owner} = {ast.unparse(node)}")
            elif isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in STEP_STATE_NAMES:
                found.append(f"{_path(module)}:{node.lineno}: {node.name}")
    assert not found, "per-step runtime state in kernels/:\n" + "\n".join(found)
    assert "llmopt.kernels.paged_context" not in MODULES
    runtime = ast.parse(MODULES["llmopt.runtime.paged_context"][0].read_text())
    defined = {n.name for n in runtime.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert STEP_STATE_NAMES <= defined
