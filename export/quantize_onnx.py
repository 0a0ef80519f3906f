"""ONNX Runtime INT8: static QDQ with real calibration images, dynamic on request, and a per-layer
sensitivity fallback that keeps the layers that hurt most in float.

The integer types are chosen by the exporting CPU's features (ONNX Runtime's own guidance, checked
against measurements in docs/export.md): without VNNI the int8 kernels of the AVX2 path saturate
with signed activations and weights, so the defaults differ by CPU; every choice can be overridden.
"""

import logging
import os
import platform
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .. import EdgeKDError
from ..base.progress import bar
from .records import Int8Settings, Restored, Tuning

if TYPE_CHECKING:  # heavy: only for the type checker
    from onnxruntime.quantization import CalibrationMethod, QuantType

log = logging.getLogger(__name__)

CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_TYPES = ("auto", "u8s8", "u8u8", "s8s8")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
Features = Tuple[str, Set[str]]  # a CPU's architecture and instruction-set flags


def cpu_features() -> Features:
    """The CPU's architecture and its instruction-set flags (Linux /proc/cpuinfo; empty elsewhere)."""
    flags: Set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return platform.machine().lower(), flags


def choose_int8_settings(types: str = "auto", reduce_range: Optional[bool] = None, per_channel: Optional[bool] = True,
                         features: Optional[Features] = None) -> Int8Settings:
    """Activation/weight types and range for the target's CPU (``features``: (arch, flags), default this
    machine's; ``edgekd export --target``), unless the user chose them."""
    arch, flags = features or cpu_features()
    vnni = sorted(flags & set(VNNI_FLAGS))
    if types == "auto":
        if arch in ("aarch64", "arm64"):
            types, reason = "s8s8", "ARM CPU: symmetric int8 kernels"
        elif vnni:
            types, reason = "u8s8", f"x86 CPU with {', '.join(vnni)}: u8s8 accumulates without saturation"
        else:
            # Measured on AVX2 without VNNI (shared FINDINGS): s8s8 lost accuracy and was no faster than
            # FP32; u8u8 kept accuracy and was the fastest int8 variant.
            types, reason = "u8u8", "x86 CPU without VNNI: u8u8 avoids the saturating s8 path"
    else:
        reason = "chosen with --int8-types"
    if types not in INT8_TYPES[1:]:
        raise EdgeKDError(f"unknown --int8-types {types!r}: choose from {', '.join(INT8_TYPES)}")
    return Int8Settings(activation_type="uint8" if types[0] == "u" else "int8",
                        weight_type="uint8" if types[2] == "u" else "int8", reduce_range=bool(reduce_range),
                        per_channel=bool(per_channel), chosen_because=reason, cpu_arch=arch, vnni=vnni)


def int8_settings(types: str = "auto", reduce_range: Optional[bool] = None, per_channel: Optional[bool] = True,
                  features: Optional[Features] = None) -> Dict[str, Any]:
    """``choose_int8_settings`` as the manifest records it."""
    return choose_int8_settings(types, reduce_range, per_channel, features).to_dict()


def _qtype(name: str) -> "QuantType":
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def _method(name: str) -> "CalibrationMethod":
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


