"""MACs and bit operations per layer (DESIGN §6).

`BOPs(layer) = MACs * b_w * b_a`; full precision counts as 32x32. MACs are measured by running the
model once on a zero input with hooks on every Conv2d/Linear, so any capturable model works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from abs_deploy.decision import FLOAT_BITS, Decision
from abs_deploy.device import device_of
from abs_deploy.errors import UserError, first_line


@dataclass
class LayerCost:
    name: str
    kind: str            # "conv" | "linear"
    c_in: int
    c_out: int
    groups: int
    kernel: int          # kh * kw (1 for Linear)
    out_pixels: int      # H_out * W_out (1 for Linear)
    macs: int

    def macs_kept(self, out_kept: int | None = None, in_kept: int | None = None) -> int:
        """MACs after pruning: output and input channels scale the count independently;
        a depthwise conv loses one MAC chain per removed channel, so only `out_kept` matters."""
        out_kept = self.c_out if out_kept is None else out_kept
        if self.groups > 1 and self.groups == self.c_in:
            return out_kept * self.kernel * self.out_pixels
        in_kept = self.c_in if in_kept is None else in_kept
        return out_kept * (in_kept // self.groups) * self.kernel * self.out_pixels


@dataclass
class LayerBops:
    name: str
    macs: int
    w_bits: int
    a_bits: int
    bops: int
    out_kept: int
    c_out: int


def layer_costs(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerCost]:
    """Every Conv2d/Linear of `model` with its MACs, in execution order."""
    costs: list[LayerCost] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            pix = output.shape[-1] * output.shape[-2]
            cost = LayerCost(names[module], "conv", module.in_channels, module.out_channels,
                             module.groups, k, pix, 0)
        else:
            # Linear on a (N, ..., in) input: one dot product per leading position.
            pix = output[0].numel() // module.out_features if output.dim() > 2 else 1
            cost = LayerCost(names[module], "linear", module.in_features, module.out_features,
                             1, 1, pix, 0)
        cost.macs = cost.macs_kept()
        costs.append(cost)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape[1:], device=device_of(model)))
    # The shape is the user's (`abs bops --input-shape`) or the data's: a model that cannot
    # take it (a kernel larger than the image, the wrong channel count) is their input's fault.
    except (RuntimeError, ValueError) as e:
        reason = first_line(e)
        raise UserError(f"the model cannot run on input shape {list(input_shape[1:])}: "
                        f"{reason}") from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return costs


def default_bits(costs: list[LayerCost], w_bits: int, a_bits: int,
                 edge_bits: int = 8) -> dict[str, tuple[int, int]]:
    """Uniform bits with the first and last layer at `edge_bits` (the published convention)."""
    bits = {c.name: (w_bits, a_bits) for c in costs}
    if costs:
        bits[costs[0].name] = (edge_bits, edge_bits)
        bits[costs[-1].name] = (edge_bits, edge_bits)
    return bits


def bops_table(costs: list[LayerCost], bits: Mapping[str, tuple[int, int]] | None = None,
               out_kept: Mapping[str, int] | None = None,
               in_kept: Mapping[str, int] | None = None) -> list[LayerBops]:
    """Per-layer BOPs. Layers absent from `bits` count as full precision (32x32)."""
    bits, out_kept, in_kept = bits or {}, out_kept or {}, in_kept or {}
    rows = []
    for c in costs:
        wb, ab = bits.get(c.name, (FLOAT_BITS, FLOAT_BITS))
        macs = c.macs_kept(out_kept.get(c.name), in_kept.get(c.name))
        rows.append(LayerBops(c.name, macs, wb, ab, macs * wb * ab,
                              out_kept.get(c.name, c.c_out), c.c_out))
    return rows


def totals(rows: list[LayerBops]) -> dict[str, int]:
    return {"macs": sum(r.macs for r in rows), "bops": sum(r.bops for r in rows)}


def rows_as_dicts(rows: list[LayerBops]) -> list[dict]:
    return [asdict(r) for r in rows]


def parse_bops(text: str, fp_bops: float) -> float:
    """A BOP target: a ratio of FP (`0.05`), a compression factor (`20x`) or a count (`35M`)."""
    s = text.strip().lower().replace(",", "")
    scale = {"x": None, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}.get(s[-1:], 1.0)
    try:
        value = float(s[:-1] if s[-1:] in "xkmgt" else s)
    except ValueError:
        raise ValueError(f"cannot read BOP target '{text}' (use 0.05, 20x, 35M or 1.2G)") from None
    # float() reads "nan" and "inf" too; neither is a target a search can land on.
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"BOP target must be a positive finite number, got '{text}'")
    if scale is None:
        return fp_bops / value
    if scale != 1.0:
        return value * scale
    return value * fp_bops if value <= 1 else value


def decision_bops(decision: Decision, arch: dict, input_shape: list[int]) -> list[LayerBops]:
    """Per-layer BOPs of a decision: its bits, its kept outputs, and for each consumer the
    inputs its producers kept (found from the float architecture's channel groups)."""
    from abs_deploy import graph
    from abs_deploy.models.registry import build_model

    model = build_model(arch)
    kept = decision.kept()
    in_kept = {}
    if any(len(k) < model.get_submodule(n).weight.shape[0] for n, k in kept.items()):
        groups = graph.channel_groups(model, torch.zeros(input_shape))
        in_kept = graph.input_kept(groups, kept)
    return bops_table(layer_costs(model, tuple(input_shape)), decision.bits(),
                      out_kept={n: len(k) for n, k in kept.items()}, in_kept=in_kept)
