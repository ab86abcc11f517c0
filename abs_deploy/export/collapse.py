"""Collapse (DESIGN §9): a `searched` or `finetuned` checkpoint becomes three plain PyTorch
models over the same architecture and layer names.

- `original`: the architecture with the checkpoint's float weights, no quantizer, no mask.
- `masked_float`: BN folded into each decided layer, float weights, every channel outside
  `kept` zeroed (its weight rows and bias), which is what the training model's mask after the
  BN does. Removing those channels later is exact.
- `clips`: each quantized activation's float range `[lo * s, hi * s]` (a layer's input, a
  residual stream). `masked_float` runs without them and is what torch.export captures; the
  float file model.fp32.onnx clips there (`clipped` is its PyTorch twin). Without the clips it
  is no model: the search and fine-tune train the weights under clipped activations, and
  unbounded ones took a digits ResNet-20 from 98.6% to 12.5%.
- `reference`: `masked_float` with integers: each decided layer holds its weight codes, a
  per-channel weight scale, an int32 bias at the accumulator scale and its frozen input
  quantizer. It computes `s_x * s_w * (conv(q_x, q_w) + q_b)` in float, which is what
  DequantizeLinear math gives, and it *is* the model the ONNX file must reproduce.

The reference differs from the training graph in three documented places: the weight clip
follows the BN scale as `clip * |k|`, which at a negative BN gamma mirrors the asymmetric
clamp bound (-2^(b-1) maps to 2^(b-1)-1); the bias is rounded to int32 at scale `s_x * s_w`
(QLinearConv needs it; the error is below half a unit of the accumulator); and 8-bit weights
that meet 8-bit or signed inputs keep a 7-bit range (quant.stored_weight_bits).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from abs_deploy import graph, streams
from abs_deploy.checkpoint import build_arch
from abs_deploy.decision import FLOAT_BITS, QUANT_BITS, Decision, LayerDecision
from abs_deploy.errors import UserError
from abs_deploy.fold import fold_bn
from abs_deploy.modules import set_module
from abs_deploy.quant import CLIP_EPS, int_range, quantize_int, scale, stored_weight_bits

# Which 8-bit layers store 7-bit weight codes, and why: abs_deploy.quant.stored_weight_bits.


@dataclass(frozen=True)
class LayerQuant:
    """One decided layer: its bits, its kept output channels, and how its weights are stored."""

    name: str
    kind: str  # "conv" | "linear"
    w_bits: int
    a_bits: int
    a_signed: bool
    kept: tuple[int, ...]
    total: int  # output channels before pruning
    bn: str | None
    w_store_bits: int  # bits of the stored weight range (quant.stored_weight_bits)

    @property
    def tag(self) -> str:
        """`w4a4`: goes into node names so any viewer shows the bits."""
        return f"w{self.w_bits}a{self.a_bits}"

    @property
    def w_quantized(self) -> bool:
        return self.w_bits < FLOAT_BITS

    @property
    def a_quantized(self) -> bool:
        return self.a_bits < FLOAT_BITS


@dataclass
class Collapsed:
    original: nn.Module
    masked_float: nn.Module
    reference: nn.Module
    layers: dict[str, LayerQuant]  # in execution order
    input_shape: list[int]
    # The architecture's channel groups, from the same capture that found the BNs to fold: the
    # three models share its channel structure (a folded BN is an Identity in them).
    groups: list[graph.ChannelGroup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Residual-stream quantizers (streams.py), in graph order: markers in the float models,
    # `IntStreamQuant` in the reference. Empty for a checkpoint without "streams".
    streams: list[str] = field(default_factory=list)
    # Quantized activation (layer input or stream) -> the float range its codes cover.
    clips: dict[str, tuple[float, float]] = field(default_factory=dict)


def collapse(ckpt: dict, reduce_range: bool = True) -> Collapsed:
    """The three models of a checkpoint (module docstring). Any mismatch between the checkpoint
    and its architecture is a `UserError` naming the layer."""
    if ckpt["stage"] not in ("searched", "finetuned"):
        raise UserError(f"stage '{ckpt['stage']}' checkpoint: export needs a searched or "
                        "finetuned one (an fp checkpoint has no decision)")
    shape = _input_shape(ckpt)
    model = build_arch(ckpt["arch"])
    example = torch.zeros(shape)
    if ckpt.get(streams.CHECKPOINT_KEY):
        # Before anything reads the graph: the channel walk and torch.export see the markers.
        model = streams.insert(model, example, streams.StreamMarker, streams.inputs_of(ckpt))
    stream_names = streams.names(model)
    analysis = graph.Analysis(model, example)
    layers = read_decision(ckpt["decision"], model, analysis.layer_order(),
                           analysis.following_norm(), reduce_range)
    if ckpt.get("bn_folded"):
        _drop_folded_norms(model, layers)
    _load_weights(model, ckpt["state_dict"], [*layers, *stream_names])
    clips = _read_clips(ckpt["state_dict"], layers)
    stream_scales = _stream_scales(ckpt["state_dict"], model)
    model.eval()

    original = copy.deepcopy(model)
    bn_scales = _fold_norms(model, layers)
    _zero_pruned(model, layers)
    reference = copy.deepcopy(model)
    for name, lq in layers.items():
        set_module(reference, name, _integer_layer(reference.get_submodule(name), lq,
                                                    clips[name], bn_scales[name]))
    streams.replace(reference, lambda name, marker: IntStreamQuant(
        StreamSpec(name, marker.bits, marker.signed), stream_scales[name]))
    notes = []
    reduced = [n for n, lq in layers.items() if lq.w_store_bits != lq.w_bits]
    if reduced:
        notes.append(f"{len(reduced)} layer(s) with 8-bit weights and 8-bit or signed inputs "
                     "store 7-bit weights (int16 saturation of ORT's u8s8 kernels on AVX2): "
                     + ", ".join(reduced))
    if stream_names:
        shared = [n for n in stream_names if model.get_submodule(n).readers]
        notes.append(f"{len(stream_names)} residual-stream quantizer(s) on the tensors that "
                     "meet residual adds or reach the next layer through another op: "
                     f"{len(stream_names) - len(shared)} of {streams.STREAM_BITS} bits, "
                     f"{len(shared)} sharing the codes of the layers that read them")
    return Collapsed(original, model, reference.eval(), layers, shape, analysis.groups(),
                     notes, stream_names, float_clips(reference, [*layers, *stream_names]))


def float_clips(reference: nn.Module, names: list[str]) -> dict[str, tuple[float, float]]:
    """The float range `[lo * s, hi * s]` of each named quantizer of the integer reference (a
    layer's input or a stream) in float32, as a float Clip stores it. Clamping there and not
    rounding is the quantized model without its rounding: `round(clamp(x, lo*s, hi*s) / s)`
    gives the reference's codes exactly."""
    out = {}
    for name in names:
        m = reference.get_submodule(name)
        if getattr(m, "a_scale", None) is None:
            continue
        s = np.float32(m.a_scale.reshape(()).item())
        lo, hi = int_range(m.lq.a_bits, m.lq.a_signed)
        out[name] = (float(np.float32(lo) * s), float(np.float32(hi) * s))
    return out


def clipped(model: nn.Module, clips: dict[str, tuple[float, float]]) -> nn.Module:
    """A copy of a float model (`masked_float`, or it pruned) that clamps every quantized
    activation to its float range: each layer's input, each stream marker's output. The
    PyTorch twin of model.fp32.onnx; hooks, so that the module names stay as they were."""
    model = copy.deepcopy(model)
    for name, (lo, hi) in clips.items():
        m = model.get_submodule(name)
        if isinstance(m, streams.StreamMarker):
            m.register_forward_hook(lambda _m, _i, y, lo=lo, hi=hi: y.clamp(lo, hi))
        else:
            m.register_forward_pre_hook(lambda _m, x, lo=lo, hi=hi: (x[0].clamp(lo, hi),))
    return model


def read_decision(decision: Decision, model: nn.Module, order: list[str],
                  norms: dict[str, str | None], reduce_range: bool = True
                  ) -> dict[str, LayerQuant]:
    """The decision (checked against the architecture when its file was read) in call order,
    with what export adds: that the forward pass calls every layer, that each `bn` is the
    BatchNorm the graph shows directly after its layer, and how each layer's weights are
    stored."""
    if not decision:
        raise UserError("checkpoint has no decision record")
    uncalled = [n for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in order]
    if uncalled:
        raise UserError(f"layer {uncalled[0]!r} is never called by the model's forward pass")
    return {name: _layer_quant(name, decision[name], model.get_submodule(name), norms.get(name),
                               reduce_range)
            for name in order}


def _layer_quant(name: str, d: LayerDecision, module: nn.Module, norm: str | None,
                 reduce_range: bool) -> LayerQuant:
    if d.bn != norm:
        raise UserError(f"decision for {name}: bn is {d.bn!r} but the BatchNorm directly after "
                        f"{name} is {norm!r}")
    store = stored_weight_bits(d.w_bits, d.a_bits, d.a_signed, reduce_range) \
        if d.w_bits in QUANT_BITS else d.w_bits
    return LayerQuant(name, "conv" if isinstance(module, nn.Conv2d) else "linear", d.w_bits,
                      d.a_bits, d.a_signed, d.kept, module.weight.shape[0], d.bn, store)


def _input_shape(ckpt: dict) -> list[int]:
    spec = ckpt.get("input")
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if not isinstance(shape, list) or len(shape) != 4 or not all(
            isinstance(s, int) and s > 0 for s in shape):
        raise UserError(f"checkpoint input shape must be [1, C, H, W], got {shape!r}")
    return [1, *shape[1:]]


def _drop_folded_norms(model: nn.Module, layers: dict[str, LayerQuant]) -> None:
    """A `bn_folded` checkpoint trained `conv(x, w_folded) + b`: its BNs are gone."""
    for name, lq in layers.items():
        if lq.bn is None:
            continue
        set_module(model, lq.bn, nn.Identity())
        layer = model.get_submodule(name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))


