"""The architectures edgekd defines itself, registered by name in ``MODELS``: the seed article's two CNNs,
edgekd's compact student, and the CIFAR ResNets of the distillation literature."""

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .. import EdgeKDError
from ..base.registry import Registry

MODELS = Registry("model")


class SeedTeacher(nn.Module):
    """The article's teacher: two 3x3 convolutions with 2x pooling, then fc 1024 -> 512 -> classes."""

    def __init__(self, num_classes: int, in_channels: int, height: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * (height // 4) * (width // 4), 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2, 2)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2, 2)
        x = torch.flatten(x, 1)
        return self.fc3(nn.functional.relu(self.fc2(nn.functional.relu(self.fc1(x)))))


class SeedStudent(nn.Module):
    """The article's student: the teacher's convolutions, then fc 512 -> classes (saves little compute)."""

    def __init__(self, num_classes: int, in_channels: int, height: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * (height // 4) * (width // 4), 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2, 2)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2, 2)
        return self.fc2(nn.functional.relu(self.fc1(torch.flatten(x, 1))))


def _conv_bn(cin: int, cout: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CompactStudent(nn.Module):
    """Our default student: three narrow conv-BN-ReLU stages and global pooling.

    Global pooling instead of the seed's 8192-wide fc is where the savings come from: about 1/300
    of seed-teacher's parameters and 1/8 of its multiply-adds at 32x32, and it accepts any size.
    """

    def __init__(self, num_classes: int, in_channels: int, height: Optional[int] = None, width: Optional[int] = None,
                 widths: Tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            *_conv_bn(in_channels, c1), nn.MaxPool2d(2),
            *_conv_bn(c1, c2), nn.MaxPool2d(2),
            *_conv_bn(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN, when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016's ResNet for 32x32 images: a 3x3 stem, three stages of 6n+2 layers, global pooling.

    Widths (16, 16, 32, 64) for resnet8..resnet110; the ``x4`` variants (32, 64, 128, 256) follow
    the teacher/student pairs of the CRD/DKD benchmarks. Stages are named ``layer1``..``layer3``
    so feature methods can pick them by name.
    """

    def __init__(self, num_classes: int, in_channels: int, height: Optional[int] = None, width: Optional[int] = None,
                 depth: int = 20, widths: Tuple[int, ...] = (16, 16, 32, 64)) -> None:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _cifar_resnet(depth: int, widths: Tuple[int, ...]) -> Callable[..., nn.Module]:
    def make(num_classes: int, in_channels: int, height: Optional[int] = None, width: Optional[int] = None) -> nn.Module:
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
