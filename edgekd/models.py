"""Model specs -> nn.Module.

Specs: ``seed-teacher`` and ``seed-student`` (the two CNNs of the seed article),
``compact-student`` (ours: at most a quarter of seed-teacher's parameters and compute),
the CIFAR ResNets of the distillation literature (``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``,
``resnet44``, ``resnet56``, ``resnet110``, ``resnet8x4``, ``resnet32x4``),
``torchvision:NAME`` (any torchvision classification model; at inputs of 64 px or less its stem is
swapped for a small-input one, ``torchvision:NAME:small-stem`` / ``:imagenet-stem`` force either),
or a checkpoint path.
"""

import os

import torch
from torch import nn

from . import EdgeKDError
from .registry import Registry

MODELS = Registry("model")
TORCHVISION_PREFIX = "torchvision:"
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


def model_names():
    return MODELS.names() + [TORCHVISION_PREFIX + "NAME", "a checkpoint path"]


def check_spec(spec):
    """Refuse an unknown model name before any data is loaded (the full check happens in build_model)."""
    if spec.startswith(TORCHVISION_PREFIX) or spec in MODELS or os.path.isfile(spec):
        return
    if spec.endswith(".pt"):
        raise EdgeKDError(f"checkpoint {spec!r} does not exist")
    raise EdgeKDError(MODELS.unknown_message(spec) + f" (or {TORCHVISION_PREFIX}NAME, or a checkpoint path)")


def build_model(spec, num_classes, input_spec):
    """Build an untrained model for ``num_classes`` classes and the data's input channels and size."""
    c, h, w = input_spec.channels, input_spec.height, input_spec.width
    if spec.startswith(TORCHVISION_PREFIX):
        name, _, stem = spec[len(TORCHVISION_PREFIX):].partition(":")
        model = _torchvision_model(name, num_classes, c)
        if stem not in STEMS:
            raise EdgeKDError(f"unknown stem {stem!r} in {spec!r}: use {TORCHVISION_PREFIX}NAME, NAME:small-stem or NAME:imagenet-stem")
        if stem == "small-stem" or (stem == "" and max(h, w) <= SMALL_INPUT_MAX):
            small_input_stem(model)
    else:
        if spec.endswith(".pt"):
            raise EdgeKDError(f"checkpoint {spec!r} does not exist")
        if spec not in MODELS:
            raise EdgeKDError(MODELS.unknown_message(spec) + f" (or {TORCHVISION_PREFIX}NAME, or a checkpoint path)")
        if spec.startswith("seed-") and (h % 4 or w % 4):
            raise EdgeKDError(f"{spec} needs an input size divisible by 4, got {h}x{w}")
        model = MODELS.get(spec)(num_classes, c, h, w)
    _check_forward(model, spec, c, h, w)
    return model


def _torchvision_model(name, num_classes, in_channels):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=1)
        hint = f"; did you mean '{TORCHVISION_PREFIX}{close[0]}'?" if close else ""
        raise EdgeKDError(f"unknown torchvision classification model {name!r}{hint} (see torchvision.models.list_models())")
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
    model on the GPU fails, and counting FLOPs after a CUDA run did (issue 13)."""
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
        raise EdgeKDError(f"model {spec!r} cannot run on {c}x{h}x{w} inputs: {str(e).splitlines()[0]}") from None


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
