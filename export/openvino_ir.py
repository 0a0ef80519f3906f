"""An OpenVINO FP32 IR bundle from an ONNX bundle, for benchmarking OpenVINO on the same network:

    python -m edgekd.export.openvino_ir ONNX_BUNDLE OUT

The IR keeps FP32 weights (openvino.save_model compresses to FP16 unless told not to); the manifest
is the ONNX bundle's with format "openvino", model_file model.xml and the new files' sha256. The
ONNX bundle's parity check against PyTorch carries over: the IR is converted from that checked file.
"""

import os
import shutil
import sys
import tempfile

from .. import EdgeKDError
from ..base.telemetry import switch_off
from ..bundle.manifest import FORMAT_FILES, Manifest, sha256_file
from ..bundle.runtime import verify_bundle


def onnx_bundle_to_openvino(src: str, out: str) -> Manifest:
    """Convert ``src`` (an ONNX bundle) into a new OpenVINO bundle folder ``out``; return its manifest."""
    import openvino as ov

    manifest = verify_bundle(src)
    if manifest.format != "onnx":
        raise EdgeKDError(f"{src!r} is a {manifest.format} bundle; expected an onnx bundle")
    if os.path.exists(out):
        raise EdgeKDError(f"{out!r} already exists")
    staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".ir-")
    try:
        model_file = FORMAT_FILES["openvino"][0]
        model = ov.convert_model(os.path.join(src, manifest.model_file))
        ov.save_model(model, os.path.join(staging, model_file), compress_to_fp16=False)
        files = {name: sha256_file(os.path.join(staging, name)) for name in FORMAT_FILES["openvino"]}
        manifest = manifest.with_changes(format="openvino", model_file=model_file, files=files,
                                         converted_from={"bundle": os.path.abspath(src), "files": manifest.files})
        manifest.write(staging)
        os.chmod(staging, 0o755)
        os.replace(staging, out)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return manifest


if __name__ == "__main__":
    switch_off()  # an edgekd process: OpenVINO telemetry off before openvino is imported
    if len(sys.argv) != 3:
        sys.exit("usage: python -m edgekd.export.openvino_ir ONNX_BUNDLE OUT")
    try:
        onnx_bundle_to_openvino(sys.argv[1], sys.argv[2])
    except EdgeKDError as e:
        sys.exit(f"openvino_ir: error: {e}")
    print(f"openvino fp32 bundle -> {sys.argv[2]}")
