"""Physical pruning (DESIGN §9): remove the channels outside `kept` from every member of their
channel-dependency group (graph.py): producer outputs, BatchNorm entries, depthwise
in/out/groups, consumer inputs and Linear columns.

Pure functions on a copy: one per layer kind and role, looked up by type; every tensor of a
layer that is indexed by output channel is sliced together (`PER_OUT` of the integer layers
lists their scales and int32 bias besides weight and bias).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from abs_deploy import graph
from abs_deploy.errors import UserError


def prune(model: nn.Module, groups: list[graph.ChannelGroup],
          kept: Mapping[str, list[int] | tuple[int, ...]]) -> nn.Module:
    """A copy of `model` without the channels outside `kept` (output channels per producer).

    A group whose producers disagree, or that graph.py marks unprunable while `kept` drops
    some of its channels, is a `UserError`: never a silent skip.
    """
    graph.input_kept(groups, {k: list(v) for k, v in kept.items()})  # the checks, one place
    model = copy.deepcopy(model)
    for g in groups:
        chosen = [p for p in g.producers if p in kept]
        if not chosen or len(kept[chosen[0]]) == g.channels:
            continue
        idx = torch.tensor(sorted(kept[chosen[0]]), dtype=torch.long)
        for name in g.producers:
            role = "depthwise" if name in g.depthwise else "out"
            _apply(model, name, role, idx)
        for name in g.norms:
            if isinstance(model.get_submodule(name), _BatchNorm):  # folded ones are Identity
                _apply(model, name, "norm", idx)
        for name in g.consumers:
            _apply(model, name, "in", _columns(idx, g.spatial.get(name, 1)))
    return model


def _apply(model: nn.Module, name: str, role: str, idx: Tensor) -> None:
    module = model.get_submodule(name)
    for kind, fns in _BY_TYPE.items():
        if isinstance(module, kind) and role in fns:
            fns[role](module, idx)
            return
    raise UserError(f"cannot prune {role} channels of {name} ({type(module).__name__})")


def _columns(idx: Tensor, spatial: int) -> Tensor:
    """A Linear reading a flattened C x H x W owns `spatial` consecutive columns per channel."""
    if spatial == 1:
        return idx
    return (idx.view(-1, 1) * spatial + torch.arange(spatial).view(1, -1)).flatten()


def _take(module: nn.Module, names: tuple[str, ...], dim: int, idx: Tensor) -> None:
    """Slice each named parameter/buffer of `module` along `dim` (absent ones are skipped)."""
    for name in names:
        t = getattr(module, name, None)
        if t is None:
            continue
        new = t.detach().index_select(dim, idx).clone()
        if isinstance(t, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            module.register_buffer(name, new)


def _per_out(module: nn.Module) -> tuple[str, ...]:
    return getattr(module, "PER_OUT", ("weight", "bias"))


def conv_out(m: nn.Conv2d, idx: Tensor) -> None:
    _take(m, _per_out(m), 0, idx)
    m.out_channels = len(idx)


def conv_in(m: nn.Conv2d, idx: Tensor) -> None:
    if m.groups != 1:
        raise UserError(f"cannot prune the input channels of grouped conv ({m.groups} groups)")
    _take(m, ("weight",), 1, idx)
    m.in_channels = len(idx)


def depthwise(m: nn.Conv2d, idx: Tensor) -> None:
    """Depthwise: output channel c reads input channel c, so in, out and groups go together."""
    _take(m, _per_out(m), 0, idx)
    m.in_channels = m.out_channels = m.groups = len(idx)


def linear_out(m: nn.Linear, idx: Tensor) -> None:
    _take(m, _per_out(m), 0, idx)
    m.out_features = len(idx)


def linear_in(m: nn.Linear, cols: Tensor) -> None:
    _take(m, ("weight",), 1, cols)
    m.in_features = len(cols)


def norm(m: _BatchNorm, idx: Tensor) -> None:
    _take(m, ("weight", "bias", "running_mean", "running_var"), 0, idx)
    m.num_features = len(idx)


_BY_TYPE: dict[type, dict[str, Callable[[nn.Module, Tensor], None]]] = {
    nn.Conv2d: {"out": conv_out, "in": conv_in, "depthwise": depthwise},
    nn.Linear: {"out": linear_out, "in": linear_in},
    _BatchNorm: {"norm": norm},
}
