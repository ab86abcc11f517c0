"""The quantizers of DESIGN §3, as plain functions shared by search (fake-quant with STE) and
export (the integers a runtime stores).

Every scale is a clip divided by a power of two, so the grids of any two bitwidths nest:
`s_b / s_b' = 2^(b'-b)`. Weights are signed, per output channel, `s_b = a_c / 2^(b-1)`.
Activations are per tensor: unsigned `s_b = a / 2^b` after ReLU-like producers, else signed
like weights. Zero point is always 0, so zero is exactly representable.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def fake_quant(x: Tensor, clip: Tensor, bits: int, signed: bool) -> Tensor:
    """Quantize-dequantize with STE rounding; the clip gets LSQ-style gradients through `s`."""
    lo, hi = int_range(bits, signed)
    s = scale(clip, bits, signed)
    return torch.clamp(round_ste(x / s), lo, hi) * s


def weight_clip_shape(w: Tensor) -> tuple[int, ...]:
    """Per-output-channel broadcast shape: (C_out, 1, 1, 1) for conv, (C_out, 1) for Linear."""
    return (w.shape[0],) + (1,) * (w.dim() - 1)


def init_weight_clip(w: Tensor) -> Tensor:
    """Per-channel clip from the weights: the largest magnitude, so nothing saturates at start."""
    return w.detach().abs().flatten(1).amax(1).clamp_min(1e-8)
