"""Every format x precision on the tiny digits student, the gate failing when it should, the format table."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgekd import EdgeKDError
from edgekd.export.formats import check_request, combinations
from edgekd.bundle.manifest import sha256_file
from edgekd.export.pipeline import ExportOptions, export_checkpoint

VAL, CALIB = 200, 100


@contextlib.contextmanager
def fp32_onnx_exported_once(root):
    """torch.onnx.export (the slowest step, ~5 s) runs once and its FP32 file is reused by every later
    export in the block, as it would be anyway: every format starts from the same FP32 ONNX graph."""
    from edgekd.export import onnx as onnx_mod
    from edgekd.export import openvino as ov_mod

    original, cache = onnx_mod.export_onnx, root / "fp32-cache.onnx"

    def export_once(model, input_spec, folder, opset=None):
        if not cache.exists():
            original(model, input_spec, str(root), opset)
            os.replace(root / "model.onnx", cache)
        shutil.copy(cache, os.path.join(folder, "model.onnx"))
        return "model.onnx"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_mod, "export_onnx", export_once)
        mp.setattr(ov_mod, "export_onnx", export_once)
        yield


@pytest.fixture(scope="module")
def bundles(digits_run, tmp_path_factory):
    """All six bundles, exported in this process with small validation and calibration sets."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    with fp32_onnx_exported_once(root):
        for fmt, precision in combinations():
            folder = root / f"{fmt}-{precision}"
            export_checkpoint(str(digits_run / "student.pt"), ExportOptions(
                format=fmt, precision=precision, out=str(folder), val_size=VAL, calib_size=CALIB, progress=False))
            out[fmt, precision] = folder
    return out


def test_the_table_offers_every_format_and_precision():
    assert combinations() == [(f, p) for f in ("onnx", "openvino") for p in ("fp32", "fp16", "int8")]


