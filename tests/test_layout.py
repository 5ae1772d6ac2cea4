"""The package's layout rules, checked on the code itself: imports between its rooms (top-level
modules and folders) form no cycle and none hides inside a function; every public class and
function says what it is; every setting a recipe can give is described where `--help` reads it."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

import docstring_parser
import pytest

import mitigate

PACKAGE = Path(mitigate.__file__).parent


def modules() -> list[str]:
    """Every module of the package (``__main__`` aside: importing it runs the command)."""
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "mitigate.") if m.name != "mitigate.__main__")


def room(module: str) -> str:
    """mitigate.data.io -> data; mitigate.cli -> cli."""
    return module.split(".")[1]


def internal_imports(tree: ast.AST, module: str, top_level_only: bool) -> list[tuple[str, int]]:
    """The mitigate modules ``tree`` imports, with their lines (at module level only, or all)."""
    found = []
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            if base == "mitigate":
                found += [(f"mitigate.{a.name}", node.lineno) for a in node.names]
            elif base.startswith("mitigate."):
                found.append((base, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("mitigate.")]
    return found


def source(module: str) -> tuple[Path, ast.AST]:
    spec = importlib.util.find_spec(module)
    path = Path(spec.origin)
    return path, ast.parse(path.read_text(encoding="utf-8"))


def test_no_import_hides_inside_a_function():
    hidden = []
    for module in modules():
        path, tree = source(module)
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            hidden += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for name, line in internal_imports(fn, module, False)]
    assert not hidden, "mitigate imports inside functions (move them to the top; a cycle they dodge must be cut):\n" + "\n".join(hidden)


def test_the_rooms_import_each_other_without_a_cycle():
    edges: dict[str, set[str]] = {}
    for module in modules():
        _, tree = source(module)
        for name, _ in internal_imports(tree, module, True):
            if room(name) != room(module):
                edges.setdefault(room(module), set()).add(room(name))
    # depth-first search for a back edge
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, f"rooms import each other in a circle: {' -> '.join(cycle)}"
    # the method rooms (and the commands on top of them) sit above the shared ones, which never import them
    methods = {"attacks", "mitigations", "defenses", "evaluation", "cli", "scan"}
    for shared in set(edges) - methods:
        assert not edges[shared] & methods, f"{shared} imports a method room: {sorted(edges[shared] & methods)}"


def public_objects():
    for module in modules():
        mod = importlib.import_module(module)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{module}.{name}", obj


def test_every_public_class_and_function_has_a_docstring():
    missing = []
    for path, obj in public_objects():
        if not inspect.getdoc(obj) or (inspect.isclass(obj) and obj.__doc__ is None):
            missing.append(path)
        if inspect.isclass(obj):
            bases = [b for b in obj.__mro__[1:] if b is not object]
            for name, member in vars(obj).items():
                if name.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                    continue
                if any(hasattr(b, name) for b in bases):
                    continue  # an override of a framework hook or of a base method: the base documents it
                doc = member.__doc__ if not isinstance(member, property) else member.fget.__doc__
                if not doc:
                    missing.append(f"{path}.{name}")
    assert not missing, f"{len(missing)} public objects without a docstring:\n" + "\n".join(missing)


def configurable_classes():
    """The classes a recipe instantiates: the modules, the data module and its parts, the
    callbacks and the settings objects."""
    from mitigate import attacks, classifier, data, defenses, evaluation, mitigations

    out = [classifier.TextClassifier, data.BackdoorDataModule, data.TokenSplit, data.TriggerCorpus, data.CorpusPoisoning]
    for package in (attacks, mitigations, defenses, evaluation):
        out += [getattr(package, n) for n in package.__all__ if inspect.isclass(getattr(package, n))]
    return sorted(set(out), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", configurable_classes(), ids=lambda c: c.__name__)
def test_every_setting_is_described_where_help_reads_it(cls):
    if dataclasses.is_dataclass(cls):
        wanted = [f.name for f in dataclasses.fields(cls)]
    else:
        wanted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    # as jsonargparse reads them: the docstrings of the class, its __init__ and its bases
    described = {p.arg_name for c in cls.__mro__ for src in (c, c.__init__)
                 for p in docstring_parser.parse(src.__doc__ or "").params if p.description}
    missing = [p for p in wanted if p not in described]
    assert not missing, f"{cls.__name__}: settings without a description in its docstring (or its bases'): {missing}"
