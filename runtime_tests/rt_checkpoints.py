"""Synthetic `searched`/`finetuned` checkpoints for export tests: a zoo model with BN statistics
measured on real batches, then random gammas (some negative), random bits and random pruning of
every prunable channel group. Nothing is zeroed here: export applies the masks itself."""

from __future__ import annotations

import random
from itertools import islice

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from abs_deploy import graph, streams
from abs_deploy.checkpoint import make_checkpoint
from abs_deploy.data import Dataset, load_dataset
from abs_deploy.decision import Decision, LayerDecision
from abs_deploy.fold import fold_bn
from abs_deploy.models.registry import arch_record, create_model
from abs_deploy.modules import set_module

FLOAT = 32


def dataset_for(name: str, shape: tuple[int, int, int] | None = None,
                num_classes: int = 10) -> Dataset:
    if name == "synthetic":
        return load_dataset("synthetic", synthetic_shape=shape or (3, 32, 32),
                            synthetic_classes=num_classes)
    return load_dataset(name)


@torch.no_grad()
def random_checkpoint(model_name: str, data: Dataset, *, seed: int = 0,
                      bits: tuple[int, ...] = (2, 4, 8), fixed: tuple[int, int] | None = None,
                      prune: bool = True, single_channel: bool = True, bn_folded: bool = False,
                      prune_fraction: float | None = None, edge_bits: int | None = None,
                      with_streams: bool = False, shared_codes: bool = False,
                      **model_kwargs) -> dict:
    """A checkpoint in the convention export consumes (see the module docstring).

    `fixed=(w, a)` gives every layer those bits (32 = float); else each tensor draws from
    `bits`. `edge_bits` then sets the first and last layer. `prune_fraction` prunes that share
    of every prunable group instead of a random one. `with_streams` adds residual-stream
    quantizers (streams.py) with clips calibrated on the same batches; `shared_codes` makes
    those whose readers quantize alike share their codes (one clip, the largest of theirs).
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kwargs = {"num_classes": data.num_classes, "in_chans": data.input_shape[1], **model_kwargs}
    arch = arch_record(model_name, **kwargs)
    model = create_model(model_name, **kwargs)
    batches = [x for x, _ in islice(data.batches("train", 32, shuffle=True, seed=seed), 2)]
    _measure_bn(model, batches, rng)
    example = torch.zeros(data.input_shape)
    order = graph.layer_order(model, example)
    norms = graph.following_norm(model, example)
    kept = _random_kept(model, example, rng, prune, single_channel, prune_fraction)
    a_max, a_min = _input_ranges(model, order, batches)

    layers, clips = {}, {}
    for name in order:
        w_bits, a_bits = fixed if fixed else (rng.choice(bits), rng.choice(bits))
        if edge_bits and name in (order[0], order[-1]):
            w_bits = a_bits = edge_bits
        layers[name] = LayerDecision(w_bits, a_bits, a_min[name] < 0,
                                     tuple(kept.get(name, range(_out(model, name)))),
                                     norms[name])
    decision = Decision(layers)
    if bn_folded:
        _fold_all(model, decision)
    for name in order:
        w = model.get_submodule(name).weight
        clips[f"{name}.w_clip"] = w.abs().flatten(1).amax(1).clamp_min(1e-8)
        clips[f"{name}.a_clip"] = torch.tensor(max(a_max[name], 1e-3))
        clips[f"{name}.gate_threshold"] = torch.tensor(0.0)  # a search method's extra key
    if with_streams:
        clips.update({f"{n}.clip": torch.tensor(v)
                      for n, v in streams.calibrate(model, example, batches).items()})
    if with_streams and shared_codes:
        streams.tie_values(model, example,
                           {n: (d.a_bits, d.a_signed) for n, d in decision.items()}, clips)
    state = {**model.state_dict(), **clips}
    spec = data.input_spec()
    extra = {streams.CHECKPOINT_KEY: streams.SHARED if shared_codes else True} \
        if with_streams else {}
    return make_checkpoint("finetuned" if bn_folded else "searched", arch, spec,
                           data.num_classes, state, decision, metrics={}, history=[],
                           bn_folded=bn_folded, method="random", **extra)


def _out(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.shape[0]


def _measure_bn(model: nn.Module, batches: list[torch.Tensor], rng: random.Random) -> None:
    """Running statistics from data (so activations keep a sane scale through deep nets),
    then random affine parameters with about one gamma in ten negative."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    model.eval()
    for bn in norms:
        n = bn.num_features
        sign = torch.tensor([-1.0 if rng.random() < 0.1 else 1.0 for _ in range(n)])
        bn.weight.copy_(sign * (0.5 + torch.rand(n)))
        bn.bias.copy_(0.2 * torch.randn(n))
        bn.momentum = 0.1


def _random_kept(model: nn.Module, example: torch.Tensor, rng: random.Random, prune: bool,
                 single_channel: bool, fraction: float | None) -> dict[str, list[int]]:
    kept: dict[str, list[int]] = {}
    if not prune:
        return kept
    groups = [g for g in graph.channel_groups(model, example) if g.prunable and g.producers]
    single = rng.randrange(len(groups)) if single_channel and groups else -1
    for i, g in enumerate(groups):
        if i == single:
            n = 1
        elif fraction is not None:
            n = max(1, round(g.channels * (1 - fraction)))
        else:
            n = rng.randint(1, g.channels)
        idx = sorted(rng.sample(range(g.channels), n))
        for p in g.producers:
            kept[p] = idx
    return kept


def _input_ranges(model: nn.Module, order: list[str], batches: list[torch.Tensor]
                  ) -> tuple[dict[str, float], dict[str, float]]:
    a_max = dict.fromkeys(order, 0.0)
    a_min = dict.fromkeys(order, 0.0)

    def hook_for(name):
        def hook(module, inputs):
            x = inputs[0]
            a_max[name] = max(a_max[name], x.abs().max().item())
            a_min[name] = min(a_min[name], x.min().item())
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in order]
    for x in batches:
        model(x)
    for h in handles:
        h.remove()
    return a_max, a_min


def _fold_all(model: nn.Module, decision: Decision) -> None:
    """The finetuned form: each decided layer's BN folded in, the BN module gone."""
    for name, d in decision.items():
        if not d.bn:
            continue
        layer = model.get_submodule(name)
        w, b, _ = fold_bn(layer.weight, layer.bias, model.get_submodule(d.bn))
        layer.weight.copy_(w)
        layer.bias = nn.Parameter(b)
        set_module(model, d.bn, nn.Identity())
