"""The device runner: the one self-contained file edgekd ships to a device, assembled from the bundle package's
modules when it is needed (``runner_source()``, ``write_runner(path)``); nothing generated is kept in the tree.

The file holds their code in dependency order under one header: the standard-library imports gathered at the
top, the package's own imports dropped, and small stand-ins for the few names the modules take from
``edgekd.base`` (``STANDALONE``), so that it runs with the device's Python alone.
"""

import ast
import os
import tempfile
from typing import Dict, List, Set, Tuple

# The modules the runner carries, each after the ones it imports.
RUNNER_MODULES = ("environment", "checks", "manifest", "preprocessing", "sessions", "rows", "device")
HERE = os.path.dirname(os.path.abspath(__file__))

HEADER = '''"""The self-contained runner that edgekd copies to an edge device and runs with the device's Python.

Assembled by edgekd.bundle.assemble from edgekd's bundle/{modules}.py when edgekd ships it.
It needs only the standard library, numpy and the bundle's runtime (onnxruntime or openvino; Pillow for
``predict``) - never torch, never an edgekd install. Python 3.8+ (Raspberry Pi OS, JetPack).

    python3 device_runner.py env
    python3 device_runner.py verify BUNDLE_DIR
    python3 device_runner.py bench JOB.json          # prints {{"environment": ..., "rows": [...]}}
    python3 device_runner.py predict BUNDLE_DIR IMAGE... [--json] [--top-k K]
    python3 device_runner.py check BUNDLE_DIR        # verify, load, one batch, the manifest's parity images
    python3 device_runner.py logits JOB.json         # export's gate on a device: a model file's logits
"""

'''

# What the modules import from edgekd.base, as the runner defines it standing alone on a device (where edgekd's
# BundleError is the CLI's one-line user error, exit 2, and require_regular is edgekd.base.files').
STANDALONE = {
    "BundleError": '''
class BundleError(Exception):
    """A bundle that cannot be used here; the message says why and what to install."""
''',
    "require_regular": '''
def require_regular(path: Any, what: str, shown: Optional[str] = None) -> os.stat_result:
    """``os.stat(path)`` after refusing anything but a regular file (never opened: a FIFO would wait for ever)."""
    import stat

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise BundleError("%s %r is not a regular file; edgekd reads only regular files" % (what, shown or path))
    return st
''',
}

FOOTER = '''

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


def _split(name: str) -> Tuple[List[ast.stmt], str, Dict[str, List[str]]]:
    """A module's standard-library imports, its code after the imports, and the names it imports from the
    package by source module (``.checks``, ``..base.errors``)."""
    with open(os.path.join(HERE, name + ".py")) as f:
        text = f.read()
    tree = ast.parse(text)
    imports: List[ast.stmt] = []
    package: Dict[str, List[str]] = {}
    last = 0
    for node in tree.body:
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node is tree.body[0]
        if not (is_doc or isinstance(node, (ast.Import, ast.ImportFrom))):
            break
        if isinstance(node, ast.ImportFrom) and node.level:
            package.setdefault("." * node.level + (node.module or ""), []).extend(a.name for a in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        last = node.end_lineno or node.lineno
    code = "\n".join(text.splitlines()[last:]).strip("\n")
    return imports, code, package


def _check_package_imports(name: str, package: Dict[str, List[str]], done: List[str]) -> Set[str]:
    """The edgekd.base names ``name`` needs from STANDALONE; ValueError for an import the runner cannot carry
    (a module not yet assembled, or a base name without a stand-in)."""
    needed: Set[str] = set()
    for source, names in package.items():
        if source.startswith("..base."):
            missing = sorted(set(names) - set(STANDALONE))
            if missing:
                raise ValueError("bundle/%s.py imports %s from %s, which the device runner has no stand-in for "
                                 "(add one to STANDALONE)" % (name, ", ".join(missing), source))
            needed.update(names)
        elif source[1:] not in done or source.count(".") != 1:
            raise ValueError("bundle/%s.py imports from %s, which is not among the modules the device runner carries "
                             "before it (RUNNER_MODULES: %s)" % (name, source, ", ".join(RUNNER_MODULES)))
    return needed


def _alias(a: ast.alias) -> str:
    return a.name + (" as " + a.asname if a.asname else "")


def _import_lines(nodes: List[ast.stmt]) -> List[str]:
    """One sorted ``import X`` line per module and one ``from X import ...`` line per source module."""
    plain: Set[str] = set()
    froms: Dict[str, Set[str]] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            plain.update(_alias(a) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            froms.setdefault(node.module, set()).update(_alias(a) for a in node.names)
    lines = ["import %s" % m for m in sorted(plain)]
    return lines + ["from %s import %s" % (m, ", ".join(sorted(n))) for m, n in sorted(froms.items())]


def _defined(code: str) -> List[str]:
    """The names a module's code defines at its top level (functions, classes, assignments)."""
    names: List[str] = []
    for node in ast.parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def runner_source() -> str:
    """The text of the device runner (``device_runner.py`` on a device), assembled from RUNNER_MODULES."""
    imports: List[ast.stmt] = []
    parts: List[str] = []
    standalone: Set[str] = set()
    owner: Dict[str, str] = {}  # one file, one namespace: a name two modules define would silently be the last one's
    for i, name in enumerate(RUNNER_MODULES):
        found, code, package = _split(name)
        standalone |= _check_package_imports(name, package, list(RUNNER_MODULES[:i]))
        for defined in _defined(code):
            if owner.setdefault(defined, name) != name:
                raise ValueError("bundle/%s.py and bundle/%s.py both define %s; the device runner is one file, one "
                                 "namespace: rename one" % (owner[defined], name, defined))
        imports += found
        parts.append("# " + "-" * 40 + " bundle/%s.py\n\n%s\n" % (name, code))
    stand_ins = "\n\n\n".join(STANDALONE[n].strip("\n") for n in STANDALONE if n in standalone)
    header = HEADER.format(modules="{" + ",".join(RUNNER_MODULES) + "}")
    return header + "\n".join(_import_lines(imports)) + "\n\n\n" + stand_ins + "\n\n\n" + "\n\n".join(parts) + FOOTER


def write_runner(path: str) -> str:
    """Write the device runner to ``path`` atomically (a temporary file beside it, then renamed); returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".runner-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(runner_source())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
