"""What the export steps produce, as typed records: the conversion (model file, FP32 counterpart, quantization),
the image samples that calibrated or tuned INT8, the parity result, the INT8 ladder's rungs and fallback, the
speed check and the per-layer report. Each turns into JSON only where manifest.json is written (``to_dict``), and
is read back from a manifest by ``edgekd.base.jsonrec`` (``from_dict``, ``ExportSummary.from_manifest``)."""

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple, Union

from ..base.jsonrec import read_json

JSON = Dict[str, Any]


def with_set(record: JSON, **optional: Any) -> JSON:
    """``record`` and, after it, each of ``optional`` that is not None (a manifest leaves unset entries out)."""
    return {**record, **{k: v for k, v in optional.items() if v is not None}}


@dataclass
class Int8Settings:
    """ONNX Runtime's INT8 operand types and options for the target's CPU, and why they were chosen."""

    activation_type: str            # uint8 | int8
    weight_type: str
    reduce_range: bool
    per_channel: bool
    chosen_because: str
    cpu_arch: str
    vnni: List[str]
    format: str = "QDQ"             # QDQ (static) | QOperator (dynamic)
    mode: Optional[str] = None      # static | dynamic, once quantized
    calib_method: Optional[str] = None

    @property
    def types(self) -> str:
        """``u8s8``, ``u8u8`` or ``s8s8``: activations then weights."""
        return "".join(("u" if t == "uint8" else "s") + "8" for t in (self.activation_type, self.weight_type))

    def to_dict(self) -> JSON:
        d: JSON = {"activation_type": self.activation_type, "weight_type": self.weight_type,
                   "reduce_range": self.reduce_range, "per_channel": self.per_channel, "format": self.format,
                   "chosen_because": self.chosen_because, "cpu": {"arch": self.cpu_arch, "vnni": list(self.vnni)}}
        return with_set(d, mode=self.mode, calib_method=self.calib_method)


@dataclass
class NncfQuantization:
    """OpenVINO's post-training INT8 through ``nncf.quantize``."""

    subset_size: int
    mode: str = "static"
    tool: str = "nncf.quantize"
    preset: str = "performance (symmetric weights and activations)"
    bias_correction: str = "full (fast_bias_correction=False)"

    def to_dict(self) -> JSON:
        return {"mode": self.mode, "tool": self.tool, "subset_size": self.subset_size, "preset": self.preset,
                "bias_correction": self.bias_correction}


@dataclass
class QatQuantization:
    """A QAT checkpoint's conversion: the quantizers were trained (``edgekd quantize``)."""

    source_student: Optional[str]
    layers_int8: Optional[List[str]]
    calibration_images: Optional[int]
    int8_graph_layers: List[str]
    placement: str
    onnxruntime: Optional[Int8Settings] = None   # --qat-onnx ort: ONNX Runtime re-quantized the trained weights
    tool: str = "edgekd quantize (NNCF fake quantizers, distillation fine-tuning)"

    def to_dict(self) -> JSON:
        d: JSON = {"mode": "qat", "tool": self.tool, "source_student": self.source_student,
                   "layers_int8": self.layers_int8, "calibration_images": self.calibration_images,
                   "int8_graph_layers": self.int8_graph_layers, "placement": self.placement}
        return with_set(d, onnxruntime=self.onnxruntime.to_dict() if self.onnxruntime else None)


Quantization = Union[Int8Settings, NncfQuantization, QatQuantization]


@dataclass
class Conversion:
    """What a format's steps found: the first sets ``model_file`` and ``fp32_reference``; INT8 steps add the rest."""

    model_file: str = ""
    fp32_reference: Optional[str] = None         # the FP32 counterpart (speed check, layer report)
    quantization: Optional[Quantization] = None
    quantizable_layers: Optional[int] = None
    quantized_from: Optional[str] = None         # the preprocessed FP32 ONNX that ONNX Runtime quantized
    int8_layers: Optional[List[str]] = None      # a QAT conversion: the layers that run in INT8
    batchnorms_folded: Optional[int] = None


@dataclass
class Sample:
    """Which images of a split were drawn (calibration, fallback tuning, the layer report), so anyone can tell
    which images shaped the INT8 scales and that they did not come from the test split."""

    data: str
    split: str
    images: int
    available: int
    seed: int
    per_class: Dict[str, int]
    files_sha256: str
    files: Optional[List[str]] = None            # left out of the tuning record (it names the same split)
    stratified: str = "by class, proportional to class counts"

    def to_dict(self) -> JSON:
        d: JSON = {"data": self.data, "split": self.split, "images": self.images, "available": self.available,
                   "seed": self.seed, "stratified": self.stratified, "per_class": dict(self.per_class),
                   "files_sha256": self.files_sha256}
        return with_set(d, files=list(self.files) if self.files is not None else None)


@dataclass
class CalibrationRecord:
    """The manifest's ``calibration``: the sample that set the INT8 ranges, or why there was none."""

    sample: Optional[Sample] = None
    note: Optional[str] = None

    def to_dict(self) -> JSON:
        return with_set(self.sample.to_dict() if self.sample else {"images": 0}, note=self.note)