class ImageReader:
    """ONNX Runtime's CalibrationDataReader over preprocessed images, with a progress bar."""

    def __init__(self, images: np.ndarray, input_name: str = "input", batch_size: int = 32,
                 progress: bool = True) -> None:
        self.batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        self.bar = bar(total=len(images), desc="calibrating", unit="img", disable=not progress)
        self.input_name, self.i = input_name, 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.i >= len(self.batches):
            self.bar.close()
            return None
        batch = self.batches[self.i]
        self.i += 1
        self.bar.update(len(batch))
        return {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self.i = 0


def preprocess(fp32_path: str, out_path: str) -> str:
    """ONNX Runtime's quant_pre_process (shape inference + graph optimisation) before quantizing."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(fp32_path, out_path)
    except Exception as e:
        raise EdgeKDError(f"ONNX Runtime quant_pre_process failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return out_path


def quantize_static_file(pre_path: str, out_path: str, calib_images: Optional[np.ndarray], settings: Int8Settings,
                         method: str, cache_path: str, exclude: Sequence[str] = (), progress: bool = True) -> None:
    """Static QDQ quantization; calibration ranges are cached so a fallback retry does not recalibrate."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    reader = None
    if not os.path.isfile(cache_path):  # the ranges are not cached yet: calibrate
        if calib_images is None:
            raise RuntimeError("static INT8 needs calibration images")  # the pipeline calibrates first: our bug
        reader = ImageReader(calib_images, progress=progress)
    try:
        quantize_static(pre_path, out_path, reader, quant_format=QuantFormat.QDQ,
                        per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                        activation_type=_qtype(settings.activation_type), weight_type=_qtype(settings.weight_type),
                        calibrate_method=_method(method), nodes_to_exclude=list(exclude) or None,
                        calibration_cache_path=cache_path)
    except EdgeKDError:
        raise
    except Exception as e:
        raise EdgeKDError(f"ONNX Runtime static quantization failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def quantize_dynamic_file(pre_path: str, out_path: str, settings: Int8Settings) -> None:
    """Dynamic INT8 (weights only, activations quantized at run time). Slow for conv nets: never a default."""
    from onnxruntime.quantization import quantize_dynamic

    try:
        quantize_dynamic(pre_path, out_path, per_channel=settings.per_channel,
                         reduce_range=settings.reduce_range, weight_type=_qtype(settings.weight_type))
    except Exception as e:
        raise EdgeKDError(f"ONNX Runtime dynamic quantization failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def quantizable_nodes(path: str) -> List[str]:
    """Names of the nodes whose weights INT8 quantizes (Conv, Gemm, MatMul), in graph order."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in QUANTIZED_OPS]


def _logits(path: str, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": images[i:i + 256]})[0] for i in range(0, len(images), 256)])


def rank_sensitivity(pre_path: str, scratch: str, calib_images: Optional[np.ndarray], tune_images: np.ndarray,
                     settings: Int8Settings, method: str, progress: bool = True) -> Tuple[List[str], Dict[str, float]]:
    """Layers ordered from most to least harmful when quantized: for each, the logit error against FP32
    on the tuning images when only that layer is kept in float (lower error = more sensitive)."""
    reference = _logits(pre_path, tune_images)
    cache = os.path.join(scratch, "calibration-cache.json")
    errors: Dict[str, float] = {}
    for name in bar(quantizable_nodes(pre_path), desc="ranking layers", unit="layer", disable=not progress):
        trial = os.path.join(scratch, "trial.onnx")
        quantize_static_file(pre_path, trial, calib_images, settings, method, cache, exclude=[name], progress=progress)
        errors[name] = float(np.mean((_logits(trial, tune_images) - reference) ** 2))
    return sorted(errors, key=lambda name: errors[name]), errors


def restore_layers(pre_path: str, out_path: str, scratch: str, calib_images: Optional[np.ndarray], tune: Tuning,
                   settings: Int8Settings, method: str, max_drop: float, max_layers: int,
                   progress: bool = True) -> Restored:
    """Keep the most sensitive layers in float, one more at a time, until the top-1 drop on the tuning
    images (train split, never the test split) fits ``max_drop`` points or ``max_layers`` is reached."""
    tune_images, tune_labels = tune
    reference_top1 = float((_logits(pre_path, tune_images).argmax(1) == tune_labels).mean())
    order, errors = rank_sensitivity(pre_path, scratch, calib_images, tune_images, settings, method, progress)
    cache = os.path.join(scratch, "calibration-cache.json")
    kept: List[str] = []
    drop: Optional[float] = None
    for name in order[:max_layers]:
        kept.append(name)
        quantize_static_file(pre_path, out_path, calib_images, settings, method, cache, exclude=kept, progress=progress)
        top1 = float((_logits(out_path, tune_images).argmax(1) == tune_labels).mean())
        drop = (reference_top1 - top1) * 100
        log.info("INT8 fallback: %d layer(s) in float, tuning drop %.2f points", len(kept), drop)
        if drop <= max_drop:
            break
    return Restored(kept, "per-layer sensitivity (logit MSE vs FP32 with the layer in float), nodes_to_exclude",
                    tuning_drop=drop, ranking={n: errors[n] for n in order})
