"""BatchNorm folding, shared by fine-tune (which trains the folded, deployable form) and export.

`BN(conv(x, w) + b) = conv(x, w * k) + (b - mean) * k + beta` with `k = gamma / sqrt(var + eps)`
per output channel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def fold_bn(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d | nn.BatchNorm1d
            ) -> tuple[Tensor, Tensor, Tensor]:
    """(folded weight, folded bias, k): BN in eval mode (running statistics) folded into a
    conv/linear. `k` is returned so a per-channel weight clip can follow as `clip * |k|`."""
    k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    b = torch.zeros_like(bn.running_mean) if bias is None else bias.detach()
    w = weight.detach() * k.view(-1, *([1] * (weight.dim() - 1)))
    return w, (b - bn.running_mean) * k + bn.bias.detach(), k