@dataclass
class RanOn:
    """Where the parity gate ran: this machine, or the --target device."""

    where: str
    machine: Optional[str]
    cpu: Optional[str] = None
    runtime_versions: Optional[Dict[str, str]] = None
    emulated: Any = None
    remote: bool = False

    def to_dict(self) -> JSON:
        if not self.remote:
            return {"where": self.where, "machine": self.machine}
        d: JSON = {"where": self.where, "machine": self.machine, "cpu": self.cpu,
                   "runtime_versions": self.runtime_versions}
        return with_set(d, emulated=self.emulated or None)


@dataclass
class Validation:
    """The parity gate's measurements: the bundle's logits against the PyTorch model's on held-out images."""

    images: int
    not_finite: int
    output_shape: List[int]
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    top1: float
    reference_top1: float
    drop: float                         # top-1 points lost against PyTorch
    data: Optional[str] = None
    split: Optional[str] = None
    atol: Optional[float] = None
    ran_on: Optional[RanOn] = None
    max_drop: Optional[float] = None    # INT8: the --max-drop it was held to
    reference: Optional[str] = None     # QAT: what the logits were compared with

    @classmethod
    def from_dict(cls, d: JSON) -> "Validation":
        """The measurements of a manifest's ``validation`` (where it ran is left out); a manifest from before
        not_finite, output_shape and mean_abs_diff were recorded reads them as 0, [] and 0.0."""
        given = {k: v for k, v in d.items() if v is not None}
        validation = read_json(cls, {**dict(not_finite=0, output_shape=[], mean_abs_diff=0.0), **given})
        if validation is None:
            raise ValueError("the manifest's validation record lacks a measurement")
        return replace(validation, ran_on=None)

    def to_dict(self) -> JSON:
        d: JSON = {"images": self.images, "not_finite": self.not_finite, "output_shape": list(self.output_shape),
                   "max_abs_diff": self.max_abs_diff, "mean_abs_diff": self.mean_abs_diff,
                   "top1_agreement": self.top1_agreement, "top1": self.top1, "reference_top1": self.reference_top1,
                   "drop": self.drop}
        if self.data is not None:
            d.update(data=self.data, split=self.split, atol=self.atol,
                     ran_on=self.ran_on.to_dict() if self.ran_on else None)
        return with_set(d, max_drop=self.max_drop, reference=self.reference)


@dataclass
class Restored:
    """What a format's INT8 fallback (rung 2) kept in float, and how it chose."""

    layers_in_float: List[str]
    method: str
    tuning_drop: Optional[float] = None
    ranking: Optional[Dict[str, float]] = None   # ONNX: the layers' sensitivity, most harmful first


@dataclass
class Fallback:
    """The manifest's ``fallback``: whether rung 2 was needed, what it kept in float and what it achieved."""

    needed: bool
    drop_before: float
    layers_in_float: List[str] = field(default_factory=list)
    restored: Optional[Restored] = None
    drop_after: Optional[float] = None
    max_layers: Optional[int] = None
    tuning: Optional[Sample] = None
    used: Optional[bool] = None          # False when rung 3 made the bundle instead

    def to_dict(self) -> JSON:
        d: JSON = {"needed": self.needed, "drop_before": self.drop_before, "layers_in_float": list(self.layers_in_float)}
        if self.restored is not None:
            r = self.restored
            if r.tuning_drop is not None or r.ranking is not None:
                d.update(tuning_drop=r.tuning_drop, ranking=r.ranking)
            d.update(method=r.method)
        if self.max_layers is not None:
            d.update(drop_after=self.drop_after, max_layers=self.max_layers,
                     tuning=self.tuning.to_dict() if self.tuning else None)
        return with_set(d, used=self.used)


@dataclass
class Rung:
    """One rung of the INT8 ladder tried: post-training (ptq), fallback, or quantization-aware (qat)."""

    rung: str
    drop: float
    passed: bool
    layers_in_float: Optional[List[str]] = None
    epochs: Optional[int] = None
    teacher: Optional[str] = None
    layers_int8: Optional[int] = None
    qat_test_top1: Optional[float] = None

    def to_dict(self) -> JSON:
        d = with_set({"rung": self.rung, "drop": self.drop, "passed": self.passed},
                     layers_in_float=list(self.layers_in_float) if self.layers_in_float is not None else None)
        if self.epochs is not None:
            d.update(epochs=self.epochs, teacher=self.teacher, layers_int8=self.layers_int8,
                     qat_test_top1=self.qat_test_top1)
        return d


@dataclass
class SpeedRow:
    batch_size: int
    fp32_ms: float
    int8_ms: float
    speedup: float

    @classmethod
    def from_dict(cls, d: JSON) -> "SpeedRow":
        """A row of the speed check's JSON (ValueError when it is not one)."""
        row = read_json(cls, d)
        if row is None:
            raise ValueError(f"not a speed check row: {str(d)[:120]}")
        return row

    def to_dict(self) -> JSON:
        return {"batch_size": self.batch_size, "fp32_ms": self.fp32_ms, "int8_ms": self.int8_ms,
                "speedup": self.speedup}


