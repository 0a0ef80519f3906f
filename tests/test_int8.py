"""INT8 that keeps its accuracy and says why: quantization-aware distillation (edgekd quantize) into bundles
that hold INT8 layers in their graphs, the ladder (PTQ, fallback, QAT) stopping at the first rung that passes,
and the per-layer report ranking a deliberately broken layer first."""

import json

import numpy as np
import pytest
import torch

from edgekd.export.pipeline import ExportOptions, export_checkpoint


def _conv_names_onnx(path):
    import onnx

    return [n.name for n in onnx.load(path).graph.node if n.op_type == "Conv"]


def _broken_checkpoint(src, dst):
    """The student with one outlier weight that INT8 cannot represent: input channel 7 of the second conv is
    dead (its batch norm pushes it below zero before the ReLU, so FP32 never sees the outlier), and the second conv's weights on that
    channel are 1000: the per-channel INT8 scale then rounds every other weight of that conv to zero."""
    ckpt = torch.load(src, weights_only=True)
    sd = ckpt["state_dict"]
    sd["features.1.weight"][7] = 1e-3  # not 0: an all-zero weight channel is a quantization hazard of its own
    sd["features.1.bias"][7] = -10.0   # always negative before the ReLU: the channel is dead
    sd["features.4.weight"][:, 7] = 1000.0
    torch.save(ckpt, dst)
    return dst


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_layer_report_ranks_the_broken_layer_first(digits_run, tmp_path, fmt):
    ckpt = _broken_checkpoint(digits_run / "student.pt", tmp_path / "broken.pt")
    out = tmp_path / f"broken-{fmt}"
    m = export_checkpoint(str(ckpt), ExportOptions(format=fmt, precision="int8", out=str(out), val_size=100,
                                                   calib_size=50, max_drop=100.0, speed_check=False, progress=False))
    report = m["int8_layers"]
    assert report["count"] == 4 and report["images"] > 0
    worst = report["layers"][0]
    assert worst["op"] in ("Conv", "Convolution")
    # the second conv of the bundle's graph (graph order), and nothing else, is the one the outlier ruins
    if fmt == "onnx":
        assert worst["name"] == _conv_names_onnx(str(out / "model.onnx"))[1]
    else:
        from edgekd.export.openvino import import_openvino

        ops = import_openvino().Core().read_model(str(out / "model.xml")).get_ordered_ops()
        op = next(op for op in ops if op.get_friendly_name() == worst["name"])
        broken_shape = list(torch.load(ckpt, weights_only=True)["state_dict"]["features.4.weight"].shape)
        assert list(op.input(1).get_partial_shape().to_shape()) == broken_shape
    assert worst["loss_db"] > 15 and worst["loss_db"] == max(r["loss_db"] for r in report["layers"])
    assert all(r["loss_db"] < worst["loss_db"] - 10 for r in report["layers"][1:])
    assert report["plot"] == "int8_layers.png" and "int8_layers.png" in m["files"]
    assert (out / "int8_layers.png").stat().st_size > 1000

    # where the time goes: per-operator times from the runtime's own profiler, with the precision each ran in
    from edgekd.bench.profile import profile_bundle

    images = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    prof = profile_bundle(str(out), images, batch_size=4, runs=3)
    assert prof.runtime == ("onnxruntime" if fmt == "onnx" else "openvino") and prof.total_ms > 0
    assert prof.by_type and all(r.ms >= 0 and r.op_type for r in prof.by_type)
    assert prof.by_layer and abs(sum(r.share for r in prof.by_type) - 1) < 0.01
    assert prof.precision_share.get("int8", 0) > 0  # some operator ran (or was fed) in INT8


