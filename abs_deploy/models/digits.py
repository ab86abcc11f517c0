"""A small CNN for the 8x8 digits data that still holds every structure export must handle:
a residual basic block (identity shortcut) and an inverted residual with a depthwise conv."""

from __future__ import annotations

from torch import nn

from abs_deploy.models.registry import register_model


class _Basic(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class _Inverted(nn.Module):
    def __init__(self, c_in: int, c_out: int, expand: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.expand = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU6()

    def forward(self, x):
        out = self.act(self.bn1(self.expand(x)))
        out = self.act(self.bn2(self.dw(out)))
        return self.bn3(self.project(out))


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, in_chans: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.block1 = _Basic(width)
        self.block2 = _Inverted(width, 2 * width, expand=2, stride=2)
        self.head = nn.Conv2d(2 * width, 4 * width, 1, bias=False)
        self.bn_head = nn.BatchNorm2d(4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.block1(x)
        x = self.block2(x)
        x = self.relu(self.bn_head(self.head(x)))
        return self.fc(self.pool(x).flatten(1))


@register_model(input_shape=(1, 8, 8))
def digits_cnn(num_classes: int = 10, width: int = 16, in_chans: int = 1) -> nn.Module:
    """Digits CNN (8x8 input): stem, basic block, inverted residual with depthwise conv."""
    return DigitsCNN(num_classes, width, in_chans)
