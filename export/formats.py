"""The format table: one registry entry per bundle format, a typed ``Format`` with what it supports and the
steps that make it. It drives both the validation of a request (refused up front, naming what is supported)
and the dispatch to the exporter."""

from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Tuple

from .. import EdgeKDError
from ..base.registry import Registry
from ..bundle.manifest import FORMAT_FILES
from .options import ONNX, OPENVINO, ExportOptions
from .job import ExportJob, Request
from .onnx import onnx_describe, onnx_fp16, onnx_fp32, onnx_int8, restore_onnx
from .openvino import openvino_convert, openvino_int8, openvino_save, restore_openvino
from .qat import build_qat
from .quantize_onnx import CALIB_METHODS
from .records import Restored, Tuning

Step = Callable[[ExportJob], None]                                 # reads the job, writes files, fills job.result
Restore = Callable[[ExportJob, Tuning, float, int], Restored]      # job, tuning images, max drop, max layers

# Logit tolerances of the parity gate. FP16 rounds weights and activations to 11-bit mantissas: on the
# CIFAR-10 and digits students the largest logit moved by about 1e-2 (docs/export.md), so 5e-2.
ATOL = {"fp32": 1e-4, "fp16": 5e-2}


@dataclass(frozen=True)
class Format:
    """A bundle format: ``steps[precision]`` run in order (the first sets the model file and its FP32
    counterpart); ``restore`` is the INT8 fallback; ``qat_steps`` convert a quantization-aware-trained
    checkpoint (edgekd quantize) at int8, and ``qat_calibrates(options)`` says whether that needs calibration
    images. A new stage is one more step in these lists."""

    name: str
    summary: str
    suffix: str                                  # the model file's suffix
    files: Tuple[str, ...]                       # the bundle's model files
    runtime: str                                 # the library that runs the bundle
    inference_precision: Optional[str]           # what the bundle runtime computes in (recorded in the manifest)
    steps: Mapping[str, Tuple[Step, ...]]
    qat_steps: Tuple[Step, ...]
    restore: Restore
    qat_calibrates: Callable[[ExportOptions], bool]
    quant_modes: Tuple[str, ...]                 # the first is the default
    calib_methods: Tuple[str, ...]               # the first is the default
    int8_types: bool                             # whether --int8-types applies
    atol: Mapping[str, float] = field(default_factory=lambda: dict(ATOL))

    @property
    def precisions(self) -> Tuple[str, ...]:
        return tuple(self.steps)


FORMATS = Registry("export format")


def register(fmt: Format) -> Format:
    """Add ``fmt`` to the table (a second format of the same name is refused)."""
    return FORMATS.register(fmt.name)(fmt)


register(Format(
    name=ONNX, summary="ONNX (ONNX Runtime); INT8 as QDQ via onnxruntime.quantization", suffix=".onnx",
    files=tuple(FORMAT_FILES[ONNX]), runtime="onnxruntime", inference_precision=None,
    steps={"fp32": (onnx_fp32, onnx_describe), "fp16": (onnx_fp32, onnx_fp16, onnx_describe),
           "int8": (onnx_fp32, onnx_int8, onnx_describe)},
    qat_steps=(build_qat, onnx_describe), restore=restore_onnx,
    qat_calibrates=lambda options: options.qat_onnx == "ort",
    quant_modes=("static", "dynamic"), calib_methods=CALIB_METHODS, int8_types=True))
register(Format(
    name=OPENVINO, summary="OpenVINO IR; INT8 via NNCF post-training quantization", suffix=".xml",
    files=tuple(FORMAT_FILES[OPENVINO]), runtime="openvino", inference_precision="f32",
    steps={"fp32": (openvino_convert, openvino_save), "fp16": (openvino_convert, openvino_save),
           "int8": (openvino_convert, openvino_int8, openvino_save)},
    qat_steps=(build_qat,), restore=restore_openvino, qat_calibrates=lambda options: False,
    quant_modes=("static",), calib_methods=("nncf",), int8_types=False))


def get_format(name: str) -> Format:
    """The table's entry for ``name`` (EdgeKDError naming the formats there are)."""
    fmt: Format = FORMATS.get(name)
    return fmt


def check_request(fmt: str, precision: str, quant: Optional[str] = None, calib_method: Optional[str] = None,
                  int8_types: Optional[str] = None) -> Request:
    """Refuse, up front, a format, precision or INT8 option that the format does not support.

    ``None`` means "not given". Returns the request with the format's defaults filled in.
    """
    entry = get_format(fmt)
    if precision not in entry.precisions:
        raise EdgeKDError(f"format {fmt!r} does not support precision {precision!r}; "
                          f"supported: {', '.join(entry.precisions)}")
    int8_only = {"--quant": quant, "--calib-method": calib_method, "--int8-types": int8_types}
    given = [flag for flag, value in int8_only.items() if value is not None]
    if precision != "int8" and given:
        raise EdgeKDError(f"{', '.join(given)} only apply to --precision int8 (got {precision})")
    if quant is not None and quant not in entry.quant_modes:
        raise EdgeKDError(f"format {fmt!r} does not support --quant {quant}; supported: {', '.join(entry.quant_modes)}")
    if calib_method is not None and calib_method not in entry.calib_methods:
        raise EdgeKDError(f"format {fmt!r} does not support --calib-method {calib_method}; "
                          f"supported: {', '.join(entry.calib_methods)}")
    if int8_types is not None and not entry.int8_types:
        raise EdgeKDError(f"--int8-types applies to ONNX Runtime quantization only; format {fmt!r} chooses its own")
    if quant == "dynamic" and calib_method is not None:
        raise EdgeKDError("--calib-method applies to static quantization; dynamic INT8 uses no calibration images")
    return Request(fmt, precision, quant or entry.quant_modes[0], calib_method or entry.calib_methods[0])


def combinations() -> List[Tuple[str, str]]:
    """Every supported (format, precision), for docs and tests."""
    return [(name, p) for name in FORMATS.names() for p in get_format(name).precisions]
