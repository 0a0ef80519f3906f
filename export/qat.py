"""INT8 bundles from a QAT checkpoint (``edgekd quantize``): the fake-quantized model is converted as it is,
with the ranges it was trained with, so no new calibration runs.

- OpenVINO: ``openvino.convert_model`` on the torch model turns NNCF's quantizers into FakeQuantize
  ops, which the CPU plugin runs as INT8 convolutions.
- ONNX (default, ``--qat-onnx ort``): the trained weights are re-quantized by ONNX Runtime's static
  quantizer, in its own QDQ placement, so its QLinearConv kernels run them (see _onnx_runtime_placement).
- ONNX, ``--qat-onnx nncf``: the quantizers are switched to NNCF's QuantizeLinear/DequantizeLinear export
  mode and the model goes through torch's TorchScript exporter (``dynamo=False``): NNCF's quantizers do not
  pass ``torch.export`` (data-dependent branches), so the dynamo exporter the FP32 path uses cannot take them.
  Batch norms are folded into the quantized convolutions (exact); the graph is exactly what was trained.

Each writes an FP32 counterpart (the same fine-tuned weights with the quantizers off, converted the
same way, so layer names match) into the scratch folder for the speed check and the per-layer report.
"""

import contextlib
import copy
import io
import logging
import os
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from .. import EdgeKDError
from ..base.files import path_from_file
from ..bundle.manifest import FORMAT_FILES
from ..core.checkpoint import Checkpoint
from ..core.fakequant import quantizer_modules
from ..core.loading import float_model, load_model
from .job import ExportJob
from .onnx import INPUT_NAME, OUTPUT_NAME, onnx_fp32, onnx_int8
from .openvino import import_openvino, quantized_layers
from .options import ONNX, OPENVINO
from .records import Int8Settings, QatQuantization, QatSource

if TYPE_CHECKING:  # heavy: only for the type checker
    import onnx
    import torch
    from torch import nn

log = logging.getLogger(__name__)

ONNX_FILE, OV_FILE = FORMAT_FILES[ONNX][0], FORMAT_FILES[OPENVINO][0]
QDQ_OPSET = 17
AS_TRAINED = "as trained (NNCF's quantizers)"


def build_qat(job: ExportJob) -> None:
    """The exporter for a QAT checkpoint at int8, either format: fills ``job.result``."""
    qat = job.checkpoint.qat
    if qat is None:
        raise RuntimeError("build_qat converts QAT checkpoints only")  # the pipeline chose the steps: our bug
    fp32 = float_model(job.checkpoint)
    if job.request.format == "onnx" and job.options.qat_onnx == "ort":
        placement = _onnx_runtime_placement(job, fp32)
    elif job.request.format == "onnx":
        placement = _onnx(job, fp32)
    else:
        placement = _openvino(job, fp32)
    result = job.result
    int8_layers = result.int8_layers or []
    runtime = result.quantization  # --qat-onnx ort: ONNX Runtime's settings, kept below
    result.quantization = QatQuantization(
        source_student=qat.source, layers_int8=qat.layers_int8, calibration_images=qat.calib_size,
        int8_graph_layers=int8_layers, placement=placement,
        onnxruntime=runtime if isinstance(runtime, Int8Settings) else None)
    result.quantizable_layers = result.quantizable_layers or len(int8_layers)
    if not int8_layers:
        raise EdgeKDError("the converted QAT model holds no INT8 layer (no quantize/dequantize feeds a weighted op)")


def _example(job: ExportJob) -> "torch.Tensor":
    import torch

    s = job.input_spec
    return torch.zeros(2, s.channels, s.height, s.width)


def _torchscript_onnx(model: "nn.Module", example: "torch.Tensor", path: str) -> None:
    import torch

    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=QDQ_OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    log.debug(chatter.getvalue())