@pytest.mark.parametrize("fmt, precision", [(f, p) for f in ("onnx", "openvino") for p in ("fp32", "fp16", "int8")])
def test_each_format_and_precision_exports_and_passes_its_gate(bundles, fmt, precision):
    folder = bundles[fmt, precision]
    m = json.loads((folder / "manifest.json").read_text())
    assert (m["format"], m["precision"]) == (fmt, precision)
    assert set(m["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert all(sha256_file(folder / name) == digest for name, digest in m["files"].items())
    assert m["input"]["shape"] == [-1, 1, 32, 32] and m["input"]["layout"] == "NCHW" and m["input"]["color"] == "L"
    assert m["classes"] == [str(i) for i in range(10)] and m["params"] > 0 and m["flops"] > 0 and m["data"] == "digits"
    v = m["validation"]
    assert v["images"] == VAL and v["split"] == "test" and v["output_shape"] == [-1, 10]
    assert v["drop"] == pytest.approx((v["reference_top1"] - v["top1"]) * 100, abs=1e-6)
    assert m["export_seconds"] > 0 and m["size_bytes"] == sum((folder / n).stat().st_size for n in m["files"])
    assert {"onnxruntime", "openvino", "numpy"} <= set(m["versions"])
    if precision == "fp32":
        assert v["max_abs_diff"] <= 1e-4 and v["top1_agreement"] == 1.0
    elif precision == "fp16":
        assert 1e-5 < v["max_abs_diff"] <= 5e-2 and v["top1_agreement"] >= 0.97
    else:
        assert v["drop"] <= 1.0 and m["fallback"]["drop_before"] >= m["validation"]["drop"] - 1e-9
        # the ladder stops at the first rung that passes: the QAT rung is never reached here
        assert [r["rung"] for r in m["ladder"]] == (["ptq", "fallback"] if m["fallback"]["needed"] else ["ptq"])
        assert m["ladder"][-1]["passed"] and m["quantization"]["mode"] == "static"
        c = m["calibration"]
        assert c["split"] == "train" and c["images"] == CALIB == len(c["files"]) and c["seed"] == 0
        assert sum(c["per_class"].values()) == CALIB and m["quantization"]["layers"] >= 1
        assert {r["batch_size"] for r in m["speed_check"]["rows"]} == {1, 32}
        assert ("warnings" in m) == (not m["speed_check"]["int8_faster"])


def test_precisions_really_change_the_weights(bundles):
    import onnx

    def initializer_types(path):
        return {t.data_type for t in onnx.load(path).graph.initializer}

    fp32, fp16, int8 = (bundles["onnx", p] / "model.onnx" for p in ("fp32", "fp16", "int8"))
    assert onnx.TensorProto.FLOAT16 in initializer_types(fp16) and onnx.TensorProto.FLOAT16 not in initializer_types(fp32)
    graph = onnx.load(fp16).graph
    assert graph.input[0].type.tensor_type.elem_type == graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(int8).graph.node}
    sizes = {p: (bundles["openvino", p] / "model.bin").stat().st_size for p in ("fp32", "fp16", "int8")}
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["int8"] < 0.6 * sizes["fp32"]
    assert "FakeQuantize" in (bundles["openvino", "int8"] / "model.xml").read_text()


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_runtime_gives_the_pytorch_top1_on_real_images(bundles, digits_run, fmt):
    from edgekd.core.loading import load_model
    from edgekd.core.data import load_data
    from edgekd.bundle import load_bundle

    data = load_data("digits")
    bundle = load_bundle(str(bundles[fmt, "fp32"]))
    batch = np.stack([bundle.preprocess(data.test.images[i]) for i in range(40)])
    model, _ = load_model(str(digits_run / "student.pt"))
    with torch.no_grad():
        expected = model(torch.stack([data.test[i][0] for i in range(40)]))
    np.testing.assert_allclose(batch, torch.stack([data.test[i][0] for i in range(40)]).numpy(), atol=1e-6)
    assert (bundle(batch).argmax(1) == expected.argmax(1).numpy()).all()


@pytest.mark.parametrize("request_, message", [
    (("onnx", "int4"), "does not support precision 'int4'; supported: fp32, fp16, int8"),
    (("openvino", "int8", "dynamic"), "does not support --quant dynamic; supported: static"),
    (("onnx", "fp32", "static"), "only apply to --precision int8"),
    (("onnx", "int8", None, "kl"), "supported: minmax, entropy, percentile"),
    (("openvino", "int8", None, "entropy"), "supported: nncf"),
    (("openvino", "int8", None, None, "u8u8"), "--int8-types applies to ONNX Runtime quantization only"),
    (("onnx", "int8", "dynamic", "entropy"), "dynamic INT8 uses no calibration"),
    (("tflite", "fp32"), "unknown export format 'tflite'"),
])
def test_unsupported_requests_are_refused_up_front(request_, message):
    with pytest.raises(EdgeKDError, match=re.escape(message)):
        check_request(*request_)


def _perturbing(monkeypatch, scale):
    """Make the exporters see a model whose classifier weights were shuffled with noise."""
    from edgekd.export import onnx as onnx_mod
    from edgekd.export import openvino as ov_mod

    original = onnx_mod.export_onnx

    def perturbed(model, *args, **kwargs):
        import copy

        model = copy.deepcopy(model)
        with torch.no_grad():
            w = model.classifier.weight
            w.add_(scale * w.abs().mean() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(onnx_mod, "export_onnx", perturbed)
    monkeypatch.setattr(ov_mod, "export_onnx", perturbed)


@pytest.mark.parametrize("fmt, precision", [("onnx", "fp32"), ("openvino", "fp16")])
def test_gate_fails_a_perturbed_float_model_and_leaves_no_bundle(digits_run, tmp_path, monkeypatch, fmt, precision):
    _perturbing(monkeypatch, 0.5)
    out = tmp_path / "bundle"
    with pytest.raises(EdgeKDError, match=r"parity check failed: max \|logit difference\| .* exceeds --atol"):
        export_checkpoint(str(digits_run / "student.pt"),
                          ExportOptions(format=fmt, precision=precision, out=str(out), val_size=VAL, progress=False))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_gate_fails_on_a_perturbed_model_with_and_without_fallback(digits_run, tmp_path, monkeypatch, fmt):
    """The fallback runs (ONNX ranking, NNCF accuracy control) but cannot undo a wrong model: still refused."""
    _perturbing(monkeypatch, 3.0)
    out = tmp_path / "bundle"
    # half the usual images: the fallback's search (ranking, NNCF accuracy control) evaluates them many times
    opts = dict(format=fmt, precision="int8", out=str(out), val_size=VAL // 2, calib_size=CALIB // 2, progress=False,
                speed_check=False, qat_epochs=0)  # the perturbation is in the PTQ exporters only
    with pytest.raises(EdgeKDError, match=r"INT8 top-1 .* points below FP32 .* over --max-drop 1 .*fallback is off"):
        export_checkpoint(str(digits_run / "student.pt"), ExportOptions(**opts, max_fallback_layers=0))
    with pytest.raises(EdgeKDError, match=r"over --max-drop 1 even with [012] layer\(s\) kept in float "
                                          r"\(--max-fallback-layers 2; before the fallback: \d+\.\d\d points\) "
                                          r"and quantization-aware distillation is off \(--qat-epochs 0\)"):
        export_checkpoint(str(digits_run / "student.pt"), ExportOptions(**opts, max_fallback_layers=2))
    assert os.listdir(tmp_path) == []


def test_onnx_int8_types_default_by_cpu_and_can_be_overridden():
    from edgekd.export.quantize_onnx import int8_settings

    assert int8_settings(features=("x86_64", {"avx2"}))["activation_type"] == "uint8"
    assert int8_settings(features=("x86_64", {"avx2"}))["weight_type"] == "uint8"
    vnni = int8_settings(features=("x86_64", {"avx2", "avx512_vnni"}))
    assert (vnni["activation_type"], vnni["weight_type"], vnni["cpu"]["vnni"]) == ("uint8", "int8", ["avx512_vnni"])
    assert int8_settings(features=("aarch64", set()))["activation_type"] == "int8"
    forced = int8_settings("s8s8", reduce_range=True, per_channel=False, features=("x86_64", {"avx2"}))
    assert forced["activation_type"] == forced["weight_type"] == "int8" and forced["reduce_range"]
    assert forced["chosen_because"] == "chosen with --int8-types" and not forced["per_channel"]
    with pytest.raises(EdgeKDError, match="choose from auto, u8s8, u8u8, s8s8"):
        int8_settings("u4")


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_runtime_never_imports_torch_in_a_fresh_interpreter(bundles, tmp_path, fmt):
    from edgekd.core.data import load_data

    image = tmp_path / "seven.png"
    load_data("digits").test.images[3].save(image)
    code = ("import sys, json\n"
            "from edgekd.bundle import load_bundle\n"
            "from edgekd.bundle.runtime import load_bundle as by_its_earlier_name\n"
            "assert by_its_earlier_name is load_bundle\n"
            "r = load_bundle(sys.argv[1]).predict_files([sys.argv[2]], top_k=2)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'nncf'))\n"
            "print(json.dumps({'heavy': heavy, 'result': r}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(bundles[fmt, "int8"]), str(image)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert len(out["result"][0]["top"]) == 2 and out["result"][0]["top"][0]["label"] in [str(i) for i in range(10)]


def test_onnx_dynamic_int8_is_available_but_never_calibrated(bundles, digits_run, tmp_path, caplog):
    import onnx

    out = tmp_path / "dynamic"
    with fp32_onnx_exported_once(bundles["onnx", "fp32"].parent), caplog.at_level("WARNING"):
        m = export_checkpoint(str(digits_run / "student.pt"), ExportOptions(
            format="onnx", precision="int8", quant="dynamic", out=str(out), val_size=VAL, max_drop=100,
            speed_check=False, progress=False))
    assert m["quantization"]["mode"] == "dynamic" and m["calibration"]["images"] == 0
    assert "ConvInteger" in {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert "slower than FP32" in caplog.text
