"""The format table: one registry entry per bundle format with what it supports. It drives both the
validation of a request (refused up front, naming what is supported) and the dispatch to the exporter."""

from .. import EdgeKDError
from ..base.registry import Registry
from ..bundle.manifest import FORMAT_FILES

from .onnx import onnx_describe, onnx_fp16, onnx_fp32, onnx_int8, restore_onnx
from .openvino import openvino_convert, openvino_int8, openvino_save, restore_openvino
from .qat import build_qat
from .quantize_onnx import CALIB_METHODS

FORMATS = Registry("export format")
# Logit tolerances of the parity gate. FP16 rounds weights and activations to 11-bit mantissas: on the
# CIFAR-10 and digits students the largest logit moved by about 1e-2 (docs/export.md), so 5e-2.
ATOL = {"fp32": 1e-4, "fp16": 5e-2}

# Each format owns its steps, the registered object: ``steps[precision]`` runs in order (each step(job)
# returns a dict merged into job.info; the first sets "model_file" and "fp32_reference"). Metadata:
# ``restore`` is the INT8 fallback (job, tuning images, max drop, max layers -> {"layers_in_float": [...]}),
# ``files`` the bundle's model files, ``inference_precision`` what the bundle runtime computes in (recorded
# in the manifest), ``qat_steps`` the conversion of a quantization-aware-trained checkpoint (edgekd
# quantize) at int8, ``qat_calibrates(options)`` whether that conversion needs calibration images. A new stage is one more step in these lists.
ONNX_STEPS = {"fp32": (onnx_fp32, onnx_describe), "fp16": (onnx_fp32, onnx_fp16, onnx_describe),
              "int8": (onnx_fp32, onnx_int8, onnx_describe)}
OPENVINO_STEPS = {"fp32": (openvino_convert, openvino_save), "fp16": (openvino_convert, openvino_save),
                  "int8": (openvino_convert, openvino_int8, openvino_save)}

FORMATS.register("onnx", precisions=tuple(ONNX_STEPS), runtime="onnxruntime", files=FORMAT_FILES["onnx"], atol=ATOL,
                 inference_precision=None, quant_modes=("static", "dynamic"), calib_methods=CALIB_METHODS,
                 int8_types=True, restore=restore_onnx, qat_steps=(build_qat, onnx_describe),
                 qat_calibrates=lambda options: options.get("qat_onnx", "ort") == "ort",
                 summary="ONNX (ONNX Runtime); INT8 as QDQ via onnxruntime.quantization")(ONNX_STEPS)
FORMATS.register("openvino", precisions=tuple(OPENVINO_STEPS), runtime="openvino", files=FORMAT_FILES["openvino"],
                 atol=ATOL, inference_precision="f32", quant_modes=("static",), calib_methods=("nncf",),
                 int8_types=False, restore=restore_openvino, qat_steps=(build_qat,), qat_calibrates=lambda options: False,
                 summary="OpenVINO IR; INT8 via NNCF post-training quantization")(OPENVINO_STEPS)


def check_request(fmt, precision, quant=None, calib_method=None, int8_types=None):
    """Refuse, up front, a format, precision or INT8 option that the format does not support.

    ``None`` means "not given". Returns the format's metadata with the defaults filled in.
    """
    meta = dict(FORMATS.meta(fmt))
    if precision not in meta["precisions"]:
        raise EdgeKDError(f"format {fmt!r} does not support precision {precision!r}; "
                          f"supported: {', '.join(meta['precisions'])}")
    int8_only = {"--quant": quant, "--calib-method": calib_method, "--int8-types": int8_types}
    given = [flag for flag, value in int8_only.items() if value is not None]
    if precision != "int8" and given:
        raise EdgeKDError(f"{', '.join(given)} only apply to --precision int8 (got {precision})")
    if quant is not None and quant not in meta["quant_modes"]:
        raise EdgeKDError(f"format {fmt!r} does not support --quant {quant}; supported: {', '.join(meta['quant_modes'])}")
    if calib_method is not None and calib_method not in meta["calib_methods"]:
        raise EdgeKDError(f"format {fmt!r} does not support --calib-method {calib_method}; "
                          f"supported: {', '.join(meta['calib_methods'])}")
    if int8_types is not None and not meta["int8_types"]:
        raise EdgeKDError(f"--int8-types applies to ONNX Runtime quantization only; format {fmt!r} chooses its own")
    if quant == "dynamic" and calib_method is not None:
        raise EdgeKDError("--calib-method applies to static quantization; dynamic INT8 uses no calibration images")
    meta.update(quant=quant or meta["quant_modes"][0], calib_method=calib_method or meta["calib_methods"][0])
    return meta


def combinations():
    """Every supported (format, precision), for docs and tests."""
    return [(fmt, p) for fmt in FORMATS.names() for p in FORMATS.meta(fmt)["precisions"]]
