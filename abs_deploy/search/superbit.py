"""Bit sharing (DESIGN §4): the super-bit quantizer, its gates, and SuperBitConv2d/Linear.

One weight tensor and one clip per layer hold every candidate bitwidth `b_0 < b_1 < ... < b_n`:

    x_hat = Q_b0(x) + g_1 * (e_1 + g_2 * (e_2 + ...)),   e_l = Q_bl(x) - Q_b(l-1)(x)

with `Q_b` the quantizers of `abs_deploy.quant` (scale = clip / 2^(b-1) signed, clip / 2^b
unsigned), whose grids nest for any ascending candidate set. With hard 0/1 gates the sum
telescopes to `Q_b_eff(x)`, `b_eff` the level of the last open gate, so the forward pass computes
that one quantization; the backward pass recomputes the other levels only to give each gate its
gradient `d x_hat / d g_l = [gates before l open] * (Q_top(l) - Q_b(l-1))` (`top(l)` the level
reached with `g_l` open). `nested_reference` is the literal decomposition; the tests prove the
two agree in value (bit-exact) and in every gradient. The point of doing it this way, rather than
summing the residual tensors, is cost: an activation is quantized once forward, not once per
candidate, and the extra rounding passes run only on steps that update activation gates.

Gates are `g = step(m - r)`: forward the hard step, backward the derivative of
`sigmoid((m - r) / TAU)` (straight-through). `m` is the mean absolute residual the gate would add,
in units of the coarser step; `r >= 0` a learnable threshold, 0 when built (all open: top bits);
the search then opens every gate at one common distance from closing
(`abs_search.start_thresholds`).
Weight gates read `m` from the current weights; activation gates from a running average, so a
decision never depends on one batch. Filter gates (0 bits) are per channel group and live in
`abs_search`, which owns the model-level view; `filter_gate` below is their rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abs_deploy.distributed import current, mean_over_ranks
from abs_deploy.quant import (
    CLIP_EPS,
    init_weight_clip,
    int_range,
    lsq_scaled_clip,
    scale,
    stored_weight_bits,
    weight_clip_shape,
)
from abs_deploy.search.qlayers import QConv2d, QLinear, mse_weight_clip

DEFAULT_CANDIDATES = (2, 4, 8)
TAU = 0.1              # sigmoid temperature of the straight-through gate gradient
A_MOMENTUM = 0.1       # running average of the activation residuals
A_SAMPLE = 16384       # elements of an activation sampled for its residual statistics


# --- the quantizer ---------------------------------------------------------------------------


def open_levels(gates: Tensor) -> int:
    """Number of leading open gates: the index of the effective level."""
    k = 0
    for g in gates.tolist():
        if g < 0.5:
            break
        k += 1
    return k


def super_quant(x: Tensor, clip: Tensor, gates: Tensor, bits: Sequence[int],
                signed: bool, lsq_scale: bool = True, shards: int = 1) -> Tensor:
    """`x_hat` of the nested decomposition at hard `gates` (one entry per level above the
    first), with straight-through gradients to `x`, `clip` (as `fake_quant`, LSQ's gradient
    scale of the level the gates select included) and the gates. `lsq_scale=False` leaves the
    clip's gradient unscaled, as the search had it before (kept for the ablation that measured
    what the scale is worth). `shards`: see `quant.lsq_scaled_clip`."""
    if lsq_scale:
        clip = lsq_scaled_clip(clip, x, int_range(bits[open_levels(gates)], signed)[1], shards)
    return _SuperQuant.apply(x, clip, gates, tuple(bits), signed)


class _SuperQuant(torch.autograd.Function):
    # Elementwise passes over an activation cost as much as the convolution on a CPU, so the
    # backward pass reuses what the forward saved: the output (which the next conv keeps anyway),
    # the input, and a 1-byte in-range mask. With `t = x / s` and `q` the clamped codes,
    # d Q / d clip = (q - t * inside) / 2^k, whose sum against `grad` is
    # (<grad, out> - <grad * inside, x>) / clip, two dot products.
    @staticmethod
    def forward(ctx, x, clip, gates, bits, signed):
        level = open_levels(gates)
        lo, hi = int_range(bits[level], signed)
        s = scale(clip, bits[level], signed)
        r = torch.round(x / s)
        q = r.clamp(lo, hi)
        inside = q == r
        out = q.mul_(s)
        ctx.save_for_backward(x, clip, gates, out, inside)
        ctx.bits, ctx.signed, ctx.level = bits, signed, level
        return out

    @staticmethod
    def backward(ctx, grad):
        x, clip, gates, out, inside = ctx.saved_tensors
        grad_x = grad * inside
        grad_clip = grad_gates = None
        if ctx.needs_input_grad[1]:
            if clip.dim():
                grad_clip = (grad * out - grad_x * x).sum_to_size(clip.shape) / clip
            else:
                grad_clip = (_dot(grad, out) - _dot(grad_x, x)) / clip
        if ctx.needs_input_grad[2]:
            grad_gates = _gate_grads(grad, x, clip, gates, ctx.bits, ctx.signed, ctx.level,
                                     out)
        return grad_x, grad_clip, grad_gates, None, None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _gate_grads(grad: Tensor, x: Tensor, clip: Tensor, gates: Tensor, bits: Sequence[int],
                signed: bool, level: int, out: Tensor) -> Tensor:
    """`<grad, Q_top(l) - Q_(l-1)>` for every gate whose predecessors are open."""
    result = torch.zeros_like(gates)
    dots: dict[int, Tensor] = {level: _dot(grad, out)}     # the forward output is Q_level

    def dot(lv: int) -> Tensor:
        if lv not in dots:
            dots[lv] = _dot(grad, _quant(x, clip, bits[lv], signed))
        return dots[lv]

    g = [v >= 0.5 for v in gates.tolist()]
    for gi in range(len(g)):
        lv = gi + 1                        # gate gi opens level lv
        if lv > level + 1:                 # an earlier gate is closed: no gradient
            break
        top = lv
        while top < len(g) and g[top]:     # gates after it that are open
            top += 1
        result[gi] = dot(top) - dot(lv - 1)
    return result


def _quant(x: Tensor, clip: Tensor, bits: int, signed: bool) -> Tensor:
    """`Q_b(x)` without autograd, the same arithmetic as `quant.fake_quant` (bit-exact)."""
    lo, hi = int_range(bits, signed)
    s = scale(clip, bits, signed)
    return torch.clamp(torch.round(x / s), lo, hi) * s


def nested_reference(x: Tensor, clip: Tensor, gates: Tensor, bits: Sequence[int],
                     signed: bool) -> Tensor:
    """The literal decomposition `Q_b0 + g_1 (e_1 + g_2 (e_2 + ...))`, in autograd ops.

    Summed in integer units of the finest step so the sum is exact in float; multiplying by that
    step once is then bit-identical to `Q_b` for whichever level the gates select."""
    from abs_deploy.quant import round_ste

    top = bits[-1]
    clip = lsq_scaled_clip(clip, x, int_range(bits[open_levels(gates)], signed)[1])
    codes = []
    for b in bits:
        lo, hi = int_range(b, signed)
        k = torch.clamp(round_ste(x / scale(clip, b, signed)), lo, hi)
        codes.append(k * 2 ** (top - b))
    acc = None
    for lv in range(len(bits) - 1, 0, -1):      # innermost bracket first
        e = codes[lv] - codes[lv - 1]
        acc = gates[lv - 1] * (e if acc is None else e + acc)
    total = codes[0] if acc is None else codes[0] + acc
    return total * scale(clip, top, signed)


@torch.no_grad()
def level_residuals(x: Tensor, clip: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """`m_l` for l = 1..n: mean |Q_bl - Q_b(l-1)| in units of the coarser step."""
    q = [_quant(x, clip, b, signed) for b in bits]
    out = []
    for lv in range(1, len(bits)):
        coarse = scale(clip, bits[lv - 1], signed)
        out.append(((q[lv] - q[lv - 1]) / coarse).abs().mean())
    return torch.stack(out) if out else x.new_zeros(0)


def step_ste(z: Tensor, tau: float = TAU) -> Tensor:
    """Hard step `z > 0` forward, `d sigmoid(z / tau)` backward."""
    soft = torch.sigmoid(z / tau)
    return (z > 0).to(soft.dtype) + (soft - soft.detach())


def gates_for_level(level: int, n_gates: int, device: torch.device | None = None) -> Tensor:
    """Hard gates selecting level `level` (0 = the lowest candidate)."""
    return (torch.arange(n_gates, device=device) < level).float()


def bits_from_gates(gates: Tensor, bits: Sequence[int]) -> Tensor:
    """Differentiable bitwidth, the telescoping sum `b_0 + sum_l (b_l - b_(l-1)) g_1..g_l`."""
    total = gates.new_tensor(float(bits[0]))
    prod = gates.new_tensor(1.0)
    for lv in range(1, len(bits)):
        prod = prod * gates[lv - 1]
        total = total + (bits[lv] - bits[lv - 1]) * prod
    return total


def filter_gate(norms: Tensor, threshold: Tensor, max_prune: float,
                tau: float = TAU, limit: int | None = None) -> Tensor:
    """`g_0,c = step(n_c - r_0)`, except that only the `max_prune` fraction of channels with the
    smallest `n_c` may close (or, given, `limit` of them), and at least one channel stays."""
    c = norms.numel()
    limit = min(int(max_prune * c) if limit is None else limit, c - 1)
    candidate = torch.zeros(c, dtype=torch.bool, device=norms.device)
    if limit > 0:
        candidate[torch.argsort(norms, stable=True)[:limit]] = True
    g = step_ste(norms - threshold, tau)
    # Channels that may never close carry no gradient: they would only push r_0 for nothing.
    return torch.where(candidate, g, torch.ones_like(g))


def filter_norms(weights: Sequence[Tensor]) -> Tensor:
    """`n_c`: each producer's per-filter mean |w| over its largest, averaged over producers."""
    per = []
    for w in weights:
        m = w.detach().abs().flatten(1).mean(1)
        per.append(m / m.max().clamp_min(1e-12))
    return torch.stack(per).mean(0)


