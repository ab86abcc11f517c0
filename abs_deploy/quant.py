"""The quantizers of DESIGN §3, as plain functions shared by search (fake-quant with STE) and
export (the integers a runtime stores).

Every scale is a clip divided by a power of two, so the grids of any two bitwidths nest:
`s_b / s_b' = 2^(b'-b)`. Weights are signed, per output channel, `s_b = a_c / 2^(b-1)`.
Activations are per tensor: unsigned `s_b = a / 2^b` after ReLU-like producers, else signed
like weights. Zero point is always 0, so zero is exactly representable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ONNX Runtime's u8 x s8 kernels on AVX2 without VNNI add pairs of products in int16 with
# saturation (VPMADDUBSW): 255 * 128 * 2 > 32767. On x64 ORT also turns int8 activations into
# uint8 with zero point 128 (QDQS8ToU8Transformer), so a signed input reaches the kernel as up
# to 255 too. A 7-bit weight range (|q| <= 64) cannot saturate: 255 * 64 * 2 = 32640. This is
# ORT's `reduce_range` and NNCF's "saturation fix" (onnxruntime#6004, nncf#301). Weights of 7 bits
# or fewer are safe anyway, and so are unsigned inputs of 7 bits or fewer (127 * 128 * 2).
# Training uses the same rule, so fine-tune learns the weights export stores.
REDUCED_BITS = 7
# Added to every learned clip magnitude before it becomes a scale, in training and export
# alike: a clip trained to zero still gives a finite scale, and the integers match.
CLIP_EPS = 1e-8


def stored_weight_bits(w_bits: int, a_bits: int, a_signed: bool,
                       reduce_range: bool = True) -> int:
    """The weight grid a layer really uses: 8-bit weights meeting 8-bit or signed inputs keep
    7 bits (see above). BOPs still count the decided bits."""
    if reduce_range and w_bits == 8 and 2 <= a_bits <= 8 and (a_bits == 8 or a_signed):
        return REDUCED_BITS
    return w_bits


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale(clip: Tensor, bits: int, signed: bool) -> Tensor:
    return clip / (2 ** (bits - 1) if signed else 2**bits)


def round_ste(x: Tensor) -> Tensor:
    """Round forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quantize_int(x: Tensor, s: Tensor, bits: int, signed: bool) -> Tensor:
    """The integer codes (as float) a runtime stores: round half to even, as QuantizeLinear."""
    lo, hi = int_range(bits, signed)
    return torch.clamp(torch.round(x / s), lo, hi)


def fake_quant(x: Tensor, clip: Tensor, bits: int, signed: bool, shards: int = 1) -> Tensor:
    """Quantize-dequantize with STE rounding; the clip gets LSQ's gradients through `s`,
    scaled down as LSQ scales them (1 / sqrt(elements per clip * top code)). Unscaled, the
    clip's gradient sums over every element it quantizes: on the BN-folded ResNet-20 it grew
    large enough at lr 0.01 to wreck fine-tune (10-20% top-1; 99.44% with the scale).
    `shards`: see `lsq_scaled_clip`."""
    lo, hi = int_range(bits, signed)
    s = scale(lsq_scaled_clip(clip, x, hi, shards), bits, signed)
    return torch.clamp(round_ste(x / s), lo, hi) * s


def lsq_scaled_clip(clip: Tensor, x: Tensor, top_code: int, shards: int = 1) -> Tensor:
    """`clip` unchanged forward; its gradient times LSQ's 1 / sqrt(elements per clip * top
    code) backward. Every quantizer that trains a clip (fixed-bit and super-bit) goes through
    this, so a clip learns at the same rate whichever path trains it. An activation `x` that is
    one of `shards` equal shares of the batch (one per DDP process) counts the whole batch's
    elements, so the clip's step does not depend on how many processes share the batch."""
    per_clip = max(x.numel() * shards // max(clip.numel(), 1), 1)
    return _GradScale.apply(clip, 1.0 / math.sqrt(per_clip * max(top_code, 1)))


class _GradScale(torch.autograd.Function):
    """Identity forward (bit-exact, unlike the `(t - g*t).detach() + g*t` trick); the gradient
    times `g` backward."""

    @staticmethod
    def forward(ctx, t: Tensor, g: float) -> Tensor:
        ctx.g = g
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.g, None


def weight_clip_shape(w: Tensor) -> tuple[int, ...]:
    """Per-output-channel broadcast shape: (C_out, 1, 1, 1) for conv, (C_out, 1) for Linear."""
    return (w.shape[0],) + (1,) * (w.dim() - 1)


def init_weight_clip(w: Tensor) -> Tensor:
    """Per-channel clip from the weights: the largest magnitude, so nothing saturates at start."""
    return w.detach().abs().flatten(1).amax(1).clamp_min(1e-8)
