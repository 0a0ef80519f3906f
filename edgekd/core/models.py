"""Model specs -> nn.Module.

Specs: ``seed-teacher`` and ``seed-student`` (the two CNNs of the seed article),
``compact-student`` (ours: at most a quarter of seed-teacher's parameters and compute),
the CIFAR ResNets of the distillation literature (``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``,
``resnet44``, ``resnet56``, ``resnet110``, ``resnet8x4``, ``resnet32x4``),
``torchvision:NAME[:WEIGHTS][:STEM]`` (any torchvision classification model; WEIGHTS is a name of its
weights enum in upper case, ``DEFAULT`` or e.g. ``IMAGENET1K_V1``; at inputs of 64 px or less its stem
is swapped for a small-input one, STEM ``small-stem`` / ``imagenet-stem`` forces either),
``timm:NAME[:pretrained][:STEM]`` (a timm model: random weights, or timm's pretrained ones),
or a checkpoint path.

``build_model`` builds the architecture only and never downloads: a checkpoint of a pretrained
student rebuilds from its spec and loads its own state dict. ``build_pretrained`` adds the
pretrained weights (named in the spec, or a local ``.pth``/``.pt``/``.safetensors`` file).
"""

import logging
import os
import re

import torch
from torch import nn

from .. import EdgeKDError
from ..base.registry import Registry
from ..bundle.manifest import sha256_file

log = logging.getLogger(__name__)

MODELS = Registry("model")
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
TIMM_PRETRAINED = "pretrained"  # timm:NAME:pretrained loads timm's default pretrained weights
# torchvision weights names are enum members: upper case, digits and underscores (DEFAULT, IMAGENET1K_V1).
WEIGHTS_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# What torchvision's classification weights were trained with (every one of them uses these).
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# At or below this size an ImageNet stem (stride-2 conv + max-pool: /4) throws away most of the
# image before the first block; the small-input stem keeps full resolution, as CIFAR models do.
SMALL_INPUT_MAX = 64
STEMS = ("", "small-stem", "imagenet-stem")


