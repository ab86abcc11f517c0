"""A small residual CNN for 28x28 grayscale images (Fashion-MNIST).

Why not ResNet-20: at 28x28 it costs ~31 M MACs per image, and a Pareto study of several methods,
budgets and seeds on 55,000 training images must fit a few hours on 2 CPU cores. This net keeps
what matters for the search and export (a stem, two residual stages with 1x1 projection
shortcuts, private inner channels that can be pruned, a classifier) at a twentieth of the cost,
and is still large enough that 2-bit weights and activations cost it clearly.
"""

from __future__ import annotations

from torch import nn

from abs_deploy.models.registry import register_model
from abs_deploy.models.resnet import BasicBlock


class FashionCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, in_chans: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(width, 2 * width, stride=2)       # 28x28 -> 14x14
        self.layer2 = BasicBlock(2 * width, 4 * width, stride=2)   # 14x14 -> 7x7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.pool(x).flatten(1))


@register_model(input_shape=(1, 28, 28))
def fashion_cnn(num_classes: int = 10, width: int = 16, in_chans: int = 1) -> nn.Module:
    """Fashion-MNIST CNN (28x28): stem, two stride-2 basic blocks with 1x1 shortcuts, fc."""
    return FashionCNN(num_classes, width, in_chans)
