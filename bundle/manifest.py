"""Bundle manifests: checksums, library versions, reading and writing manifest.json."""

import hashlib
import math
import json
import os

MANIFEST = "manifest.json"
# edgekd's metadata inside an ONNX file (written by export, read by the ONNX teacher source):
# classes, mean, std and input_size as JSON ([names], [floats] in [0, 1] pixel units, [height, width]);
# color as RGB, BGR or L; outputs as logits or probs.
METADATA_KEYS = {"classes": "edgekd.classes", "mean": "edgekd.mean", "std": "edgekd.std", "color": "edgekd.color",
                 "input_size": "edgekd.input_size", "outputs": "edgekd.outputs"}
MAX_SIDE = 8192  # an input height or width beyond this is a damaged field, not a model


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def library_versions(names=("edgekd", "torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "openvino", "nncf", "numpy")):
    """Installed versions by distribution name (openvino's __version__ is not PEP 440, metadata is)."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(folder, manifest):
    path = os.path.join(folder, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder):
    from .. import EdgeKDError

    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise EdgeKDError(f"{folder!r} is not a bundle: it has no {MANIFEST}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeKDError(f"{path!r} is not valid JSON: {e}") from None
    problem = schema_problem(manifest)
    if problem:
        raise EdgeKDError(f"{path!r} fails the manifest schema: {problem}")
    return manifest


def _is_number_list(value, length=None, kind=(int, float)):
    """A list of finite numbers (json.load reads NaN and Infinity, which no preprocessing can use)."""
    return (isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)
                                            for v in value)
            and (length is None or len(value) == length))


def _plain_name(name):
    """A file name that stays inside the bundle folder: no folders, no '..', not absolute."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def schema_problem(m):
    """The first field of a manifest that is missing or malformed, as 'field X: what is wrong', else None."""
    if not isinstance(m, dict):
        return "the manifest is not a JSON object"
    checks = [
        ("format", lambda v: v in ("onnx", "openvino"), "must be onnx or openvino"),
        ("precision", lambda v: v in ("fp32", "fp16", "int8"), "must be fp32, fp16 or int8"),
        ("files", lambda v: isinstance(v, dict) and v and all(
            _plain_name(k) and isinstance(h, str) and len(h) == 64 for k, h in v.items()),
         "must map plain file names (no folders or '..') to sha256 hex digests"),
        ("input", lambda v: isinstance(v, dict), "must be an object"),
        ("classes", lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v),
         "must be a non-empty list of class names"),
    ]
    for field, ok, what in checks:
        if field not in m:
            return f"field {field!r} is missing"
        if not ok(m[field]):
            return f"field {field!r} {what}"
    if "model_file" not in m:
        return "field 'model_file' is missing"
    if not isinstance(m["model_file"], str) or m["model_file"] not in m["files"]:
        return "field 'model_file' must name one of the files"
    spec = m["input"]
    shape = spec.get("shape")
    if not (_is_number_list(shape, 4) and all(isinstance(d, int) for d in shape) and shape[1] in (1, 3)):
        return "field 'input.shape' must be [batch, channels (1 or 3), height, width]"
    channels = shape[1]
    for field, ok, what in (
            ("color", lambda v: v == ("L" if channels == 1 else "RGB"), f"must be {'L' if channels == 1 else 'RGB'}"),
            ("resize", lambda v: _is_number_list(v, 2, int) and 0 < min(v) and max(v) <= MAX_SIDE,
             f"must be [height, width], whole numbers from 1 to {MAX_SIDE}"),
            ("mean", lambda v: _is_number_list(v, channels), f"must hold {channels} numbers"),
            ("std", lambda v: _is_number_list(v, channels) and min(v) > 0, f"must hold {channels} positive numbers")):
        if field not in spec:
            return f"field 'input.{field}' is missing"
        if not ok(spec[field]):
            return f"field 'input.{field}' {what}"
    return None
