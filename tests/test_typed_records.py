"""The records that cross modules are typed: checkpoints, the format table's entries, the export's step results."""

import pytest
import torch

from edgekd import EdgeKDError
from edgekd.core.checkpoint import Checkpoint, QatState, read_checkpoint, save_checkpoint, write_checkpoint
from edgekd.core.data import InputSpec
from edgekd.core.models import build_model
from edgekd.export.formats import Format, check_request, get_format
from edgekd.export.pipeline import ExportOptions
from edgekd.export.records import Fallback, Restored, Rung, Sample, Validation

SPEC = InputSpec(1, 16, 16, [0.5], [0.5])


def test_a_checkpoint_is_a_record_on_the_file_format_of_design_md(tmp_path):
    model = build_model("compact-student", 3, SPEC)
    path = tmp_path / "m.pt"
    saved = save_checkpoint(str(path), model, spec="compact-student", classes=["a", "b", "c"], input_spec=SPEC,
                            data_spec="digits", metrics={"test_top1": 0.5}, config={"teacher": "t.pt"})
    ckpt = read_checkpoint(str(path))
    assert isinstance(ckpt, Checkpoint) and ckpt.qat is None
    assert (ckpt.model, ckpt.classes, ckpt.input, ckpt.data) == ("compact-student", ["a", "b", "c"], SPEC, "digits")
    assert ckpt.params == saved.params > 0 and ckpt.metrics == {"test_top1": 0.5}
    raw = torch.load(path, weights_only=True)  # on disk: the dict of plain types and tensors
    assert set(raw) == set(ckpt) and raw["input"] == SPEC.to_dict() and "qat" not in ckpt

    qat = QatState(quantizers={"compression_state": []}, source="../s.pt", source_top1=0.9, layers_int8=["fc"])
    write_checkpoint(str(path), Checkpoint.from_dict({**raw, "qat": qat.to_dict(), "from_a_newer_edgekd": 1}))
    again = read_checkpoint(str(path))
    assert again.qat == qat and again.extra == {"from_a_newer_edgekd": 1}


def test_format_table_entries_are_typed_and_settle_the_defaults():
    onnx, openvino = get_format("onnx"), get_format("openvino")
    assert isinstance(onnx, Format) and onnx.suffix == ".onnx" and openvino.files == ("model.xml", "model.bin")
    assert onnx.precisions == openvino.precisions == ("fp32", "fp16", "int8")
    ort = ExportOptions(format="onnx", out="b")
    assert onnx.qat_calibrates(ort) and not onnx.qat_calibrates(ExportOptions(format="onnx", out="b", qat_onnx="nncf"))
    assert not openvino.qat_calibrates(ort)
    request = check_request("onnx", "int8")
    assert (request.quant, request.calib_method, request.static) == ("static", "minmax", True)
    assert not check_request("onnx", "int8", quant="dynamic").static
    with pytest.raises(EdgeKDError, match="unknown export format 'onx'.*did you mean 'onnx'"):
        get_format("onx")


def test_step_records_write_the_manifest_json_they_replace():
    v = Validation(images=10, not_finite=0, output_shape=[-1, 3], max_abs_diff=1e-6, mean_abs_diff=1e-7,
                   top1_agreement=1.0, top1=0.9, reference_top1=0.9, drop=0.0, data="digits", split="test", atol=1e-4)
    d = v.to_dict()
    assert d["ran_on"] is None and "max_drop" not in d and Validation.from_dict(d).to_dict() == d
    tuning = Sample(data="digits", split="train", images=4, available=10, seed=1, per_class={"a": 4},
                    files_sha256="0" * 64)
    fallback = Fallback(needed=True, drop_before=3.0, restored=Restored(["conv"], "nncf"), layers_in_float=["conv"],
                        drop_after=0.5, max_layers=2, tuning=tuning)
    assert fallback.to_dict() == {"needed": True, "drop_before": 3.0, "layers_in_float": ["conv"], "method": "nncf",
                                  "drop_after": 0.5, "max_layers": 2, "tuning": tuning.to_dict()}
    assert "files" not in tuning.to_dict()
    assert Rung("ptq", 3.0, False).to_dict() == {"rung": "ptq", "drop": 3.0, "passed": False}
