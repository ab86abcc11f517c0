"""MobileNetV2 (Sandler et al. 2018): the 224x224 ImageNet layout and a CIFAR variant
(stride 1 in the stem and the first stride-2 stage, as is usual for 32x32 inputs)."""

from __future__ import annotations

from torch import nn

from abs_deploy.models.registry import register_model

# (expansion t, channels c, repeats n, stride s) of the paper's Table 2.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _divisible(v: float, d: int = 8) -> int:
    # Channel counts rounded to a multiple of 8, never down by more than 10% (the reference code).
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = c_in * t
        self.use_res = stride == 1 and c_in == c_out
        layers = [] if t == 1 else [_conv_bn(c_in, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, cifar: bool = False,
                 in_chans: int = 3) -> None:
        super().__init__()
        c = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        layers = [_conv_bn(in_chans, c, 3, 1 if cifar else 2)]
        for i, (t, ch, n, s) in enumerate(_SETTINGS):
            out = _divisible(ch * width_mult)
            if cifar and i == 1:
                s = 1
            for j in range(n):
                layers.append(InvertedResidual(c, out, s if j == 0 else 1, t))
                c = out
        layers.append(_conv_bn(c, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model(input_shape=(3, 224, 224))
def mobilenetv2(num_classes: int = 1000, width_mult: float = 1.0, in_chans: int = 3) -> nn.Module:
    """MobileNetV2, ImageNet layout (224x224)."""
    return MobileNetV2(num_classes, width_mult, cifar=False, in_chans=in_chans)


@register_model
def mobilenetv2_cifar(num_classes: int = 10, width_mult: float = 1.0,
                      in_chans: int = 3) -> nn.Module:
    """MobileNetV2 for 32x32 inputs (stem and first stride-2 stage at stride 1)."""
    return MobileNetV2(num_classes, width_mult, cifar=True, in_chans=in_chans)