def _load_weights(model: nn.Module, state: object, owners: list[str]) -> None:
    """Load `state`; keys under an owner's name (a layer or a stream quantizer) that the
    architecture lacks are the search method's own parameters (clips, gate thresholds)."""
    if not isinstance(state, dict):
        raise UserError("checkpoint state_dict is not a dict of tensors")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = next((s.strip() for s in str(e).splitlines() if "size mismatch" in s),
                      str(e).splitlines()[0])
        raise UserError(f"checkpoint weights do not fit the architecture: {detail[:200]}"
                        ) from None
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} weight(s) of its architecture, "
                        f"e.g. {missing[0]}")
    # Search methods keep their own parameters (clips, gate thresholds) under a layer's name.
    foreign = [k for k in unexpected if not any(k.startswith(f"{n}.") for n in owners)]
    if foreign:
        raise UserError(f"checkpoint holds {len(foreign)} tensor(s) the architecture lacks, "
                        f"e.g. {foreign[0]}")


def _read_clips(state: dict, layers: dict[str, LayerQuant]
                ) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    clips = {}
    for name, lq in layers.items():
        w_clip = a_clip = None
        if lq.w_quantized:
            w_clip = _tensor(state, f"{name}.w_clip", (lq.total,))
        if lq.a_quantized:
            a_clip = _tensor(state, f"{name}.a_clip", ()).reshape(())
        clips[name] = (w_clip, a_clip)
    return clips