class SeedTeacher(nn.Module):
    """The article's teacher: two 3x3 convolutions with 2x pooling, then fc 1024 -> 512 -> classes."""

    def __init__(self, num_classes, in_channels, height, width):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * (height // 4) * (width // 4), 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2, 2)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2, 2)
        x = torch.flatten(x, 1)
        return self.fc3(nn.functional.relu(self.fc2(nn.functional.relu(self.fc1(x)))))


class SeedStudent(nn.Module):
    """The article's student: the teacher's convolutions, then fc 512 -> classes (saves little compute)."""

    def __init__(self, num_classes, in_channels, height, width):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * (height // 4) * (width // 4), 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2, 2)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2, 2)
        return self.fc2(nn.functional.relu(self.fc1(torch.flatten(x, 1))))


def _conv_bn(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CompactStudent(nn.Module):
    """Our default student: three narrow conv-BN-ReLU stages and global pooling.

    Global pooling instead of the seed's 8192-wide fc is where the savings come from: about 1/300
    of seed-teacher's parameters and 1/8 of its multiply-adds at 32x32, and it accepts any size.
    """

    def __init__(self, num_classes, in_channels, height=None, width=None, widths=(16, 32, 64)):
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            *_conv_bn(in_channels, c1), nn.MaxPool2d(2),
            *_conv_bn(c1, c2), nn.MaxPool2d(2),
            *_conv_bn(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN, when the shape changes) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016's ResNet for 32x32 images: a 3x3 stem, three stages of 6n+2 layers, global pooling.

    Widths (16, 16, 32, 64) for resnet8..resnet110; the ``x4`` variants (32, 64, 128, 256) follow
    the teacher/student pairs of the CRD/DKD benchmarks. Stages are named ``layer1``..``layer3``
    so feature methods can pick them by name.
    """

    def __init__(self, num_classes, in_channels, height=None, width=None, depth=20, widths=(16, 16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise EdgeKDError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin, stages = widths[0], []
        for i, cout in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _cifar_resnet(depth, widths):
    def make(num_classes, in_channels, height=None, width=None):
        return CifarResNet(num_classes, in_channels, height, width, depth=depth, widths=widths)

    return make


for _depth in (8, 14, 20, 32, 44, 56, 110):
    MODELS.register(f"resnet{_depth}", summary=f"CIFAR ResNet-{_depth} (widths 16-32-64)")(
        _cifar_resnet(_depth, (16, 16, 32, 64)))
for _depth in (8, 32):
    MODELS.register(f"resnet{_depth}x4", summary=f"CIFAR ResNet-{_depth}x4 (widths 64-128-256, CRD/DKD pairs)")(
        _cifar_resnet(_depth, (32, 64, 128, 256)))

MODELS.register("seed-teacher", summary="the seed article's teacher CNN")(SeedTeacher)
MODELS.register("seed-student", summary="the seed article's student (keeps the teacher's convolutions)")(SeedStudent)
MODELS.register("compact-student", summary="edgekd's default student (<1/4 of seed-teacher's params and FLOPs)")(CompactStudent)
# narrower and wider compact students: the widths edgekd fit searches
MODELS.register("compact-student-s", summary="compact-student at half width (8-16-32)")(
    lambda num_classes, in_channels, height=None, width=None: CompactStudent(num_classes, in_channels, widths=(8, 16, 32)))
MODELS.register("compact-student-l", summary="compact-student at double width (32-64-128)")(
    lambda num_classes, in_channels, height=None, width=None: CompactStudent(num_classes, in_channels, widths=(32, 64, 128)))


def model_names():
    return MODELS.names() + [TORCHVISION_PREFIX + "NAME[:WEIGHTS][:STEM]", TIMM_PREFIX + "NAME[:pretrained][:STEM]",
                             "a checkpoint path"]


def _unknown_spec(spec):
    return EdgeKDError(MODELS.unknown_message(spec) + f" (or {TORCHVISION_PREFIX}NAME, {TIMM_PREFIX}NAME, or a checkpoint path)")


def check_spec(spec):
    """Refuse an unknown model name or a malformed spec before any data is loaded (nothing is downloaded)."""
    if spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        _torchvision_name(name)
        if weights:
            _torchvision_weights(name, weights)
        return
    if spec.startswith(TIMM_PREFIX):
        _timm_name(parse_timm_spec(spec)[0])
        return
    if spec in MODELS or os.path.isfile(spec):
        return
    if spec.endswith(".pt"):
        raise EdgeKDError(f"checkpoint {spec!r} does not exist")
    raise _unknown_spec(spec)


def parse_torchvision_spec(spec):
    """``torchvision:NAME[:WEIGHTS][:STEM]`` -> (name, weights or None, stem or '').

    Unambiguous because the two parts look different: stems are the lower-case words of STEMS,
    weights names are torchvision enum members in upper case (DEFAULT, IMAGENET1K_V1).
    """
    name, *rest = spec[len(TORCHVISION_PREFIX):].split(":")
    weights = stem = None
    form = f"use {TORCHVISION_PREFIX}NAME[:WEIGHTS][:STEM], e.g. {TORCHVISION_PREFIX}resnet18:DEFAULT:small-stem"
    for part in rest:
        if part in STEMS and part and stem is None:
            stem = part
        elif WEIGHTS_NAME.match(part) and weights is None and stem is None:
            weights = part
        else:
            raise EdgeKDError(f"unknown stem or misplaced weights name {part!r} in model spec {spec!r}: {form} "
                              f"(weights in upper case, stem {' or '.join(STEMS[1:])})")
    if not name:
        raise EdgeKDError(f"model spec {spec!r} names no model: {form}")
    return name, weights, stem or ""


def parse_timm_spec(spec):
    """``timm:NAME[:pretrained][:STEM]`` -> (name, pretrained, stem). Plain ``timm:NAME`` is random init,
    like ``torchvision:NAME``: a spec alone never downloads unless it asks to."""
    parts = spec[len(TIMM_PREFIX):].split(":")
    stem = parts.pop() if len(parts) > 1 and parts[-1] in STEMS else ""
    pretrained = len(parts) > 1 and parts[-1] == TIMM_PRETRAINED
    if pretrained:
        parts.pop()
    name = ":".join(parts)  # timm's own names may hold a colon (hf-hub:org/model)
    if not name or name.endswith(":"):
        raise EdgeKDError(f"cannot read model spec {spec!r}: use {TIMM_PREFIX}NAME[:{TIMM_PRETRAINED}][:small-stem|imagenet-stem]")
    return name, pretrained, stem


def _import_timm():
    try:
        import timm
    except ImportError:
        raise EdgeKDError("timm: models need the timm package: pip install 'edgekd[timm]' (or timm safetensors)") from None
    return timm


def _timm_name(name):
    timm = _import_timm()
    if name.startswith("hf-hub:") or name.startswith("hf_hub:") or timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=1)
    hint = f"; did you mean '{TIMM_PREFIX}{close[0]}'?" if close else ""
    raise EdgeKDError(f"unknown timm model {name!r}{hint} (see timm.list_models())")


def build_model(spec, num_classes, input_spec):
    """Build a model for ``num_classes`` classes and the data's input channels and size, with fresh
    random weights (a pretrained spec gives the same architecture; see build_pretrained)."""
    return _build(spec, num_classes, input_spec, None)


def _build(spec, num_classes, input_spec, load):
    """The architecture of ``spec``; ``load(model)`` (when given) fills in pretrained weights after the head
    and input channels are fitted to the data and before the stem is adapted to small inputs."""
    c, h, w = input_spec.channels, input_spec.height, input_spec.width
    if spec.startswith(TORCHVISION_PREFIX) or spec.startswith(TIMM_PREFIX):
        if spec.startswith(TORCHVISION_PREFIX):
            name, _, stem = parse_torchvision_spec(spec)
            model = _torchvision_model(name, num_classes, c)
        else:
            name, _, stem = parse_timm_spec(spec)
            model = _timm_model(name, num_classes, c)
        if load is not None:
            load(model)
        if stem == "small-stem" or (stem == "" and max(h, w) <= SMALL_INPUT_MAX):
            small_input_stem(model)
            if load is not None:  # a ResNet's 7x7 conv1 becomes a new 3x3 one: its pretrained weights go
                log.info("small-input stem for %dx%d inputs (the first convolution runs at stride 1; a ResNet's "
                         "conv1 is a new 3x3 one and its max-pool goes)", h, w)
    else:
        if spec.endswith(".pt"):
            raise EdgeKDError(f"checkpoint {spec!r} does not exist")
        if spec not in MODELS:
            raise _unknown_spec(spec)
        if spec.startswith("seed-") and (h % 4 or w % 4):
            raise EdgeKDError(f"{spec} needs an input size divisible by 4, got {h}x{w}")
        model = MODELS.get(spec)(num_classes, c, h, w)
        if load is not None:
            load(model)
    _check_forward(model, spec, c, h, w)
    return model


def _timm_model(name, num_classes, in_channels, pretrained=False):
    timm = _import_timm()
    _timm_name(name)
    # timm fits the head and, for grey inputs, sums the stem's RGB weights itself (in_chans).
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels)


def _torchvision_name(name):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=1)
        hint = f"; did you mean '{TORCHVISION_PREFIX}{close[0]}'?" if close else ""
        raise EdgeKDError(f"unknown torchvision classification model {name!r}{hint} (see torchvision.models.list_models())")


def _torchvision_model(name, num_classes, in_channels):
    import torchvision

    _torchvision_name(name)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def small_input_stem(model):
    """Adapt a torchvision model to small (e.g. 32x32) images: a 3x3 stride-1 first convolution, no max-pool.

    ResNet-style models (``conv1`` + ``maxpool``) get a new 3x3 stride-1 ``conv1`` and lose the
    max-pool; other families (MobileNet, EfficientNet, RegNet, ...) keep their first convolution's
    weights shape but run it at stride 1. Returns the model.
    """
    if isinstance(getattr(model, "conv1", None), nn.Conv2d):
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=old.bias is not None)
        if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
            model.maxpool = nn.Identity()
        return model
    for module in model.modules():
        if isinstance(module, nn.Conv2d):  # the first convolution is the stem
            module.stride = (1, 1)
            return model
    raise EdgeKDError("cannot find a stem convolution to adapt to small inputs")


def _replace_first_conv(model, in_channels):
    """Swap the stem convolution for one with the data's channel count (e.g. 1 for grey digits)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride,
                                child.padding, child.dilation, 1, child.bias is not None, child.padding_mode)
                setattr(parent, child_name, new)
                return
    raise EdgeKDError("cannot find the first convolution to adapt to the input channels")


def example_input(model, c, h, w):
    """One zero image on the device (and floating dtype) of ``model``'s weights: a CPU tensor fed to a
    model on the GPU fails, and counting FLOPs after a CUDA run did."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    device, dtype = (tensors[0].device, tensors[0].dtype) if tensors else (torch.device("cpu"), torch.float32)
    return torch.zeros(1, c, h, w, device=device, dtype=dtype)


def _check_forward(model, spec, c, h, w):
    """Fail early, with the input size, when a model cannot run on the data's images."""
    model.eval()
    try:
        with torch.no_grad():
            model(example_input(model, c, h, w))
    except RuntimeError as e:
        raise EdgeKDError(f"model {spec!r} cannot run on {c}x{h}x{w} inputs: {str(e).splitlines()[0]}") from e


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_flops(model, input_spec):
    """FLOPs of one image's forward pass (multiply-add = 2 FLOPs), from torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = example_input(model, input_spec.channels, input_spec.height, input_spec.width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


# --- pretrained weights -------------------------------------------------------------------------


def _torchvision_weights(name, weights_name):
    """The torchvision weights enum member ``weights_name`` of model ``name`` (no download)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[weights_name]
    except KeyError:
        raise EdgeKDError(f"torchvision model {name!r} has no weights {weights_name!r}: choose from "
                          f"{', '.join(enum.__members__)}") from None


def pretrained_norm(spec, weights_path=None):
    """(mean, std, source) of the RGB inputs the pretrained weights of a student were trained on, or None
    when it starts from random weights (or a local file for an edgekd model, whose statistics are unknown).
    Found without downloading: torchvision's weights enum and timm's pretrained config carry them."""
    if spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        if weights:
            member = _torchvision_weights(name, weights)
            t = member.transforms()
            return list(t.mean), list(t.std), f"torchvision {member}"
        if weights_path:  # every torchvision classification weight set was trained on these
            return list(IMAGENET_MEAN), list(IMAGENET_STD), f"ImageNet (torchvision {name}, weights file)"
    if spec.startswith(TIMM_PREFIX):
        name, pretrained, _ = parse_timm_spec(spec)
        if pretrained or weights_path:
            cfg = None
            if not name.startswith(("hf-hub:", "hf_hub:")):
                cfg = _import_timm().models.get_pretrained_cfg(name)
            if cfg is None:
                return list(IMAGENET_MEAN), list(IMAGENET_STD), f"ImageNet (timm {name}: no pretrained config)"
            return list(cfg.mean), list(cfg.std), f"timm {name} pretrained config"
    return None


def pretrained_view(spec, weights_path=None):
    """((height, width), crop_pct, source) that a pretrained student's weights were evaluated at (torchvision's
    weights transforms, timm's pretrained config), or None; the default input for folders of mixed sizes."""
    import math

    try:
        if spec.startswith(TORCHVISION_PREFIX):
            name, weights, _ = parse_torchvision_spec(spec)
            if weights:
                member = _torchvision_weights(name, weights)
                t = member.transforms()
                crop = int(t.crop_size[0])
                return (crop, crop), crop / int(t.resize_size[0]), f"torchvision {member}"
        if spec.startswith(TIMM_PREFIX):
            name, pretrained, _ = parse_timm_spec(spec)
            if (pretrained or weights_path) and not name.startswith(("hf-hub:", "hf_hub:")):
                cfg = _import_timm().models.get_pretrained_cfg(name)
                if cfg is not None and cfg.input_size:
                    crop = cfg.crop_pct if cfg.crop_pct and math.isfinite(cfg.crop_pct) else 0.875
                    return tuple(cfg.input_size[1:]), min(float(crop), 1.0), f"timm {name} pretrained config"
    except EdgeKDError:
        return None  # the spec's own checks say what is wrong, later and better
    return None


def build_pretrained(spec, num_classes, input_spec, weights_path=None):
    """(model, record): ``spec``'s architecture started from pretrained weights, or (build_model, None) when
    neither the spec names weights nor ``weights_path`` is given.

    Weights come from torchvision's weights API (``torchvision:NAME:WEIGHTS``, downloaded once into
    torch's cache, TORCH_HOME), from timm (``timm:NAME:pretrained``, timm's cache) or from a local state
    dict (``weights_path``: .pth/.pt or .safetensors) for machines without internet. The classifier
    head is replaced to fit ``num_classes`` (logged), grey inputs get the stem's RGB weights summed, and
    anything else that does not fit is a one-line error naming the first bad key.
    """
    source = _weights_source(spec, weights_path)
    if source is None:
        return build_model(spec, num_classes, input_spec), None
    record = {"source": source, "head": [], "adapted": []}
    if weights_path:
        state = read_weights_file(weights_path)
        record["sha256"] = sha256_file(weights_path)
        load = lambda model: load_state(model, state, num_classes, f"weights file {weights_path!r}", record)  # noqa: E731
    elif spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        state = _download_torchvision(_torchvision_weights(name, weights))
        load = lambda model: load_state(model, state, num_classes, f"torchvision {source}", record)  # noqa: E731
    else:
        load = _timm_pretrained_loader(spec, num_classes, input_spec, record)
    model = _build(spec, num_classes, input_spec, load)
    for line in record["head"]:
        log.info("%s: replaced head %s classes", source, line)
    for line in record["adapted"]:
        log.info("%s: %s", source, line)
    return model, record


def _weights_source(spec, weights_path):
    named = ((spec.startswith(TORCHVISION_PREFIX) and parse_torchvision_spec(spec)[1])
             or (spec.startswith(TIMM_PREFIX) and parse_timm_spec(spec)[1]))
    if named and weights_path:
        raise EdgeKDError(f"model {spec!r} names its pretrained weights and a weights file {weights_path!r} was given "
                          "too: use one of them")
    if weights_path:
        return f"file {os.path.basename(weights_path)}"  # its sha256 beside it; no path of this machine
    if not named:
        return None
    if spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        return str(_torchvision_weights(name, weights))
    return f"timm {parse_timm_spec(spec)[0]} (pretrained)"


def _no_download(what, e):
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return EdgeKDError(f"could not download {what} ({type(e).__name__}: {reason}); without internet, pass a local "
                       "copy of the weights with --student-weights PATH (edgekd train: --weights PATH)")


def _download_torchvision(member):
    """The state dict of torchvision weights, through torch's download cache (TORCH_HOME/hub/checkpoints)."""
    try:
        return member.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # no network, a proxy, a damaged file: say what to do instead
        raise _no_download(f"torchvision weights {member}", e) from e


def _timm_pretrained_loader(spec, num_classes, input_spec, record):
    """timm's own loader (create_model(pretrained=True)) fits the head and input channels; its weights are
    then copied into the architecture build_model makes, so a checkpoint rebuilds the same model."""
    name, _, _ = parse_timm_spec(spec)
    try:
        ref = _timm_model(name, num_classes, input_spec.channels, pretrained=True)
    except EdgeKDError:
        raise
    except Exception as e:
        raise _no_download(f"timm weights for {name!r}", e) from e
    timm_config = getattr(ref, "pretrained_cfg", {}) or {}
    head, classes = timm_config.get("classifier"), timm_config.get("num_classes")
    if head and classes and classes != num_classes:
        record["head"].append(f"{head if isinstance(head, str) else '/'.join(head)} {classes} -> {num_classes}")
    if input_spec.channels != timm_config.get("input_size", (3,))[0]:
        record["adapted"].append(f"stem convolution fitted to {input_spec.channels}-channel input by timm")

    def load(model):
        model.load_state_dict(ref.state_dict())

    return load


# Where training scripts keep the weights inside a checkpoint: the trained ones first, then an EMA copy
# (timm's state_dict_ema, DeiT's model_ema) when that is all the file holds.
WEIGHTS_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
# Prefixes that wrappers put before every key: DistributedDataParallel/DataParallel and EMA wrappers
# ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_weights_file(path, flag="weights file"):
    """A state dict (parameter name -> tensor) from a .pth/.pt file (read with weights_only=True: no pickled
    code runs) or a .safetensors file: the one reader of --weights, --student-weights and --teacher-weights.
    A training checkpoint holding one under a key of WEIGHTS_KEYS is unwrapped, and the prefixes of
    WRAPPER_PREFIXES (DDP's 'module.', torch.compile's '_orig_mod.') are dropped. ``flag`` names the file
    in errors."""
    if not os.path.isfile(path):
        raise EdgeKDError(f"{flag} {path!r} does not exist")
    from .safe_load import weights_file

    state = weights_file(path, flag)  # edgekd's one loader of files that can carry a pickle
    for key in WEIGHTS_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgeKDError(f"{flag} {path!r} holds no state dict (a dict of parameter name -> tensor, as "
                          "torch.save(model.state_dict(), path) writes)")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state, stripped = {k[len(prefix):]: v for k, v in state.items()}, True
    return state



def _head_module(model, num_classes):
    """The classifier head: the last Linear (or 1x1 convolution, SqueezeNet) with ``num_classes`` outputs."""
    head = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or (
                isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1)):
            head = name
    return head


def _first_conv_weight(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return f"{name}.weight"
    return None


def adapt_input_conv(weight, channels):
    """RGB stem weights (O, 3, k, k) for ``channels`` inputs: summed for grey (a grey image is R=G=B), else
    repeated and rescaled so the output keeps its size (timm's rule)."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    reps = -(-channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :channels] * (weight.shape[1] / channels)


def load_state(model, state, num_classes, source, record):
    """Copy a pretrained ``state`` into ``model`` (built for the data: its head and input channels).

    Head tensors whose class count differs stay new (recorded as 'fc 1000 -> 10'), the first convolution's
    RGB weights are fitted to the data's channels; a missing, unexpected or misshapen key otherwise is
    a one-line error naming the first one.
    """
    own = model.state_dict()
    head, first_conv = _head_module(model, num_classes), _first_conv_weight(model)
    fitted, replaced = {}, {}
    for key, target in own.items():
        module = key.rsplit(".", 1)[0]
        value = state.get(key)
        if value is None:
            if key.endswith("num_batches_tracked"):  # older files lack it; batch norm fills it in
                continue
            if module == head:  # a backbone-only file: the head is new anyway
                replaced[module] = f"{module} (not in the file) -> {num_classes}"
                continue
            raise EdgeKDError(f"{source} does not fit this model: it has no key {key!r}")
        if value.shape == target.shape:
            fitted[key] = value
        elif module == head and value.shape[1:] == target.shape[1:]:
            replaced[module] = f"{module} {value.shape[0]} -> {target.shape[0]}"
        elif key == first_conv and value.dim() == 4 and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            fitted[key] = adapt_input_conv(value, target.shape[1])
            record["adapted"].append(f"{key} fitted from {value.shape[1]} to {target.shape[1]} input channels")
        else:
            raise EdgeKDError(f"{source} does not fit this model: key {key!r} is {list(value.shape)} in the file "
                              f"but {list(target.shape)} in the model")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise EdgeKDError(f"{source} does not fit this model: unexpected key {unexpected[0]!r}{more}")
    model.load_state_dict(fitted, strict=False)
    record["head"] += sorted(set(replaced.values()))
    record["loaded_tensors"] = len(fitted)


def check_student(spec, weights_path=None):
    """check_spec, plus the weights file: it exists, and the spec does not name other weights too."""
    check_spec(spec)
    if weights_path is not None and not os.path.isfile(weights_path):
        raise EdgeKDError(f"weights file {weights_path!r} does not exist (a state dict saved as .pth/.pt or .safetensors)")
    _weights_source(spec, weights_path)


def fetch_pretrained(spec):
    """Download the weights a spec names into the library's cache now, before any data is decoded, so that
    a machine without internet fails in seconds (build_pretrained then reads the cached file)."""
    if spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        if weights:
            _download_torchvision(_torchvision_weights(name, weights))
    elif spec.startswith(TIMM_PREFIX):
        name, pretrained, _ = parse_timm_spec(spec)
        if pretrained:
            try:
                _import_timm().create_model(name, pretrained=True)
            except Exception as e:
                raise _no_download(f"timm weights for {name!r}", e) from e
