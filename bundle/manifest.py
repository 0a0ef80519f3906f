"""Bundle manifests: the ``Manifest`` record and its ``ModelInput`` and ``Parity`` records, parsed from
manifest.json and written back here only (part of the device runner); the bundle's file names and the one sha256
(bundle/checks.py's, imported from here by edgekd's export)."""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..base.errors import BundleError
from .checks import FORMAT_FILES, MANIFEST_FILE, check_files, manifest_json, sha256_file

# The most pixels a resize may ask for: edgekd.base.bounds.MAX_RESIZE_PIXELS (the runner carries this module alone).
MAX_RESIZE_PIXELS = 89_478_485
# edgekd's metadata inside an ONNX file (written by export, read by the ONNX teacher source):
# classes, mean, std and input_size as JSON ([names], [floats] in [0, 1] pixel units, [height, width]);
# color as RGB, BGR or L; outputs as logits or probs.
METADATA_KEYS = {"classes": "edgekd.classes", "mean": "edgekd.mean", "std": "edgekd.std", "color": "edgekd.color",
                 "input_size": "edgekd.input_size", "outputs": "edgekd.outputs"}
MAX_SIDE = 8192  # an input height or width beyond this is a damaged field, not a model
INFERENCE_PRECISIONS = ("f32", "f16", "bf16")  # OpenVINO CPU plugin precisions that edgekd writes


@dataclass(frozen=True)
class Parity:
    """The manifest's parity record: images saved in the bundle and the logits the exporting machine computed on
    them, with the tolerance a device must meet (a logit ``atol`` for FP32/FP16, top-1 agreement for INT8)."""

    file: str
    logits: List[List[float]]
    atol: Optional[float] = None
    min_agreement: float = 1.0

    @classmethod
    def from_json(cls, value: Any) -> "Optional[Parity]":
        """The record of the JSON object (None when the manifest has none)."""
        if not isinstance(value, dict) or not value:
            return None
        atol = value.get("atol")
        return cls(file=str(value["file"]), logits=value["logits"], atol=None if atol is None else float(atol),
                   min_agreement=float(value.get("min_agreement", 1.0)))


