"""BSQ, bit-level sparsity quantization (DESIGN §7; Yang et al., ICLR 2021): the second search
method. Every middle layer's weight becomes bit planes (`bitplanes.py`) converted from the
trained FP model at 7 magnitude bits (8 bits two's complement); a bit-level group Lasso drives
whole planes to zero; every `requant_every` epochs the planes are rounded and each layer's
precision is re-sized to the planes still in use. Activations stay at fixed bits, first and last
layer at `edge_bits`. No filter pruning: every output channel is kept.

The result is a `searched` checkpoint like any other method's: the layers' state is that of fixed
`QConv2d`/`QLinear` at `w_bits = magnitude bits + 1` with the weight the planes represent, so
fine-tune and export read it unchanged (the planes ride along under each layer's prefix).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from abs_deploy import bops, graph
from abs_deploy.data import Dataset
from abs_deploy.distributed import current
from abs_deploy.errors import UserError
from abs_deploy.modules import get_module, set_module
from abs_deploy.progress import Progress, no_progress
from abs_deploy.search.bitplanes import MAX_MAG_BITS, MIN_MAG_BITS, to_bitplane
from abs_deploy.search.qmodel import make_decision, model_from_checkpoint, quantize_model
from abs_deploy.search.uniform import prepare_quantizers, searched_checkpoint
from abs_deploy.train import (
    EpochLog,
    Method,
    TrainConfig,
    evaluate,
    fit,
    param_groups,
)

TARGET_TOLERANCE = 0.10     # the acceptance: land within 10% of --target-bops
ARRIVE_AT = 0.6             # fraction of the epochs by which the target should be reached
RATE_WINDOW = 3             # re-quantization periods over which the BOPs' descent is measured
BIT_LR_SCALE = 10.0          # learning rate of the bit planes relative to cfg.lr
WEIGHT_BITS_NOTE = ("BSQ weights are sign-magnitude: n magnitude bits are stored and counted "
                    "as n+1-bit two's-complement integers (w_bits = n + 1)")

BitLayer = nn.Module  # a BitPlaneConv2d or BitPlaneLinear


def bsq_search(fp_ckpt: dict, data: Dataset, alpha: float, act_bits: int, cfg: TrainConfig,
               target_bops: float | None = None, requant_every: int = 1, edge_bits: int = 8,
               progress: Progress = no_progress,
               on_epoch_end: Callable[[EpochLog], None] | None = None) -> dict:
    """Search per-layer weight bits of an `fp` checkpoint's model with BSQ; return a `searched`
    checkpoint (method "bsq", every channel kept, BN not folded).

    `alpha` is the regulariser strength. With `target_bops` (an absolute count, or a ratio of
    the FP BOPs when <= 1) alpha is adapted after every re-quantization, and if the last one
    still misses the target by more than 10% whole low planes are added or removed, cheapest
    first, until it does not (recorded in the checkpoint's `bsq.landing`)."""
    if alpha < 0:
        raise UserError(f"--alpha must be >= 0, got {alpha}")
    if requant_every < 1:
        raise UserError(f"--requant-every must be >= 1, got {requant_every}")
    if not 2 <= act_bits <= 8:
        raise UserError(f"--act-bits must be in [2, 8], got {act_bits}")
    model = model_from_checkpoint(fp_ckpt).to(data.device)
    example = torch.zeros(data.input_shape, device=data.device)
    order = graph.layer_order(model, example)
    bn_of = graph.following_norm(model, example)
    costs = bops.layer_costs(model, data.input_shape)
    fp_bops = bops.totals(bops.bops_table(costs))["bops"]
    if target_bops is not None and target_bops <= 1:
        target_bops *= fp_bops
    fp_top1 = evaluate(model, data, "test")

    edges = {costs[0].name, costs[-1].name}
    quantize_model(model, {n: (edge_bits, edge_bits) for n in order if n in edges})
    for name in order:
        if name not in edges:
            set_module(model, name, to_bitplane(get_module(model, name), MAX_MAG_BITS, act_bits))
    layers = {n: get_module(model, n) for n in order if n not in edges}
    model.to(data.device)        # the bit-plane layers' new parameters
    prepare_quantizers(model, data)
    for layer in layers.values():
        layer.sync()    # prepare_quantizers set an MSE clip; a bit-plane layer's clip is s * 2^n

    state = BsqMethod(model, layers, costs, data, cfg, alpha, act_bits, edge_bits, target_bops,
                      requant_every)
    logs = fit(model, data, cfg, state, progress, on_epoch_end)
    if target_bops is not None:
        final = state.land(target_bops)
        if final:
            state.landing.append({"epoch": cfg.epochs, **final})
            recalibrate_bn(model, data, cfg.batch_size)

    decision = make_decision(model, bn_of, order=order)
    extra = {"alpha": alpha, "final_alpha": state.alpha, "act_bits": act_bits,
             "edge_bits": edge_bits, "edge_layers": sorted(edges),
             "requant_every": requant_every, "target_bops": target_bops,
             "magnitude_bits": {n: m.n_bits for n, m in layers.items()},
             "zeroed_layers": sorted(state.zeroed), "saturated_weights": state.saturated,
             "landing": state.landing, "weight_bits": WEIGHT_BITS_NOTE}
    return searched_checkpoint(fp_ckpt, model, decision, data, costs, fp_top1, logs,
                               method="bsq", bsq=extra)


def bit_group_lasso(layers: Mapping[str, BitLayer], total_weights: int) -> Tensor:
    """BSQ's memory-aware bit-level group Lasso: `sum_l (#W_l * n_l / #W_total) *
    sum_i ||[p_i; n_i]||_2`. A plane is one group, so the penalty zeroes whole planes; the
    weighting by a layer's share of the weight memory makes big, wide layers pay most.
    Layers already at the minimum precision are left out: they cannot lose a plane, only be
    driven to zero, which the graph cannot afford."""
    terms = [m.weight.numel() * m.n_bits / total_weights * m.plane_norms().sum()
             for m in layers.values() if m.n_bits > MIN_MAG_BITS]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def adapt_alpha(alpha: float, ratio: float, drop_rate: float, periods_left: int,
                tol: float = TARGET_TOLERANCE) -> float:
    """Next alpha from `ratio` = BOPs / target now and `drop_rate` = the mean log-decrease of
    the BOPs per re-quantization period lately. Above the band, alpha is scaled so that rate
    would reach the band in `periods_left` periods (at most x1.5 or /2 a step, also when nothing
    moved: planes take a few periods to die, and precision only comes down through alpha).
    In the band: quartered, so the remaining epochs train accuracy instead of cutting more
    planes (planes already near zero still die); below it: a tenth, as precision goes back up
    only on overflow, and undershoot is the costly error."""
    if ratio < 1 - tol:
        return alpha * 0.1
    if ratio <= 1 + tol:
        return alpha * 0.25
    if drop_rate <= 0:
        return alpha * 1.5
    need = math.log(ratio) / max(periods_left, 1)
    return alpha * min(1.5, max(0.5, need / drop_rate))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Dataset, batch_size: int) -> None:
    """Recompute every BatchNorm's running statistics over the training set for the weights
    the model has now. Re-quantization and landing change weights at once (landing by whole
    planes), and the running averages of the old weights would make the eval-mode model, the
    checkpoint's top-1 and the BN fold of fine-tune describe a network that no longer exists."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None   # a cumulative average: every batch counts the same
    model.train()
    try:
        for x, _ in data.batches("train", batch_size, augment=False):
            model(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)


class BsqMethod(Method):
    """What BSQ adds to the shared loop: the bit-level group Lasso on the loss, planes clamped
    after each step, and at an epoch's end re-quantization, the landing on the target, BN
    re-calibration and the alpha controller. Its state: the model, its bit layers and alpha.
    The optimizer is rebuilt after every re-quantization because the plane tensors are replaced
    (and change shape when precision changes)."""

    name = "bsq"
    keep_best = False
    amp_safe = False

    def __init__(self, model: nn.Module, layers: dict[str, BitLayer],
                 costs: list[bops.LayerCost], data: Dataset, cfg: TrainConfig, alpha: float,
                 act_bits: int, edge_bits: int, target: float | None,
                 requant_every: int) -> None:
        super().__init__()
        self.model, self.layers, self.costs, self.data, self.cfg = model, layers, costs, data, cfg
        self.alpha, self.act_bits, self.edge_bits, self.target = alpha, act_bits, edge_bits, target
        self.requant_every = requant_every
        self.total_weights = sum(m.weight.numel() for m in layers.values())
        self.zeroed: set[str] = set()
        self.saturated = 0
        self.landing: list[dict] = []
        # Aim to reach the target band this far in, leaving the rest of the epochs to recover
        # accuracy at a small alpha.
        self.arrive_epoch = max(1, round(ARRIVE_AT * cfg.epochs))
        self.seen_bops = [self.bops()]
        self.replaced = False

    def lr_factor(self, step: int, total: int) -> float:
        # A constant rate: the regulariser's pull per epoch is then alpha alone, which is what
        # alpha adaptation steers (a decaying rate would weaken a fixed alpha over time).
        return 1.0

    def loss(self, ce: Tensor, step: int) -> Tensor:
        if self.alpha > 0:
            return ce + self.alpha * bit_group_lasso(self.layers, self.total_weights)
        return ce

    def end_step(self, step: int) -> None:
        for m in self.layers.values():
            m.clamp_planes()

    def end_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        extra = {"alpha": self.alpha}
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % self.requant_every == 0 or last:
            self.requantize()
            self.replaced = True
            extra["requant"] = 1
        if self.target is not None and epoch + 1 == self.arrive_epoch and not last:
            # Planes die in bursts, so alpha alone reaches the band late or overshoots it.
            # Landing here leaves the remaining epochs to recover from the cut.
            # To the target itself, not the band's top: overflow can still add bits.
            landed = self.land(self.target, ceiling=self.target)
            if landed:
                self.landing.append({"epoch": epoch + 1, **landed})
                self.replaced = True
                extra["planes_landed"] = sum(abs(v) for v in landed.values())
        if "requant" in extra or "planes_landed" in extra:
            recalibrate_bn(self.model, self.data, cfg.batch_size)
        now = self.bops()
        current().same_on_all_ranks({"bits": self.bits(), "alpha": self.alpha}, "BSQ's bits")
        extra.update({"bops": now, "mean_w_bits": self.mean_w_bits()})
        if self.target is not None and "requant" in extra and not last:
            periods_left = (self.arrive_epoch - epoch - 1) // self.requant_every
            self.seen_bops.append(now)
            window = self.seen_bops[-RATE_WINDOW - 1:]
            rate = math.log(window[0] / window[-1]) / max(len(window) - 1, 1)
            self.alpha = adapt_alpha(self.alpha, now / self.target, rate, periods_left)
        return extra

    def rebuild(self) -> bool:
        replaced, self.replaced = self.replaced, False
        return replaced

    def requantize(self) -> None:
        for name, m in self.layers.items():
            event = m.requantize()
            self.saturated += event["saturated"]
            if event["zeroed"]:
                self.zeroed.add(name)

    def bits(self) -> dict[str, tuple[int, int]]:
        """(w_bits, a_bits) of every layer as the decision will count them (n + 1 for BSQ)."""
        out = {c.name: (self.edge_bits, self.edge_bits) for c in self.costs}
        out.update({n: (m.w_bits, m.a_bits) for n, m in self.layers.items()})
        return out

    def bops(self) -> int:
        # No filter is pruned, so the table over the float layers' costs equals decision_bops.
        return bops.totals(bops.bops_table(self.costs, self.bits()))["bops"]

    def mean_w_bits(self) -> float:
        n = sum(m.weight.numel() for m in self.layers.values())
        return sum(m.weight.numel() * m.w_bits for m in self.layers.values()) / max(n, 1)

    def land(self, target: float, ceiling: float | None = None) -> dict[str, int]:
        """Bring the BOPs into the target band by whole low planes when alpha alone did not:
        while above `ceiling` (default: the band's top) remove a plane from the widest layer;
        while below the band add one (exact: a zero plane) to the narrowest layer, cheapest
        first. Returns the planes added (+) or removed (-) per layer."""
        hi, lo = target * (1 + TARGET_TOLERANCE), target * (1 - TARGET_TOLERANCE)
        ceiling = hi if ceiling is None else ceiling
        macs = {c.name: c.macs for c in self.costs}
        changes: dict[str, int] = {}
        while self.bops() > ceiling:
            cands = [n for n, m in self.layers.items() if m.n_bits > MIN_MAG_BITS]
            if not cands:
                break
            # The widest layer first: one plane less costs it the least relative precision,
            # and the differences the regulariser made between layers survive.
            name = max(cands, key=lambda n: (self.layers[n].n_bits,
                                              macs[n] * self.layers[n].a_bits))
            self.layers[name].drop_lsb()
            changes[name] = changes.get(name, 0) - 1
        while self.bops() < lo:
            room = hi - self.bops()
            cands = [n for n, m in self.layers.items() if m.n_bits < MAX_MAG_BITS
                     and macs[n] * m.a_bits <= room]
            if not cands:
                break
            name = min(cands, key=lambda n: (self.layers[n].n_bits,
                                             macs[n] * self.layers[n].a_bits))
            self.layers[name].add_lsb()
            changes[name] = changes.get(name, 0) + 1
        return changes

    def optimizers(self, model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        """SGD as in `train.py` (at the constant rate of `lr_factor`). Bit planes get no weight
        decay (the group Lasso is their only pull toward zero) and a larger learning rate, since
        a plane's gradient is the weight's scaled by `s * 2^i`, small against the unit distance
        between bit levels."""
        planes = [p for m in self.layers.values() for p in (m.pos, m.neg)]
        plane_ids = {id(p) for p in planes}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in plane_ids]
        groups = [{"params": planes, "weight_decay": 0.0, "lr": cfg.lr * BIT_LR_SCALE},
                  *param_groups(rest, cfg.weight_decay)]
        return [torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr,
                                momentum=cfg.momentum, nesterov=True)]
