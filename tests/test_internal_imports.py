"""Every ``from <dflash module> import name`` in the package names something that exists.

Imports inside functions (optional dependencies, CUDA-only branches) run only where their
branch runs, so a moved function can break a GPU-only path while the CPU suite stays green
(``environment_info`` once imported ``driver_version`` from the module it had left). This reads
every such statement from the source and resolves it against the package itself."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dflash"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_name(path)
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "dflash" or target.startswith("dflash."):
                for alias in node.names:
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", target, alias.name


def test_every_internal_import_resolves():
    cases = list(_internal_imports())
    assert len(cases) > 100, "the scan found almost nothing: is PACKAGE right?"
    broken = [f"{where}: {module}.{name}" for where, module, name in cases
              if not _resolves(module, name)]
    assert not broken, "imports of names that do not exist:\n" + "\n".join(broken)


def _resolves(module: str, name: str) -> bool:
    mod = importlib.import_module(module)
    if name == "*" or hasattr(mod, name):
        return True
    if name in _defined_anywhere(mod):  # e.g. a Triton kernel, defined only where Triton is
        return True
    try:  # a submodule imported by name (``from . import kernels``)
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return False
    return True


def _defined_anywhere(mod) -> set[str]:
    """Names a module's source defines at any depth of its top-level statements (under an
    ``if``/``try`` too), not inside functions or classes."""
    names, todo = set(), list(ast.parse(Path(mod.__file__).read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            todo.extend(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                todo.extend(handler.body)
    return names
