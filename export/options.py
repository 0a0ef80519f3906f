"""The options of ``edgekd export``, one field per option (see edgekd.core.optionspec)."""

from dataclasses import dataclass
from typing import Optional

from ..core.optionspec import MAX_IMAGES, MAX_SEED, Options, opt, register

# --opset: torch's dynamo ONNX exporter writes opsets 18 to torch.onnx's ONNX_MAX_OPSET (23 in torch 2.14; export
# checks it again against the installed torch); below 18 it converts down or silently writes another opset.
MIN_OPSET, MAX_OPSET = 18, 23
# The bundle formats' names (edgekd.export.formats holds their table; the bundle layer names their files).
ONNX, OPENVINO = "onnx", "openvino"

@register("export")
@dataclass(frozen=True, kw_only=True)
class ExportOptions(Options):
    """The options of ``edgekd export``."""

    checkpoint: Optional[str] = opt(None, "a .pt checkpoint written by edgekd train/distill", metavar="CHECKPOINT",
        positional=True)
    format: Optional[str] = opt(None, "bundle format: onnx or openvino", metavar="FORMAT", required=True)
    precision: str = opt("fp32", "fp32, fp16 (weights halved; inputs and outputs stay float32) or int8", metavar="P")
    val_size: int = opt(1000, "held-out test images for the parity gate", low=1, high=MAX_IMAGES)
    atol: Optional[float] = opt(None, "largest allowed |logit difference| from PyTorch (default: 1e-4 for fp32, "
        "5e-2 for fp16)", low=0, low_open=True)
    opset: Optional[int] = opt(None, f"ONNX opset, {MIN_OPSET} to {MAX_OPSET}: the range torch's ONNX exporter writes "
        "(default: the exporter's)", low=1, high=99, check=lambda v: None if MIN_OPSET <= int(v) <= MAX_OPSET else
        f"torch's ONNX exporter writes opsets {MIN_OPSET} to {MAX_OPSET}")
    quant: Optional[str] = opt(None, "static (calibrated, the default) or dynamic (ONNX only; slow for conv nets)",
        choices=("static", "dynamic"), group="int8")
    calib_data: Optional[str] = opt(None, "data whose train split calibrates INT8 (default: the checkpoint's data)",
        metavar="SPEC", group="int8")
    calib_size: int = opt(300, "calibration images, class-stratified", low=1, high=MAX_IMAGES, group="int8")
    calib_method: Optional[str] = opt(None, "ONNX: minmax (default), entropy or percentile; OpenVINO: nncf (its own "
        "statistics)", metavar="M", group="int8")
    seed: int = opt(0, "seed of the calibration sample", low=0, high=MAX_SEED, group="int8")
    max_drop: float = opt(1.0, "fail INT8 when its top-1 is more than P points below FP32", low=0, metavar="P",
        group="int8")
    max_fallback_layers: int = opt(10, "most layers kept in float to meet --max-drop; 0 turns the fallback off", low=0,
        high=100_000, group="int8")
    tune_size: Optional[int] = opt(None, "train images that steer the fallback (default: as many as --val-size); "
        "its cost grows with them times the number of layers", low=1, high=MAX_IMAGES, group="int8")
    qat_epochs: int = opt(1, "the INT8 ladder's last rung: when post-training INT8 and the fallback both miss "
        "--max-drop, fine-tune the student with fake quantizers against its teacher for N epochs (edgekd "
        "quantize) and export that, every layer INT8; 0 turns it off", low=0, high=10_000, metavar="N", group="int8")
    qat_teacher: Optional[str] = opt(None, "teacher of that rung: any --teacher spec of distill (default: the "
        "teacher the student was distilled from, else the FP32 student itself)", metavar="SPEC", group="int8")
    qat_onnx: str = opt("ort", "ONNX from a QAT checkpoint: ort (its trained weights re-quantized in ONNX Runtime's "
        "own QDQ placement, activations calibrated; runs as QLinearConv) or nncf (NNCF's trained quantizers as "
        "they are; exact to training, but ONNX Runtime then runs most convolutions in fp32)", choices=("ort", "nncf"),
        group="int8")
    int8_types: Optional[str] = opt(None, "ONNX: auto (by CPU features: u8s8 with VNNI, u8u8 without, s8s8 on ARM), "
        "u8s8, u8u8, s8s8 (default: auto)", metavar="T", group="int8")
    reduce_range: bool = opt(False, "ONNX: 7-bit weights (for CPUs without VNNI)", group="int8")
    per_channel: bool = opt(True, "ONNX: one weight scale per tensor instead of per output channel", group="int8",
        negate="--per-tensor")
    speed_check: bool = opt(True, "skip the short FP32-vs-INT8 timing on this machine", group="int8",
        negate="--no-speed-check")
    zip: bool = opt(False, "also pack the bundle into DIR.zip")
    target: Optional[str] = opt(None, "the device the bundle is for: cpu (this machine, the default), arm64, "
        "x86-avx2, x86-vnni, or ssh://[user@]host[:port][/python] (its CPU asked over SSH; the parity gate and "
        "the INT8 check run there). Sets INT8 types and, for OpenVINO on ARM, a static batch; adds parity images "
        "that deploy checks on the device", metavar="T")
    ssh_config: Optional[str] = opt(None, "--target ssh://: an ssh_config file (default: ~/.ssh/config)",
        metavar="FILE")
    timeout: int = opt(600, "--target ssh://: seconds to wait for the device at each step", low=1)
    progress: bool = opt(True, "hide progress bars", negate="--no-progress")
    data: Optional[str] = opt(None, "digits (scikit-learn, embedded), a folder PATH or imagefolder:PATH with train/ "
        "and test/ (or val/), webdataset:PATH (the same sub-folders holding .tar shards), cifar10 or cifar100 "
        "(default: the checkpoint's data)", metavar="SPEC")
    data_root: Optional[str] = opt(None, "where cifar10/cifar100 live or are downloaded to (an ImageFolder copy is "
        "read in place)", metavar="DIR")
    out: Optional[str] = opt(None, "output folder (default: none)", metavar="DIR", required=True)
    force: bool = opt(False, "replace the outputs of an earlier edgekd run in --out (never files edgekd did not "
        "write; default: refuse a non-empty --out)", yaml=False)
    config: Optional[str] = opt(None, "YAML file of option values (keys as in the saved config.yaml); the command "
        "line wins (default: none)", metavar="FILE", yaml=False)
