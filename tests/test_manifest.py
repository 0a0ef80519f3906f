"""The Manifest type: read, checked and written in one place; bundle file names and sha256 defined once."""

import hashlib
import json

import pytest

from edgekd import EdgeKDError
from edgekd.bundle import manifest as manifest_module
from edgekd.bundle import checks, device
from edgekd.bundle.manifest import Manifest, read_manifest, write_manifest


def _manifest_dict():
    return {"format": "onnx", "precision": "fp32", "model_file": "model.onnx", "files": {"model.onnx": "0" * 64},
            "input": {"shape": [-1, 1, 8, 8], "layout": "NCHW", "mean": [0.5], "std": [0.5], "color": "L",
                      "resize": [8, 8]},
            "classes": [str(i) for i in range(10)], "model": "compact-student", "params": None,
            "validation": {"top1": 0.9}, "versions": {"numpy": "2"}}


def test_a_manifest_round_trips_byte_for_byte(tmp_path):
    data = _manifest_dict()
    write_manifest(str(tmp_path), data)
    written = (tmp_path / "manifest.json").read_text()
    assert written == json.dumps(data, indent=2) + "\n"  # the keys in the order the export wrote them
    m = read_manifest(str(tmp_path))
    assert (m.format, m.model_file, m.channels, m.record("model"), m.validation["top1"]) == (
        "onnx", "model.onnx", 1, "compact-student", 0.9)
    assert m.to_dict() == data and list(m.to_dict()) == list(data)
    m.write(str(tmp_path))
    assert (tmp_path / "manifest.json").read_text() == written


def test_with_changes_sets_typed_fields_and_adds_records():
    m = Manifest.from_dict(_manifest_dict())
    ov = m.with_changes(format="openvino", model_file="model.xml", files={"model.xml": "1" * 64, "model.bin": "2" * 64},
                        converted_from={"files": m.files})
    assert (ov.format, ov.model_file, ov.record("converted_from"), ov.record("versions")) == (
        "openvino", "model.xml", {"files": m.files}, {"numpy": "2"})
    assert m.format == "onnx"  # frozen: the original is unchanged


@pytest.mark.parametrize("field, value, message", [
    ("format", "tflite", "field 'format' must be onnx or openvino"),
    ("files", {"../x": "0" * 64}, "field 'files' must map plain file names"),
    ("model_file", "other.onnx", "field 'model_file' must name one of the files"),
    ("classes", [], "field 'classes' must be a non-empty list"),
])
def test_a_malformed_manifest_is_named_by_its_field(tmp_path, field, value, message):
    data = {**_manifest_dict(), field: value}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EdgeKDError, match=f"fails the manifest schema: {message}"):
        read_manifest(str(tmp_path))
    with pytest.raises(ValueError, match="edgekd built a malformed manifest"):  # our own bug: exit 1, not 2
        write_manifest(str(tmp_path / "none"), data)


def test_a_folder_without_a_manifest_or_with_bad_json(tmp_path):
    with pytest.raises(EdgeKDError, match="is not a bundle: it has no manifest.json"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(EdgeKDError, match="is not valid JSON"):
        read_manifest(str(tmp_path))


def test_file_names_and_sha256_have_one_home(tmp_path):
    from edgekd.base import outdir
    from edgekd.core import checkpoint
    from edgekd.export import onnx, openvino, qat

    assert outdir.BUNDLE_MANIFEST == checks.MANIFEST_FILE == manifest_module.MANIFEST_FILE  # base sits below bundle
    assert (onnx.MODEL_FILE, openvino.MODEL_FILE, openvino.WEIGHTS_FILE) == ("model.onnx", "model.xml", "model.bin")
    assert (qat.ONNX_FILE, qat.OV_FILE) == (onnx.MODEL_FILE, openvino.MODEL_FILE)
    assert checkpoint.file_sha256 is checks.sha256_file and manifest_module.sha256_file is checks.sha256_file
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3_000_000)
    assert checks.sha256_file(str(path)) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_the_device_runner_reads_its_job_into_a_dataclass(tmp_path):
    job = device.BenchJob(bundles=["bundle0"], images="i.npy", labels="l.npy", batch_sizes=[1, 8], warmup=2, runs=5)
    path = tmp_path / "job.json"
    path.write_text(job.to_json()[:-1] + ', "from_a_newer_edgekd": 1}')  # unknown keys are left alone
    assert device.BenchJob.read(str(path)) == job
