"""The model card's inputs and its own record, typed: the manifest as the card reads it (``CardManifest``), the
training record taken from the checkpoint at export, bench's measurements, deployments, and the ``edgekd`` block
of the card's front matter that holds them (``CardBlock``). Parsed from JSON or YAML with ``from_json`` and
written back with ``to_json``, keys in the order the card has always had them.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .rows import Record

CARD_SCHEMA = 1


# ---------------------------------------------------------------------------------------------- the manifest

@dataclass
class InputView(Record):
    """The manifest's preprocessing contract (``input``)."""

    shape: Optional[List[Any]] = None
    layout: Optional[str] = None
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)
    color: Optional[str] = None
    resize: Optional[List[int]] = None
    resize_mode: Optional[str] = None
    crop_pct: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RanOn(Record):
    """Where the export's parity check ran (a device, or this machine)."""

    where: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationView(Record):
    """The export's parity check against the PyTorch model."""

    images: Optional[int] = None
    top1: Optional[float] = None
    reference_top1: Optional[float] = None
    top1_agreement: Optional[float] = None
    max_abs_diff: Optional[float] = None
    data: Optional[str] = None
    split: str = "test"
    ran_on: RanOn = field(default_factory=RanOn)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CalibrationView(Record):
    """The images INT8 was calibrated on."""

    images: Optional[int] = None
    split: Optional[str] = None
    data: Optional[str] = None
    seed: Optional[int] = None
    note: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantizationView(Record):
    """How the model was quantized."""

    mode: Optional[str] = None
    format: Optional[str] = None
    activation_type: Optional[str] = None
    weight_type: Optional[str] = None
    chosen_because: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FallbackView(Record):
    """The layers INT8 kept in float."""

    layers_in_float: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerLoss(Record):
    """One layer of the INT8 layer report."""

    name: str = ""
    op: Optional[str] = None
    sqnr_db: Optional[float] = None
    loss_db: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Int8Layers(Record):
    """The INT8 layer report (SQNR per layer)."""

    metric: str = "SQNR"
    layers: List[LayerLoss] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RungView(Record):
    """One rung of the INT8 ladder."""

    rung: Optional[str] = None
    passed: Optional[bool] = None
    drop: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RuntimeView(Record):
    """The runtime a bundle is run by."""

    library: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceView(Record):
    """The checkpoint a bundle was exported from."""

    checkpoint: Optional[str] = None
    sha256: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CardManifest(Record):
    """manifest.json as the card reads it (the bundle layer's ``Manifest.to_dict()``)."""

    format: str
    precision: str
    model_file: str
    files: Dict[str, str]
    classes: List[str]
    input: InputView = field(default_factory=InputView)
    model: Optional[str] = None
    params: Optional[int] = None
    flops: Optional[int] = None
    data: Optional[str] = None
    runtime: RuntimeView = field(default_factory=RuntimeView)
    validation: ValidationView = field(default_factory=ValidationView)
    calibration: CalibrationView = field(default_factory=CalibrationView)
    quantization: QuantizationView = field(default_factory=QuantizationView)
    fallback: FallbackView = field(default_factory=FallbackView)
    int8_layers: Int8Layers = field(default_factory=Int8Layers)
    ladder: List[RungView] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    versions: Dict[str, Any] = field(default_factory=dict)
    source: SourceView = field(default_factory=SourceView)
    extra: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- the card's block

@dataclass
class TeacherRecord(Record):
    """The teacher as the checkpoint's metrics name it (only what was recorded)."""

    spec: Optional[str] = None
    model: Optional[str] = None
    kind: Optional[str] = None
    source: Optional[str] = None
    file: Optional[str] = None
    sha256: Optional[str] = None
    test_top1: Optional[float] = None
    params: Optional[int] = None
    epochs: Optional[int] = None
    black_box: Optional[bool] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    OPTIONAL = frozenset({"spec", "model", "kind", "source", "file", "sha256", "test_top1", "params", "epochs",
                          "black_box"})


