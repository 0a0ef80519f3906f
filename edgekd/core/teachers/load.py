"""Loading a teacher: resolve the spec to its source, load, settle the view, check the outputs, match the classes."""

import logging
from typing import Any, Optional

import torch

from ... import EdgeKDError
from ..data import Data, InputSpec
from ..train_loop import evaluate
from .checkpoint import Trained
from .classes import class_index
from .options import TeacherOptions
from .source import TEACHERS, Env, Source
from .view import Loaded, Teacher, as_logits, check_probs

log = logging.getLogger(__name__)


def resolve(spec: str, options: TeacherOptions) -> Source:
    """The registered source that reads ``spec`` (exactly one matches: the fallback is a model spec)."""
    found = [name for name in TEACHERS.names() if name != "model" and TEACHERS.get(name).matches(spec, options)]
    if len(found) > 1:
        raise AssertionError(f"teacher spec {spec!r} matches sources {found}")  # a bug in the matchers
    return TEACHERS.get(found[0] if found else "model")


def check(spec: str, options: TeacherOptions, needs_features: bool = False) -> Source:
    """Cheap checks before any data is loaded: the spec resolves, its file exists, a loss that ``needs_features``
    (fitnet) gets a PyTorch model."""
    source = resolve(spec, options)
    source.check(spec, options)
    if options.weights and source.kind not in ("torchvision", "timm", "factory"):
        raise EdgeKDError(f"--teacher-weights loads weights into torchvision:NAME, timm:NAME or MODULE:FUNCTION, "
                          f"not into a {source.kind} teacher ({spec!r})")
    if needs_features and not source.hookable:
        raise EdgeKDError(f"loss fitnet needs the teacher's feature maps, but teacher {spec!r} is a black box "
                          f"({source.kind}: logits only); use a PyTorch teacher (an edgekd checkpoint, torchvision:, "
                          "timm:, MODULE:FUNCTION) or a logit loss (kd, dkd, seed, mse)")
    return source


def load_teacher(cfg: Any, options: TeacherOptions, data: Data, train: Any = None, test: Any = None, ctx: Any = None,
                 evaluate_on: Any = None, trained: Optional[Trained] = None) -> Teacher:
    """The Teacher of ``cfg.teacher`` (``cfg``: the command's options) for this data: loaded, its view settled, its classes matched. A teacher
    given as a model spec is never trained here: pass the caller's ``trained`` (teachers.Trained)."""
    spec = cfg.teacher
    source = check(spec, options)
    loaded = source.load(spec, options, Env(cfg, data, train, test, ctx, trained))
    view = _settle_input(loaded, options, data.input, spec)
    outputs = _probe(loaded, spec, view, loaded.outputs == "probs")
    index, record = class_index(data.classes, outputs, loaded.names, loaded.names_from, options.classes, spec)
    teacher = Teacher(loaded, data.input, index, record, spec)
    log.info("teacher %s (%s): %dx%dx%d %s, %s, classes %s", spec, loaded.kind, view.channels, view.height, view.width,
             loaded.color, teacher.outputs, record.matched)
    if evaluate_on is not None and teacher.metrics.get("test_top1") is None:
        teacher.to(cfg.device)
        teacher.metrics["test_top1"] = evaluate(teacher, evaluate_on, cfg.device, dist=ctx)
        teacher.metrics["test_top1_measured"] = "here, on the data's test split through the teacher's view"
        teacher.take_seconds()
    return teacher


def _settle_input(lo: Loaded, options: TeacherOptions, data_input: InputSpec, spec: str) -> InputSpec:
    """Fill the teacher's input view from options (which win), the teacher itself, or the data; return it."""
    for name in ("mean", "std", "color", "outputs"):
        value = getattr(options, name)
        if value is not None:
            lo.settle(f"--teacher-{name}", **{name: value})
    if options.input_size is not None:
        lo.settle("--teacher-input-size", size=(options.input_size[0], options.input_size[1]))
    if lo.color is not None:
        lo.channels = 1 if lo.color == "L" else 3
    channels = lo.channels
    if channels is None:
        channels = data_input.channels
        lo.settle("the data's", channels=channels)
    lo.color = lo.color or ("L" if channels == 1 else "RGB")
    if (lo.color == "L") != (channels == 1):
        raise EdgeKDError(f"teacher {spec!r} takes {channels} channels, which colour {lo.color} does not have; "
                          "fix --teacher-color (RGB, BGR or L)")
    size = lo.size
    if size is None:
        size = (data_input.height, data_input.width)
        lo.settle("the data's (set --teacher-input-size)", size=size)
        log.warning("teacher %s gives no input size: it sees the data's %dx%d (set --teacher-input-size)", spec, *size)
    if lo.mean is None or lo.std is None:
        raise EdgeKDError(f"teacher {spec!r} carries no input normalisation: pass --teacher-mean and --teacher-std "
                          "in [0, 1] pixel units (ImageNet: 0.485,0.456,0.406 and 0.229,0.224,0.225; 0 and 1 for "
                          "plain [0, 1] pixels)")
    lo.mean = lo.mean * channels if len(lo.mean) == 1 else list(lo.mean)
    lo.std = lo.std * channels if len(lo.std) == 1 else list(lo.std)
    if len(lo.mean) != channels or len(lo.std) != channels:
        raise EdgeKDError(f"teacher {spec!r} takes {channels} channels but its mean/std give "
                          f"{len(lo.mean)}/{len(lo.std)} values")
    return InputSpec(channels, size[0], size[1], list(lo.mean), list(lo.std))


def _probe(lo: Loaded, spec: str, view: InputSpec, probs: bool = False) -> int:
    """Run the teacher once on two blank images of its ``view``: the number of outputs, or a one-line error
    (``probs``: also when the outputs cannot be probabilities)."""
    x = ((torch.zeros(2, view.channels, view.height, view.width) - torch.tensor(view.mean).view(1, -1, 1, 1))
         / torch.tensor(view.std).view(1, -1, 1, 1))
    runner = lo.module.eval() if lo.module is not None else lo.run
    if runner is None:  # every source gives a module or a runtime: our bug
        raise RuntimeError(f"teacher {spec!r} has neither a module nor a runtime")
    try:
        with torch.inference_mode():
            out = as_logits(runner(x))
    except EdgeKDError:
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # noqa: B036 - the user's forward: contained
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = f"{type(e).__name__}({reason})" if not isinstance(e, Exception) else reason
        raise EdgeKDError(f"teacher {spec!r} cannot run on {view.channels}x{view.height}x{view.width} inputs "
                          f"(set --teacher-input-size / --teacher-color): {reason[:300]}") from e
    if out.dim() != 2 or out.shape[0] != 2:
        raise EdgeKDError(f"teacher {spec!r} returns a {tuple(out.shape)} output for 2 images; a classifier's "
                          "(images, classes) logits or probabilities are needed")
    if probs:
        check_probs(out, spec)
    return int(out.shape[1])