@dataclass
class SpeedCheck:
    """FP32 against INT8 timed on the exporting machine; ``status`` says why there are no rows."""

    rows: List[SpeedRow] = field(default_factory=list)
    int8_faster: Optional[bool] = None
    threshold: Optional[float] = None
    machine: Optional[JSON] = None
    status: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Optional[JSON]) -> Optional["SpeedCheck"]:
        """The manifest's record (None when the check did not run)."""
        return read_json(cls, d) if d else None

    def to_dict(self) -> JSON:
        if self.status is not None:
            return {"status": self.status}
        return {"rows": [r.to_dict() for r in self.rows], "int8_faster": self.int8_faster,
                "threshold": self.threshold, "machine": self.machine}


@dataclass
class LayerRow:
    """One weighted layer of the per-layer INT8 report."""

    name: str
    fp32_name: str
    op: str
    sqnr_db: float
    input_sqnr_db: float
    loss_db: float
    in_float: bool

    def to_dict(self) -> JSON:
        return {"name": self.name, "fp32_name": self.fp32_name, "op": self.op, "sqnr_db": self.sqnr_db,
                "input_sqnr_db": self.input_sqnr_db, "loss_db": self.loss_db, "in_float": self.in_float}


@dataclass
class LayerReport:
    """Which layers INT8 hurts (export/layer_report.py), worst first."""

    metric: str
    images: int
    split: str
    count: int
    worst: str
    median_sqnr_db: float
    min_sqnr_db: float
    layers: List[LayerRow]
    plot: Optional[str] = None

    def to_dict(self) -> JSON:
        d: JSON = {"metric": self.metric, "images": self.images, "split": self.split, "count": self.count,
                   "worst": self.worst, "median_sqnr_db": self.median_sqnr_db, "min_sqnr_db": self.min_sqnr_db,
                   "layers": [r.to_dict() for r in self.layers]}
        return with_set(d, plot=self.plot)


@dataclass
class QatSource:
    """The manifest's ``qat``: the FP32 student a QAT bundle started from, and the bundle's drop against it."""

    source: Optional[str]
    top1: Optional[float] = None
    drop_vs_fp32_student: Optional[float] = None
    note: Optional[str] = None

    def to_dict(self) -> JSON:
        d: JSON = {"source": self.source, "top1": self.top1, "drop_vs_fp32_student": self.drop_vs_fp32_student}
        return with_set(d, note=self.note)


@dataclass
class Parity:
    """--target: the images and logits ``edgekd deploy`` checks on the device before installing."""

    file: str
    images: int
    logits: List[List[float]]
    atol: Optional[float]
    min_agreement: float
    source: str                     # where the logits were computed

    def to_dict(self) -> JSON:
        return {"file": self.file, "images": self.images, "logits": self.logits, "atol": self.atol,
                "min_agreement": self.min_agreement, "from": self.source}


Tuning = Tuple[Any, Any]  # (images, labels) as numpy arrays


@dataclass(frozen=True)
class ExportSummary:
    """What ``edgekd export`` reports of the bundle it wrote, read from its manifest's JSON."""

    format: str
    precision: str
    size_bytes: int
    export_seconds: float
    validation: Validation
    ladder: List[Rung] = field(default_factory=list)
    fallback: Optional[Fallback] = None
    warnings: List[str] = field(default_factory=list)

    @classmethod
    def from_manifest(cls, manifest: JSON) -> "ExportSummary":
        """The summary of a manifest export wrote (one that lacks its records is our bug: RuntimeError)."""
        summary = read_json(cls, manifest)
        if summary is None:
            raise RuntimeError("the manifest export wrote lacks its format, size or validation records")
        return summary

    def lines(self, out: str, zipped: bool) -> List[str]:
        """The lines ``edgekd export`` prints: the bundle, the parity gate, the INT8 ladder, what stayed in float."""
        v = self.validation
        shown = f"{out} (+ {out.rstrip('/')}.zip)" if zipped else out
        lines = [f"{self.format} {self.precision} bundle -> {shown}: {self.size_bytes / 1e6:.3f} MB, exported in "
                 f"{self.export_seconds:.1f} s",
                 f"parity on {v.images} test images: max |diff| {v.max_abs_diff:.2e}, top-1 agreement "
                 f"{v.top1_agreement:.4f}, top-1 {v.top1:.4f} (PyTorch {v.reference_top1:.4f}, drop {v.drop:+.2f} "
                 "points)"]
        if len(self.ladder) > 1:
            lines.append("INT8 ladder: " + " -> ".join(f"{r.rung} drop {r.drop:.2f} ({'pass' if r.passed else 'fail'})"
                                                      for r in self.ladder))
        f = self.fallback
        if f is not None and f.layers_in_float and f.used is not False:
            lines.append(f"kept in float: {', '.join(f.layers_in_float)} (drop {f.drop_before:.2f} -> "
                         f"{f.drop_after:.2f})")
        return lines + [f"warning: {w}" for w in self.warnings]