@dataclass
class DataRecord(Record):
    """The training data as the checkpoint's metrics count it (only what was recorded)."""

    spec: Optional[str] = None
    train_images: Optional[int] = None
    labelled_images: Optional[int] = None
    unlabeled_images: Optional[int] = None
    unlabeled: Optional[str] = None
    train_subset: Optional[int] = None
    skipped_bad_images: Optional[int] = None
    test_images: Optional[int] = None
    augment: Optional[Any] = None
    input_size: Optional[Any] = None
    crop_pct: Optional[float] = None
    norm: Optional[Any] = None
    seed: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    OPTIONAL = frozenset({"spec", "train_images", "labelled_images", "unlabeled_images", "unlabeled", "train_subset",
                          "skipped_bad_images", "test_images", "augment", "input_size", "crop_pct", "norm", "seed"})


@dataclass
class Recipe(Record):
    """How the student was trained (only what was recorded)."""

    loss: Optional[str] = None
    loss_params: Optional[Dict[str, Any]] = None
    epochs: Optional[int] = None
    input_size: Optional[Any] = None
    augment: Optional[Any] = None
    pretrained: Optional[Any] = None
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    schedule: Optional[str] = None
    warmup_epochs: Optional[Any] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    label_smoothing: Optional[float] = None
    seed: Optional[int] = None
    teacher_cache: Optional[Any] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    OPTIONAL = frozenset({"loss", "loss_params", "epochs", "input_size", "augment", "pretrained", "batch_size",
                          "optimizer", "lr", "schedule", "warmup_epochs", "weight_decay", "momentum", "label_smoothing",
                          "seed", "teacher_cache"})


@dataclass
class TrainingRecord(Record):
    """What the card says of how the model was made (from the checkpoint, at export)."""

    command: Optional[str] = None
    command_line: Optional[str] = None
    edgekd: Optional[str] = None
    model: Optional[str] = None
    params: Optional[int] = None
    flops: Optional[int] = None
    data_spec: Optional[str] = None
    test_top1: Optional[float] = None
    best_top1: Optional[float] = None
    teacher: Optional[TeacherRecord] = None
    data: Optional[DataRecord] = None
    recipe: Recipe = field(default_factory=Recipe)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurement(Record):
    """One of bench's rows as the card keeps it."""

    device: str
    cpu: Optional[str] = None
    emulated: Optional[str] = None
    runtime: str = ""
    runtime_version: Optional[str] = None
    precision: str = ""
    runtime_precision: Optional[str] = None
    threads: Optional[int] = None
    batch_size: int = 1
    p50_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    top1: Optional[float] = None
    images: Optional[int] = None
    data: Optional[str] = None
    status: Optional[str] = None
    measured_utc: Optional[str] = None
    command: Optional[str] = None
    edgekd: Optional[str] = None
    git_commit: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Deployment(Record):
    """Where ``edgekd deploy`` installed the bundle and what it checked there."""

    device: str
    path: Optional[str] = None
    cpu: Optional[str] = None
    machine: Optional[str] = None
    emulated: Optional[str] = None
    python: Optional[str] = None
    versions: Dict[str, Any] = field(default_factory=dict)
    checked: Optional[str] = None
    installed_utc: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DeviceCheck(Record):
    """What the device runner's ``check`` reported (deploy's evidence)."""

    parity_images: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CardBlock(Record):
    """The ``edgekd`` block of the card's front matter: every record the card is rendered from."""

    card: int = CARD_SCHEMA
    training: TrainingRecord = field(default_factory=TrainingRecord)
    measurements: List[Measurement] = field(default_factory=list)
    deployments: List[Deployment] = field(default_factory=list)
    export_command: Optional[str] = None
    fit: Optional[Dict[str, Any]] = None   # how edgekd fit chose the model (plain values, shown as they are)
    extra: Dict[str, Any] = field(default_factory=dict)
    OPTIONAL = frozenset({"fit"})

    @property
    def ok_rows(self) -> List[Measurement]:
        """The measurements that were timed."""
        return [m for m in self.measurements if m.ok]
