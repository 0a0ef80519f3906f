"""INT8 bundles from a QAT checkpoint (``edgekd quantize``): the fake-quantized model is converted as it is,
with the ranges it was trained with, so no new calibration runs.

- OpenVINO: ``openvino.convert_model`` on the torch model turns NNCF's quantizers into FakeQuantize
  ops, which the CPU plugin runs as INT8 convolutions.
- ONNX: the quantizers are switched to NNCF's QuantizeLinear/DequantizeLinear export mode and the model
  goes through torch's TorchScript exporter (``dynamo=False``): NNCF's quantizers do not pass
  ``torch.export`` (data-dependent branches), so the dynamo exporter the FP32 path uses cannot take them.

Each writes an FP32 counterpart (the same fine-tuned weights with the quantizers off, converted the
same way, so layer names match) into the scratch folder for the speed check and the per-layer report.
"""

import contextlib
import copy
import io
import logging
import os
import warnings

from .. import EdgeKDError

log = logging.getLogger(__name__)

ONNX_FILE, OV_FILE = "model.onnx", "model.xml"
QDQ_OPSET = 17


def build_qat(job):
    """The exporter for a QAT checkpoint at int8, either format; returns the format exporter's info dict."""
    from ..quantize import float_model

    ckpt = job.state["ckpt"]
    fp32 = float_model(ckpt)
    if job.options["fmt"] == "onnx":
        info = _onnx(job, fp32)
    else:
        info = _openvino(job, fp32)
    qat = ckpt["qat"]
    info["quantization"] = {"mode": "qat", "tool": "edgekd quantize (NNCF fake quantizers, distillation fine-tuning)",
                            "source_student": qat.get("source"), "layers_int8": qat.get("layers_int8"),
                            "calibration_images": qat.get("calib_size"), "int8_graph_layers": info["int8_layers"]}
    info["quantizable_layers"] = len(info["int8_layers"])
    if not info["int8_layers"]:
        raise EdgeKDError("the converted QAT model holds no INT8 layer (no quantize/dequantize feeds a weighted op)")
    return info


def _example(job):
    import torch

    s = job.input_spec
    return torch.zeros(2, s.channels, s.height, s.width)


def _torchscript_onnx(model, example, path):
    import torch

    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=QDQ_OPSET, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    log.debug(chatter.getvalue())


def _onnx(job, fp32):
    import onnx
    from nncf.torch.quantization.layers import QuantizerExportMode

    from ..quantize import quantizer_modules

    qmodel = copy.deepcopy(job.model).eval()
    for q in quantizer_modules(qmodel):
        q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    out = os.path.join(job.folder, ONNX_FILE)
    reference = os.path.join(job.scratch, "fp32.onnx")
    try:
        _torchscript_onnx(qmodel, _example(job), out)
        _torchscript_onnx(fp32, _example(job), reference)
        onnx.checker.check_model(out, full_check=True)
    except Exception as e:
        raise EdgeKDError(f"ONNX export of the QAT model failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return {"model_file": ONNX_FILE, "fp32_reference": reference, "int8_layers": qdq_layers(out)}


def qdq_layers(path):
    """Names of the Conv/Gemm/MatMul nodes of an ONNX graph fed by a DequantizeLinear (they run in INT8)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and any(i in dq for i in n.input)]


def _openvino(job, fp32):
    from .openvino import import_openvino, quantized_layers

    ov = import_openvino()
    s = job.input_spec
    shape = [-1, s.channels, s.height, s.width]
    reference = os.path.join(job.scratch, "fp32.xml")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ov.convert_model(copy.deepcopy(job.model).eval(), example_input=_example(job), input=shape)
            ov.save_model(ov.convert_model(fp32, example_input=_example(job), input=shape), reference,
                          compress_to_fp16=False)
    except Exception as e:
        raise EdgeKDError(f"openvino.convert_model of the QAT model failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0]}") from None
    ov.save_model(model, os.path.join(job.folder, OV_FILE), compress_to_fp16=False)
    return {"model_file": OV_FILE, "fp32_reference": reference, "int8_layers": quantized_layers(model)}


def fp32_student_record(ckpt, images, labels, bundle_top1):
    """Top-1 of the FP32 student the QAT started from, on the gate's images, and the bundle's drop against it
    (the gate itself compares the bundle with the fake-quantized model in torch: like with like)."""
    import numpy as np
    import torch

    from ..checkpoint import load_model

    source = ckpt["qat"].get("source")
    record = {"source": source, "top1": None, "drop_vs_fp32_student": None}
    if source and os.path.isfile(source):
        model, _ = load_model(source)
        with torch.no_grad():
            preds = np.concatenate([model(torch.from_numpy(images[i:i + 256])).argmax(1).numpy()
                                    for i in range(0, len(images), 256)])
        record["top1"] = float((preds == labels).mean())
    else:
        record["top1"] = ckpt["qat"].get("source_top1")
        record["note"] = "source checkpoint not found: its test top-1 at QAT time is used"
    if record["top1"] is not None:
        record["drop_vs_fp32_student"] = round((record["top1"] - bundle_top1) * 100, 4)
    return record
