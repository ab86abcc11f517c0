"""ABS search (DESIGN §4, §5): turn a trained FP model into its super-bit twin, train weights and
gates against `CE + lam * log(BOPs)`, land on a BOP target, read the decision out.

The steps, top-down:
1. `to_superbit` swaps every Conv2d/Linear for its super-bit twin (first and last layer fixed at
   `edge_bits`) and puts one filter gate on every prunable channel group of `graph.py`; the gate
   masks each producer's channels after its BatchNorm, so a pruned channel is exactly zero.
2. `SuperBitNet.bops` is the model's BOPs as a function of the gates (telescoping bit increments;
   a pruned group lowers its producers' outputs and its consumers' inputs). Gates are hard in the
   forward pass, so this is exactly the `bops.decision_bops` of the read-out decision.
3. `start_thresholds` opens every gate the same distance from closing, so which gates close
   first is decided by loss against BOPs, not by how far each tensor's statistics put it from its
   threshold. The search loop alternates weight-gate and activation-gate steps and, with a
   target, adapts `lam` (`controller.py`, proportional-integral on log(BOPs / target)): up while
   above the target, down while below -- through zero if need be, so a search that overshot
   reopens gates instead of stalling (nothing else pulls a closed gate open once the training
   loss is near zero). The integral restarts at every crossing of the target: the gates react
   with a lag, and a wound-up integral would carry the search far past it.
4. Gradient search oscillates around the target, so a last `project` step walks the hard decision
   into the 5% band: greedy one-level/one-filter-step moves, each chosen as the least loss increase
   per BOP saved (or the most loss decrease per BOP added when below), measured on held-out
   training batches. A short re-train of the weights at the fixed decision follows. A search
   given a latency table keeps only the counts the table measured (`SuperBitNet.snap_to`):
   the hard decision is rounded up to them, and a projection move goes to any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abs_deploy import bops, graph
from abs_deploy.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from abs_deploy.data import Dataset
from abs_deploy.decision import Decision
from abs_deploy.device import device_of
from abs_deploy.distributed import current
from abs_deploy.errors import UserError
from abs_deploy.modules import get_module, set_module
from abs_deploy.progress import Progress, no_progress
from abs_deploy.search.controller import RELAY, ControllerGains, LambdaController
from abs_deploy.search.costs import (
    LatencyCost,
    SizeCost,
    Target,
    level_weights,
    lut_record,
    worst_ratio,
)
from abs_deploy.search.qmodel import calibrate, make_decision, model_from_checkpoint
from abs_deploy.search.superbit import (
    SUPERBIT_TYPES,
    TAU,
    filter_gate,
    filter_norms,
    superbit_from_float,
)
from abs_deploy.search.uniform import searched_checkpoint
from abs_deploy.train import (
    EpochLog,
    Method,
    ResumeFile,
    TrainConfig,
    evaluate,
    fit,
    param_groups,
)

if TYPE_CHECKING:
    from abs_deploy.latency_table import LatencyTable

REACH = 2 * TAU        # how far past its largest residual a threshold may go (see clamp)
GATE_LR = 0.1          # plain SGD on thresholds: a gate moves in proportion to its layer's
                       # share of the BOPs, which is what ranks layers (Adam would equalise them)
PROJECT_SAMPLES = 128  # validation images the projection step measures the loss on
GATE_MARGIN = TAU      # every gate starts open, this far below the value at which it closes


@dataclass
class GateGroup:
    """A prunable channel group and its filter gate (threshold `f_thr` on its first producer)."""

    id: int
    channels: int
    producers: list[str]
    consumers: list[str]
    depthwise: list[str]
    spatial: dict[str, int]
    masked: list[str]                 # modules whose output the mask multiplies (BN or layer)
    pinned_kept: int | None = None    # kept count pinned by the projection step
    allowed: list[int] | None = None  # the kept counts a decision may have (None: any)
    mask: Tensor | None = field(default=None, repr=False)

    @property
    def owner(self) -> str:
        return self.producers[0]


class SuperBitNet:
    """The super-bit model plus the model-level view the gates need: layer costs, groups, the
    differentiable BOPs and the decision read-out. `model` is an ordinary nn.Module."""

    def __init__(self, model: nn.Module, order: list[str], bn_of: dict[str, str | None],
                 costs: dict[str, bops.LayerCost], groups: list[GateGroup],
                 max_prune: float) -> None:
        self.model, self.order, self.bn_of, self.costs = model, order, bn_of, costs
        self.groups, self.max_prune = groups, max_prune
        self.group_of = {p: g for g in groups for p in g.producers}
        self.feeds: dict[str, list[GateGroup]] = {n: [] for n in order}
        for g in groups:
            for c in g.consumers:
                self.feeds[c].append(g)
        self.layers = {n: get_module(model, n) for n in order}
        self.cost_fns: dict[str, LatencyCost | SizeCost] = {}

    # -- filter gates ------------------------------------------------------------------------

    def norms(self, g: GateGroup) -> Tensor:
        return filter_norms([self.layers[p].weight for p in g.producers])

    def group_mask(self, g: GateGroup) -> Tensor:
        if g.pinned_kept is not None:
            norms = self.norms(g)
            keep = torch.argsort(norms, descending=True, stable=True)[:g.pinned_kept]
            mask = norms.new_zeros(g.channels)
            mask[keep] = 1.0
            return mask
        return filter_gate(self.norms(g), self.layers[g.owner].f_thr, self.max_prune,
                           limit=self.limit(g))

    def limit(self, g: GateGroup) -> int:
        """The most channels `g` may drop: `max_prune` of them, never all, and with `allowed`
        counts down to the fewest of those."""
        if g.allowed:
            return g.channels - g.allowed[0]
        return min(int(self.max_prune * g.channels), g.channels - 1)

    def fewest(self, g: GateGroup) -> int:
        """The fewest channels `g` may keep."""
        return g.channels - self.limit(g)

    def snap(self, g: GateGroup, kept: int) -> int:
        """`kept` as a count `g` may keep: the allowed count at or above it."""
        if not g.allowed:
            return kept
        return next((k for k in g.allowed if k >= kept), g.allowed[-1])

    def snap_to(self, lut: LatencyTable) -> None:
        """Let every group keep only the counts `lut` measured (its layers' grids): between
        grid points a table only interpolates, and on int8 kernels a count off the runtime's
        preferred multiple is a cliff no interpolation sees (`profile.ProfileOptions`)."""
        fewest = {g.id: self.fewest(g) for g in self.groups}
        for g in self.groups:
            grid = lut.grid(g.owner)[0]
            if len(grid) > 1:
                g.allowed = [k for k in grid if k >= fewest[g.id]] or [g.channels]

    def align(self, multiple: int) -> None:
        """Let every group keep only multiples of `multiple` channels (or all of them), where
        two such counts fit it; the others keep any count."""
        if multiple <= 1:
            return
        for g in self.groups:
            g.allowed = graph.aligned_counts(g.channels, self.fewest(g), multiple) or None

    @contextlib.contextmanager
    def smallest(self) -> Iterator[None]:
        """Within: the smallest decision the space holds (lowest bits, fewest channels kept);
        the pins the gates had are back afterwards."""
        bits = {n: m.pinned_bits for n, m in self.layers.items()}
        kept = {g.id: g.pinned_kept for g in self.groups}
        for m in self.layers.values():
            m.pinned_bits = (m.candidates[0], m.candidates[0])
        for g in self.groups:
            g.pinned_kept = self.fewest(g)
        try:
            yield
        finally:
            for n, m in self.layers.items():
                m.pinned_bits = bits[n]
            for g in self.groups:
                g.pinned_kept = kept[g.id]

    def refresh_masks(self) -> None:
        for g in self.groups:
            g.mask = self.group_mask(g)

    # -- BOPs and the decision ----------------------------------------------------------------

    def kept_counts(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Every layer's kept (output, input) channels as float64 tensors, differentiable in
        the filter thresholds; a depthwise conv's inputs are its outputs."""
        kept = {g.id: self.group_mask(g).double().sum() for g in self.groups}
        one = torch.ones((), dtype=torch.float64, device=device_of(self.model))
        out = {}
        for name in self.order:
            c = self.costs[name]
            g = self.group_of.get(name)
            n_out = kept[g.id] if g is not None else one * c.c_out
            if c.groups > 1 and c.groups == c.c_in:
                out[name] = (n_out, n_out)
                continue
            n_in = one * c.c_in
            for f in self.feeds[name]:
                n_in = n_in - (f.channels - kept[f.id]) * f.spatial.get(name, 1)
            out[name] = (n_out, n_in)
        return out

    def weight_counts(self, kept: dict[str, tuple[Tensor, Tensor]] | None = None
                      ) -> dict[str, Tensor]:
        """Weights each layer keeps (its MACs per output pixel)."""
        kept = self.kept_counts() if kept is None else kept
        out = {}
        for name, (n_out, n_in) in kept.items():
            c = self.costs[name]
            per_out = 1.0 if c.groups > 1 and c.groups == c.c_in else n_in / c.groups
            out[name] = n_out * per_out * c.kernel
        return out

    def levels(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Each layer's weight and input level weights (`costs.level_weights`)."""
        return {n: (level_weights(m.w_gates()).double(), level_weights(m.a_gates()).double())
                for n, m in self.layers.items()}

    def candidates(self) -> dict[str, tuple[int, ...]]:
        return {n: m.candidates for n, m in self.layers.items()}

    def bops(self) -> Tensor:
        """BOPs of the current gates (float64, differentiable in every threshold)."""
        total = torch.zeros((), dtype=torch.float64, device=device_of(self.model))
        for name, count in self.weight_counts().items():
            layer = self.layers[name]
            macs = count * self.costs[name].out_pixels
            total = total + macs * layer.w_bits_t().double() * layer.a_bits_t().double()
        return total

    def cost(self, kind: str) -> Tensor:
        """BOPs, or a cost given by `use_cost` (latency, size), at the current gates."""
        if kind == "bops":
            return self.bops()
        fn = self.cost_fns.get(kind)
        if fn is None:
            raise KeyError(f"no {kind} cost set on this search")
        kept = self.kept_counts()
        arg = kept if kind == "latency" else self.weight_counts(kept)
        return fn(arg, self.levels(), self.candidates())

    def use_cost(self, fn: LatencyCost | SizeCost) -> None:
        self.cost_fns[fn.kind] = fn

    def kept(self) -> dict[str, list[int]]:
        out = {}
        for g in self.groups:
            idx = torch.nonzero(self.group_mask(g).detach() > 0.5).flatten().tolist()
            for p in g.producers:
                out[p] = [int(i) for i in idx]
        return out

    def decision(self) -> Decision:
        return make_decision(self.model, self.bn_of, self.kept(), self.order)

    def histogram(self) -> str:
        """`w 2:3 4:5 8:2  a ...  pruned 12/96` for the progress display."""
        w: dict[int, int] = {}
        a: dict[int, int] = {}
        for m in self.layers.values():
            w[m.w_bits] = w.get(m.w_bits, 0) + 1
            a[m.a_bits] = a.get(m.a_bits, 0) + 1
        pruned = sum(g.channels - int(self.group_mask(g).sum()) for g in self.groups)
        total = sum(g.channels for g in self.groups)
        fmt = lambda h: " ".join(f"{b}:{h[b]}" for b in sorted(h))  # noqa: E731
        return f"w {fmt(w)} | a {fmt(a)} | pruned {pruned}/{total}"

    # -- parameters ------------------------------------------------------------------------------

    def thresholds(self, kind: str) -> list[nn.Parameter]:
        """`"w"` (weight and filter thresholds) or `"a"` (activation thresholds)."""
        out = []
        for m in self.layers.values():
            if not m.searchable:
                continue
            out.append(m.w_thr if kind == "w" else m.a_thr)
        if kind == "w":
            out += [self.layers[g.owner].f_thr for g in self.groups]
        return out

    def weight_params(self) -> list[nn.Parameter]:
        gate = {id(p) for p in self.thresholds("w") + self.thresholds("a")}
        return [p for p in self.model.parameters() if id(p) not in gate]

    @torch.no_grad()
    def clamp_thresholds(self) -> None:
        """Keep every threshold in [0, m_max + REACH]: past the largest residual (or norm) it
        gates can close on, a threshold changes nothing but drifts out of the sigmoid's reach,
        and the gate could never reopen when `lam` turns."""
        for m in self.layers.values():
            if not m.searchable:
                continue
            mw = m.w_residuals()
            m.w_thr.copy_(torch.minimum(m.w_thr.clamp(min=0.0), mw + REACH))
            m.a_thr.copy_(torch.minimum(m.a_thr.clamp(min=0.0), m.a_m + REACH))
        for g in self.groups:
            n = self.norms(g)
            limit = self.limit(g)
            top = torch.sort(n).values[limit - 1] if limit > 0 else n.new_tensor(0.0)
            r = self.layers[g.owner].f_thr
            r.copy_(torch.minimum(r.clamp(min=0.0), top + REACH))

    def pin(self, bits: tuple[int, int]) -> None:
        """Hold every searchable layer at `bits` (w, a) and keep every filter: the search's
        training path with no decision to make (an ablation against plain QAT)."""
        for m in self.layers.values():
            if m.searchable:
                if bits[0] not in m.candidates or bits[1] not in m.candidates:
                    raise UserError(f"pinned bits {bits} are not among the candidates "
                                    f"{m.candidates}")
                m.pinned_bits = tuple(bits)
        for g in self.groups:
            g.pinned_kept = g.channels

    def freeze(self) -> None:
        """Pin the current hard decision (bits and kept counts); gates stop moving."""
        for m in self.layers.values():
            m.pinned_bits = (m.w_bits, m.a_bits)
        for g in self.groups:
            g.pinned_kept = self.snap(g, int(self.group_mask(g).sum()))


def to_superbit(model: nn.Module, example_input: Tensor,
                candidates: Sequence[int] = (2, 4, 8), max_prune: float = 0.5,
                edge_bits: int | None = 8, allow_shared: bool = False) -> SuperBitNet:
    """Swap every Conv2d/Linear the forward pass calls for its super-bit twin (in place).
    `edge_bits` fixes the first and last layer (None: search them too)."""
    order = graph.layer_order(model, example_input)
    bn_of = graph.following_norm(model, example_input)
    raw = graph.channel_groups(model, example_input, allow_shared=allow_shared)
    costs = {c.name: c for c in bops.layer_costs(model, tuple(example_input.shape))}
    for i, name in enumerate(order):
        edge = edge_bits is not None and i in (0, len(order) - 1)
        set_module(model, name, superbit_from_float(get_module(model, name),
                                                    (edge_bits,) if edge else candidates))
    groups = []
    for g in raw:
        if not g.prunable or not g.producers or max_prune <= 0:
            continue
        masked = [bn_of.get(p) or p for p in g.producers]
        groups.append(GateGroup(g.id, g.channels, list(g.producers), list(g.consumers),
                                list(g.depthwise), dict(g.spatial), masked))
    net = SuperBitNet(model, order, bn_of, costs, groups, max_prune)
    for g in groups:
        get_module(model, g.owner).register_parameter("f_thr", nn.Parameter(torch.zeros(())))
        for target in g.masked:
            get_module(model, target).register_forward_hook(_mask_hook(g))
    model.register_forward_pre_hook(lambda module, args: net.refresh_masks())
    return net


def _mask_hook(g: GateGroup) -> Callable:
    def hook(module, inputs, output):
        return output * g.mask.view((1, -1) + (1,) * (output.dim() - 2)).to(output.dtype)
    return hook


# --- the search ------------------------------------------------------------------------------


def abs_search(fp_ckpt: dict, data: Dataset, target_bops: float | None, cfg: TrainConfig,
               lam: float | None = None, candidates: Sequence[int] = (2, 4, 8),
               max_prune: float = 0.5, edge_bits: int | None = 8,
               progress: Progress = no_progress,
               on_epoch_end: Callable[[EpochLog], None] | None = None,
               resume_path: str | None = None, tolerance: float = 0.05,
               refine_epochs: int = 1, gate_lr: float = GATE_LR,
               gate_margin: float | None = GATE_MARGIN,
               pin_bits: tuple[int, int] | None = None, lsq_scale: bool = True,
               swap_samples: int = 0, gains: ControllerGains = RELAY,
               on_step: Callable[[float, float], None] | None = None,
               targets: Sequence[Target] = (), lut: LatencyTable | None = None,
               weights: str = "int8", channel_multiple: int = 1) -> dict:
    """ABS search from an `fp` checkpoint; returns a `searched` checkpoint (method "abs").

    `target_bops` (absolute, see `bops.parse_bops`) makes `lam` adapt and the final decision land
    within `tolerance` of it; without a target, `lam` stays fixed (the paper's mode). With
    `resume_path`, the search state is written there after every epoch, and a search started with
    an existing file continues from it. `gate_margin` (None: thresholds at 0) is where every
    gate starts, see `start_thresholds`. `pin_bits` holds every gate at one (w, a) decision with
    nothing pruned and no BOP loss: the super-bit training path alone, for ablations.
    `lsq_scale=False` trains the clips without LSQ's gradient scale, as the search did before
    (for the ablation that measured it). `swap_samples` > 0 runs `swap` after the projection.
    `gains` sets the lam controller; `on_step(bops, lam)` sees every step.

    `targets` adds budgets in other units (`costs.Target`: latency from `lut`, the weights'
    stored bytes with export's `weights` storage); with several, the controller drives the one
    the decision exceeds most (`costs.worst_ratio`) and the decision lands in the band of that
    one, at or under the others. A decision keeps only `channel_multiple` multiples of each
    group's channels (`SuperBitNet.align`), or, given `lut`, only the counts it measured."""
    if pin_bits is not None:
        target_bops, lam, targets = None, 0.0, ()
    targets = ([Target("bops", target_bops, f"{target_bops:.6g}")]
               if target_bops is not None else []) + list(targets)
    cands = _check_settings(candidates, targets, lam, max_prune)
    model = model_from_checkpoint(fp_ckpt).to(data.device)
    fp_top1 = evaluate(model, data, "test")
    costs = bops.layer_costs(model, data.input_shape)
    fp_bops = float(bops.totals(bops.bops_table(costs))["bops"])
    net = _superbit_net(model, data, cands, max_prune, edge_bits, lsq_scale, gate_margin)
    if lut is None:
        net.align(channel_multiple)
    _use_costs(net, targets, lut, weights)
    _check_targets(net, targets)
    if pin_bits is not None:
        net.pin(pin_bits)

    ctl = (LambdaController(1.0, tolerance, gains, 0.0 if lam is None else float(lam))
           if targets else None)
    method = AbsMethod(net, fp_bops, 0.0 if lam is None else float(lam), ctl, gate_lr,
                       targets, on_step)
    method.find_unused_parameters = pin_bits is not None   # pinned gates leave thresholds idle
    resume = None
    if resume_path:
        resume = _SearchState(resume_path, fp_ckpt, net, {
            "arch": fp_ckpt["arch"], "target_bops": target_bops,
            "targets": [t.as_record() for t in targets], "candidates": list(cands),
            "max_prune": max_prune, "edge_bits": edge_bits, "epochs": cfg.epochs,
            "seed": cfg.seed, "channel_multiple": channel_multiple})
    logs = fit(model, data, cfg, method, progress, on_epoch_end, resume)

    searched_bops = net.bops().item()
    moves, swapped = _settle(net, data, targets, tolerance, swap_samples)
    if refine_epochs > 0:
        logs += _refine(net, data, cfg, refine_epochs, progress)
    decision = net.decision()
    extra = {"targets": _target_records(net, targets, lut, weights)} if targets else {}
    return searched_checkpoint(fp_ckpt, model, decision, data, list(costs), fp_top1, logs,
                               method="abs", target_bops=target_bops, lam=method.lam,
                               candidates=list(cands), max_prune=max_prune,
                               channel_multiple=channel_multiple, search_bops=searched_bops,
                               projection_moves=moves, swap=swapped, **extra)


def _check_settings(candidates: Sequence[int], targets: Sequence[Target], lam: float | None,
                    max_prune: float) -> tuple[int, ...]:
    """The candidate bitwidths as ints, once the settings are known to make a search."""
    cands = tuple(int(b) for b in candidates)
    if list(cands) != sorted(set(cands)) or cands[0] < 1 or cands[-1] > 8:
        raise UserError(f"candidates must be distinct ascending bitwidths in 1..8, got {cands}")
    if not targets and lam is None:
        raise UserError("give a target (BOPs, latency or size) or a fixed lam")
    kinds = [t.kind for t in targets]
    if len(set(kinds)) != len(kinds):
        raise UserError(f"one target per kind, got {kinds}")
    if not 0 <= max_prune < 1:
        raise UserError(f"max_prune must be in [0, 1), got {max_prune}")
    return cands


def _superbit_net(model: nn.Module, data: Dataset, cands: tuple[int, ...], max_prune: float,
                  edge_bits: int | None, lsq_scale: bool, gate_margin: float | None
                  ) -> SuperBitNet:
    """`model` turned super-bit, its clips calibrated and its gates opened (`start_thresholds`).
    Every rank reads the same unsharded batches here, so all start from the same clips."""
    net = to_superbit(model, torch.zeros(data.input_shape, device=data.device), cands,
                      max_prune, edge_bits)
    model.to(data.device)        # the super-bit layers' new clips, thresholds and gates
    for layer in net.layers.values():
        layer.lsq_scale = lsq_scale
    calibrate(model, (x for x, _ in islice(data.batches("train", 128, shuffle=True), 4)))
    if gate_margin is not None:
        start_thresholds(net, (x for x, _ in islice(data.batches("train", 128, shuffle=True),
                                                    4)), gate_margin)
    return net


def _settle(net: SuperBitNet, data: Dataset, targets: Sequence[Target], tolerance: float,
            swap_samples: int) -> tuple[int, dict | None]:
    """The search's last hard decision, frozen and the same on every rank: with targets,
    first projected into the band of the binding one (and, with `swap_samples`, improved by
    equal-cost swaps). Returns the projection's moves and the swap's summary."""
    moves, swapped = 0, None
    if targets:
        ratio = _ratio_fn(net, targets)
        moves = project(net, data, 1.0, tolerance, measure=ratio)
        if swap_samples:
            swapped = swap(net, data, 1.0, tolerance, swap_samples, measure=ratio)
    net.freeze()
    _agree(net)
    return moves, swapped


class AbsMethod(Method):
    """What the ABS search adds to the shared loop: the cost term `lam * log(C)`, the gates'
    own plain-SGD optimizer, weight (and filter) gates and activation gates trained on
    alternate steps, thresholds clamped after each step, and `lam` from the controller.

    `C` is `max_k cost_k / target_k` with targets (one BOP target: `BOPs / T`, whose gradient
    is the paper's `log(BOPs / fp_bops)`'s), and `BOPs / fp_bops` with a fixed `lam`."""

    name = "abs search"
    keep_best = False             # the search's last state is its result, not its best epoch
    amp_safe = False

    def __init__(self, net: SuperBitNet, fp_bops: float, lam: float,
                 ctl: LambdaController | None, gate_lr: float, targets: Sequence[Target],
                 on_step: Callable[[float, float], None] | None) -> None:
        super().__init__()
        self.net, self.fp_bops, self.lam, self.ctl = net, fp_bops, lam, ctl
        self.gate_lr, self.targets, self.on_step = gate_lr, list(targets), on_step
        self.values: dict[str, Tensor] = {}
        self.ratio: Tensor | None = None

    def optimizers(self, model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        net = self.net
        weights = torch.optim.SGD(param_groups(net.weight_params(), cfg.weight_decay),
                                  lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
        gates = torch.optim.SGD(net.thresholds("w") + net.thresholds("a"), lr=self.gate_lr)
        return [weights, gates]

    def loss(self, ce: Tensor, step: int) -> Tensor:
        kinds = {"bops"} | {t.kind for t in self.targets}
        self.values = {k: self.net.cost(k) for k in kinds}
        self.ratio = (worst_ratio(self.values, self.targets) if self.targets
                      else self.values["bops"] / self.fp_bops)
        return ce + self.lam * torch.log(self.ratio)

    def before_update(self, step: int) -> None:
        # Weight (and filter) gates move on even steps, activation gates on odd ones. Their
        # gradients are computed on every step (DDP needs every step's backward to be the
        # same) and the resting kind's are dropped here.
        for p in self.net.thresholds("a" if step % 2 == 0 else "w"):
            p.grad = None

    def end_step(self, step: int) -> None:
        self.net.clamp_thresholds()
        if self.ctl is not None:
            self.lam = self.ctl.update(self.ratio.item())
        if self.on_step is not None:
            self.on_step(self.values["bops"].item(), self.lam)

    def postfix(self) -> str:
        shown = []
        for kind in ("bops", "latency", "size"):
            if kind not in self.values:
                continue
            v = self.values[kind].item()
            t = next((t.value for t in self.targets if t.kind == kind), None)
            shown.append(_fmt_cost(kind, v) + (f"/{_fmt_cost(kind, t)}" if t else ""))
        return f"{' '.join(shown)} lam {self.lam:.3g} {self.net.histogram()}"

    def end_epoch(self, epoch: int) -> dict:
        with torch.no_grad():
            values = {k: self.net.cost(k).item()
                      for k in {"bops"} | {t.kind for t in self.targets}}
        current().same_on_all_ranks({"decision": self.net.decision().to_record(),
                                     "lam": self.lam},
                                    "the search's gates and lam")
        cur = values["bops"]
        extra = {"bops": cur, "fp_ratio": self.fp_bops / cur, "lam": self.lam,
                 "bits": self.net.histogram()}
        for kind, key in (("latency", "latency_ms"), ("size", "size_bytes")):
            if kind in values:
                extra[key] = values[kind]
        if self.targets:
            extra["target_ratio"] = max(values[t.kind] / t.value for t in self.targets)
        return extra

    def state_dict(self) -> dict:
        return {"lam": self.lam, "controller": self.ctl.state_dict() if self.ctl else None,
                "a_signed": {n: bool(m.a_signed) for n, m in self.net.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.lam = state["lam"]
        if self.ctl is not None and isinstance(state.get("controller"), dict):
            self.ctl.load_state_dict(state["controller"])
        for n, signed in state["a_signed"].items():
            self.net.layers[n].a_signed = signed


def _agree(net: SuperBitNet) -> None:
    """Rank 0's frozen decision on every rank, then checked: the projection measures losses,
    and on a GPU two ranks' sums may round differently and pick different moves."""
    dist = current()
    pinned = dist.broadcast({"layers": {n: list(m.pinned_bits) for n, m in net.layers.items()},
                             "groups": {g.id: g.pinned_kept for g in net.groups}})
    for n, m in net.layers.items():
        m.pinned_bits = tuple(pinned["layers"][n])
    for g in net.groups:
        g.pinned_kept = pinned["groups"][g.id]
    dist.same_on_all_ranks(net.decision().to_record(), "the searched decision")


class _Refine(Method):
    name = "refine"
    keep_best = False
    amp_safe = False
    find_unused_parameters = True


def _refine(net: SuperBitNet, data: Dataset, cfg: TrainConfig, epochs: int,
            progress: Progress) -> list[EpochLog]:
    """A short re-train of the weights at the frozen decision. The thresholds no longer act
    (every gate is pinned), so they leave the trained set; and a pinned level leaves some
    clips idle too, which DDP must be told to expect."""
    for p in net.thresholds("w") + net.thresholds("a"):
        p.requires_grad_(False)
    logs = fit(net.model, data, dataclasses.replace(cfg, epochs=epochs, lr=cfg.lr * 0.1),
               _Refine(net.weight_params()), progress)
    for log in logs:
        log.extra["phase"] = "refine"
    return logs


@torch.no_grad()
def start_thresholds(net: SuperBitNet, batches: Iterable[Tensor],
                     margin: float = GATE_MARGIN) -> None:
    """Open every gate at the same distance `margin` below the value at which it would close.

    A threshold's gradient is the loss gradient times the sigmoid slope at `(m - r) / TAU`, so
    with every `r` at 0 the slope is set by `m` alone: post-ReLU activations (half zeros, m ~
    0.13 coarse steps) would move 3x faster than weights (m ~ 0.26) and filter gates (norms
    0.5-1) 40x slower, and the search would spend the BOPs by tensor statistics instead of
    by loss against BOPs (measured on digits_cnn: 2-bit inputs to the large layers, 8/8 head,
    no filter ever pruned). Starting at equal distance, gates race only on their gradients.
    The activation residuals come from a few training-mode batches with BatchNorm frozen."""
    model = net.model
    was = model.training
    model.train()
    bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bn_layers:
        m.eval()
    for x in batches:
        model(x)
    model.train(was)
    for m in net.layers.values():
        if m.searchable:
            m.w_thr.copy_((m.w_residuals() - margin).clamp(min=0.0))
            m.a_thr.copy_((m.a_m - margin).clamp(min=0.0))
    for g in net.groups:
        # The first filter to close is the weakest one the max_prune rule lets go.
        net.layers[g.owner].f_thr.fill_(max(float(net.norms(g).min()) - margin, 0.0))


def _use_costs(net: SuperBitNet, targets: Sequence[Target], lut: LatencyTable | None,
               weights: str) -> None:
    """Give the net the cost functions its targets (and a given table) need."""
    kinds = {t.kind for t in targets}
    if "latency" in kinds and lut is None:
        raise UserError("a latency target needs a latency table (--lut, from `abs profile`)")
    if lut is not None:
        net.use_cost(LatencyCost(lut, net.order, net.candidates(),
                                 {n: c.c_in for n, c in net.costs.items()}))
        _check_grids(net, lut)
        net.snap_to(lut)
    if "size" in kinds:
        net.use_cost(SizeCost(weights))


def _check_grids(net: SuperBitNet, lut: LatencyTable) -> None:
    """Below what it was profiled for a table can only guess (interpolation holds the end
    value): refuse a search that may keep fewer channels than the table's `max_prune` allowed.
    (Its grid may start higher, at a multiple of its channel multiple; the search then keeps
    grid counts only, `SuperBitNet.snap_to`.)"""
    with torch.no_grad(), net.smallest():
        fewest = net.kept_counts()
    for name, (out, inp) in fewest.items():
        counts = (out, inp * lut.channels(name)[1] / net.costs[name].c_in)
        for side, grid, kept, total in zip(("output", "input"), lut.grid(name), counts,
                                           lut.channels(name), strict=True):
            profiled = min(grid[0], max(1, math.ceil((1 - lut.max_prune) * total - 1e-9)))
            # One point: a side the table does not prune (it ignores the count there).
            if len(grid) > 1 and profiled > kept.item() + 1e-9:
                raise UserError(f"the latency table's {side} grid for {name} starts at "
                                f"{profiled} channels; this search may keep {kept.item():.0f} "
                                f"(profile with --max-prune {net.max_prune:g})")


def _ratio_fn(net: SuperBitNet, targets: Sequence[Target]) -> Callable[[], float]:
    def ratio() -> float:
        with torch.no_grad():
            return worst_ratio({t.kind: net.cost(t.kind) for t in targets}, targets).item()
    return ratio


def _extremes(net: SuperBitNet, kinds: Sequence[str]) -> tuple[dict, dict]:
    """Every cost at the smallest decision (lowest bits, most pruned) and at the open gates
    the search starts from (top bits, nothing pruned)."""
    with torch.no_grad():
        hi = {k: net.cost(k).item() for k in kinds}
        with net.smallest():
            lo = {k: net.cost(k).item() for k in kinds}
    return lo, hi


def _check_targets(net: SuperBitNet, targets: Sequence[Target]) -> None:
    """A target outside what the search space can reach is a user error, said up front."""
    if not targets:
        return
    lo, hi = _extremes(net, [t.kind for t in targets])
    for t in targets:
        if not lo[t.kind] <= t.value <= hi[t.kind]:
            name = {"bops": "BOP", "latency": "latency", "size": "size"}[t.kind]
            raise UserError(f"{name} target {_fmt_cost(t.kind, t.value)} is outside what this "
                            f"search space reaches ({_fmt_cost(t.kind, lo[t.kind])} .. "
                            f"{_fmt_cost(t.kind, hi[t.kind])})")


def _fmt_cost(kind: str, value: float) -> str:
    if kind == "latency":
        return f"{value:,.3g} ms"
    if kind == "size":
        return f"{value / 1e3:,.1f} KB"
    return f"{value / 1e6:,.2f} M"


def _target_records(net: SuperBitNet, targets: Sequence[Target], lut: LatencyTable | None,
                    weights: str) -> list[dict]:
    """What the checkpoint says about each target: its value and what the frozen decision is
    predicted to cost (BOPs: exact), with where the prediction comes from."""
    out = []
    with torch.no_grad():
        for t in targets:
            rec = t.as_record(net.cost(t.kind).item())
            if t.kind == "latency" and lut is not None:
                rec["lut"] = lut_record(lut)
            if t.kind == "size":
                rec["weights"] = weights
            out.append(rec)
    return out


# --- projection onto the target ----------------------------------------------------------------


def project(net: SuperBitNet, data: Dataset, target: float, tolerance: float = 0.05,
            max_rounds: int = 50, measure: Callable[[], float] | None = None) -> int:
    """Move the hard decision into `[1 - tol, 1 + tol] * target` (tol: 80% of `tolerance`, a
    margin that costs nothing since the count is exact). Returns the number of moves made.
    `measure` is the cost projected (default: the BOPs; the search with several targets passes
    the worst cost-to-target ratio, with `target` 1).

    Each round measures every single move (one bit level of one layer's weights or inputs, or one
    step of a group's filters) on validation batches (it chooses, so never on the test split),
    ranks them by loss change per BOP, and applies them best-first, at most one per layer and
    kind, until the band is reached; the next round re-measures. Rounds rather than one move per
    measurement keep it to a few seconds when the search ended far from the target. Below the
    band with no move up small enough, the best one is taken anyway and the way back down goes
    through other layers."""
    net.freeze()
    lo, hi = _band(target, tolerance)
    batches = list(islice(data.batches("val", 128, shuffle=True, seed=12345),
                          max(1, PROJECT_SAMPLES // 128)))
    loss = _loss_fn(net.model, batches)
    measure = measure or (lambda: net.bops().item())
    cur_loss, cur = loss(), measure()
    moves, locked = 0, set()
    for _ in range(max_rounds):
        if lo <= cur <= hi:
            break
        down = cur > target
        scored = []
        for key, apply, undo in _moves(net, down):
            if key in locked:
                continue
            apply()
            nb = measure()
            if (nb < cur) if down else (nb > cur):
                scored.append(((loss() - cur_loss) / abs(cur - nb), key, apply, undo))
            undo()
        scored.sort(key=lambda t: t[0])
        touched: set = set()
        for _, key, apply, undo in scored:
            if key in touched:
                continue
            apply()
            nb = measure()
            if not down and nb > hi:          # overshooting upward: try a smaller move
                undo()
                continue
            touched.add(key)
            cur, moves = nb, moves + 1
            if (cur <= hi) if down else (cur >= lo):
                break
        if not touched:
            if not scored:
                break
            # Below the band and every move up jumps over it (a layer whose next bit level is
            # a large share of the model): take the best one anyway and come back down in
            # smaller steps elsewhere; locking it keeps the way down from undoing it.
            _, key, apply, _ = scored[0]
            apply()
            locked.add(key)
            cur, moves = measure(), moves + 1
        cur_loss = loss()
    return moves


def swap(net: SuperBitNet, data: Dataset, target: float, tolerance: float = 0.05,
         samples: int = 2048, max_rounds: int = 8,
         measure: Callable[[], float] | None = None) -> dict:
    """Exchange bits between layers at equal cost: from the frozen decision, score every pair of
    one move down and one move up (see `_moves`) whose BOPs stay in the projection's band by
    the loss on `samples` validation images, take the pair that lowers it most, and repeat until
    no pair helps. Returns how many pairs were taken and scored, and the best loss change seen.

    The search ranks gates by a first-order estimate of what closing them costs; the super-bit
    weights serve every candidate, so a neighbouring decision's real loss can be measured and a
    mis-ranked pair corrected. Opt-in (`swap_samples`): on Fashion-MNIST at 64x it took one
    pair on two of three seeds and moved fine-tuned top-1 by +0.19 points on average, inside
    the seed noise (benchmarks/README.md): the searched decision is already close to a local
    optimum of this loss, whose weights are co-adapted to the decision they were trained under."""
    lo, hi = _band(target, tolerance)
    batches = list(islice(data.batches("val", 256, shuffle=True, seed=54321),
                          max(1, samples // 256)))
    loss = _loss_fn(net.model, batches)
    measure = measure or (lambda: net.bops().item())
    cur_loss, taken, scored, best_seen = loss(), 0, 0, math.inf
    for _ in range(max_rounds):
        pair = _best_pair(net, lo, hi, loss, measure)
        if pair is None:
            break
        scored, best_seen = scored + pair.scored, min(best_seen, pair.loss - cur_loss)
        if pair.loss >= cur_loss:
            break
        pair.apply()
        cur_loss, taken = pair.loss, taken + 1
    return {"pairs_taken": taken, "pairs_scored": scored,
            "best_loss_change": best_seen if scored else None}


def _band(target: float, tolerance: float) -> tuple[float, float]:
    """The BOPs the decision steps (projection, swap) aim into: 80% of `tolerance` either side of
    the target, a margin that costs nothing since the count is exact."""
    tol = 0.8 * tolerance
    return target * (1 - tol), target * (1 + tol)


@dataclass
class _Pair:
    loss: float
    apply_down: Callable[[], None]
    apply_up: Callable[[], None]
    scored: int

    def apply(self) -> None:
        self.apply_down()
        self.apply_up()


def _best_pair(net: SuperBitNet, lo: float, hi: float, loss: Callable[[], float],
               measure: Callable[[], float]) -> _Pair | None:
    """Of all pairs of one move down and one move up (different layers or kinds) that put the
    cost `measure` in `[lo, hi]`, the one with the least loss; None when no pair does."""
    best, scored = None, 0
    for kd, apply_d, undo_d in list(_moves(net, down=True)):
        apply_d()
        for ku, apply_u, undo_u in list(_moves(net, down=False)):
            if ku != kd:
                apply_u()
                if lo <= measure() <= hi:
                    value, scored = loss(), scored + 1
                    if best is None or value < best.loss:
                        best = _Pair(value, apply_d, apply_u, 0)
                undo_u()
        undo_d()
    if best is not None:
        best.scored = scored
    return best


def _moves(net: SuperBitNet, down: bool):
    """(key, apply, undo) for one level of weight or input bits of one layer, or one step of
    filters of a group."""
    sign = -1 if down else 1
    for name, m in net.layers.items():
        if not m.searchable:
            continue
        for which in (0, 1):
            idx = m.candidates.index(m.pinned_bits[which]) + sign
            if 0 <= idx < len(m.candidates):
                old = m.pinned_bits
                new = (m.candidates[idx], old[1]) if which == 0 else (old[0], m.candidates[idx])
                yield (name, which), _setter(m, "pinned_bits", new), _setter(m, "pinned_bits", old)
    for g in net.groups:
        if g.allowed:
            # Every allowed count that way, not just the next: on int8 kernels the next one
            # down can be slower (a count off the kernel's multiple), the one after faster.
            news = [k for k in g.allowed if (k < g.pinned_kept if down else k > g.pinned_kept)]
        else:
            step = max(1, g.channels // 16)
            news = [min(max(g.pinned_kept + sign * step, net.fewest(g)), g.channels)]
        for new in news:
            if new != g.pinned_kept:
                yield (("group", g.id), _setter(g, "pinned_kept", new),
                       _setter(g, "pinned_kept", g.pinned_kept))


def _setter(obj: object, attr: str, value: object) -> Callable[[], None]:
    return lambda: setattr(obj, attr, value)


def _loss_fn(model: nn.Module, batches: list) -> Callable[[], float]:
    @torch.no_grad()
    def loss() -> float:
        was = model.training
        model.eval()
        total = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches)
        model.train(was)
        return total / sum(len(y) for _, y in batches)
    return loss


# --- resume ---------------------------------------------------------------------------------


class _SearchState(ResumeFile):
    """The search after an epoch as a `searched` checkpoint (so `abs bops` and export can read
    it) whose `resume` record holds the loop's state; written atomically, so a kill mid-write
    keeps the last one, and read with the same reader as every checkpoint (no pickled objects,
    no code the file names)."""

    def __init__(self, path: str, fp_ckpt: dict, net: SuperBitNet, fingerprint: dict) -> None:
        super().__init__(path, fingerprint)
        self.fp_ckpt, self.net = fp_ckpt, net

    def save(self, model: nn.Module, loop_state: dict) -> None:
        fp = self.fp_ckpt
        resume = {"epoch": loop_state["epoch"], "fingerprint": self.fingerprint,
                  "loop": loop_state}
        ckpt = make_checkpoint("searched", fp["arch"], fp["input"], fp["num_classes"],
                               model.state_dict(), self.net.decision(), {}, [], method="abs",
                               bn_folded=False, resume=resume)
        save_checkpoint(ckpt, self.path)

    def load(self, model: nn.Module) -> dict | None:
        if not Path(self.path).is_file():
            return None
        ckpt = load_checkpoint(self.path, stages=("searched",))
        resume = ckpt.get("resume")
        if not isinstance(resume, dict) or not isinstance(resume.get("loop"), dict):
            raise UserError(f"cannot resume from {self.path}: it holds no search state (or one "
                            "written by an older version); delete it to start over")
        if resume.get("fingerprint") != self.fingerprint:
            raise UserError(f"{self.path} is the state of a different search (model, target or "
                            "settings differ); delete it or change the output name")
        model.load_state_dict(ckpt["state_dict"])
        return dict(resume["loop"])


def superbit_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SUPERBIT_TYPES)}
