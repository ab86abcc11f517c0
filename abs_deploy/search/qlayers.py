"""Fixed-bit quantized Conv2d/Linear (DESIGN §3): the form uniform QAT and fine-tune train, and
the form every search method's decision is read back into.

State-dict keys are those of the float layer plus `w_clip` (per output channel) and `a_clip`
(the layer's input), which is what export reads. 32 bits means "leave this tensor float".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abs_deploy.decision import FLOAT_BITS
from abs_deploy.distributed import current
from abs_deploy.quant import (
    CLIP_EPS,
    fake_quant,
    init_weight_clip,
    int_range,
    round_ste,
    scale,
    stored_weight_bits,
    weight_clip_shape,
)


class _QuantMixin:
    w_bits: int
    a_bits: int
    a_signed: bool

    def _init_quant(self, w_bits: int, a_bits: int, a_signed: bool) -> None:
        self.w_bits, self.a_bits, self.a_signed = w_bits, a_bits, a_signed
        self.w_clip = nn.Parameter(init_weight_clip(self.weight))
        self.a_clip = nn.Parameter(torch.tensor(1.0))

    def quant_input(self, x: Tensor) -> Tensor:
        if self.a_bits >= FLOAT_BITS:
            return x
        return fake_quant(x, self.a_clip.abs() + CLIP_EPS, self.a_bits, self.a_signed,
                          current().world)

    def quant_weight(self) -> Tensor:
        if self.w_bits >= FLOAT_BITS:
            return self.weight
        clip = self.w_clip.abs().add(CLIP_EPS).view(weight_clip_shape(self.weight))
        bits = stored_weight_bits(self.w_bits, self.a_bits, self.a_signed)
        return fake_quant(self.weight, clip, bits, True)

    def quant_bias(self) -> Tensor | None:
        """The bias as export stores it: an int32 at the accumulator scale `s_x * s_w`. Without
        this, the tiny rounding difference flips codes of a coarse (2-bit) quantizer downstream,
        and each flip is a whole step."""
        if self.bias is None or self.w_bits >= FLOAT_BITS or self.a_bits >= FLOAT_BITS:
            return self.bias
        s_x = scale(self.a_clip.abs() + CLIP_EPS, self.a_bits, self.a_signed)
        s_w = scale(self.w_clip.abs() + CLIP_EPS,
                    stored_weight_bits(self.w_bits, self.a_bits, self.a_signed), True)
        s = s_x * s_w
        return round_ste(self.bias / s) * s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w{self.w_bits}a{self.a_bits}" + \
            ("s" if self.a_signed else "u")


class QConv2d(_QuantMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, w_bits: int, a_bits: int, a_signed: bool) -> QConv2d:
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.bias is not None, m.padding_mode)
        q.load_state_dict(m.state_dict())
        q._init_quant(w_bits, a_bits, a_signed)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.quant_bias())


class QLinear(_QuantMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear, w_bits: int, a_bits: int, a_signed: bool) -> QLinear:
        q = cls(m.in_features, m.out_features, m.bias is not None)
        q.load_state_dict(m.state_dict())
        q._init_quant(w_bits, a_bits, a_signed)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.quant_bias())


QUANT_TYPES = (QConv2d, QLinear)


def mse_weight_clip(w: Tensor, bits: int, steps: int = 20) -> Tensor:
    """Per-channel clip minimising the quantization MSE: at 2-4 bits the max-magnitude clip
    wastes most levels on a few outliers."""
    w = w.detach().flatten(1)
    wmax = init_weight_clip(w)
    lo, hi = int_range(bits, True)
    best_err = torch.full_like(wmax, float("inf"))
    best = wmax.clone()
    for f in torch.linspace(0.2, 1.0, steps):
        clip = wmax * f
        s = (clip / 2 ** (bits - 1)).unsqueeze(1)
        err = ((torch.clamp(torch.round(w / s), lo, hi) * s - w) ** 2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best