def _stream_scales(state: dict, model: nn.Module) -> dict[str, Tensor]:
    """Each stream quantizer's scale from its trained clip, as `streams.StreamQuant` uses it."""
    out = {}
    for name in streams.names(model):
        marker = model.get_submodule(name)
        clip = _tensor(state, f"{name}.clip", ()).reshape(())
        out[name] = scale(clip.abs() + CLIP_EPS, marker.bits, marker.signed)
    return out


def _tensor(state: dict, key: str, shape: tuple[int, ...]) -> Tensor:
    t = state.get(key)
    if not isinstance(t, Tensor):
        raise UserError(f"checkpoint lacks {key}, needed by the layer's quantized bits")
    if t.numel() != math.prod(shape) or not torch.isfinite(t).all():
        raise UserError(f"checkpoint {key} has shape {list(t.shape)}, expected {list(shape)} "
                        "of finite values")
    return t.detach().float()


@torch.no_grad()
def _fold_norms(model: nn.Module, layers: dict[str, LayerQuant]) -> dict[str, Tensor]:
    """Fold each layer's BN into it (in place); the per-channel BN scale `k` of each layer
    (ones where no BN follows), which the weight clip is multiplied by."""
    bn_scales = {}
    for name, lq in layers.items():
        layer = model.get_submodule(name)
        bn = model.get_submodule(lq.bn) if lq.bn else None
        if not isinstance(bn, _BatchNorm):
            bn_scales[name] = torch.ones(lq.total)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(lq.total))
            continue
        w, b, k = fold_bn(layer.weight, layer.bias, bn)
        layer.weight = nn.Parameter(w)
        layer.bias = nn.Parameter(b)
        set_module(model, lq.bn, nn.Identity())
        bn_scales[name] = k
    for p in model.parameters():
        p.requires_grad_(False)
    return bn_scales


@torch.no_grad()
def _zero_pruned(model: nn.Module, layers: dict[str, LayerQuant]) -> None:
    """The mask of the training model: channels outside `kept` are exactly zero after the BN."""
    for name, lq in layers.items():
        if len(lq.kept) == lq.total:
            continue
        drop = torch.ones(lq.total, dtype=torch.bool)
        drop[list(lq.kept)] = False
        layer = model.get_submodule(name)
        layer.weight[drop] = 0
        layer.bias[drop] = 0