def _onnx(job: ExportJob, fp32: "nn.Module") -> str:
    """--qat-onnx nncf: NNCF's quantizers exported as QDQ pairs; returns the placement."""
    import onnx
    from nncf.torch.quantization.layers import QuantizerExportMode

    qmodel = copy.deepcopy(job.model).eval()
    for q in quantizer_modules(qmodel):
        q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    out = os.path.join(job.folder, ONNX_FILE)
    reference = os.path.join(job.scratch, "fp32.onnx")
    try:  # the exporter on the user's model; folding and checking our own graph are not in here: a bug there is ours
        _torchscript_onnx(qmodel, _example(job), out)
        _torchscript_onnx(fp32, _example(job), reference)
    except Exception as e:
        raise EdgeKDError(f"ONNX export of the QAT model failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    folded = fold_batchnorm(out)
    onnx.checker.check_model(out, full_check=True)
    log.info("ONNX QAT model: %d batch norm(s) folded into their quantized convolutions", folded)
    result = job.result
    result.model_file, result.fp32_reference, result.int8_layers = ONNX_FILE, reference, qdq_layers(out)
    result.batchnorms_folded = folded
    return AS_TRAINED


def fold_batchnorm(path: str) -> int:
    """Fold every BatchNormalization that follows a Conv whose weight is a constant through a per-channel
    symmetric QuantizeLinear -> DequantizeLinear into that Conv; return how many were folded.

    Why: the TorchScript exporter folds BN into a Conv only when the weight is a plain initializer, and ONNX
    Runtime's Conv+BN fusion likewise, so in a QAT graph every BN stays between its Conv and the next
    QuantizeLinear and blocks the QDQ -> QLinearConv fusion: the Conv then runs in fp32 on dequantized
    tensors (slower than the FP32 model). It is exact: with s = gamma / sqrt(var + eps) per output channel,
    Q(w * s, scale * |s|) = sign(s) * Q(w, scale) for a symmetric quantizer (zero point 0, round half to
    even), so the INT8 weights keep their values up to sign and BN(conv(x)) = conv'(x) + (b - mean) * s + beta.
    """
    import onnx

    model = onnx.load(path)
    graph = _Graph(model.graph)
    dead = [bn for bn in list(model.graph.node) if bn.op_type == "BatchNormalization" and graph.fold(bn)]
    for bn in dead:
        model.graph.node.remove(bn)
    _prune(model.graph)
    onnx.save(model, path)
    return len(dead)


class _Graph:
    """An ONNX graph's constants, producers and reader counts, for folding batch norms into QDQ convolutions."""

    def __init__(self, g: "onnx.GraphProto") -> None:
        self.g = g
        self.tensors = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.tensors[n.output[0]] = n.attribute[0].t
        self.producer = {o: n for n in g.node for o in n.output}
        self.readers: Dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                self.readers[i] = self.readers.get(i, 0) + 1

    def value(self, name: str) -> Optional[np.ndarray]:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.tensors[name]) if name in self.tensors else None

    def _single(self, name: str) -> bool:
        return self.readers.get(name) == 1

    def _chain(self, bn: "onnx.NodeProto") -> Optional[Tuple["onnx.NodeProto", "onnx.NodeProto", "onnx.NodeProto"]]:
        """(conv, quantize, dequantize) when ``bn`` follows a Conv whose weight is a constant through a QDQ pair."""
        conv = self.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or not self._single(conv.output[0]) or len(bn.output) != 1:
            return None
        dq = self.producer.get(conv.input[1])
        q = self.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if dq is None or q is None or q.op_type != "QuantizeLinear" or not self._single(q.output[0]) \
                or not self._single(dq.output[0]) or dq.input[1:] != q.input[1:]:
            return None
        return conv, q, dq

    def fold(self, bn: "onnx.NodeProto") -> bool:
        """Fold ``bn`` into its quantized Conv when that is exact; whether it was."""
        chain = self._chain(bn)
        if chain is None:
            return False
        conv, q, dq = chain
        w, scale = self.value(q.input[0]), self.value(q.input[1])
        zero = self.value(q.input[2]) if len(q.input) > 2 else None
        gamma, beta, mean, var = (self.value(name) for name in bn.input[1:5])
        if w is None or scale is None or gamma is None or beta is None or mean is None or var is None:
            return False
        if (zero is not None and np.any(zero != 0)) or scale.ndim != 1 or _attr(q, "axis", 1) != 0 \
                or len(scale) != w.shape[0]:
            return False  # per-tensor or asymmetric weights: folding would change the INT8 values
        bias = self.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0])
        if bias is None:
            return False
        s = (gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))).astype(np.float64)
        folded = ((w * s.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype), (scale * np.abs(s)).astype(scale.dtype),
                  ((bias - mean) * s + beta).astype(w.dtype))
        self._rewire(conv, q, dq, bn, folded)
        return True

    def _rewire(self, conv: "onnx.NodeProto", q: "onnx.NodeProto", dq: "onnx.NodeProto", bn: "onnx.NodeProto",
                folded: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Point ``conv`` at the folded (weight, scale, bias) and take over ``bn``'s output."""
        from onnx import numpy_helper

        names = tuple(f"{conv.name or conv.output[0]}.folded_{k}" for k in ("weight", "scale", "bias"))
        self.g.initializer.extend(numpy_helper.from_array(v, name) for v, name in zip(folded, names))
        weight, scale, bias = names
        q.input[0], q.input[1], dq.input[1] = weight, scale, scale
        if len(conv.input) > 2:
            conv.input[2] = bias
        else:
            conv.input.append(bias)
        conv.output[0] = bn.output[0]


def _attr(node: "onnx.NodeProto", name: str, default: object) -> object:
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _prune(g: "onnx.GraphProto") -> None:
    """Drop the constants and initializers nothing reads any more (the old scales and weights)."""
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(n)
    keep = [t for t in g.initializer if t.name in used or t.name in {i.name for i in g.input}]
    del g.initializer[:]
    g.initializer.extend(keep)


def _onnx_runtime_placement(job: ExportJob, fp32: "nn.Module") -> str:
    """ONNX, the default (--qat-onnx ort): the QAT-trained weights (the fine-tuned model without its fake
    quantizers) through the same FP32 export and ONNX Runtime static quantization as post-training INT8,
    calibrated on train images. Why not the trained quantizers as they are: NNCF places them where OpenVINO
    fuses INT8 (at each convolution's input), but ONNX Runtime forms a QLinearConv only where a
    QuantizeLinear directly follows the Conv; with a batch norm, hard-swish or residual add in between, the
    Conv runs in fp32 on dequantized tensors (MobileNetV3-small on CIFAR-10: 7 of 52 convolutions fused, 0.12x
    the FP32 speed at batch 32). The weights still carry the training: ONNX Runtime quantizes them per channel,
    symmetric, to 8 bits as NNCF did; the activation ranges come from calibration."""
    if job.calib is None:
        raise EdgeKDError("--qat-onnx ort re-quantizes the QAT-trained weights with ONNX Runtime and needs "
                          "calibration images; --quant dynamic cannot convert a QAT model")
    qmodel, job.model = job.model, fp32
    try:
        onnx_fp32(job)  # the next step reads the FP32 file from job.result
        onnx_int8(job)
    finally:
        job.model = qmodel
    job.result.int8_layers = qdq_layers(os.path.join(job.folder, ONNX_FILE))
    return "ONNX Runtime static QDQ (the trained weights re-quantized, activations calibrated)"


def qdq_layers(path: str) -> List[str]:
    """Names of the Conv/Gemm/MatMul nodes of an ONNX graph fed by a DequantizeLinear (they run in INT8)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and any(i in dq for i in n.input)]


def _openvino(job: ExportJob, fp32: "nn.Module") -> str:
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
                          f"{str(e).splitlines()[0]}") from e
    ov.save_model(model, os.path.join(job.folder, OV_FILE), compress_to_fp16=False)
    result = job.result
    result.model_file, result.fp32_reference, result.int8_layers = OV_FILE, reference, quantized_layers(model)
    return AS_TRAINED


def fp32_student_record(ckpt: Checkpoint, images: np.ndarray, labels: np.ndarray, bundle_top1: float,
                        folder: str = ".") -> QatSource:
    """Top-1 of the FP32 student the QAT started from, on the gate's images, and the bundle's drop against it
    (the gate itself compares the bundle with the fake-quantized model in torch: like with like)."""
    import torch

    qat = ckpt.qat
    recorded = qat.source if qat else None
    source = path_from_file(recorded, folder)  # recorded relative to the QAT checkpoint's folder
    record = QatSource(recorded)
    if source and os.path.isfile(source):
        model, _ = load_model(source)
        with torch.no_grad():
            preds = np.concatenate([model(torch.from_numpy(images[i:i + 256])).argmax(1).numpy()
                                    for i in range(0, len(images), 256)])
        record.top1 = float((preds == labels).mean())
    else:
        record.top1 = qat.source_top1 if qat else None
        record.note = "source checkpoint not found: its test top-1 at QAT time is used"
    if record.top1 is not None:
        record.drop_vs_fp32_student = round((record.top1 - bundle_top1) * 100, 4)
    return record
