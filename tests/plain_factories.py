"""Model factories written as other libraries write them, loaded by import path in
test_trust.py: `tiny_net` takes `num_classes` alone (it is built for 3-channel images), and
`tv_style` has torchvision's signature (keywords forwarded to a class without `in_chans`)."""

from torch import nn


class _Tiny(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1))


def tiny_net(num_classes: int = 10) -> nn.Module:
    return _Tiny(num_classes)


def tv_style(*, weights: object = None, progress: bool = True, **kwargs) -> nn.Module:
    return _Tiny(**kwargs)


def fixed_classes() -> nn.Module:
    """Takes nothing: always 1000 classes, as a pretrained ImageNet head."""
    return _Tiny(1000)