def _integer_layer(layer: nn.Module, lq: LayerQuant, clip: tuple[Tensor | None, Tensor | None],
                   bn_scale: Tensor) -> nn.Module:
    w_clip, a_clip = clip
    w, b = layer.weight.detach(), layer.bias.detach()
    codes = w_scale = a_scale = b_int = None
    if lq.w_quantized:
        clip_eff = (w_clip.abs() + CLIP_EPS) * bn_scale.abs()
        s = scale(clip_eff, lq.w_store_bits, True)
        # A zero BN gamma zeroes the folded channel: any scale stores it (as code 0).
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = quantize_int(w, s.view(-1, *([1] * (w.dim() - 1))), lq.w_store_bits, True)
        w_scale = s
    if lq.a_quantized:
        a_scale = scale(a_clip.abs() + CLIP_EPS, lq.a_bits, lq.a_signed)
    if lq.w_quantized and lq.a_quantized:
        bias_scale = a_scale * w_scale
        q = torch.round(b / bias_scale)
        if q.abs().max() >= 2 ** 31:
            raise UserError(f"{lq.name}: bias does not fit int32 at scale s_x*s_w "
                            f"(max |b| {b.abs().max():.3g}); the clips are degenerate")
        b_int = q
    cls = IntConv2d if lq.kind == "conv" else IntLinear
    return cls(layer, lq, codes, w_scale, a_scale, b_int)


class _Integer:
    """Shared by the integer twins of Conv2d and Linear. Tensors indexed by output channel are
    listed in `PER_OUT`, so pruning slices all of them the same way."""

    PER_OUT = ("weight", "bias", "w_scale", "b_int")
    lq: LayerQuant

    def _init_integer(self, lq: LayerQuant, codes: Tensor | None, w_scale: Tensor | None,
                      a_scale: Tensor | None, b_int: Tensor | None) -> None:
        self.lq = lq
        if codes is not None:
            self.weight = nn.Parameter(codes, requires_grad=False)
        for name, t in (("w_scale", w_scale), ("a_scale", a_scale), ("b_int", b_int)):
            self.register_buffer(name, None if t is None else t.detach().clone())

    def input_codes(self, x: Tensor) -> Tensor:
        """The integers QuantizeLinear (+ Clip) hands this layer (as float)."""
        return quantize_int(x, self.a_scale, self.lq.a_bits, self.lq.a_signed)

    def _operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.a_scale is not None:
            x = self.input_codes(x) * self.a_scale
        w = self.weight
        if self.w_scale is not None:
            w = w * self.w_scale.view(-1, *([1] * (w.dim() - 1)))
        b = self.bias
        if self.b_int is not None:
            b = self.b_int * (self.a_scale * self.w_scale)
        return x, w, b

    def weight_range(self) -> tuple[int, int]:
        return int_range(self.lq.w_store_bits, True)


class IntConv2d(_Integer, nn.Conv2d):
    """Conv2d computing with integer weights and a frozen input quantizer."""

    def __init__(self, conv: nn.Conv2d, lq: LayerQuant, codes, w_scale, a_scale, b_int):
        nn.Conv2d.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size,
                           conv.stride, conv.padding, conv.dilation, conv.groups, True,
                           conv.padding_mode)
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self._init_integer(lq, codes, w_scale, a_scale, b_int)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(*self._operands(x))


class IntLinear(_Integer, nn.Linear):
    """Linear computing with integer weights and a frozen input quantizer."""

    def __init__(self, linear: nn.Linear, lq: LayerQuant, codes, w_scale, a_scale, b_int):
        nn.Linear.__init__(self, linear.in_features, linear.out_features, True)
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._init_integer(lq, codes, w_scale, a_scale, b_int)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(*self._operands(x))


INTEGER_TYPES = (IntConv2d, IntLinear)


@dataclass(frozen=True)
class StreamSpec:
    """A stream quantizer's bits, in the names `qdq.activation` reads off a layer's."""

    name: str
    a_bits: int
    a_signed: bool

    @property
    def tag(self) -> str:
        return f"a{self.a_bits}"


class IntStreamQuant(nn.Module):
    """A frozen residual-stream quantizer: the integer codes QuantizeLinear (+ Clip) stores,
    times the scale, which is what the DequantizeLinear after it gives every reader."""

    def __init__(self, lq: StreamSpec, a_scale: Tensor) -> None:
        super().__init__()
        self.lq = lq
        self.register_buffer("a_scale", a_scale.detach().clone().reshape(()))

    def input_codes(self, x: Tensor) -> Tensor:
        return quantize_int(x, self.a_scale, self.lq.a_bits, self.lq.a_signed)

    def forward(self, x: Tensor) -> Tensor:
        return self.input_codes(x) * self.a_scale