# --- the layers --------------------------------------------------------------------------------


class _SuperBitMixin:
    """Super-bit weight and input quantizers on top of a QConv2d/QLinear (so every whole-model
    helper of `qmodel` that looks for quantized layers, e.g. `calibrate`, sees these too).

    State-dict keys: the float layer's, `w_clip` [C_out], `a_clip` (scalar) -- what export and
    `model_from_checkpoint` read -- plus `w_thr`, `a_thr` (one threshold per gated level) and the
    buffer `a_m` (running activation residuals), all under the layer's own prefix."""

    weight: nn.Parameter
    candidates: tuple[int, ...]
    a_signed: bool
    pinned_bits: tuple[int, int] | None

    def _init_superbit(self, candidates: Sequence[int], clip_bits: int | None = None) -> None:
        self.candidates = tuple(int(b) for b in candidates)
        self.a_signed = True
        self.pinned_bits = None     # (w_bits, a_bits) pinned by the search's projection step
        self.lsq_scale = True       # LSQ's clip-gradient scale (False: the ablation's old path)
        n = len(self.candidates) - 1
        clip_bits = clip_bits or self.candidates[len(self.candidates) // 2]
        self.w_clip = nn.Parameter(mse_weight_clip(self.weight, clip_bits)
                                   if clip_bits < 8 else init_weight_clip(self.weight))
        self.a_clip = nn.Parameter(torch.tensor(1.0))
        self.w_thr = nn.Parameter(torch.zeros(n))
        self.a_thr = nn.Parameter(torch.zeros(n))
        # 1.0 is above any residual a rounding can add (0.5 coarse steps), so unseen = open.
        self.register_buffer("a_m", torch.ones(n))
        self.register_buffer("a_m_seen", torch.tensor(False))

    @property
    def searchable(self) -> bool:
        return len(self.candidates) > 1

    # -- gates ---------------------------------------------------------------------------------

    def _w_clip(self) -> Tensor:
        # The same expression as QConv2d's, so the fixed-bit twin reproduces this layer exactly.
        return self.w_clip.abs().add(CLIP_EPS).view(weight_clip_shape(self.weight))

    def _a_clip(self) -> Tensor:
        return self.a_clip.abs() + CLIP_EPS

    def w_gates(self) -> Tensor:
        n = len(self.candidates) - 1
        if self.pinned_bits is not None:
            return gates_for_level(self.candidates.index(self.pinned_bits[0]), n, self.w_thr.device)
        return step_ste(self.w_residuals() - self.w_thr)

    def w_residuals(self) -> Tensor:
        """`m_l` of the weights, recomputed only when the weights or clip changed: the gates,
        the BOPs and the threshold clamp all ask for it every step."""
        key = (self.weight._version, self.w_clip._version, id(self.weight), id(self.w_clip))
        if getattr(self, "_m_key", None) != key:
            self._m_cache = level_residuals(self.weight, self._w_clip(), self.candidates, True)
            self._m_key = key
        return self._m_cache

    def a_gates(self) -> Tensor:
        n = len(self.candidates) - 1
        if self.pinned_bits is not None:
            return gates_for_level(self.candidates.index(self.pinned_bits[1]), n, self.a_thr.device)
        return step_ste(self.a_m - self.a_thr)

    def w_bits_t(self) -> Tensor:
        return bits_from_gates(self.w_gates(), self.candidates)

    def a_bits_t(self) -> Tensor:
        return bits_from_gates(self.a_gates(), self.candidates)

    @property
    def w_bits(self) -> int:
        return self.candidates[open_levels(self.w_gates())]

    @property
    def a_bits(self) -> int:
        return self.candidates[open_levels(self.a_gates())]

    # -- quantizers ----------------------------------------------------------------------------

    def quant_weight(self) -> Tensor:
        return super_quant(self.weight, self._w_clip(), self.w_gates(), self.weight_levels(),
                           True, self.lsq_scale)

    def weight_levels(self) -> tuple[int, ...]:
        """The grids the weights really use: what export stores (quant.stored_weight_bits: an
        8-bit weight meeting 8-bit or signed inputs keeps 7 bits), so the fixed-bit read-out
        and fine-tune compute exactly what the search did. The grids still nest."""
        a_bits = self.a_bits
        return tuple(stored_weight_bits(b, a_bits, self.a_signed) for b in self.candidates)

    def quant_input(self, x: Tensor) -> Tensor:
        clip = self._a_clip()
        if self.training and self.searchable and self.pinned_bits is None:
            self._track_residuals(x, clip)
        return super_quant(x, clip, self.a_gates(), self.candidates, self.a_signed,
                           self.lsq_scale, current().world)

    @torch.no_grad()
    def _track_residuals(self, x: Tensor, clip: Tensor) -> None:
        # Over the live input channels only: a pruned channel is exactly zero, quantizes
        # without error, and counted in the mean it scaled `a_m` by the kept share, so pruning
        # the layer in front closed this layer's bit gates for no reason of its own (ResNet-20,
        # a 0.5x latency search: every conv2 behind a conv1 pruned to a third went to 2-bit
        # activations, and those cost 1.4 points of top-1 against the same decision at 8).
        x = x.detach()
        if x.dim() > 1:
            live = x.abs().amax(dim=[d for d in range(x.dim()) if d != 1]) > 0
            if bool(live.any()):
                x = x[:, live]
        flat = x.flatten()
        sample = flat[:: max(1, flat.numel() // A_SAMPLE)]
        # Under torchrun each rank sees its share of the batch; the tracked statistic is the
        # average over ranks, so every rank's gates see the same value.
        m = mean_over_ranks(level_residuals(sample, clip.detach(), self.candidates,
                                            self.a_signed))
        if bool(self.a_m_seen):
            self.a_m.lerp_(m, A_MOMENTUM)
        else:
            self.a_m.copy_(m)
            self.a_m_seen.fill_(True)

    def extra_repr(self) -> str:
        base = nn.Conv2d.extra_repr(self) if isinstance(self, nn.Conv2d) else \
            nn.Linear.extra_repr(self)
        return f"{base}, candidates={list(self.candidates)}, w{self.w_bits}a{self.a_bits}"


class SuperBitConv2d(_SuperBitMixin, QConv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, candidates: Sequence[int] = DEFAULT_CANDIDATES
                   ) -> SuperBitConv2d:
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.bias is not None, m.padding_mode)
        q.load_state_dict(m.state_dict())
        q._init_superbit(candidates)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.quant_bias())


class SuperBitLinear(_SuperBitMixin, QLinear):
    @classmethod
    def from_float(cls, m: nn.Linear, candidates: Sequence[int] = DEFAULT_CANDIDATES
                   ) -> SuperBitLinear:
        q = cls(m.in_features, m.out_features, m.bias is not None)
        q.load_state_dict(m.state_dict())
        q._init_superbit(candidates)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.quant_bias())


SUPERBIT_TYPES = (SuperBitConv2d, SuperBitLinear)


def superbit_from_float(m: nn.Module, candidates: Sequence[int] = DEFAULT_CANDIDATES
                        ) -> SuperBitConv2d | SuperBitLinear:
    """The super-bit twin of a Conv2d or Linear (a one-element `candidates` fixes its bits)."""
    cls = SuperBitConv2d if isinstance(m, nn.Conv2d) else SuperBitLinear
    return cls.from_float(m, candidates)
