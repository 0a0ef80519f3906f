"""OpenVINO IR bundles: FP32 and FP16 through ``openvino.convert_model`` + ``save_model``, INT8 through
NNCF post-training quantization on real calibration images (accuracy control for the fallback).

The model is converted from the checkpoint's FP32 ONNX export: that keeps channels, height and width
static and the batch dynamic, and traces the network once, the same way for every format.
"""

import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING, List, Tuple

import numpy as np

from .. import EdgeKDError
from ..base.progress import nncf_quiet
from ..bundle.manifest import FORMAT_FILES
from .job import ExportJob
from .onnx import MODEL_FILE as ONNX_FILE, export_onnx
from .options import OPENVINO
from .records import NncfQuantization, Restored, Tuning

if TYPE_CHECKING:  # heavy: only for the type checker
    import openvino

log = logging.getLogger(__name__)

MODEL_FILE, WEIGHTS_FILE = FORMAT_FILES[OPENVINO]
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


def import_openvino() -> ModuleType:
    """openvino (its telemetry, which otherwise phones home and writes under ~/intel, is off in edgekd's processes:
    base/telemetry.py)."""
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    import openvino

    return openvino


# The format table's steps (see export/onnx.py): convert, [quantize,] save.


def openvino_convert(job: ExportJob) -> None:
    """The checkpoint's FP32 ONNX export (scratch) converted to an in-memory OpenVINO model."""
    ov = import_openvino()
    export_onnx(job.model, job.input_spec, job.scratch, job.options.opset)
    fp32_onnx = os.path.join(job.scratch, ONNX_FILE)
    job.openvino.model = _convert(ov, fp32_onnx)
    job.result.model_file, job.result.fp32_reference = MODEL_FILE, fp32_onnx


def _convert(ov: ModuleType, path: str) -> "openvino.Model":
    try:
        return ov.convert_model(path)
    except Exception as e:
        raise EdgeKDError(f"openvino.convert_model failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def openvino_int8(job: ExportJob) -> None:
    """NNCF post-training quantization on the calibration images; keeps an FP32 copy for the fallback."""
    calib, fp32_onnx = job.calib, job.result.fp32_reference
    if calib is None or fp32_onnx is None:
        raise RuntimeError("OpenVINO INT8 needs calibration images and the converted FP32 model")  # our bug
    model = _nncf_quantize(job.openvino.model, calib, job.progress)
    job.openvino.model = job.openvino.int8 = model
    job.openvino.fp32 = _convert(import_openvino(), fp32_onnx)
    job.result.quantizable_layers = len(quantized_layers(model))
    job.result.quantization = NncfQuantization(subset_size=len(calib))


def openvino_save(job: ExportJob) -> None:
    # save_model compresses weights to FP16 unless told not to: only the fp16 bundle should be.
    import_openvino().save_model(job.openvino.model, os.path.join(job.folder, MODEL_FILE),
                                 compress_to_fp16=job.precision == "fp16")


def _nncf_quantize(model: "openvino.Model", calib: np.ndarray, progress: bool = True) -> "openvino.Model":
    import nncf

    # One image per item, so subset_size counts images and nothing is silently capped.
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    try:
        # Fast bias correction cost the digits student 33 points of top-1 (0.90 -> 0.57) in our tests;
        # the full bias correction kept it at 0.91 (docs/export.md), so it is the default here.
        with nncf_quiet(progress):
            return nncf.quantize(model, dataset, subset_size=len(calib), fast_bias_correction=False)
    except Exception as e:
        raise EdgeKDError(f"nncf.quantize failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def quantized_layers(model: "openvino.Model") -> List[str]:
    """Friendly names of the weighted layers that run in INT8: a FakeQuantize or an 8-bit constant sits on
    their input or weight path (looking through a few reshape/convert steps NNCF leaves in between)."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in WEIGHTED_OPS and any(_int8_upstream(i.get_source_output().get_node(), 4)
                                                       for i in op.inputs()):
            names.append(op.get_friendly_name())
    return names


def _int8_upstream(node: "openvino.Node", depth: int) -> bool:
    kind = node.get_type_name()
    if kind == "FakeQuantize" or (kind == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8")):
        return True
    if depth == 0 or kind in WEIGHTED_OPS:
        return False
    return any(_int8_upstream(i.get_source_output().get_node(), depth - 1) for i in node.inputs())


def restore_openvino(job: ExportJob, tune: Tuning, max_drop: float, max_layers: int) -> Restored:
    """Accuracy-aware retry: NNCF's quantize_with_accuracy_control, validated on the tuning images
    (train split, never the test split); it reverts the most harmful layers to float one by one."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    ov = import_openvino()
    images, labels = tune
    if job.calib is None:
        raise RuntimeError("the OpenVINO INT8 fallback needs the calibration images")  # static INT8 has them
    calib = nncf.Dataset([job.calib[i:i + 1] for i in range(len(job.calib))])
    validation = nncf.Dataset([(images[i:i + 1], int(labels[i])) for i in range(len(images))], lambda item: item[0])

    def top1(compiled: "openvino.CompiledModel", items: List[Tuple[np.ndarray, int]]) -> Tuple[float, None]:
        hits = [int(np.argmax(compiled(x)[0]) == y) for x, y in items]
        return float(np.mean(hits)), None

    try:
        with nncf_quiet(job.progress):
            model = nncf.quantize_with_accuracy_control(
                job.openvino.fp32, calib, validation, top1, max_drop=max_drop / 100,
                drop_type=nncf.DropType.ABSOLUTE, subset_size=len(job.calib), fast_bias_correction=False,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=max_layers))
    except Exception as e:
        raise EdgeKDError(f"nncf.quantize_with_accuracy_control failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    before = quantized_layers(job.openvino.int8)
    after = set(quantized_layers(model))
    ov.save_model(model, os.path.join(job.folder, MODEL_FILE), compress_to_fp16=False)
    return Restored([n for n in before if n not in after],
                    "nncf.quantize_with_accuracy_control (validated on the tuning images)")