@dataclass(frozen=True)
class ModelInput:
    """A bundle's ``input`` record: the preprocessing contract (training's evaluation transform, which
    bundle/preprocessing.py reproduces) and the model's input shape.

    Written back exactly as read: the keys in their order, the values as given, the records edgekd does not read
    (layout, dtype, scale, resample, resize_mode) kept in ``extra``.
    """

    color: str                      # L or RGB
    resize: Tuple[int, int]         # the model's (height, width)
    mean: List[float]               # per channel, in [0, 1] pixel units
    std: List[float]
    crop_pct: Optional[float] = None  # None: the image is stretched to resize (manifests written before it)
    shape: Optional[List[int]] = None  # [batch (-1: any), channels, height, width]; every manifest states it
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    order: Tuple[str, ...] = dataclasses.field(default=(), compare=False)  # the JSON keys, in the order read

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "ModelInput":
        """The record of an ``input`` JSON object (a manifest's, checked by ``schema_problem``, or a checkpoint's
        preprocessing view: color, resize, mean, std and crop_pct)."""
        typed = ("color", "resize", "mean", "std", "crop_pct", "shape")
        height, width = value["resize"]
        return cls(color=value["color"], resize=(height, width), mean=list(value["mean"]), std=list(value["std"]),
                   crop_pct=value.get("crop_pct"), shape=value.get("shape"),
                   extra={k: v for k, v in value.items() if k not in typed}, order=tuple(value))

    def to_json(self) -> Dict[str, Any]:
        """The JSON object, keys in the order they were read (new ones last)."""
        values: Dict[str, Any] = {"shape": self.shape, "color": self.color, "resize": list(self.resize),
                                  "mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct,
                                  **self.extra}
        present = {k: v for k, v in values.items() if v is not None or k in self.order}
        return {**{k: present[k] for k in self.order if k in present}, **present}


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest.json (DESIGN.md, "Machine-readable outputs"). The fields every bundle has and
    every reader needs are typed and checked (``schema_problem``); the export's records (validation,
    calibration, versions, ...) are kept in ``extra``, in the order they were written."""

    format: str                 # onnx | openvino
    precision: str              # fp32 | fp16 | int8
    model_file: str             # the file the runtime opens, one of ``files``
    files: Dict[str, str]       # plain file name -> sha256
    input: ModelInput           # shape, mean, std, color, resize, crop_pct: the preprocessing contract
    classes: List[str]
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> "Manifest":
        """The manifest of a JSON object, or BundleError naming the first field that is missing or malformed."""
        problem = schema_problem(data)
        if problem:
            raise BundleError("%s fails the manifest schema: %s" % (where, problem))
        typed = ("format", "precision", "model_file", "files", "input", "classes")
        return cls(format=data["format"], precision=data["precision"], model_file=data["model_file"],
                   files=data["files"], input=ModelInput.from_json(data["input"]), classes=data["classes"],
                   extra={k: v for k, v in data.items() if k not in typed})

    @classmethod
    def read(cls, folder: str) -> "Manifest":
        """The manifest of a bundle folder, checked (not its files: bundle.runtime.verify_bundle does that)."""
        return cls.from_dict(manifest_json(folder), repr(os.path.join(folder, MANIFEST_FILE)))

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object, as written to manifest.json."""
        return {"format": self.format, "precision": self.precision, "model_file": self.model_file,
                "files": dict(self.files), "input": self.input.to_json(), "classes": list(self.classes), **self.extra}

    def write(self, folder: str) -> None:
        """Write ``folder``/manifest.json atomically (fsynced before it replaces an older one)."""
        path = os.path.join(folder, MANIFEST_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def with_changes(self, **changes: Any) -> "Manifest":
        """A copy with some typed fields changed and ``extra`` records added (keyword names not among the fields)."""
        typed = {k: v for k, v in changes.items() if k in self.__dataclass_fields__}
        added = {k: v for k, v in changes.items() if k not in typed}
        return replace(self, **typed, extra={**self.extra, **added})

    @property
    def channels(self) -> int:
        """The model's input channels (1 or 3)."""
        return len(self.input.mean)  # the schema holds it to input.shape[1]

    @property
    def validation(self) -> Dict[str, Any]:
        """The parity gate's results at export (max_abs_diff, top1_agreement, top1, reference_top1, images)."""
        return self.record("validation") or {}

    @property
    def parity(self) -> Optional[Parity]:
        """The parity images and logits a device checks the bundle against, when the export saved them."""
        return Parity.from_json(self.record("parity"))

    @property
    def static_batch(self) -> Optional[int]:
        """The one batch size a static-batch bundle accepts (``input.shape[0]``), or None for a dynamic batch.

        OpenVINO for aarch64 cannot compile some dynamic-batch models (MobileNetV3-small), so ``edgekd export
        --target arm64`` writes OpenVINO bundles with a static batch.
        """
        n = self.input.shape[0] if self.input.shape else None
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    @property
    def resize(self) -> Tuple[int, int]:
        """The model's input (height, width)."""
        height, width = self.input.resize
        return int(height), int(width)

    def model_path(self, folder: str) -> str:
        """The file the runtime opens, in the bundle ``folder``."""
        return os.path.join(folder, self.model_file)

    def record(self, name: str, default: Any = None) -> Any:
        """One of the export's records (``validation``, ``model``, ``params``, ``size_bytes``, ...)."""
        return self.extra.get(name, default)


def precision_hint(manifest: Manifest) -> str:
    """The precision OpenVINO's CPU plugin must compute a bundle in: the one it was validated at
    (``runtime.inference_precision``, f32 when absent); BundleError when that field is damaged.

    Left alone, the plugin silently runs FP32 models in bf16 on CPUs with AVX512_BF16 or AMX, which moves
    logits by about 1e-2: an fp32 bundle (or row of a benchmark) would no longer be fp32.
    """
    runtime = manifest.record("runtime")
    hint = runtime.get("inference_precision") if isinstance(runtime, dict) else None
    if hint is None:
        return "f32"
    if hint not in INFERENCE_PRECISIONS:  # what edgekd writes; anything else is damage
        raise BundleError("manifest field 'runtime.inference_precision' must be f32, f16 or bf16, got %r" % (hint,))
    return str(hint)


def verify(folder: str) -> Manifest:
    """The bundle's Manifest (schema-checked), after checking every listed file against its sha256 and that the
    folder holds nothing else."""
    manifest = Manifest.read(folder)
    check_files(folder, manifest.files)
    return manifest


def library_versions(names: Sequence[str] = ("edgekd", "torch", "torchvision", "onnx", "onnxruntime", "onnxscript",
                                             "openvino", "nncf", "numpy")) -> Dict[str, str]:
    """Installed versions by distribution name (openvino's __version__ is not PEP 440, metadata is)."""
    versions: Dict[str, str] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(folder: str, data: Dict[str, Any]) -> Manifest:
    """Check the JSON object ``data`` against the schema and write it into ``folder`` as manifest.json (a Manifest
    writes itself: ``Manifest.write``); returns its Manifest."""
    problem = schema_problem(data)
    if problem:  # edgekd's own export wrote it: a bug (exit 1), not the user's input
        raise ValueError(f"edgekd built a malformed manifest: {problem}")
    manifest = Manifest.from_dict(data)
    manifest.write(folder)
    return manifest


def read_manifest(folder: str) -> Manifest:
    """The checked Manifest of a bundle folder (EdgeKDError in one line when it is missing or malformed)."""
    return Manifest.read(folder)


def _is_number_list(value: Any, length: Optional[int] = None, kind: Any = (int, float)) -> bool:
    """A list of finite numbers (json.load reads NaN and Infinity, which no preprocessing can use)."""
    return (isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)
                                            for v in value)
            and (length is None or len(value) == length))


