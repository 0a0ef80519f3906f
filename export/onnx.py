"""ONNX bundles: FP32 from torch.onnx (dynamo exporter, dynamic batch), FP16 with float32 inputs and
outputs, INT8 through ONNX Runtime's quantizer (static QDQ by default, dynamic on request)."""

import contextlib
import io
import json
import logging
import os
from typing import TYPE_CHECKING, List, Optional

from .. import EdgeKDError
from ..bundle.manifest import FORMAT_FILES, METADATA_KEYS
from ..core.data import InputSpec
from .options import MIN_OPSET, ONNX
from . import quantize_onnx as q
from .job import ExportJob
from .records import Restored, Tuning

if TYPE_CHECKING:  # heavy: only for the type checker
    import onnx
    from torch import nn

log = logging.getLogger(__name__)

(MODEL_FILE,) = FORMAT_FILES[ONNX]
# The graph's input and output names (the bundle's runner feeds its first input and reads its first output).
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Weights go into external data only when the protobuf would pass its 2 GB limit.
EXTERNAL_DATA_BYTES = 1_500_000_000


def export_onnx(model: "nn.Module", input_spec: InputSpec, folder: str, opset: Optional[int] = None) -> str:
    """Write ``folder/model.onnx`` (+ ``model.onnx.data`` for huge models); return the model file name."""
    import onnx
    import torch

    from torch.onnx import _constants

    if opset and not MIN_OPSET <= opset <= _constants.ONNX_MAX_OPSET:  # else another opset is written without a word
        raise EdgeKDError(f"--opset {opset}: torch {torch.__version__}'s ONNX exporter writes opsets {MIN_OPSET} to "
                          f"{_constants.ONNX_MAX_OPSET}")
    example = torch.zeros(2, input_spec.channels, input_spec.height, input_spec.width)
    path = os.path.join(folder, MODEL_FILE)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    chatter = io.StringIO()  # the exporter prints progress lines; keep them for --debug logs only
    try:
        with contextlib.redirect_stdout(chatter):
            torch.onnx.export(
                model.eval(), (example,), path, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                external_data=weight_bytes > EXTERNAL_DATA_BYTES, opset_version=opset or None,
            )
    except Exception as e:
        log.debug(chatter.getvalue())
        raise EdgeKDError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    log.debug(chatter.getvalue())
    if weight_bytes <= EXTERNAL_DATA_BYTES:
        _strip_debug_metadata(path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise EdgeKDError(f"exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}") from e
    return MODEL_FILE


def _strip_debug_metadata(path: str) -> None:
    """Drop the exporter's per-node stack traces and scope names: a device never reads them, and on a
    small model they are a tenth of the file (11 KB of the CIFAR-10 student's 114 KB)."""
    import onnx

    model = onnx.load(path)
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    onnx.save(model, path)


def write_metadata(path: str, classes: List[str], input_spec: InputSpec) -> None:
    """Describe the model inside the ONNX file (METADATA_KEYS), so the file alone is a usable teacher."""
    import onnx

    model = onnx.load(path, load_external_data=False)  # external weights stay where they are
    values = {"classes": json.dumps(list(classes)), "mean": json.dumps(list(input_spec.mean)),
              "std": json.dumps(list(input_spec.std)), "color": input_spec.color,
              "input_size": json.dumps([input_spec.height, input_spec.width]), "outputs": "logits"}
    kept = [p for p in model.metadata_props if p.key not in METADATA_KEYS.values()]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=METADATA_KEYS[key], value=value)
    onnx.save(model, path)


def to_fp16(src: str, dst: str) -> None:
    """FP16 weights and arithmetic, float32 input and output (callers keep feeding float32 images)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    # The converter appends its input casts after the nodes that read them; ONNX requires graph order.
    _sort_topologically(model.graph)
    onnx.save(model, dst)
    try:
        onnx.checker.check_model(dst, full_check=True)
    except onnx.checker.ValidationError as e:
        raise EdgeKDError(f"FP16 ONNX model fails onnx.checker: {str(e).splitlines()[0]}") from e


def _sort_topologically(graph: "onnx.GraphProto") -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable otherwise)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise EdgeKDError("FP16 conversion produced a graph with a cycle or a dangling input")
        for n in ready:
            known.update(n.output)
            ordered.append(n)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


# The format table's steps (export/formats.py): each reads the job, writes its files, and records what it made
# in ``job.result``; the pipeline runs the ones listed for the requested precision, in order.


def onnx_fp32(job: ExportJob) -> None:
    """FP32 ONNX from torch: the bundle's model at fp32, otherwise the reference the next step starts from."""
    folder = job.folder if job.precision == "fp32" else job.scratch
    export_onnx(job.model, job.input_spec, folder, job.options.opset)
    job.result.model_file, job.result.fp32_reference = MODEL_FILE, os.path.join(folder, MODEL_FILE)


def onnx_fp16(job: ExportJob) -> None:
    to_fp16(_fp32_reference(job), os.path.join(job.folder, MODEL_FILE))


def _fp32_reference(job: ExportJob) -> str:
    if job.result.fp32_reference is None:
        raise RuntimeError("the FP32 ONNX step must run first")  # the format table's order: our bug
    return job.result.fp32_reference


def onnx_int8(job: ExportJob) -> None:
    """INT8 through ONNX Runtime's quantizer: static QDQ on the calibration images, or dynamic on request."""
    settings = job.int8_settings()
    pre = q.preprocess(_fp32_reference(job), os.path.join(job.scratch, "preprocessed.onnx"))
    out = os.path.join(job.folder, MODEL_FILE)
    if job.request.quant == "dynamic":
        log.warning("dynamic INT8 runs convolutions as ConvInteger, measured several times slower than FP32 "
                    "on CPU; static INT8 is the default for conv nets")
        q.quantize_dynamic_file(pre, out, settings)
        settings.mode, settings.format = "dynamic", "QOperator"
    else:
        q.quantize_static_file(pre, out, job.calib, settings, job.request.calib_method,
                               os.path.join(job.scratch, "calibration-cache.json"), progress=job.progress)
        settings.mode, settings.calib_method = "static", job.request.calib_method
    job.result.quantization = settings
    job.result.quantizable_layers = len(q.quantizable_nodes(pre))
    job.result.quantized_from = pre


def onnx_describe(job: ExportJob) -> None:
    """The last ONNX step: class names and preprocessing travel inside the file (a teacher needs them)."""
    write_metadata(os.path.join(job.folder, MODEL_FILE), job.checkpoint.classes, job.input_spec)


def restore_onnx(job: ExportJob, tune: Tuning, max_drop: float, max_layers: int) -> Restored:
    """Accuracy-aware retry for ONNX INT8: keep the most sensitive layers in float (nodes_to_exclude)."""
    if job.request.quant == "dynamic":
        raise EdgeKDError("the INT8 fallback works on static quantization; drop --quant dynamic")
    pre = os.path.join(job.scratch, "preprocessed.onnx")
    restored = q.restore_layers(pre, os.path.join(job.folder, MODEL_FILE), job.scratch, job.calib, tune,
                                job.int8_settings(), job.request.calib_method, max_drop, max_layers, job.progress)
    onnx_describe(job)  # the re-quantized file is a new file
    return restored
