"""What a decision costs, in the units users state (#16): BOPs, latency read from a measured
table, and the bytes its weights take as export stores them -- each as a differentiable function
of the search's gates, so one controller can drive any of them to a target.

Every cost is a sum over layers of a table over the layer's (weight bits, input bits), evaluated
at its kept output and input channel counts:

    cost(layer) = sum_i sum_j p_w(i) p_a(j) T_ij(out_kept, in_kept)

`p_w(i) = g_1 ... g_i (1 - g_(i+1))` is the weight of level i under the layer's gates; with hard
gates it is one-hot, so the forward value is exactly the entry of the decision the gates read
out, and the straight-through gates give each level its gradient. For BOPs (`T_ij = MACs * b_i *
b_j`) this is the telescoping sum `SuperBitNet.bops` computes. Latency interpolates `T_ij`
bilinearly between the measured kept-channel grid points for its value; the kept counts (sums
of the filter gates) get their gradient from the layer's trend instead (`trend_slopes`): on
ONNX Runtime's int8 kernels a layer's time is not monotone in its channel count (ResNet-20's
layer1 conv with 16 outputs 1.41 ms, 12: 2.21, 8: 1.62), so the local slope at the top end,
where the search starts, said every pruning step costs time, and a 0.5x search pruned nothing.
The controller and the projection read the table's values, so the decision is still held to
what the table measured.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from abs_deploy.decision import FLOAT_BITS
from abs_deploy.errors import UserError

if TYPE_CHECKING:
    from abs_deploy.latency_table import LatencyTable

KINDS = ("bops", "latency", "size")
UNITS = {"bops": "BOPs", "latency": "ms", "size": "bytes"}


@dataclass(frozen=True)
class Target:
    """One budget: `kind` in KINDS, `value` in its unit (BOPs, ms, bytes), `text` as given."""

    kind: str
    value: float
    text: str

    def as_record(self, predicted: float | None = None) -> dict:
        out = {"kind": self.kind, "value": self.value, "unit": UNITS[self.kind],
               "text": self.text}
        if predicted is not None:
            out["predicted"] = predicted
        return out


def level_weights(gates: Tensor) -> Tensor:
    """`p(i)` for levels 0..n from the n gates: one-hot at hard gates, with their gradients."""
    ones = gates.new_ones(1)
    reached = torch.cumprod(torch.cat([ones, gates]), 0)        # g_1 ... g_i
    return reached * torch.cat([1 - gates, ones])               # ... (1 - g_(i+1))


def interpolate(grid: Sequence[float], x: Tensor) -> tuple[int, int, Tensor]:
    """The grid cell holding `x` (clamped to the grid's ends) and `x`'s differentiable position
    in it: the two indices and `t` in [0, 1]. Not `latency_table`'s bracket: at the grid's top
    end (every channel kept, where the search starts) that one holds the end value, which gives
    the filter gates no latency gradient; this one stays in the last cell, keeping its slope."""
    if len(grid) == 1 or grid[0] == grid[-1]:
        return 0, 0, x * 0.0
    v = float(x.detach())
    hi = next((i for i, g in enumerate(grid) if g >= v), len(grid) - 1)
    hi = max(hi, 1)
    lo = hi - 1
    t = (x - grid[lo]) / (grid[hi] - grid[lo])
    return lo, hi, t.clamp(0.0, 1.0)


def table_value(values: Sequence[Sequence[float]], out_grid: Sequence[float],
                in_grid: Sequence[float], out_kept: Tensor, in_kept: Tensor) -> Tensor:
    """Bilinear interpolation of `values[out][in]` at (out_kept, in_kept)."""
    o0, o1, s = interpolate(out_grid, out_kept)
    i0, i1, t = interpolate(in_grid, in_kept)
    v = [[values[o][i] for i in (i0, i1)] for o in (o0, o1)]
    return ((1 - s) * ((1 - t) * v[0][0] + t * v[0][1])
            + s * ((1 - t) * v[1][0] + t * v[1][1]))


def trend_slopes(values: Sequence[Sequence[float]], out_grid: Sequence[float],
                 in_grid: Sequence[float]) -> tuple[float, float]:
    """Per kept output and input channel, the least-squares plane through a layer's measured
    grid (ms per channel), each at least 0: what a channel costs on the whole, without the
    alignment bumps between grid points; 0 on a side with one grid point."""
    v = torch.tensor(values, dtype=torch.float64)
    o = torch.tensor(out_grid, dtype=torch.float64)[:, None].expand_as(v)
    i = torch.tensor(in_grid, dtype=torch.float64)[None, :].expand_as(v)
    cols = [torch.ones_like(v)] + [c for c, g in ((o, out_grid), (i, in_grid)) if len(g) > 1]
    if len(cols) == 1:
        return 0.0, 0.0
    a = torch.stack([c.flatten() for c in cols], 1)
    coef = torch.linalg.lstsq(a, v.flatten()[:, None]).solution.flatten().tolist()[1:]
    per_out = coef.pop(0) if len(out_grid) > 1 else 0.0
    per_in = coef.pop(0) if len(in_grid) > 1 else 0.0
    return max(per_out, 0.0), max(per_in, 0.0)


class LatencyCost:
    """Predicted latency (ms) of the exported model from a measured `LatencyTable`: the table's
    value forward, the trend's gradient for the kept counts (module docstring)."""

    kind = "latency"

    def __init__(self, table: LatencyTable, names: Sequence[str],
                 candidates: dict[str, tuple[int, ...]],
                 in_columns: dict[str, int] | None = None) -> None:
        missing = [n for n in names if n not in set(table.layers())]
        if missing:
            raise UserError(f"the latency table has no entry for layer {missing[0]}: it was "
                            "measured for another model")
        self.table, self.names = table, list(names)
        # The table counts a layer's inputs in channels of its input group; a Linear over a
        # flattened C x H x W reads C*H*W columns, which is what the search's counts are in.
        in_columns = in_columns or {}
        self.in_scale = {n: table.channels(n)[1] / in_columns[n] if n in in_columns else 1.0
                         for n in names}
        self.constant, self.per_out = table.overhead()
        self.cells = {n: {(w, a): table.values(n, w, a) for w in candidates[n]
                          for a in candidates[n]} for n in names}
        self.grids = {n: table.grid(n) for n in names}
        self.slopes = {n: {wa: trend_slopes(v, *self.grids[n]) for wa, v in cells.items()}
                       for n, cells in self.cells.items()}

    def __call__(self, kept: dict[str, tuple[Tensor, Tensor]],
                 levels: dict[str, tuple[Tensor, Tensor]],
                 candidates: dict[str, tuple[int, ...]]) -> Tensor:
        total = None
        for n in self.names:
            out, inp = kept[n]
            inp = inp * self.in_scale[n]
            pw, pa = levels[n]
            og, ig = self.grids[n]
            layer = self.per_out.get(n, 0.0) * out
            for i, w in enumerate(candidates[n]):
                for j, a in enumerate(candidates[n]):
                    bo, bi = self.slopes[n][w, a]
                    trend = bo * out + bi * inp
                    value = table_value(self.cells[n][w, a], og, ig, out.detach(),
                                        inp.detach()) + trend - trend.detach()
                    layer = layer + pw[i] * pa[j] * value
            total = layer if total is None else total + layer
        return total + self.constant


class SizeCost:
    """Bytes of the weight initializers as export stores them: 1 byte a weight in the int8
    container, half a byte for weights of 4 bits or fewer when export packs them (`int4`)."""

    kind = "size"

    def __init__(self, weights: str = "int8") -> None:
        if weights not in ("int8", "int4"):
            raise ValueError(f"weights must be int8 or int4, got {weights!r}")
        self.weights = weights

    def bytes_per_weight(self, w_bits: int) -> float:
        # Only 8-bit weights are ever stored narrower than decided (7 bits), in the same byte.
        if w_bits >= FLOAT_BITS:
            return 4.0
        return 0.5 if self.weights == "int4" and w_bits <= 4 else 1.0

    def __call__(self, n_weights: dict[str, Tensor], levels: dict[str, tuple[Tensor, Tensor]],
                 candidates: dict[str, tuple[int, ...]]) -> Tensor:
        total = None
        for n, count in n_weights.items():
            pw = levels[n][0]
            per = sum(pw[i] * self.bytes_per_weight(w) for i, w in enumerate(candidates[n]))
            total = count * per if total is None else total + count * per
        return total


# --- reading targets -----------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "k": 1e3, "mb": 1e6, "m": 1e6, "kib": 1024,
               "mib": 1024**2}