@pytest.mark.slow
def test_quantization_aware_distillation_gives_int8_bundles(digits_run, tmp_path, cli):
    qat = tmp_path / "qat"
    cli("quantize", digits_run / "student.pt", "--epochs", 1, "--calib-size", 50, "--train-subset", 300,
        "--out", qat, "--no-progress")
    ckpt = torch.load(qat / "student-qat.pt", weights_only=True)  # plain types only
    assert ckpt["qat"]["layers_int8"] == ["classifier", "features.0", "features.4", "features.8"]
    metrics = json.loads((qat / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and 0 <= metrics["qat"]["int8_top1_before"] <= 1
    assert metrics["qat"]["drop_before"] == pytest.approx((metrics["qat"]["fp32_top1"] - metrics["qat"]["int8_top1_before"]) * 100, abs=1e-3)
    assert (qat / "config.yaml").is_file()

    onnx_out, ov_out = tmp_path / "qat-onnx", tmp_path / "qat-ov"
    cli("export", qat / "student-qat.pt", "--format", "onnx", "--precision", "int8", "--out", onnx_out,
        "--val-size", 100, "--no-speed-check", "--no-progress")
    cli("export", qat / "student-qat.pt", "--format", "openvino", "--precision", "int8", "--out", ov_out,
        "--val-size", 100, "--no-speed-check", "--no-progress")

    import onnx

    graph = onnx.load(str(onnx_out / "model.onnx")).graph
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    fed = [n for n in graph.node if n.op_type == "Conv" and any(i in dq for i in n.input)]
    assert len(fed) == 3 and any(n.op_type == "QuantizeLinear" for n in graph.node)

    from edgekd.export.openvino import import_openvino, quantized_layers

    ov_model = import_openvino().Core().read_model(str(ov_out / "model.xml"))
    kinds = {op.get_type_name() for op in ov_model.get_ordered_ops()}
    assert "FakeQuantize" in kinds and len(quantized_layers(ov_model)) == 4

    for folder in (onnx_out, ov_out):
        m = json.loads((folder / "manifest.json").read_text())
        assert m["precision"] == "int8" and m["quantization"]["mode"] == "qat"
        assert m["validation"]["drop"] <= 1.0
        # OpenVINO keeps the trained quantizer ranges; ONNX (--qat-onnx ort) re-quantizes the trained weights
        # in ONNX Runtime's own placement, with calibrated activation ranges
        assert (m["calibration"]["images"] > 0) == (folder == onnx_out)
        assert m["qat"]["top1"] is not None and np.isfinite(m["qat"]["drop_vs_fp32_student"])
        assert m["int8_layers"]["count"] == 4

    # NNCF's trained quantizers as they are (--qat-onnx nncf): batch norms folded into the quantized convs, exactly
    nncf_out = tmp_path / "qat-onnx-nncf"
    cli("export", qat / "student-qat.pt", "--format", "onnx", "--precision", "int8", "--qat-onnx", "nncf",
        "--out", nncf_out, "--val-size", 100, "--no-speed-check", "--no-progress")
    graph = onnx.load(str(nncf_out / "model.onnx")).graph
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)
    m = json.loads((nncf_out / "manifest.json").read_text())
    assert m["validation"]["top1_agreement"] >= 0.99 and m["quantization"]["placement"].startswith("as trained")

    # A QAT checkpoint exports at int8 only
    bad = cli("export", qat / "student-qat.pt", "--format", "onnx", "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "--precision int8" in bad.stderr


@pytest.fixture(scope="module")
def black_calibration(tmp_path_factory):
    """A calibration folder of black images, as if a user pointed --calib-data at the wrong folder: the input's
    range comes out as one value, so post-training INT8 clips every real image and collapses."""
    from PIL import Image

    root = tmp_path_factory.mktemp("black")
    for split in ("train", "test"):
        for label in range(10):
            (root / split / str(label)).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(root / split / str(label) / f"{i}.png")
    return root


def _int8(run, student, out, *extra, **kw):
    """``edgekd export`` to ONNX INT8 through ``run`` (the ``cli`` or ``cli_main`` fixture)."""
    return run("export", student, "--format", "onnx", "--precision", "int8", "--val-size", 200, "--no-speed-check",
               "--no-progress", "--out", out, *extra, **kw)


def test_int8_ladder_stops_at_the_first_rung_that_passes(digits_run, black_calibration, tmp_path, cli_main):
    student = digits_run / "student.pt"
    # (rung 1 passing on proper calibration, with nothing else tried: tests/test_export.py::test_each_format_and_precision_exports_and_passes_its_gate)
    # black calibration: rung 1 fails, rung 2 (the first conv in float) passes, so rung 3 is not taken
    bad = ("--calib-data", black_calibration, "--calib-size", 30)
    proc = _int8(cli_main, student, tmp_path / "fallback", *bad, "--max-fallback-layers", 1)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "fallback" / "manifest.json").read_text())
    assert [(r["rung"], r["passed"]) for r in m["ladder"]] == [("ptq", False), ("fallback", True)]
    assert m["ladder"][0]["drop"] > 10 and len(m["fallback"]["layers_in_float"]) == 1
    assert m["quantization"]["mode"] == "static"

    # rungs 2 and 3 off: refused in one line, naming both, and nothing written
    proc = _int8(cli_main, student, tmp_path / "none", *bad, "--max-fallback-layers", 0, "--qat-epochs", 0)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fallback is off" in proc.stderr and "quantization-aware distillation is off (--qat-epochs 0)" in proc.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_int8_ladder_takes_the_last_rung_when_the_first_two_fail(digits_run, black_calibration, tmp_path, cli):
    """PTQ collapses on the black calibration and the fallback is off: export runs quantization-aware
    distillation itself (its own calibration on the student's train images), every layer INT8, and says so."""
    out = tmp_path / "qat"
    proc = _int8(cli, digits_run / "student.pt", out, "--calib-data", black_calibration, "--calib-size", 30,
                 "--max-fallback-layers", 0, "--max-drop", 2)
    assert "last rung: quantization-aware distillation for 1 epoch(s)" in proc.stderr
    assert "INT8 ladder: ptq drop" in proc.stdout and "-> qat drop" in proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert [(r["rung"], r["passed"]) for r in m["ladder"]] == [("ptq", False), ("qat", True)]
    assert m["ladder"][1]["teacher"] == str(digits_run / "teacher.pt") and m["ladder"][1]["epochs"] == 1
    assert m["quantization"]["mode"] == "qat" and m["validation"]["drop"] <= 2
    from edgekd.export.qat import qdq_layers

    assert len(qdq_layers(str(out / "model.onnx"))) == 4 == m["quantization"]["layers"]  # every layer INT8, in the graph
    assert not m["fallback"]["used"] and m["int8_layers"]["count"] == 4


