"""Whole-model operations on quantized layers: swap Conv2d/Linear for their quantized twins,
calibrate activation clips, mask pruned channels, fold BN, and read the decision record back
out (or rebuild a model from one)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from abs_deploy import streams
from abs_deploy.decision import Decision, LayerDecision
from abs_deploy.errors import UserError
from abs_deploy.fold import fold_bn
from abs_deploy.models.registry import build_model
from abs_deploy.modules import get_module, set_module
from abs_deploy.search.qlayers import QUANT_TYPES, QConv2d, QLinear

Bits = Mapping[str, tuple[int, int]]


def quantize_model(model: nn.Module, bits: Bits, signed: Mapping[str, bool] | None = None
                   ) -> nn.Module:
    """Replace every layer named in `bits` by its quantized twin (in place)."""
    signed = signed or {}
    for name, (wb, ab) in bits.items():
        m = get_module(model, name)
        cls = QConv2d if isinstance(m, nn.Conv2d) else QLinear
        set_module(model, name, cls.from_float(m, wb, ab, signed.get(name, True)))
    return model


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor], percentile: float = 0.999,
              sample: int = 200_000) -> None:
    """Set each quantized layer's input sign and clip from real data: a layer whose input was
    never negative gets an unsigned quantizer (it sits behind a ReLU), clip at a high percentile
    of |x| so one outlier does not cost all the resolution."""
    layers = quant_layers(model)
    seen: dict[str, list[Tensor]] = {n: [] for n in layers}
    mins = {n: float("inf") for n in layers}

    def hook_for(name):
        def hook(module, inputs):
            x = inputs[0].detach().flatten()
            mins[name] = min(mins[name], x.min().item())
            idx = torch.randint(0, x.numel(), (min(sample, x.numel()),),
                                generator=torch.Generator().manual_seed(0))
            seen[name].append(x[idx].abs())
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, m in layers.items():
        if not seen[name]:
            continue
        values = torch.cat(seen[name])
        m.a_signed = mins[name] < 0
        m.a_clip.fill_(max(torch.quantile(values, percentile).item(), 1e-4))


def attach_masks(model: nn.Module, decision: Decision) -> None:
    """Zero the pruned channels after each producer's BN (or after the layer when it has none),
    so a pruned channel is exactly zero and removing it later changes nothing."""
    for name, d in decision.items():
        layer = get_module(model, name)
        n_out = layer.weight.shape[0]
        if len(d.kept) == n_out:
            continue
        mask = layer.weight.new_zeros(n_out)
        mask[list(d.kept)] = 1.0
        target = get_module(model, d.bn) if d.bn and _is_norm(get_module(model, d.bn)) else layer
        old = getattr(target, "_abs_mask_handle", None)
        if old is not None:
            old.remove()
        target._abs_mask_handle = target.register_forward_hook(_mask_hook(mask))


def _mask_hook(mask: Tensor):
    def hook(module, inputs, output):
        shape = (1, -1) + (1,) * (output.dim() - 2)
        return output * mask.view(shape).to(output.dtype)
    return hook


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, decision: Decision) -> None:
    """Fold each layer's BN into its weights (the deployable form fine-tune trains). The weight
    clip follows the per-channel BN scale so the quantization grid starts where it was."""
    for name, d in decision.items():
        bn_name = d.bn
        if not bn_name or not _is_norm(get_module(model, bn_name)):
            continue
        layer, bn = get_module(model, name), get_module(model, bn_name)
        w, b, k = fold_bn(layer.weight, layer.bias, bn)
        layer.weight.copy_(w)
        layer.bias = nn.Parameter(b.clone())
        if hasattr(layer, "w_clip"):
            layer.w_clip.mul_(k.abs().clamp_min(1e-8))
        set_module(model, bn_name, nn.Identity())
    attach_masks(model, decision)


def add_streams(model: nn.Module, example: Tensor, batches: Iterable[Tensor],
                inputs: streams.InputBits | None = None) -> nn.Module:
    """`model` with trainable residual-stream quantizers (streams.py), their clips calibrated
    on `batches` of training data. After BN folding: the clips see the deployed tensors. With
    `inputs` (the layers' input bits), streams share their readers' codes where they can and
    take their clip (`streams.tie`) rather than a calibrated one."""
    clips = streams.calibrate(model, example, batches)
    out = streams.insert(model, example, inputs=inputs)
    with torch.no_grad():
        for name, clip in clips.items():
            out.get_submodule(name).clip.fill_(clip)
    streams.tie(out)
    return out


def make_decision(model: nn.Module, bn_of: Mapping[str, str | None],
                  kept: Mapping[str, list[int]] | None = None,
                  order: Iterable[str] | None = None) -> Decision:
    """The decision of a model of quantized layers: their bits now, `kept` channels (default
    all), listed in `order` (default: the modules' own order)."""
    kept = kept or {}
    layers = quant_layers(model)
    out = {}
    for name in layers if order is None else order:
        m = layers[name]
        out[name] = LayerDecision(int(m.w_bits), int(m.a_bits), bool(m.a_signed),
                                  tuple(int(i) for i in kept.get(name, range(m.weight.shape[0]))),
                                  bn_of.get(name))
    return Decision(out)


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the trainable model a checkpoint describes and load its weights. Keys that belong
    to a search method's own parameters (gates, thresholds) are ignored; missing keys are not."""
    model = build_model(ckpt["arch"])
    decision: Decision = ckpt.get("decision") or Decision()
    if ckpt["stage"] == "fp" or not decision:
        model.load_state_dict(ckpt["state_dict"])
        return model
    quantize_model(model, decision.bits(), {n: d.a_signed for n, d in decision.items()})
    if ckpt.get("bn_folded"):
        for name, d in decision.items():
            if d.bn:
                set_module(model, d.bn, nn.Identity())
                layer = get_module(model, name)
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
    if ckpt.get(streams.CHECKPOINT_KEY):
        model = streams.insert(model, torch.zeros(ckpt["input"]["shape"]),
                               inputs=streams.inputs_of(ckpt))
        streams.tie(model)
    missing, _ = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} weights of its architecture, "
                        f"e.g. {missing[0]}")
    attach_masks(model, decision)
    return model

