"""Teachers: every kind of model a user may learn from, behind one callable.

A ``Teacher`` takes a batch in the *student's* normalised view and returns logits in the *data's*
class order. In between it converts the view for the teacher (back to [0, 1] pixels with the
student's mean/std, grey <-> RGB, RGB -> BGR, a bilinear antialiased resize to the teacher's size,
the teacher's own mean/std), runs the teacher outside autograd, and permutes or slices its outputs
to the data's classes, matched by name wherever the teacher carries names.

Sources (``TEACHERS``, one entry per kind of ``--teacher`` spec): an edgekd checkpoint or a model
spec trained first (the original two), an edgekd bundle, a foreign ONNX file or OpenVINO IR (black
boxes: logits only), TorchScript and ``torch.export`` (.pt2) files, torchvision and timm models with
pretrained weights (or a local weights file), and ``MODULE:FUNCTION`` factories in the user's code.
"""

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .. import EdgeKDError
from .checkpoint import file_sha256
from ..bundle.manifest import METADATA_KEYS
from ..base.registry import Registry

log = logging.getLogger(__name__)

TEACHERS = Registry("teacher source")
COLORS = ("RGB", "BGR", "L")
OUTPUTS = ("logits", "probs")
# Probabilities of exactly 0 would give -inf logits: clamp before the log (KD losses see log-probs).
PROB_FLOOR = 1e-12
# The spec prefixes of the sources; a MODULE:FUNCTION factory never uses one of these as its module.
PREFIXES = ("bundle", "onnx", "openvino", "torchscript", "pt2", "torchvision", "timm")


# ---------------------------------------------------------------------------------------------------
# Options (the CLI's --teacher-* flags, validated here so a config file or Python caller is checked too)

@dataclass
class TeacherOptions:
    """How to read a teacher that does not describe itself; ``None``: from the teacher, else a default."""

    input_size: tuple = None   # (height, width) the teacher takes
    mean: list = None          # per-channel mean of the teacher's normalisation, [0, 1] pixel units
    std: list = None
    color: str = None          # RGB, BGR or L (L: one grey channel)
    outputs: str = None        # logits or probs
    classes: str = None        # a --teacher-classes file
    weights: str = None        # a local state dict / safetensors file for torchvision:, timm:, MODULE:FUNCTION
    views: int = None          # --teacher-views K: K fixed augmented views per image, replayed across epochs
    threads: int = None        # ONNX Runtime / OpenVINO threads (default: torch's)

    @classmethod
    def from_cfg(cls, cfg):
        o = cls(input_size=_size(cfg.get("teacher_input_size")), mean=_floats(cfg.get("teacher_mean"), "--teacher-mean"),
                std=_floats(cfg.get("teacher_std"), "--teacher-std"), color=cfg.get("teacher_color"),
                outputs=cfg.get("teacher_outputs"), classes=cfg.get("teacher_classes"),
                weights=cfg.get("teacher_weights"),
                views=_positive(cfg.get("teacher_views"), "--teacher-views"),
                threads=_positive(cfg.get("teacher_threads"), "--teacher-threads"))
        if o.color is not None and o.color.upper() not in COLORS:
            raise EdgeKDError(f"--teacher-color {o.color!r}: choose from {', '.join(COLORS)}")
        o.color = o.color.upper() if o.color else None
        if o.outputs is not None and o.outputs not in OUTPUTS:
            raise EdgeKDError(f"--teacher-outputs {o.outputs!r}: choose from {', '.join(OUTPUTS)}")
        if o.std is not None and min(o.std) <= 0:
            raise EdgeKDError(f"--teacher-std {o.std}: every std must be positive")
        for flag, path in (("--teacher-classes", o.classes), ("--teacher-weights", o.weights)):
            if path is not None and not os.path.isfile(path):
                raise EdgeKDError(f"{flag} {path!r} does not exist")
        return o


def _floats(value, flag):
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace("/", ",").split(",")
    try:
        out = [float(v) for v in items if str(v).strip()]
    except ValueError:
        raise EdgeKDError(f"{flag} {value!r}: give one number or one per channel, e.g. 0.485,0.456,0.406") from None
    if not out or len(out) > 3 or not all(math.isfinite(v) for v in out):
        raise EdgeKDError(f"{flag} {value!r}: give one number or one per channel, e.g. 0.485,0.456,0.406")
    return out


def _size(value):
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        sizes = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 2 or min(sizes) < 1:
        raise EdgeKDError(f"--teacher-input-size {value!r}: give SIZE or HEIGHT,WIDTH in pixels, e.g. 224")
    return (sizes[0], sizes[-1])


def _positive(value, flag):
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise EdgeKDError(f"{flag} {value!r}: expected a positive whole number")
    return number


# ---------------------------------------------------------------------------------------------------
# What a source hands back, and the Teacher built from it

@dataclass
class Loaded:
    """A teacher as its source found it, before the view and the classes are settled."""

    kind: str
    run: object                  # callable: teacher-view float tensor -> outputs tensor
    module: nn.Module = None     # the PyTorch model when there is one (moved to the device)
    hookable: bool = False       # feature hooks work (fitnet)
    channels: int = None
    size: tuple = None           # (height, width)
    mean: list = None
    std: list = None
    color: str = None
    names: list = None           # class names in output order, when the teacher carries them
    names_from: str = None
    outputs: str = None
    file: str = None
    sha256: str = None
    metrics: dict = field(default_factory=dict)
    runtime: dict = None
    found: dict = field(default_factory=dict)   # where each input setting came from
    keep: object = None          # e.g. an unpacked bundle whose folder must live as long as the teacher


