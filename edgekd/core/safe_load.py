"""The one loader for every file that can carry a pickle: checkpoints, training states, weights files,
teacher caches, TorchScript and ``torch.export`` (.pt2) archives.

No code path of edgekd unpickles with ``weights_only=False`` (tests/test_hostile_files.py checks that no
other module calls ``torch.load``, ``torch.jit.load``, ``torch.export.load`` or ``pickle``): a pickle can
name any Python callable, so loading one from a file is running the file's code. A file that cannot be
read without it is refused in one line that says why. NNCF's quantizer state travels as JSON inside a
checkpoint (edgekd/core/quantize.py), so it passes through here too.
"""

import contextlib
import json
import os
import zipfile

import torch

from .. import EdgeKDError

PICKLED = "it holds pickled Python objects, which edgekd never loads (they could run code)"


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _reason(e):
    """Why torch.load(weights_only=True) refused a file, without torch's advice to retry unsafely."""
    text = str(e)
    if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text or "Unsupported operand" in text:
        return PICKLED
    return "not a file written by torch.save, or a damaged one"


def _need_file(path, what):
    if not os.path.isfile(path):
        raise EdgeKDError(f"{what} {path!r} does not exist or is not a file")


class Refused(EdgeKDError):
    """A file the loader will not read; ``reason`` says why without the path."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def torch_file(path, what="file"):
    """``torch.load(path, weights_only=True)`` on the CPU; a refusal is one line naming ``what``."""
    _need_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Refused(f"cannot read {what} {path!r}: {_reason(e)}", _reason(e)) from e


def safetensors_file(path, what="weights file"):
    """A .safetensors file (no pickle in the format); damaged headers are one line, not a traceback."""
    _need_file(path, what)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise EdgeKDError("reading .safetensors files needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError, OSError, ...
        raise EdgeKDError(f"cannot read {what} {path!r}: not a valid .safetensors file ({_first_line(e)})") from e


def weights_file(path, what="weights file"):
    """What a weights file holds (.safetensors, else a torch file read with weights_only=True)."""
    if path.lower().endswith(".safetensors"):
        return safetensors_file(path, what)
    return torch_file(path, what)


def torchscript(path, what="TorchScript file"):
    """A TorchScript module: its archive is read by torch's C++ unpickler, which rebuilds only tensors and
    TorchScript classes from the archive's own code (it cannot import or call Python)."""
    _need_file(path, what)
    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise EdgeKDError(f"cannot load {what} {path!r}: {_first_line(e)[:300]}") from e


# members of a .pt2 archive that torch.export.load unpickles with plain pickle or TorchScript's object
# pickler whatever weights_only says (opaque Python objects, torchbind objects): refused, never read
_UNSAFE_PT2 = ("/data/constants/custom_obj_", "/data/constants/opaque_obj_")


@contextlib.contextmanager
def _weights_only_everywhere():
    """torch.export.load retries a pickle that weights_only=True refused with weights_only=False (and reads
    pickled weights and constants with weights_only=False outright); torch honours this variable over the
    argument, so every torch.load inside it stays weights-only."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


# What the graph of a .pt2 may name. torch's deserializer resolves a node's target by attribute lookup from
# ``torch``/``_operator``/``math`` (``torch.os.system`` resolves), and parses every symbolic shape with
# sympy.sympify, which evaluates Python: both are checked in the archive's JSON before torch reads it.
_SAFE_OPERATORS = {"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq",
                   "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "matmul"}
_SYMPY_CALLS = {"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne",
                "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
                "Equality", "Unequality", "And", "Or", "Not", "floor", "ceiling", "Piecewise", "ExprCondPair",
                "CeilDiv", "CeilToInt", "CleanDiv", "FloatPow", "FloatTrueDiv", "FloorDiv", "FloorToInt", "Identity",
                "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "LShift", "Mod", "ModularIndexing", "PowByNatural",
                "PythonMod", "RShift", "RoundDecimal", "RoundToInt", "ToFloat", "TruncToFloat", "TruncToInt", "Where"}


def _safe_target(target):
    if target.startswith("torch.ops.") or target.startswith("math."):
        return "__" not in target  # operators and math functions, never a dunder path out of them
    if target.startswith("torch."):  # symbolic-shape helpers only (torch.sym_max, ...), never torch.load & co
        name = target[len("torch."):]
        return "." not in name and name.startswith(("sym_", "_sym_"))
    return target.startswith("_operator.") and target[len("_operator."):] in _SAFE_OPERATORS


def _safe_expr(text):
    """A sympy expression in srepr form built only from the calls sympy and torch's shape functions write."""
    import ast

    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
                return False
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                return False
        elif not isinstance(node, (ast.Expression, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp, ast.operator,
                                   ast.unaryop, ast.Load, ast.Tuple, ast.Compare, ast.cmpop, ast.BoolOp, ast.boolop)):
            return False
    return True


def _graph_problem(z, names):
    """The first target or symbolic expression in the archive's model JSON that could run code, else None."""
    for name in names:
        if not (name.endswith(".json") and "/models/" in "/" + name):
            continue
        if z.getinfo(name).file_size > 512 << 20:
            return f"{name} is larger than 512 MB"
        stack = [json.loads(z.read(name))]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for key, value in item.items():
                    if key == "target" and isinstance(value, str) and not _safe_target(value):
                        return f"its graph calls {value[:80]!r}, which is not a torch operator"
                    if key == "expr_str" and isinstance(value, str) and not _safe_expr(value):
                        return f"a symbolic shape in it is not a sympy expression ({value[:60]!r})"
                    stack.append(value)
            elif isinstance(item, list):
                stack.extend(item)
    return None


def exported_program(path, what="torch.export file"):
    """A ``torch.export`` program (.pt2) whose pickled members are read weights-only; an archive that needs
    more (pickled Python objects) is refused in one line."""
    _need_file(path, what)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            graph = _graph_problem(z, names)
    except (zipfile.BadZipFile, OSError, ValueError, RecursionError) as e:
        raise EdgeKDError(f"cannot load {what} {path!r}: not a .pt2 archive ({_first_line(e)})") from e
    if graph:
        raise EdgeKDError(f"cannot load {what} {path!r}: {graph}; edgekd loads only graphs of torch operators")
    unsafe = [n for n in names if any(part in "/" + n for part in _UNSAFE_PT2)]
    if unsafe:
        raise EdgeKDError(f"cannot load {what} {path!r}: member {unsafe[0]!r} is a pickled Python object, which "
                          "edgekd never loads (it could run code); export the model without custom objects")
    try:
        with _weights_only_everywhere():
            return torch.export.load(path)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "GLOBAL" in text or "Unsupported global" in text:
            raise EdgeKDError(f"cannot load {what} {path!r}: {PICKLED}") from e
        raise EdgeKDError(f"cannot load {what} {path!r}: {_first_line(e)[:300]}") from e
