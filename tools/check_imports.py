#!/usr/bin/env python3
"""Fails when a function imports one of edgekd's own modules that is light to import.

An import inside a function is kept for one reason: the module is heavy (it loads torch, torchvision, onnx,
onnxruntime, openvino, nncf, matplotlib or timm when imported) and the command can run without it. A project
module counts as heavy when its module-level imports reach one of those libraries, directly or through other
project modules; everything else (base, bundle, the option classes, ...) belongs at the top of the file.

    python tools/check_imports.py            # prints each offending import and exits 1 if there is one
"""

import ast
import os
import sys
from typing import Dict, Iterator, List, Optional, Set, Tuple

HEAVY = {"torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "openvino", "nncf", "matplotlib", "timm"}
# Where each installed package's files live in the repository (export/, bench/, bundle/ and fit/ sit beside
# edgekd/ and install as its subpackages).
ROOTS = {"edgekd": "edgekd", "edgekd.export": "export", "edgekd.bench": "bench", "edgekd.bundle": "bundle",
         "edgekd.fit": "fit"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules() -> Dict[str, str]:
    """Every project module's dotted name -> its file."""
    found: Dict[str, str] = {}
    for package, folder in ROOTS.items():
        base = os.path.join(REPO, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not os.path.islink(os.path.join(dirpath, d))]
            rel = os.path.relpath(dirpath, base)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in filenames:
                if name.endswith(".py"):
                    dotted = prefix if name == "__init__.py" else prefix + "." + name[:-3]
                    found[dotted] = os.path.join(dirpath, name)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.stmt, module: str, is_package: bool, known: Dict[str, str]) -> Iterator[str]:
    """The absolute names one import statement loads (a submodule when `from pkg import name` names one)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        parts = module.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    yield base
    for alias in node.names:
        if base + "." + alias.name in known:
            yield base + "." + alias.name


def _walk(tree: ast.AST, in_function: bool = False) -> Iterator[Tuple[ast.stmt, bool]]:
    """(import statement, whether it sits inside a function), skipping `if TYPE_CHECKING:` blocks."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _is_type_checking(child):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(child, inner)


def _project(name: str, known: Dict[str, str]) -> Optional[str]:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def scan() -> Tuple[Dict[str, Set[str]], List[Tuple[str, int, str]]]:
    """Each module's module-level imports, and every function-level import of a project module."""
    known = modules()
    top: Dict[str, Set[str]] = {}
    inner: List[Tuple[str, int, str]] = []
    for module, path in known.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        top[module] = set()
        for node, in_function in _walk(tree):
            for name in _targets(node, module, path.endswith("__init__.py"), known):
                if in_function:
                    target = _project(name, known)
                    if target and target != module:
                        inner.append((path, node.lineno, target))
                else:
                    top[module].add(name)
    return top, inner


def heavy_modules(top: Dict[str, Set[str]]) -> Set[str]:
    """The project modules whose import loads a heavy library (a fixed point over the module-level imports)."""
    known = set(top)
    heavy = {m for m, names in top.items() if any(n.split(".")[0] in HEAVY for n in names)}
    changed = True
    while changed:
        changed = False
        for m, names in top.items():
            if m in heavy:
                continue
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            reached = set()
            for n in names:
                p = _project(n, {k: "" for k in known})
                while p:
                    reached.add(p)
                    p = p.rpartition(".")[0]
            if reached & heavy:
                heavy.add(m)
                changed = True
    return heavy


def main() -> int:
    top, inner = scan()
    heavy = heavy_modules(top)
    bad = [(path, line, target) for path, line, target in inner if target not in heavy]
    for path, line, target in sorted(bad):
        print(f"{os.path.relpath(path, REPO)}:{line}: imports the light module {target} inside a function; "
              f"import it at the top of the file")
    if bad:
        print(f"{len(bad)} function-level imports of light project modules")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