def parse_size(text: str) -> float:
    """`150KB`, `1.5MB`, `200KiB` or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise UserError(f"cannot read size target '{text}' (use 150KB, 1.5MB, 200KiB or bytes)")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"size target must be a positive size, got '{text}'")
    return value


def parse_latency(text: str, fp_ms: float) -> float:
    """`0.5x` (a fraction of the float original's measured latency) or `3.2ms`."""
    s = text.strip().lower()
    try:
        if s.endswith("ms"):
            value = float(s[:-2])
        elif s.endswith("x"):
            value = float(s[:-1]) * fp_ms
        else:
            raise ValueError
    except ValueError:
        raise UserError(f"cannot read latency target '{text}' (use 0.5x of the float model "
                        "or 3.2ms)") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"latency target must be positive, got '{text}'")
    return value


def worst_ratio(values: dict[str, Tensor], targets: Sequence[Target]) -> Tensor:
    """`max_k cost_k / target_k`: the budget the decision exceeds most (or is closest to)."""
    ratios = [values[t.kind] / t.value for t in targets]
    return torch.stack(ratios).max() if len(ratios) > 1 else ratios[0]



def lut_record(table: LatencyTable) -> dict:
    """Where a latency prediction comes from, for the checkpoint and the export report: the
    export measures its artifact in the same runtime and setting to compare."""
    return {"runtime": table.runtime, "runtime_version": table.runtime_version,
            "batch": table.batch, "threads": table.threads, "clock": table.clock,
            "machine": dict(table.machine),
            "fp_original_ms": table.fp_original_ms}
