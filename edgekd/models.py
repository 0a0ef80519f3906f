"""Model specs -> nn.Module.

Specs: ``seed-teacher`` and ``seed-student`` (the two CNNs of the seed article),
``compact-student`` (ours: at most a quarter of seed-teacher's parameters and compute),
``torchvision:NAME`` (any torchvision classification model), or a checkpoint path.
"""

import torch
from torch import nn

from . import EdgeKDError
from .registry import Registry

MODELS = Registry("model")
TORCHVISION_PREFIX = "torchvision:"


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


MODELS.register("seed-teacher", summary="the seed article's teacher CNN")(SeedTeacher)
MODELS.register("seed-student", summary="the seed article's student (keeps the teacher's convolutions)")(SeedStudent)
MODELS.register("compact-student", summary="edgekd's default student (<1/4 of seed-teacher's params and FLOPs)")(CompactStudent)


def model_names():
    return MODELS.names() + [TORCHVISION_PREFIX + "NAME", "a checkpoint path"]


def build_model(spec, num_classes, input_spec):
    """Build an untrained model for ``num_classes`` classes and the data's input channels and size."""
    c, h, w = input_spec.channels, input_spec.height, input_spec.width
    if spec.startswith(TORCHVISION_PREFIX):
        model = _torchvision_model(spec[len(TORCHVISION_PREFIX):], num_classes, c)
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


def _check_forward(model, spec, c, h, w):
    """Fail early, with the input size, when a model cannot run on the data's images."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, c, h, w))
    except RuntimeError as e:
        raise EdgeKDError(f"model {spec!r} cannot run on {c}x{h}x{w} inputs: {str(e).splitlines()[0]}") from None


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_flops(model, input_spec):
    """FLOPs of one image's forward pass (multiply-add = 2 FLOPs), from torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = torch.zeros(1, input_spec.channels, input_spec.height, input_spec.width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())