def _plain_name(name: Any) -> bool:
    """A file name that stays inside the bundle folder: no folders, no '..', not absolute."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def schema_problem(m: Any) -> Optional[str]:
    """The first field of a manifest that is missing or malformed, as 'field X: what is wrong', else None."""
    if not isinstance(m, dict):
        return "the manifest is not a JSON object"
    checks = [
        ("format", lambda v: v in ("onnx", "openvino"), "must be onnx or openvino"),
        ("precision", lambda v: v in ("fp32", "fp16", "int8"), "must be fp32, fp16 or int8"),
        ("files", lambda v: isinstance(v, dict) and v and all(
            _plain_name(k) and isinstance(h, str) and len(h) == 64 for k, h in v.items()),
         "must map plain file names (no folders or '..') to sha256 hex digests"),
        ("input", lambda v: isinstance(v, dict), "must be an object"),
        ("classes", lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v),
         "must be a non-empty list of class names"),
    ]
    for field, ok, what in checks:
        if field not in m:
            return f"field {field!r} is missing"
        if not ok(m[field]):
            return f"field {field!r} {what}"
    if "model_file" not in m:
        return "field 'model_file' is missing"
    if not isinstance(m["model_file"], str) or m["model_file"] not in m["files"]:
        return "field 'model_file' must name one of the files"
    spec = m["input"]
    shape = spec.get("shape")
    if not (_is_number_list(shape, 4) and all(isinstance(d, int) for d in shape) and shape[1] in (1, 3)):
        return "field 'input.shape' must be [batch, channels (1 or 3), height, width]"
    channels = shape[1]
    for field, ok, what in (
            ("color", lambda v: v == ("L" if channels == 1 else "RGB"), f"must be {'L' if channels == 1 else 'RGB'}"),
            ("resize", lambda v: _is_number_list(v, 2, int) and 0 < min(v) and max(v) <= MAX_SIDE,
             f"must be [height, width], whole numbers from 1 to {MAX_SIDE}"),
            ("mean", lambda v: _is_number_list(v, channels), f"must hold {channels} numbers"),
            ("std", lambda v: _is_number_list(v, channels) and min(v) > 0, f"must hold {channels} positive numbers")):
        if field not in spec:
            return f"field 'input.{field}' is missing"
        if not ok(spec[field]):
            return f"field 'input.{field}' {what}"
    crop = spec.get("crop_pct")  # absent in manifests written before it: the image is stretched to resize
    if crop is not None and not (_is_number_list([crop]) and 0 < crop <= 1):
        return "field 'input.crop_pct' must be a number in (0, 1]"
    height, width = spec["resize"]  # bounded in memory: the resize of the shorter side to size / crop_pct
    if crop is not None and math.floor(height / crop) * math.floor(width / crop) > MAX_RESIZE_PIXELS:
        return (f"field 'input.crop_pct': {crop!r} at {height}x{width} resizes every image to at least "
                f"{math.floor(height / crop)}x{math.floor(width / crop)} pixels (at most "
                f"{MAX_RESIZE_PIXELS / 1e6:.0f} megapixels)")
    return None