class Teacher(nn.Module):
    """A frozen teacher seen through the student's data: view in, logits in the data's class order out."""

    def __init__(self, loaded, student_input, index=None, classes_record=None, spec=None):
        super().__init__()
        self.kind, self.spec, self.loaded = loaded.kind, spec, loaded
        self.model = loaded.module.eval().requires_grad_(False) if loaded.module is not None else None
        self.run = loaded.run if loaded.module is None else None
        self.is_module = loaded.hookable
        self.sha256, self.metrics = loaded.sha256, dict(loaded.metrics)
        self.input = _input_spec(loaded)
        self.color, self.outputs = loaded.color, loaded.outputs or "logits"
        s = student_input
        self.student = (s.channels, s.height, s.width)
        self.resize = (s.height, s.width) != (loaded.size[0], loaded.size[1])
        self.recolor = s.channels != loaded.channels or self.color == "BGR"
        self.renorm = (list(s.mean), list(s.std)) != (list(loaded.mean), list(loaded.std))
        shape = (1, -1, 1, 1)
        self.register_buffer("s_mean", torch.tensor(s.mean, dtype=torch.float32).view(shape))
        self.register_buffer("s_std", torch.tensor(s.std, dtype=torch.float32).view(shape))
        self.register_buffer("t_mean", torch.tensor(loaded.mean, dtype=torch.float32).view(shape))
        self.register_buffer("t_std", torch.tensor(loaded.std, dtype=torch.float32).view(shape))
        self.index = None if index is None else torch.as_tensor(index, dtype=torch.long)
        self.classes_record = classes_record or {}
        self.seconds = 0.0  # the teacher's own forward time since the last take_seconds()

    def train(self, mode=True):  # the teacher never leaves eval mode
        return super().train(False)

    def view(self, x):
        """The student's normalised batch as the teacher expects it."""
        if not (self.resize or self.recolor):
            return (x * self.s_std + self.s_mean - self.t_mean) / self.t_std if self.renorm else x
        pixels = x * self.s_std + self.s_mean
        channels = self.loaded.channels
        if pixels.shape[1] == 1 and channels == 3:
            pixels = pixels.expand(-1, 3, -1, -1)
        elif pixels.shape[1] == 3 and channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            pixels = (pixels * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if self.color == "BGR":
            pixels = pixels.flip(1)
        if self.resize:
            pixels = F.interpolate(pixels, size=tuple(self.loaded.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return (pixels - self.t_mean) / self.t_std

    def forward(self, x):
        start = time.perf_counter()
        with torch.inference_mode():  # cheaper than no_grad: no version counters, no autograd metadata
            out = self.model(self.view(x)) if self.model is not None else self.run(self.view(x))
            out = _as_logits(out)
            if self.outputs == "probs":  # log-probabilities are logits up to a constant per image
                out = out.float().clamp_min(PROB_FLOOR).log()
            if self.index is not None:
                out = out[:, self.index.to(out.device)]
        out = out.float().to(x.device).clone()  # a normal tensor again, so the loss may save it for backward
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - start
        return out

    def take_seconds(self):
        """The teacher's forward seconds since the last call (the training loop asks once per epoch)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def cache_key(self):
        """What besides the file decides the teacher's answer: its view of the data and the class mapping."""
        d = self.describe()
        return {k: d[k] for k in ("input", "outputs")} | {"index": d["classes"].get("index")}

    def describe(self):
        """The resolved teacher: kind, file, sha256, input view, outputs, class mapping (config.yaml, metrics.json)."""
        lo = self.loaded
        return {"kind": self.kind, "spec": self.spec, "file": lo.file, "sha256": self.sha256,
                "input": {"channels": lo.channels, "size": list(lo.size), "color": lo.color, "mean": list(lo.mean),
                          "std": list(lo.std), "from": dict(lo.found)},
                "view": {"from": list(self.student), "resize": self.resize, "interpolation": "bilinear, antialias",
                         "channels": f"{self.student[0]} -> {lo.channels}"},
                "outputs": self.outputs, "classes": dict(self.classes_record), "black_box": lo.module is None,
                "runtime": lo.runtime}


class FrozenTeacher(Teacher):
    """A PyTorch teacher of the data's own size in eval mode with no gradients, re-normalising inputs made for
    the student when the two were trained with different mean/std (the pre-registry form, kept for callers)."""

    def __init__(self, model, teacher_input, student_input):
        loaded = Loaded("module", None, module=model, hookable=True, channels=teacher_input.channels,
                        size=(teacher_input.height, teacher_input.width), mean=list(teacher_input.mean),
                        std=list(teacher_input.std), color=teacher_input.color)
        super().__init__(loaded, student_input)


def _input_spec(loaded):
    from .data import InputSpec

    return InputSpec(loaded.channels, loaded.size[0], loaded.size[1], list(loaded.mean), list(loaded.std))


def _as_logits(out):
    """A model's output as an (N, K) tensor: the first of several outputs, trailing 1x1 dims dropped."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    if out.dim() == 4 and out.shape[2:] == (1, 1):
        out = out.flatten(1)
    return out


# ---------------------------------------------------------------------------------------------------
# Class order: matched by name, picked by index, or (for a teacher without names) by position

def read_classes_file(path):
    """``--teacher-classes FILE``: ('names', [NAME...]) or ('index', [(INDEX, NAME or None)...]).

    One entry per line; blank lines and lines starting with '#' are skipped. ``NAME`` lines name the
    teacher's outputs in order (as many lines as it has outputs). ``INDEX NAME`` lines pick teacher
    output INDEX (from 0) for the data's class NAME; ``INDEX`` lines pick it for the data's class on
    that line's position. A line holding one whole number is an INDEX line.
    """
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise EdgeKDError(f"--teacher-classes {path!r} holds no class lines")
    parsed = [re.match(r"^(\d+)(?:\s+(.+))?$", ln) for ln in lines]
    if not any(parsed):
        return "names", lines
    if not all(parsed):
        bad = lines[parsed.index(None)]
        raise EdgeKDError(f"--teacher-classes {path!r} mixes 'INDEX NAME' lines and name lines (e.g. {bad!r}); "
                          "use one form for the whole file")
    pairs = [(int(m.group(1)), m.group(2)) for m in parsed]
    if len({name is None for _, name in pairs}) > 1:
        raise EdgeKDError(f"--teacher-classes {path!r} mixes 'INDEX NAME' and bare 'INDEX' lines; use one form")
    return "index", pairs


def class_index(data_classes, outputs, names=None, names_from=None, classes_file=None, spec="teacher"):
    """The teacher output for each data class (``None`` when that is the identity) and a record of how."""
    data_classes = list(data_classes)
    if classes_file:
        form, entries = read_classes_file(classes_file)
        if form == "index":
            return _index_pairs(data_classes, outputs, entries, classes_file, spec)
        if len(entries) != outputs:
            raise EdgeKDError(f"--teacher-classes {classes_file!r} names {len(entries)} classes but teacher {spec!r} "
                              f"has {outputs} outputs (NAME lines name every output in order)")
        names, names_from = entries, "--teacher-classes"
    if names is None:
        if outputs != len(data_classes):
            raise EdgeKDError(f"teacher {spec!r} has {outputs} outputs but the data has {len(data_classes)} classes; "
                              "pass --teacher-classes FILE to pick and name its outputs (lines 'INDEX NAME')")
        log.warning("teacher %s carries no class names: its %d outputs are taken in the data's class order (%s); "
                    "pass --teacher-classes FILE to have them checked by name", spec, outputs,
                    ", ".join(data_classes[:5]) + (", ..." if outputs > 5 else ""))
        return None, {"matched": "by position (the teacher carries no class names)", "teacher_outputs": outputs}
    if len(names) != outputs:
        raise EdgeKDError(f"teacher {spec!r} names {len(names)} classes ({names_from}) but has {outputs} outputs")
    where = {}
    for i, name in enumerate(names):
        where.setdefault(name, []).append(i)
    index = []
    for name in data_classes:
        if name not in where:
            import difflib

            close = difflib.get_close_matches(name, list(where), n=3)
            hint = f" (close: {', '.join(close)})" if close else f" (it knows e.g. {', '.join(names[:3])})"
            counts = (f"teacher {spec!r} has {outputs} classes but the data has {len(data_classes)}, and "
                      if outputs != len(data_classes) else "")
            raise EdgeKDError(f"{counts}data class {name!r} is not a class of teacher {spec!r}{hint}; map the classes "
                              "with --teacher-classes FILE (lines 'INDEX NAME')")
        if len(where[name]) > 1:
            raise EdgeKDError(f"data class {name!r} names teacher outputs {where[name]} of {spec!r}; pick one with "
                              "--teacher-classes FILE (lines 'INDEX NAME')")
        index.append(where[name][0])
    record = {"matched": "by name", "names_from": names_from, "teacher_outputs": outputs, "index": index,
              "teacher_names": [names[i] for i in index]}
    return (None if index == list(range(outputs)) else index), record


def _index_pairs(data_classes, outputs, pairs, path, spec):
    if len(pairs) != len(data_classes):
        raise EdgeKDError(f"--teacher-classes {path!r} picks {len(pairs)} outputs but the data has "
                          f"{len(data_classes)} classes: one line per data class")
    index = [None] * len(data_classes)
    for k, (i, name) in enumerate(pairs):
        if i >= outputs:
            raise EdgeKDError(f"--teacher-classes {path!r} picks output {i}, but teacher {spec!r} has {outputs} "
                              f"outputs (0..{outputs - 1})")
        if name is None:
            index[k] = i
            continue
        if name not in data_classes:
            raise EdgeKDError(f"--teacher-classes {path!r} names {name!r}, which is not a data class "
                              f"(the data's: {', '.join(data_classes[:10])}{', ...' if len(data_classes) > 10 else ''})")
        if index[data_classes.index(name)] is not None:
            raise EdgeKDError(f"--teacher-classes {path!r} names data class {name!r} twice")
        index[data_classes.index(name)] = i
    if len(set(index)) != len(index):
        raise EdgeKDError(f"--teacher-classes {path!r} picks the same teacher output for two data classes")
    record = {"matched": "by index (--teacher-classes)", "file": os.path.abspath(path), "teacher_outputs": outputs,
              "index": index}
    return (None if index == list(range(outputs)) else index), record


# ---------------------------------------------------------------------------------------------------
# Loading: resolve the spec, load, settle the view, check the outputs, match the classes

class Env:
    """What a source may need besides the spec: the run's config, data and process group."""

    def __init__(self, cfg, data=None, train=None, test=None, ctx=None):
        self.cfg, self.data, self.train, self.test, self.ctx = cfg, data, train, test, ctx


def resolve(spec, options):
    """The registered source that reads ``spec`` (exactly one matches: the fallback is a model spec)."""
    found = [name for name in TEACHERS.names() if name != "model" and TEACHERS.get(name).matches(spec, options)]
    if len(found) > 1:
        raise AssertionError(f"teacher spec {spec!r} matches sources {found}")  # a bug in the matchers
    return TEACHERS.get(found[0] if found else "model")


def check(spec, options, loss_meta=None):
    """Cheap checks before any data is loaded: the spec resolves, its file exists, fitnet gets a PyTorch model."""
    source = resolve(spec, options)
    source.check(spec, options)
    if options.weights and source.kind not in ("torchvision", "timm", "factory"):
        raise EdgeKDError(f"--teacher-weights loads weights into torchvision:NAME, timm:NAME or MODULE:FUNCTION, "
                          f"not into a {source.kind} teacher ({spec!r})")
    if loss_meta and loss_meta.get("needs_features") and not source.hookable:
        raise EdgeKDError(f"loss fitnet needs the teacher's feature maps, but teacher {spec!r} is a black box "
                          f"({source.kind}: logits only); use a PyTorch teacher (an edgekd checkpoint, torchvision:, "
                          "timm:, MODULE:FUNCTION) or a logit loss (kd, dkd, seed, mse)")
    return source


def load_teacher(cfg, options, data, train=None, test=None, ctx=None, evaluate_on=None):
    """The Teacher of ``cfg['teacher']`` for this data: loaded, its view settled, its classes matched."""
    spec = cfg["teacher"]
    source = check(spec, options)
    loaded = source.load(spec, options, Env(cfg, data, train, test, ctx))
    _settle_input(loaded, options, data.input, spec)
    outputs = _probe(loaded, spec)
    index, record = class_index(data.classes, outputs, loaded.names, loaded.names_from, options.classes, spec)
    teacher = Teacher(loaded, data.input, index, record, spec)
    log.info("teacher %s (%s): %dx%dx%d %s, %s, classes %s", spec, loaded.kind, loaded.channels, *loaded.size,
             loaded.color, teacher.outputs, record["matched"])
    if evaluate_on is not None and teacher.metrics.get("test_top1") is None:
        from .train_loop import evaluate

        teacher.to(cfg.get("device", "cpu"))
        teacher.metrics["test_top1"] = evaluate(teacher, evaluate_on, cfg.get("device", "cpu"), dist=ctx)
        teacher.metrics["test_top1_measured"] = "here, on the data's test split through the teacher's view"
        teacher.take_seconds()
    return teacher


def _settle_input(lo, options, data_input, spec):
    """Fill the teacher's input view from options (which win), the teacher itself, or the data."""
    for name in ("mean", "std", "color", "outputs"):
        value = getattr(options, name)
        if value is not None:
            setattr(lo, name, value)
            lo.found[name] = f"--teacher-{name}"
    if options.input_size is not None:
        lo.size, lo.found["size"] = tuple(options.input_size), "--teacher-input-size"
    if lo.color is not None:
        lo.channels = 1 if lo.color == "L" else 3
    if lo.channels is None:
        lo.channels, lo.found["channels"] = data_input.channels, "the data's"
    lo.color = lo.color or ("L" if lo.channels == 1 else "RGB")
    if (lo.color == "L") != (lo.channels == 1):
        raise EdgeKDError(f"teacher {spec!r} takes {lo.channels} channels, which colour {lo.color} does not have; "
                          "fix --teacher-color (RGB, BGR or L)")
    if lo.size is None:
        lo.size, lo.found["size"] = (data_input.height, data_input.width), "the data's (set --teacher-input-size)"
        log.warning("teacher %s gives no input size: it sees the data's %dx%d (set --teacher-input-size)", spec, *lo.size)
    if lo.mean is None or lo.std is None:
        raise EdgeKDError(f"teacher {spec!r} carries no input normalisation: pass --teacher-mean and --teacher-std "
                          "in [0, 1] pixel units (ImageNet: 0.485,0.456,0.406 and 0.229,0.224,0.225; 0 and 1 for "
                          "plain [0, 1] pixels)")
    lo.mean = lo.mean * lo.channels if len(lo.mean) == 1 else list(lo.mean)
    lo.std = lo.std * lo.channels if len(lo.std) == 1 else list(lo.std)
    if len(lo.mean) != lo.channels or len(lo.std) != lo.channels:
        raise EdgeKDError(f"teacher {spec!r} takes {lo.channels} channels but its mean/std give "
                          f"{len(lo.mean)}/{len(lo.std)} values")


def _probe(lo, spec):
    """Run the teacher once on two blank images of its view: the number of outputs, or a one-line error."""
    x = (torch.zeros(2, lo.channels, *lo.size) - torch.tensor(lo.mean).view(1, -1, 1, 1)) / torch.tensor(lo.std).view(1, -1, 1, 1)
    try:
        with torch.inference_mode():
            out = _as_logits(lo.module.eval()(x) if lo.module is not None else lo.run(x))
    except EdgeKDError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeKDError(f"teacher {spec!r} cannot run on {lo.channels}x{lo.size[0]}x{lo.size[1]} inputs "
                          f"(set --teacher-input-size / --teacher-color): {reason[:300]}") from None
    if out.dim() != 2 or out.shape[0] != 2:
        raise EdgeKDError(f"teacher {spec!r} returns a {tuple(out.shape)} output for 2 images; a classifier's "
                          "(images, classes) logits or probabilities are needed")
    return int(out.shape[1])



def _files_sha256(paths):
    """One sha256 for several files (an IR's .xml and .bin, an ONNX file and its external data)."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    return hashlib.sha256(json.dumps([file_sha256(p) for p in paths]).encode()).hexdigest()


def _state_sha256(model, spec):
    """For models built from code and downloaded weights: the spec and every tensor of the state dict."""
    h = hashlib.sha256(spec.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if tensor.numel() else b"")
    return h.hexdigest()


def _split(spec, prefix):
    return spec[len(prefix) + 1:] if spec.startswith(prefix + ":") else spec


def _need_file(path, what):
    if not os.path.exists(path):
        raise EdgeKDError(f"{what} {path!r} does not exist")


def _threads(options):
    return options.threads or torch.get_num_threads()


class Source:
    """A kind of teacher spec: ``matches(spec, options)``, ``check`` (cheap), ``load -> Loaded``."""

    kind = ""
    hookable = False

    def matches(self, spec, options):
        raise NotImplementedError

    def check(self, spec, options):
        pass

    def load(self, spec, options, env):
        raise NotImplementedError


def _source(name):
    def add(cls):
        obj = cls()
        obj.kind = name
        TEACHERS.register(name, hookable=cls.hookable)(obj)
        return cls

    return add


def _suffix(spec, prefix, suffixes):
    return spec.startswith(prefix + ":") or (":" not in spec[2:] and spec.lower().endswith(suffixes))


# --- the original two: an edgekd checkpoint, a model spec trained first ------------------------------

@_source("checkpoint")
class CheckpointSource(Source):
    hookable = True

    def matches(self, spec, options):
        return os.path.isfile(spec) and not _is_torchscript(spec) and not spec.lower().endswith(
            (".onnx", ".xml", ".pt2", ".zip"))

    def load(self, spec, options, env):
        from .checkpoint import load_model

        model, ckpt = load_model(spec)
        metrics = dict(ckpt.get("metrics") or {})
        metrics.update(source=os.path.abspath(spec), model=ckpt["model"])
        return _from_checkpoint(self.kind, model, ckpt, spec, metrics)


def _from_checkpoint(kind, model, ckpt, path, metrics):
    spec_in = ckpt["input"]
    return Loaded(kind, None, module=model, hookable=True, channels=spec_in["channels"],
                  size=(spec_in["height"], spec_in["width"]), mean=list(spec_in["mean"]), std=list(spec_in["std"]),
                  names=[str(c) for c in ckpt["classes"]], names_from="the checkpoint", file=os.path.abspath(path),
                  sha256=file_sha256(path), metrics=metrics, found={"input": "the checkpoint"})


@_source("model")
class TrainedSource(Source):
    """A model spec (seed-teacher, resnet20, torchvision:resnet18, ...) trained here on the data first."""

    hookable = True

    def matches(self, spec, options):
        return True  # the fallback: resolve() asks it last

    def check(self, spec, options):
        from .models import check_spec

        check_spec(spec)

    def load(self, spec, options, env):
        from .checkpoint import load_model
        from .distill import _finish, _save, _summary
        from .losses import make_loss
        from .models import build_model
        from .train_loop import TrainRun, fit

        cfg, data, ctx = env.cfg, env.data, env.ctx
        path = os.path.join(cfg["out"], "teacher.pt")
        if cfg.get("resume") and ctx.broadcast_object(os.path.isfile(path)):  # trained before the interruption
            model, ckpt = load_model(path)
            log.info("resuming: teacher already trained (%s)", path)
            return _from_checkpoint(self.kind, model, ckpt, path, dict(ckpt["metrics"]))
        model = build_model(spec, len(data.classes), data.input)
        loss_fn, _ = make_loss("ce", label_smoothing=cfg.get("label_smoothing"))
        epochs = cfg["teacher_epochs"] or cfg["epochs"]
        t_cfg = {**cfg, "epochs": epochs}
        run = TrainRun(env.train, env.test, loss_fn, dist=ctx)
        history = fit(model, run, t_cfg, desc=f"teacher {spec}", state_path=os.path.join(cfg["out"], "teacher.state.pt"))
        metrics = _finish(model, run, t_cfg, _summary(spec, epochs, history, model, data))
        metrics["source"] = "trained"
        if ctx.is_main:
            _save(path, model, spec, data, metrics, t_cfg)
        ctx.barrier()  # the others hash teacher.pt for the teacher cache: wait until it is written
        ckpt = {"input": data.input.to_dict(), "classes": data.classes}
        return _from_checkpoint(self.kind, model.eval().cpu(), ckpt, path, metrics)


# --- runtimes: an edgekd bundle, a foreign ONNX file or OpenVINO IR ----------------------------------

def ort_session(path, threads):
    """ONNX Runtime with torch's thread count and no spinning: its idle workers must not steal the cores
    torch needs for the student's step between two teacher calls."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EdgeKDError(f"ONNX Runtime cannot load {path!r}: {str(e).strip().splitlines()[0][:300]}") from None


def ort_runner(session):
    """A torch-in, torch-out call of an ONNX Runtime session; a fixed batch size is served in chunks."""
    import numpy as np

    first = session.get_inputs()[0]
    fixed = first.shape[0] if first.shape and isinstance(first.shape[0], int) and first.shape[0] > 0 else None

    def run(x):
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if fixed is None or len(batch) == fixed:
            return torch.from_numpy(session.run(None, {first.name: batch})[0])
        outs = []
        for start in range(0, len(batch), fixed):
            part = batch[start:start + fixed]
            pad = fixed - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
            outs.append(session.run(None, {first.name: part})[0][:fixed - pad])
        return torch.from_numpy(np.concatenate(outs))

    return run


def openvino_runner(path, threads):
    """OpenVINO on the CPU with a latency hint (one stream), torch's thread count, no thread pinning, f32 for
    float layers (INT8 layers stay INT8)."""
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    import numpy as np
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(path)
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                     "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False})
    except Exception as e:
        raise EdgeKDError(f"OpenVINO cannot load {path!r}: {str(e).strip().splitlines()[0][:300]}") from None
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    shape = model.inputs[0].get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else []
    return run, dims


@_source("bundle")
class BundleSource(Source):
    """An edgekd bundle (folder or .zip): checksums verified, the manifest's view and class names."""

    def matches(self, spec, options):
        path = _split(spec, "bundle")
        return spec.startswith("bundle:") or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json"))) \
            or (os.path.isfile(path) and path.lower().endswith(".zip"))

    def check(self, spec, options):
        _need_file(_split(spec, "bundle"), "teacher bundle")

    def load(self, spec, options, env):
        from ..bundle import load_bundle

        path = _split(spec, "bundle")
        bundle = load_bundle(path, threads=1)
        bundle.session = None  # the bundle's own session spins; the teacher opens one that does not
        m = bundle.manifest
        model_path = os.path.join(bundle.folder, m["model_file"])
        threads = _threads(options)
        if m["format"] == "onnx":
            run = ort_runner(ort_session(model_path, threads))
        else:
            run, _ = openvino_runner(model_path, threads)
        sha = file_sha256(path) if os.path.isfile(path) else hashlib.sha256(
            json.dumps(m["files"], sort_keys=True).encode()).hexdigest()
        spec_in = m["input"]
        return Loaded(self.kind, run, channels=spec_in["shape"][1], size=tuple(spec_in["resize"]),
                      mean=list(spec_in["mean"]), std=list(spec_in["std"]), color=spec_in["color"],
                      names=list(m["classes"]), names_from="the bundle manifest", file=os.path.abspath(path),
                      sha256=sha, runtime={"library": m["format"], "precision": m["precision"], "threads": threads},
                      metrics={"model": m.get("model"), "source": os.path.abspath(path),
                               "bundle_top1": m.get("validation", {}).get("top1")},
                      found={"input": "the bundle manifest"}, keep=bundle)


def _onnx_files(path):
    """The ONNX file and the external-data files it names (all of them decide its answers)."""
    try:
        import onnx
    except ImportError:
        return [path]
    model = onnx.load(path, load_external_data=False)
    extra = sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                    for e in t.external_data if e.key == "location"})
    return [path] + [os.path.join(os.path.dirname(path), name) for name in extra]


@_source("onnx")
class OnnxSource(Source):
    """A foreign ONNX file, run by ONNX Runtime: a black box whose view comes from options or its metadata."""

    def matches(self, spec, options):
        return _suffix(spec, "onnx", (".onnx",))

    def check(self, spec, options):
        _need_file(_split(spec, "onnx"), "teacher ONNX file")

    def load(self, spec, options, env):
        path = _split(spec, "onnx")
        threads = _threads(options)
        session = ort_session(path, threads)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        dims = session.get_inputs()[0].shape
        lo = Loaded(self.kind, ort_runner(session), file=os.path.abspath(path), sha256=_files_sha256(_onnx_files(path)),
                    runtime={"library": "onnxruntime", "threads": threads, "spinning": False})
        _apply_shape(lo, dims, "the ONNX graph")
        _apply_metadata(lo, meta, spec)
        return lo


def _apply_shape(lo, dims, where):
    dims = [d if isinstance(d, int) and d > 0 else None for d in (dims or [])]
    if len(dims) == 4:
        if dims[1] in (1, 3):
            lo.channels, lo.found["channels"] = dims[1], where
        if dims[2] and dims[3]:
            lo.size, lo.found["size"] = (dims[2], dims[3]), where


def _apply_metadata(lo, meta, spec):
    """Read edgekd's ONNX metadata_props keys (export.onnx.METADATA_KEYS) when the file carries them."""
    def value(key):
        text = meta.get(METADATA_KEYS[key])
        if text is None:
            return None
        try:
            return json.loads(text) if key != "color" and key != "outputs" else text
        except json.JSONDecodeError:
            raise EdgeKDError(f"teacher {spec!r}: metadata {METADATA_KEYS[key]!r} is not JSON: {text[:80]!r}") from None

    for key in ("mean", "std", "color", "outputs", "classes", "input_size"):
        v = value(key)
        if v is None:
            continue
        if key == "classes":
            lo.names, lo.names_from = [str(c) for c in v], f"ONNX metadata {METADATA_KEYS['classes']}"
        elif key == "input_size":
            lo.size, lo.found["size"] = tuple(int(s) for s in v), "ONNX metadata"
        else:
            setattr(lo, key, v)
            lo.found[key] = "ONNX metadata"
    if lo.color is not None and lo.color not in COLORS or lo.outputs is not None and lo.outputs not in OUTPUTS:
        raise EdgeKDError(f"teacher {spec!r}: metadata color {lo.color!r} / outputs {lo.outputs!r} not understood "
                          f"(color: {', '.join(COLORS)}; outputs: {', '.join(OUTPUTS)})")


@_source("openvino")
class OpenVINOSource(Source):
    """A foreign OpenVINO IR (.xml + .bin), run by OpenVINO: a black box whose view comes from options."""

    def matches(self, spec, options):
        return _suffix(spec, "openvino", (".xml",))

    def check(self, spec, options):
        path = _split(spec, "openvino")
        _need_file(path, "teacher OpenVINO IR")
        _need_file(os.path.splitext(path)[0] + ".bin", "the weights of the OpenVINO IR")

    def load(self, spec, options, env):
        path = _split(spec, "openvino")
        threads = _threads(options)
        run, dims = openvino_runner(path, threads)
        lo = Loaded(self.kind, run, file=os.path.abspath(path),
                    sha256=_files_sha256([path, os.path.splitext(path)[0] + ".bin"]),
                    runtime={"library": "openvino", "threads": threads, "hint": "LATENCY"})
        _apply_shape(lo, dims, "the OpenVINO model")
        return lo


# --- PyTorch files: TorchScript, torch.export -------------------------------------------------------

def _is_torchscript(path):
    """A TorchScript archive holds code/ and constants.pkl; torch.save's zip (a checkpoint) does not."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _first_conv_channels(module):
    for p in module.parameters():
        if p.dim() == 4:
            return p.shape[1] if p.shape[1] in (1, 3) else None
    return None


class _Opaque(nn.Module):
    """Holds a module whose train()/eval()/requires_grad_() raise (torch.export's, TorchScript's): the teacher is
    frozen anyway."""

    def __init__(self, module):
        super().__init__()
        self.inner = module

    def train(self, mode=True):
        return self

    def forward(self, x):
        return self.inner(x)


@_source("torchscript")
class TorchScriptSource(Source):
    def matches(self, spec, options):
        return spec.startswith("torchscript:") or (os.path.isfile(spec) and not spec.lower().endswith(
            (".onnx", ".xml", ".pt2", ".zip")) and _is_torchscript(spec))

    def check(self, spec, options):
        _need_file(_split(spec, "torchscript"), "teacher TorchScript file")

    def load(self, spec, options, env):
        path = _split(spec, "torchscript")
        try:
            module = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise EdgeKDError(f"cannot load TorchScript {path!r}: {str(e).strip().splitlines()[0][:300]}") from None
        return Loaded(self.kind, None, module=_Opaque(module.eval()), channels=_first_conv_channels(module),
                      file=os.path.abspath(path),
                      sha256=file_sha256(path), runtime={"library": "torch.jit"})


@_source("pt2")
class ExportedProgramSource(Source):
    def matches(self, spec, options):
        return _suffix(spec, "pt2", (".pt2",))

    def check(self, spec, options):
        _need_file(_split(spec, "pt2"), "teacher torch.export file")

    def load(self, spec, options, env):
        path = _split(spec, "pt2")
        try:
            program = torch.export.load(path)
        except Exception as e:
            raise EdgeKDError(f"cannot load torch.export program {path!r}: {str(e).strip().splitlines()[0][:300]}") from None
        lo = Loaded(self.kind, None, module=_Opaque(program.module()), file=os.path.abspath(path),
                    sha256=file_sha256(path), runtime={"library": "torch.export"})
        user = set(program.graph_signature.user_inputs)
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in user and hasattr(node.meta.get("val"), "shape"):
                _apply_shape(lo, [d if isinstance(d, int) else None for d in node.meta["val"].shape], "the exported program")
                break
        return lo


# --- models from code: torchvision, timm, the user's factory ---------------------------------------

def load_state_dict(path):
    """A state dict from a .safetensors file or a torch file (a bare state dict, or one under 'state_dict'/'model')."""
    if path.lower().endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise EdgeKDError("reading .safetensors needs the safetensors package: pip install 'edgekd[timm]'") from None
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EdgeKDError(f"--teacher-weights {path!r} is not a state dict torch can read: "
                          f"{str(e).strip().splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EdgeKDError(f"--teacher-weights {path!r} does not hold a state dict (names -> tensors)")
    return obj


def _load_weights(model, path, spec):
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as e:
        raise EdgeKDError(f"--teacher-weights {path!r} does not fit {spec!r}: "
                          f"{' '.join(str(e).split())[:300]}") from None


def _head_classes(state):
    """The class count of a state dict: the rows of its last 2-D weight (the classifier)."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(weights[-1].shape[0]) if weights else None


@_source("torchvision")
class TorchvisionSource(Source):
    """``torchvision:NAME:WEIGHTS`` (pretrained through torchvision's weights API and download cache), or
    ``torchvision:NAME`` with --teacher-weights FILE. Without either it is a model spec trained first."""

    hookable = True

    def matches(self, spec, options):
        if not spec.startswith("torchvision:"):
            return False
        from .models import STEMS

        _, _, weights = spec[len("torchvision:"):].partition(":")
        return weights not in STEMS or bool(options.weights)

    def load(self, spec, options, env):
        import torchvision

        name, _, weights_name = spec[len("torchvision:"):].partition(":")
        if name not in torchvision.models.list_models(module=torchvision.models):
            from .models import _torchvision_model

            _torchvision_model(name, 10, 3)  # raises the unknown-model error with a suggestion
        enum = torchvision.models.get_model_weights(name)
        try:
            weights = enum[weights_name] if weights_name else enum.DEFAULT
        except KeyError:
            raise EdgeKDError(f"torchvision {name} has no weights {weights_name!r}: choose from "
                              f"{', '.join(['DEFAULT'] + [w.name for w in enum])}") from None
        lo = Loaded(self.kind, None, hookable=True, channels=3, runtime={"library": "torch"})
        if options.weights:
            state = load_state_dict(options.weights)
            classes = _head_classes(state) or len(weights.meta["categories"])
            model = torchvision.models.get_model(name, weights=None, num_classes=classes)
            _load_weights(model, options.weights, spec)
            lo.file, lo.sha256 = os.path.abspath(options.weights), file_sha256(options.weights)
        else:
            try:
                model = torchvision.models.get_model(name, weights=weights)  # torch.hub's cache, downloaded once
            except Exception as e:  # no internet, a proxy, a damaged cache file
                raise EdgeKDError(f"cannot get torchvision weights {weights} ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); on a machine "
                                  "without internet pass --teacher-weights FILE") from None
            lo.file, lo.sha256 = weights.url, _state_sha256(model, f"{spec}:{weights.url}")
        transform = weights.transforms()
        lo.module, lo.mean, lo.std = model, list(transform.mean), list(transform.std)
        lo.size = (transform.crop_size[0], transform.crop_size[-1])
        lo.found = {"input": f"torchvision {weights} transforms"}
        categories = weights.meta.get("categories")
        if categories and _probe_count(model, lo.size) == len(categories):
            lo.names, lo.names_from = list(categories), f"torchvision {weights} meta"
        lo.metrics = {"model": spec, "source": lo.file, "params": sum(p.numel() for p in model.parameters())}
        return lo


def _probe_count(model, size):
    with torch.inference_mode():
        return _as_logits(model.eval()(torch.zeros(1, 3, *size))).shape[1]


@_source("timm")
class TimmSource(Source):
    """``timm:NAME``: timm.create_model(NAME, pretrained=True), or with --teacher-weights FILE; its data config
    (input size, mean, std) from timm.data.resolve_data_config, ImageNet names for 1000-class heads."""

    hookable = True

    def matches(self, spec, options):
        return spec.startswith("timm:")

    def check(self, spec, options):
        _import_timm()

    def load(self, spec, options, env):
        timm = _import_timm()
        name = spec[len("timm:"):]
        try:
            if options.weights:
                state = load_state_dict(options.weights)
                model = timm.create_model(name, pretrained=False, num_classes=_head_classes(state) or 1000)
                _load_weights(model, options.weights, spec)
                file, sha = os.path.abspath(options.weights), file_sha256(options.weights)
            else:
                model = timm.create_model(name, pretrained=True)  # timm's loader and the Hugging Face cache
                file, sha = f"timm:{name} pretrained", None
        except EdgeKDError:
            raise
        except Exception as e:  # an unknown name, no internet, a head that does not fit the weights
            if "Unknown model" in str(e):
                raise EdgeKDError(f"unknown timm model {name!r} (see timm.list_models())") from None
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise EdgeKDError(f"timm cannot load {name!r}: {reason}"
                              + ("" if options.weights else "; on a machine without internet pass --teacher-weights FILE")) from None
        sha = sha or _state_sha256(model, spec)
        config = timm.data.resolve_data_config(model=model)
        c, h, w = config["input_size"]
        lo = Loaded(self.kind, None, module=model, hookable=True, channels=c, size=(h, w), mean=list(config["mean"]),
                    std=list(config["std"]), file=file, sha256=sha, found={"input": "timm.data.resolve_data_config"},
                    runtime={"library": "torch"},
                    metrics={"model": spec, "source": file, "params": sum(p.numel() for p in model.parameters())})
        if getattr(model, "num_classes", None) == 1000:
            info = timm.data.ImageNetInfo()
            lo.names = [info.index_to_description(i) for i in range(1000)]
            lo.names_from = "timm.data.ImageNetInfo descriptions"
        return lo


def _import_timm():
    try:
        import timm
        import timm.data
    except ImportError:
        raise EdgeKDError("timm: teachers need the timm package: pip install 'edgekd[timm]'") from None
    return timm


FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@_source("factory")
class FactorySource(Source):
    """``MODULE:FUNCTION``: a function in the user's code (importable from PYTHONPATH) returning an nn.Module,
    called with no arguments; --teacher-weights loads a state dict into it."""

    hookable = True

    def matches(self, spec, options):
        return bool(FACTORY.match(spec)) and spec.split(":")[0] not in PREFIXES and not os.path.exists(spec)

    def load(self, spec, options, env):
        import importlib

        module_name, fn_name = spec.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise EdgeKDError(f"cannot import {module_name!r} for teacher {spec!r}: {e} (is its folder on PYTHONPATH?)") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise EdgeKDError(f"module {module_name!r} has no function {fn_name!r} (teacher {spec!r})")
        model = fn()
        if not isinstance(model, nn.Module):
            raise EdgeKDError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
        file = getattr(module, "__file__", None)
        if options.weights:
            _load_weights(model, options.weights, spec)
            file = os.path.abspath(options.weights)
        return Loaded(self.kind, None, module=model, hookable=True, channels=_first_conv_channels(model), file=file,
                      sha256=_state_sha256(model, spec), runtime={"library": "torch"},
                      metrics={"model": spec, "source": file, "params": sum(p.numel() for p in model.parameters())})
