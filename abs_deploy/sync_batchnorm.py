"""`--sync-bn`: BatchNorm statistics over the global batch of all ranks.

torch's own `nn.SyncBatchNorm` refuses CPU tensors (its statistics kernels exist for CUDA only),
so gloo runs could not use it. This computes the same statistics from two differentiable
all-reduces (the sum, then the squared deviations from the global mean),
which run on NCCL and gloo alike: one code path for every device. The module objects stay the
ones the model has (their forward is replaced while training and restored afterwards), so the
hooks the search puts on them and the names the checkpoint uses do not change.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from abs_deploy.distributed import current


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, every BatchNorm of `model` normalises training batches with the
    statistics of all ranks' batches together. Yields how many layers it changed."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not enabled or not current().active:
        yield 0
        return
    for m in norms:
        m.forward = types.MethodType(_global_batch_forward, m)
    try:
        yield len(norms)
    finally:
        for m in norms:
            del m.forward


def _global_batch_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    if not self.training:
        return type(self).forward(self, x)
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
    tdist.all_reduce(count)
    n = float(count.item())
    mean = _sum_over_ranks(x.sum(dims)) / n
    centred = x - mean.view(shape)
    var = _sum_over_ranks(centred.pow(2).sum(dims)) / n
    if self.track_running_stats:
        _update_running(self, mean.detach(), var.detach() * n / max(n - 1, 1.0))
    y = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: each rank's loss depends on
    every rank's inputs through the shared statistics. (`torch.distributed.nn`'s equivalent is
    deprecated, and the functional collectives that replace it are private.)"""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone()
        tdist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        out = grad.clone()
        tdist.all_reduce(out)
        return out


def _sum_over_ranks(t: Tensor) -> Tensor:
    return _SumOverRanks.apply(t)


@torch.no_grad()
def _update_running(m: nn.modules.batchnorm._BatchNorm, mean: Tensor, unbiased: Tensor) -> None:
    # The same rule as nn.BatchNorm: momentum, or a cumulative average when it is None.
    m.num_batches_tracked.add_(1)
    factor = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
    m.running_mean.lerp_(mean.to(m.running_mean.dtype), factor)
    m.running_var.lerp_(unbiased.to(m.running_var.dtype), factor)
