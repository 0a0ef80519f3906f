"""Bundle manifests: checksums, library versions, reading and writing manifest.json."""

import hashlib
import json
import os

MANIFEST = "manifest.json"


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
    for key in ("format", "precision", "files", "input", "classes"):
        if key not in manifest:
            raise EdgeKDError(f"{path!r} lacks the field {key!r}")
    return manifest
