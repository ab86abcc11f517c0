"""Architectures in the style of common libraries (torchvision, timm), small enough for tests,
used by the generality checks: each must either export with parity or be refused by name.
Factories take `num_classes` and `in_chans` like the zoo, so they load by import path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class VGG(nn.Module):
    """torchvision-style VGG: features, then `torch.flatten` of C x H x W into a Linear stack."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(*_cbr(in_chans, 16), nn.MaxPool2d(2), *_cbr(16, 32),
                                      nn.MaxPool2d(2), *_cbr(32, 32), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class ViewNet(nn.Module):
    """`x.view(n, -1)` before the classifier, with spatial positions kept (no global pool)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(*_cbr(in_chans, 8, stride=2), *_cbr(8, 16, stride=2),
                                  nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(16 * 2 * 2, num_classes)

    def forward(self, x):
        x = self.body(x)
        return self.fc(x.view(x.size(0), -1))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet (stem, 4 stages, avgpool, fc) at a test-sized width."""

    def __init__(self, block: str, layers: tuple[int, ...], num_classes: int = 10,
                 in_chans: int = 3, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        c, stages = 16, []
        for i, n in enumerate(layers):
            width = 8 * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if block == "basic":
                    blocks.append(BasicBlock(c, width * 2, stride))
                    c = width * 2
                else:
                    blocks.append(Bottleneck(c, width, stride, groups))
                    c = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DenseBlockNet(nn.Module):
    """DenseNet-style: every layer's output is concatenated onto its input."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(in_chans, 16))
        self.dense = nn.ModuleList([nn.Sequential(*_cbr(16 + i * growth, growth))
                                    for i in range(3)])
        self.transition = nn.Sequential(*_cbr(16 + 3 * growth, 32, k=1), nn.AvgPool2d(2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.dense:
            x = torch.cat([x, layer(x)], 1)
        x = self.transition(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionNet(nn.Module):
    """Inception-style: parallel 1x1 / 3x3 / pool branches concatenated."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(in_chans, 16, stride=2))
        self.b1 = nn.Sequential(*_cbr(16, 8, k=1))
        self.b3 = nn.Sequential(*_cbr(16, 8, k=1), *_cbr(8, 12))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_cbr(16, 4, k=1))
        self.head = nn.Sequential(*_cbr(24, 32, k=1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b3(x), self.bp(x)], dim=1)
        return self.fc(self.head(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SENet(nn.Module):
    """timm-style blocks with squeeze-and-excitation channel attention."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(in_chans, 16))
        self.block = nn.Sequential(*_cbr(16, 32, stride=2), *_cbr(32, 32))
        self.se = SqueezeExcite(32)
        self.head = nn.Sequential(*_cbr(32, 32, k=1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.se(self.block(self.stem(x)))
        return self.fc(self.head(x).mean((2, 3)))


class UpsampleNet(nn.Module):
    """FPN/U-Net style: a coarse map upsampled (nearest) and added to a fine one."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.fine = nn.Sequential(*_cbr(in_chans, 16))
        self.coarse = nn.Sequential(*_cbr(16, 16, stride=2))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        fine = self.fine(x)
        up = F.interpolate(self.coarse(fine), scale_factor=2.0, mode="nearest")
        return self.fc((fine + up).mean((2, 3)))


class FPNLevel(nn.Module):
    """One FPN level: a lateral 1x1 conv on the fine map added to the upsampled top-down map.
    Its layers are few and far apart in BOPs, so single projection moves jump over the band."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(in_chans, 16))
        self.down = nn.Sequential(*_cbr(16, 32, stride=2))
        self.top = nn.Conv2d(32, 24, 1)
        self.lateral = nn.Conv2d(16, 24, 1)
        self.head = nn.Sequential(*_cbr(24, 24))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        fine = self.stem(x)
        coarse = self.top(self.down(fine))
        p = self.lateral(fine) + F.interpolate(coarse, scale_factor=2.0, mode="nearest")
        return self.fc(self.head(p).mean((2, 3)))


class BilinearNet(UpsampleNet):
    """UpsampleNet with bilinear upsampling, which the op table knows for channels but export
    does not write: refused by name."""

    def forward(self, x):
        fine = self.fine(x)
        up = F.interpolate(self.coarse(fine), scale_factor=2.0, mode="bilinear")
        return self.fc((fine + up).mean((2, 3)))


def vgg(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return VGG(num_classes, in_chans)


def view_net(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ViewNet(num_classes, in_chans)


def resnet18_style(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNet("basic", (2, 2, 2, 2), num_classes, in_chans)


def resnet50_style(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNet("bottleneck", (1, 1, 1, 1), num_classes, in_chans)


def resnext_style(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """Bottleneck blocks with grouped (not depthwise) 3x3 convs."""
    return ResNet("bottleneck", (1, 1, 1, 1), num_classes, in_chans, groups=4)


def densenet_style(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return DenseBlockNet(num_classes, in_chans)


def inception_style(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return InceptionNet(num_classes, in_chans)


def se_net(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return SENet(num_classes, in_chans)


def mobilenetv2_style(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    from abs_deploy.models import create_model
    return create_model("mobilenetv2_cifar", num_classes=num_classes, width_mult=0.35,
                        in_chans=in_chans)


def upsample_net(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return UpsampleNet(num_classes, in_chans)


def fpn_level(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return FPNLevel(num_classes, in_chans)


def bilinear_net(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return BilinearNet(num_classes, in_chans)


ALL = ["vgg", "view_net", "resnet18_style", "resnet50_style", "resnext_style", "densenet_style",
       "inception_style", "se_net", "mobilenetv2_style", "upsample_net",
       "fpn_level", "bilinear_net"]
