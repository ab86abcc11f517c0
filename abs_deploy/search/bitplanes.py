"""Bit-plane layers for BSQ (DESIGN §7): a quantized conv/linear whose weight is
`W = s * round(sum_i (p_i - n_i) * 2^i)`, with positive and negative planes `p_i, n_i` as
trainable variables, continuous in [0, 2] during training (the BSQ paper's relaxation), rounded
straight-through, and a scale `s` per output channel (the paper has one per layer; see
`from_float` for why not here). The number of planes is the layer's.

A sign-magnitude weight with n magnitude bits is an integer in [-(2^n - 1), 2^n - 1]; that is a
two's-complement integer of n + 1 bits at scale `s`, i.e. the weight quantizer of §3 with
`b = n + 1` and per-channel clip `s_c * 2^n`. So the layer keeps `w_bits = n + 1`, `weight` (the
value the planes represent) and `w_clip` in sync with its planes, and export, fine-tune and the
decision record see an ordinary fixed-bit layer. Magnitude bits are capped at 7 so the weight
fits the int8 container (8 bits two's complement).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from abs_deploy.quant import round_ste, weight_clip_shape
from abs_deploy.search.qlayers import QConv2d, QLinear

MAX_MAG_BITS = 7    # 7 magnitude bits + sign = int8, the widest container of DESIGN §3
MIN_MAG_BITS = 1    # a layer never leaves the graph: 1 magnitude bit = ternary, 2 bits stored
PLANE_MAX = 2.0     # BSQ: bits live in [0, 2] so a plane can overflow into the next bit


class _BitPlaneMixin:
    """Planes, scale and the plane operations; mixed into QConv2d/QLinear, which supply the
    activation quantizer and the forward pass (that calls `quant_weight`)."""

    weight: nn.Parameter
    w_clip: nn.Parameter
    w_bits: int
    pos: nn.Parameter   # [n, *weight.shape], plane i is bit 2^i of the positive part
    neg: nn.Parameter
    scale: Tensor       # per output channel, broadcastable to the weight: one grid step

    @classmethod
    def from_float(cls, m: nn.Module, n_bits: int = MAX_MAG_BITS, a_bits: int = 32,
                   a_signed: bool = True):
        """Convert a float layer: scale `max|w_c| / (2^n - 1)` per output channel, so each
        channel's largest weight uses every plane and the planes reproduce the (n + 1)-bit
        quantized weight exactly.

        Per channel, not per layer as in the BSQ paper: with one scale, a layer cut to 2-3
        bits rounds its small-weight channels to all zeros; the BN after it then sees almost no
        variance, and folding it for fine-tune multiplies those channels by gains of hundreds
        (ResNet-20 on digits32: 45 of 64 channels of layer3.0.conv1 all zero, BN gains up to
        327; per channel, even with every middle layer at 2 bits: no zero channel, at most 21).
        It is also the grid export stores (DESIGN §3: weights per output channel)."""
        if not MIN_MAG_BITS <= n_bits <= MAX_MAG_BITS:
            raise ValueError(f"magnitude bits must be in [{MIN_MAG_BITS}, {MAX_MAG_BITS}], "
                             f"got {n_bits}")
        layer = super().from_float(m, n_bits + 1, a_bits, a_signed)
        w = layer.weight.detach()
        s = w.abs().flatten(1).amax(1).clamp_min(1e-12) / (2**n_bits - 1)
        s = s.view(weight_clip_shape(w))
        # The float weight is now derived from the planes: not trained, kept for export.
        layer.weight.requires_grad_(False)
        layer.w_clip.requires_grad_(False)
        layer.register_buffer("scale", s.clone())
        layer.set_integer(torch.round(w / s), s, n_bits)
        return layer

    @property
    def n_bits(self) -> int:
        return self.pos.shape[0]

    def integer_weight(self) -> Tensor:
        """The continuous magnitude sum `sum_i (p_i - n_i) 2^i` (an integer after requant)."""
        powers = 2.0 ** torch.arange(self.n_bits, dtype=self.pos.dtype, device=self.pos.device)
        powers = powers.view(-1, *([1] * (self.pos.dim() - 1)))
        return ((self.pos - self.neg) * powers).sum(0)

    def quant_weight(self) -> Tensor:
        # Round the sum, not each plane: a bit at 0.6 and its neighbour at 0.7 together make
        # one unit more, which is what the gradient asked for.
        return round_ste(self.integer_weight()) * self.scale

    def plane_norms(self, eps: float = 1e-12) -> Tensor:
        """`||[p_i; n_i]||_2` per plane: the groups of BSQ's bit-level group Lasso. `eps` keeps
        the gradient finite on an all-zero plane."""
        sq = self.pos.pow(2).flatten(1).sum(1) + self.neg.pow(2).flatten(1).sum(1)
        return (sq + eps).sqrt()

    @torch.no_grad()
    def clamp_planes(self) -> None:
        """Keep the relaxed bits in [0, 2] after an optimizer step."""
        self.pos.clamp_(0.0, PLANE_MAX)
        self.neg.clamp_(0.0, PLANE_MAX)

    @torch.no_grad()
    def set_integer(self, q: Tensor, s: Tensor, n_bits: int) -> None:
        """Binary planes of the integer weight `q` (|q| <= 2^n - 1) at scale `s`; replaces the
        plane parameters (their shape may change, so any optimizer holding them is stale)."""
        q = q.to(self.weight.dtype)
        mag = q.abs().to(torch.int64)
        shifts = torch.arange(n_bits, device=q.device).view(-1, *([1] * q.dim()))
        bits = ((mag.unsqueeze(0) >> shifts) & 1).to(q.dtype)
        self.pos = nn.Parameter(bits * (q > 0))
        self.neg = nn.Parameter(bits * (q < 0))
        self.scale.copy_(s)     # a scalar broadcasts to every channel
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Write the represented weight, its bits and its clip where export reads them."""
        n = self.n_bits
        self.w_bits = n + 1
        self.weight.copy_(torch.round(self.integer_weight()) * self.scale)
        self.w_clip.data = (self.scale * 2**n).flatten().clone()

    @torch.no_grad()
    def requantize(self, min_bits: int = MIN_MAG_BITS, max_bits: int = MAX_MAG_BITS
                   ) -> dict:
        """BSQ's re-quantization: round the relaxed planes to the nearest integer weight, then
        size the precision to it. The magnitude needs `bit_length(max|q|)` bits: more than `n`
        on overflow (bits near 2 carried into a new MSB; the sum of n planes is at most
        2(2^n - 1), so one extra bit always suffices), fewer when the top planes are all zero.
        All-zero low planes are dropped by halving the integers and doubling the scale. None
        of this changes a weight, except saturation at `max_bits`.

        A layer whose weights all round to zero would leave the graph; it is kept at
        `min_bits` (its largest continuous weights become +-1) and reported as `zeroed`."""
        before = self.n_bits
        cont = self.integer_weight()
        q, s = torch.round(cont), self.scale.clone()
        zeroed = not bool(q.any())
        if zeroed:
            top = cont.abs().max()
            if top > 0:
                q, s = torch.round(cont / top), s * top
            else:   # no signal left at all: fall back to the last represented weight
                top = self.weight.abs().max().clamp_min(1e-12)
                q, s = torch.round(self.weight / top), top.clone()
        need = int(q.abs().max().item()).bit_length()
        n = min(max(need, min_bits), max_bits)
        limit = 2**n - 1
        saturated = int((q.abs() > limit).sum().item())
        q = q.clamp(-limit, limit)
        dropped_lsb = 0
        while n > min_bits and bool(q.any()) and not bool(torch.remainder(q, 2).any()):
            q, s, n = q / 2, s * 2, n - 1
            dropped_lsb += 1
        self.set_integer(q, s, n)
        return {"before": before, "after": n, "dropped_lsb": dropped_lsb,
                "saturated": saturated, "zeroed": zeroed}

    @torch.no_grad()
    def add_lsb(self) -> None:
        """One more low plane, all zero (integers doubled, scale halved): the same weight at a
        finer grid, for the training that follows to use."""
        if self.n_bits >= MAX_MAG_BITS:
            raise ValueError(f"already at {MAX_MAG_BITS} magnitude bits")
        self.set_integer(torch.round(self.integer_weight()) * 2, self.scale / 2,
                         self.n_bits + 1)

    @torch.no_grad()
    def drop_lsb(self) -> None:
        """One low plane less by rounding to the coarser grid (this changes weights)."""
        if self.n_bits <= MIN_MAG_BITS:
            raise ValueError(f"already at {MIN_MAG_BITS} magnitude bit")
        q = torch.round(self.integer_weight())
        # Round half away from zero keeps the grid symmetric: +-x map to +-round(x/2).
        q = torch.sign(q) * torch.floor(q.abs() / 2 + 0.5)
        n = self.n_bits - 1
        self.set_integer(q.clamp(-(2**n - 1), 2**n - 1), self.scale * 2, n)


class BitPlaneConv2d(_BitPlaneMixin, QConv2d):
    """Conv2d with bit-plane weights and a fixed-bit input quantizer."""


class BitPlaneLinear(_BitPlaneMixin, QLinear):
    """Linear with bit-plane weights and a fixed-bit input quantizer."""


BITPLANE_TYPES = (BitPlaneConv2d, BitPlaneLinear)


def to_bitplane(m: nn.Conv2d | nn.Linear, n_bits: int = MAX_MAG_BITS, a_bits: int = 32,
                a_signed: bool = True) -> BitPlaneConv2d | BitPlaneLinear:
    """The bit-plane twin of a float Conv2d or Linear."""
    cls = BitPlaneConv2d if isinstance(m, nn.Conv2d) else BitPlaneLinear
    return cls.from_float(m, n_bits, a_bits, a_signed)
