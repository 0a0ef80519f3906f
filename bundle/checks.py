"""Bundle verification, torch-free and standalone (part of the device runner): the bundle's file names, the
bounded JSON reader, manifest.json's JSON, sha256 sums, the files against their sums, the model's outputs against
the class names."""

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Type

from ..base.errors import BundleError
from ..base.files import require_regular

# The names of a bundle's files, for all of edgekd: the manifest, and per format the files its export writes,
# the model file the runtime opens first.
MANIFEST_FILE = "manifest.json"
FORMAT_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
RUNTIME_PACKAGE = {"onnx": "onnxruntime", "openvino": "openvino"}

# A manifest is a few kilobytes (the calibration record lists image ids: a few megabytes at most), and a
# few levels deep; anything far beyond is damage or an attack, refused before it is parsed or walked.
MAX_JSON_BYTES = 64 * 1024 ** 2
MAX_JSON_DEPTH = 32


def json_depth_problem(value: Any, limit: int = MAX_JSON_DEPTH) -> Optional[str]:
    """'nested N levels deep' when a parsed JSON/YAML value nests deeper than ``limit``, else None (no recursion)."""
    stack: List[Tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return "nested more than %d levels deep (at most %d)" % (limit, limit)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return None


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """json's object_pairs_hook: a key given twice is an error, never 'the last one wins'."""
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("the key %r appears twice in one object" % key)
        out[key] = value
    return out


def load_json(path: str, what: str, error: Optional[Type[Exception]] = None, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``, or ``error`` (an exception class, BundleError by default) in one line naming
    ``what``: too large, not UTF-8 JSON, or nested too deeply (json's recursion ends in RecursionError)."""
    error = error or BundleError
    try:
        size = require_regular(path, what).st_size
    except (OSError, ValueError) as e:
        raise error(str(e)) from None
    if size > max_bytes:
        raise error("%s %r is %.1f MB; a valid one is far smaller (at most %d MB)"
                    % (what, path, size / 1e6, max_bytes // 1024 ** 2))
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise error("%s %r is not valid JSON: %s" % (what, path, str(e).splitlines()[0] if str(e) else
                                                     type(e).__name__)) from e
    except RecursionError as e:
        raise error("%s %r is not valid: nested too deeply (at most %d levels)" % (what, path, MAX_JSON_DEPTH)) from e
    deep = json_depth_problem(value)
    if deep:
        raise error("%s %r is not valid: %s" % (what, path, deep))
    return value


def manifest_json(folder: str) -> Any:
    """The JSON of a bundle's manifest.json: the one place that reads the file (edgekd.bundle.manifest.Manifest
    checks its fields; on a device the runner uses what it needs)."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.lexists(path):
        raise BundleError("%r is not a bundle: it has no %s" % (folder, MANIFEST_FILE))
    if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
        raise BundleError("bundle %r: its %s is a link; links out of a bundle are refused (copy the file in)"
                          % (folder, MANIFEST_FILE))
    return load_json(path, "bundle manifest")  # bounded: size, nesting


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in 1 MiB blocks: edgekd's one implementation (checkpoints, teachers, bundles)."""
    h = hashlib.sha256()
    require_regular(path, "file")  # every file edgekd hashes (teachers, checkpoints, bundles): a FIFO never opened
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_files(folder: str, files: Dict[str, str]) -> None:
    """A bundle is exactly its manifest: every file the manifest lists lies inside the folder (no links, no ../)
    and matches its sha256, and the folder holds nothing else (a file nobody checked could be what a runtime
    reads: OpenVINO finds model.bin beside model.xml whether or not it is listed)."""
    root = os.path.realpath(folder)
    unlisted = sorted(n for n in os.listdir(root) if n != MANIFEST_FILE and n not in files)
    if unlisted:
        raise BundleError("bundle %r holds %s, which its manifest.json does not list (a bundle is exactly the files "
                          "its manifest lists: remove them, or export again)" % (folder, ", ".join(unlisted)[:200]))
    for name, digest in files.items():
        path = os.path.join(root, name)
        if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != root:
            raise BundleError("bundle file %r points outside the bundle folder" % name)
        if not os.path.isfile(path):
            raise BundleError("bundle %r is missing %r" % (folder, name))
        if sha256_file(path) != digest:
            raise BundleError("bundle file %r does not match its sha256 in manifest.json (corrupt or edited)" % name)


def check_outputs(count: Optional[int], classes: List[str]) -> None:
    """A BundleError when the model's number of outputs is not the manifest's number of class names."""
    if count is not None and count != len(classes):
        raise BundleError("the bundle's model has %d outputs but its manifest names %d classes: the manifest does not "
                          "describe this model (export it again)" % (count, len(classes)))