def test_batchnorm_folds_exactly_into_a_quantized_conv(tmp_path):
    """--qat-onnx nncf: Conv(DequantizeLinear(QuantizeLinear(w))) -> BatchNormalization becomes one Conv whose INT8
    weights keep their values (up to sign where gamma < 0); ONNX Runtime gives the same outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekd.export.qat import fold_batchnorm

    rng = np.random.default_rng(0)
    out_ch = 4
    w = rng.standard_normal((out_ch, 3, 3, 3)).astype(np.float32)
    scale = (np.abs(w).reshape(out_ch, -1).max(1) / 127).astype(np.float32)
    gamma = np.array([1.5, -0.7, 0.2, -2.0], np.float32)  # negative gammas flip the weights' sign
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w, "w"), (scale, "s"), (np.zeros(out_ch, np.int8), "z"), (gamma, "gamma"),
        (rng.standard_normal(out_ch).astype(np.float32), "beta"), (rng.standard_normal(out_ch).astype(np.float32), "mean"),
        (rng.uniform(0.5, 2, out_ch).astype(np.float32), "var")]]
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=0),
             helper.make_node("Conv", ["x", "wd"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-5)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_ch, 8, 8])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert fold_batchnorm(str(path)) == 1
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "DequantizeLinear", "Conv"]
    after = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new_w = tensors["conv.folded_weight"]
    new_s = tensors["conv.folded_scale"]
    q_before = np.clip(np.round(w / scale[:, None, None, None]), -128, 127)
    q_after = np.clip(np.round(new_w / new_s[:, None, None, None]), -128, 127)
    np.testing.assert_array_equal(q_after, q_before * np.sign(gamma)[:, None, None, None])
