"""What a format's export steps receive: ``ExportJob``, the typed options of the request and what the format
table settled for it, the model and its checkpoint, and the ``Conversion`` record the steps fill in."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..core.checkpoint import Checkpoint
from ..core.data import Data, InputSpec
from .options import ExportOptions
from .quantize_onnx import Int8Settings, choose_int8_settings
from .records import Conversion, Sample
from .target import Target

if TYPE_CHECKING:  # heavy: only for the type checker
    import openvino
    from torch import nn


@dataclass(frozen=True)
class Request:
    """A request as the format table settled it: the INT8 mode and calibration method, defaults filled in."""

    format: str
    precision: str
    quant: str                   # static | dynamic (INT8)
    calib_method: str            # minmax | entropy | percentile (ONNX), nncf (OpenVINO)

    @property
    def int8(self) -> bool:
        return self.precision == "int8"

    @property
    def static(self) -> bool:
        """Static INT8: calibrated on images, with a fallback."""
        return self.int8 and self.quant == "static"


@dataclass
class OpenVinoModels:
    """The in-memory OpenVINO models one step hands to the next (openvino.Model objects)."""

    model: Optional["openvino.Model"] = None   # what openvino_save writes
    int8: Optional["openvino.Model"] = None    # NNCF's post-training INT8 model (the fallback compares against it)
    fp32: Optional["openvino.Model"] = None    # the FP32 model the fallback quantizes again


@dataclass
class ExportJob:
    """One conversion: steps read the model, options and request, write into ``folder``, record in ``result``."""

    model: "nn.Module"
    input_spec: InputSpec
    folder: str                  # the staging bundle folder: write only the bundle's files here
    scratch: str                 # intermediate files (FP32 ONNX, calibration cache), deleted afterwards
    options: ExportOptions
    request: Request
    target: Target
    checkpoint: Checkpoint
    calib: Optional[np.ndarray] = None
    result: Conversion = field(default_factory=Conversion)
    openvino: OpenVinoModels = field(default_factory=OpenVinoModels)

    @property
    def precision(self) -> str:
        return self.request.precision

    @property
    def progress(self) -> bool:
        return bool(self.options.progress)

    def int8_settings(self) -> Int8Settings:
        """ONNX Runtime's INT8 operand types for the target's CPU, unless --int8-types chose them."""
        o = self.options
        return choose_int8_settings(o.int8_types or "auto", o.reduce_range, o.per_channel,
                                    (self.target.arch, self.target.flags))


@dataclass
class Reference:
    """The checkpoint and what each bundle of it is checked against: its PyTorch model's logits on test images."""

    checkpoint: str
    model: "nn.Module"
    ckpt: Checkpoint
    spec: InputSpec              # the checkpoint's input
    dataset: Data                # the validation data (and, by default, the calibration data)
    images: np.ndarray           # the held-out test images of the gate, and their labels
    labels: np.ndarray
    logits: np.ndarray           # the PyTorch model's logits on them

    @property
    def qat(self) -> bool:
        """A QAT checkpoint (edgekd quantize): exported as it was trained, INT8 only."""
        return self.ckpt.qat is not None

    def data_spec(self) -> str:
        """The checkpoint's data spec (an image folder is recorded relative to the checkpoint's folder)."""
        return self.ckpt.data_spec(self.checkpoint) or "digits"


@dataclass
class Calibration:
    """Class-stratified train images that set INT8 ranges, the data they came from, and their record."""

    images: np.ndarray
    record: Sample
    data: Data
