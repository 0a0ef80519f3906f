"""ONNX bundles: FP32 from torch.onnx (dynamo exporter, dynamic batch), FP16 with float32 inputs and
outputs, INT8 through ONNX Runtime's quantizer (static QDQ by default, dynamic on request)."""

import contextlib
import io
import logging
import os

from .. import EdgeKDError
from ..bundle.manifest import FORMAT_FILES, METADATA_KEYS
from .options import MIN_OPSET

from . import quantize_onnx as q

log = logging.getLogger(__name__)

(MODEL_FILE,) = FORMAT_FILES["onnx"]
# Weights go into external data only when the protobuf would pass its 2 GB limit.
EXTERNAL_DATA_BYTES = 1_500_000_000


def export_onnx(model, input_spec, folder, opset=None):
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
    kwargs = {"opset_version": opset} if opset else {}
    chatter = io.StringIO()  # the exporter prints progress lines; keep them for --debug logs only
    try:
        with contextlib.redirect_stdout(chatter):
            torch.onnx.export(
                model.eval(), (example,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                external_data=weight_bytes > EXTERNAL_DATA_BYTES, **kwargs,
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


def _strip_debug_metadata(path):
    """Drop the exporter's per-node stack traces and scope names: a device never reads them, and on a
    small model they are a tenth of the file (11 KB of the CIFAR-10 student's 114 KB)."""
    import onnx

    model = onnx.load(path)
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    onnx.save(model, path)


def write_metadata(path, classes, input_spec):
    """Describe the model inside the ONNX file (METADATA_KEYS), so the file alone is a usable teacher."""
    import json

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


def to_fp16(src, dst):
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


def _sort_topologically(graph):
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


# The format table's steps (export/formats.py): each reads the job, writes its files, and returns what it
# adds to ``job.info``; the pipeline runs the ones listed for the requested precision, in order.


def onnx_fp32(job):
    """FP32 ONNX from torch: the bundle's model at fp32, otherwise the reference the next step starts from."""
    folder = job.folder if job.precision == "fp32" else job.scratch
    export_onnx(job.model, job.input_spec, folder, job.options.get("opset"))
    return {"model_file": MODEL_FILE, "fp32_reference": os.path.join(folder, MODEL_FILE)}


def onnx_fp16(job):
    to_fp16(job.info["fp32_reference"], os.path.join(job.folder, MODEL_FILE))


def onnx_int8(job):
    """INT8 through ONNX Runtime's quantizer: static QDQ on the calibration images, or dynamic on request."""
    o = job.options
    settings = q.int8_settings(o["int8_types"], o["reduce_range"], o["per_channel"], o.get("target_features"))
    pre = q.preprocess(job.info["fp32_reference"], os.path.join(job.scratch, "preprocessed.onnx"))
    out = os.path.join(job.folder, MODEL_FILE)
    if o["quant"] == "dynamic":
        log.warning("dynamic INT8 runs convolutions as ConvInteger, measured several times slower than FP32 "
                    "on CPU; static INT8 is the default for conv nets")
        q.quantize_dynamic_file(pre, out, settings)
        settings.update(mode="dynamic", format="QOperator")
    else:
        q.quantize_static_file(pre, out, job.calib, settings, o["calib_method"],
                               os.path.join(job.scratch, "calibration-cache.json"), progress=job.progress)
        settings.update(mode="static", calib_method=o["calib_method"])
    return {"quantization": settings, "quantizable_layers": len(q.quantizable_nodes(pre)), "quantized_from": pre}


def onnx_describe(job):
    """The last ONNX step: class names and preprocessing travel inside the file (a teacher needs them)."""
    write_metadata(os.path.join(job.folder, MODEL_FILE), job.options["classes"], job.input_spec)


def restore_onnx(job, tune, max_drop, max_layers):
    """Accuracy-aware retry for ONNX INT8: keep the most sensitive layers in float (nodes_to_exclude)."""
    o = job.options
    if o["quant"] == "dynamic":
        raise EdgeKDError("the INT8 fallback works on static quantization; drop --quant dynamic")
    settings = q.int8_settings(o["int8_types"], o["reduce_range"], o["per_channel"], o.get("target_features"))
    pre = os.path.join(job.scratch, "preprocessed.onnx")
    restored = q.restore_layers(pre, os.path.join(job.folder, MODEL_FILE), job.scratch, job.calib, tune, settings,
                                o["calib_method"], max_drop, max_layers, job.progress)
    onnx_describe(job)  # the re-quantized file is a new file
    return restored
