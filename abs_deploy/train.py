"""The training loop every stage shares: pretrain, uniform QAT, the ABS and BSQ searches and
fine-tune all run through `fit`. A stage supplies a `Method` with only what is its own (its loss
term, its optimizers and parameter groups, its alternating phases, what it does after a step and
at the end of an epoch); device, DistributedDataParallel, batch sharding, mixed precision,
resume files, best-epoch selection and progress live here, once.

The validation split chooses (best epoch, controllers); reported accuracy is on the test split,
which nothing here chooses by. Progress display is injected (`progress`), so the library never
prints, and under torchrun only rank 0 shows it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from abs_deploy.data import Dataset
from abs_deploy.distributed import Dist, current
from abs_deploy.errors import UserError
from abs_deploy.progress import Progress, no_progress
from abs_deploy.sync_batchnorm import synced_batchnorm

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 64          # the global batch: split evenly over the ranks under torchrun
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    sync_bn: bool = False         # BatchNorm statistics over all ranks' batches
    amp: str | None = None        # "bf16" or "fp16" autocast, for the full-precision stage only
    grad_clip: float | None = None  # the gradients' global norm is clipped to this each step


@dataclass
class EpochLog:
    epoch: int
    loss: float
    train_acc: float
    val_acc: float
    seconds: float
    extra: dict

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "loss": self.loss, "train_acc": self.train_acc,
                "val_acc": self.val_acc, "seconds": self.seconds, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> EpochLog:
        base = ("epoch", "loss", "train_acc", "val_acc", "seconds")
        return cls(*(d[k] for k in base), {k: v for k, v in d.items() if k not in base})


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


class Method:
    """Plain supervised training (cross-entropy, SGD with Nesterov momentum, cosine learning
    rate, best validation epoch kept). A stage overrides what is its own."""

    name = "train"
    keep_best = True
    amp_safe = True               # quantizers' rounding under fp16/bf16 is not, see TrainConfig
    find_unused_parameters = False

    def __init__(self, params: Iterable[Tensor] | None = None) -> None:
        self.params = None if params is None else list(params)

    def optimizers(self, model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        source = model if self.params is None else self.params
        return [torch.optim.SGD(param_groups(source, cfg.weight_decay), lr=cfg.lr,
                                momentum=cfg.momentum, nesterov=True)]

    def lr_factor(self, step: int, total: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))

    def begin_step(self, step: int) -> None:
        """Before the forward pass (alternating phases)."""

    def loss(self, ce: Tensor, step: int) -> Tensor:
        """The training loss from the batch's cross-entropy (a regulariser adds to it)."""
        return ce

    def before_update(self, step: int) -> None:
        """After backward (gradients already averaged over ranks), before the optimizers."""

    def end_step(self, step: int) -> None:
        """After the optimizers (clamps, controllers)."""

    def postfix(self) -> str:
        """A short status for the progress bar."""
        return ""

    def end_epoch(self, epoch: int) -> dict:
        """Numbers for the epoch's log; runs before validation."""
        return {}

    def rebuild(self) -> bool:
        """True when the model's parameters were replaced and the optimizers must be rebuilt."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ResumeFile:
    """Where a stage's state goes after every epoch so that a killed run continues (`--resume`).
    A stage decides the file's format (`wrap`, `unwrap`); the loop decides what is in it."""

    def __init__(self, path: str, fingerprint: dict) -> None:
        self.path, self.fingerprint = path, fingerprint

    def save(self, model: nn.Module, loop_state: dict) -> None:
        raise NotImplementedError

    def load(self, model: nn.Module) -> dict | None:
        """The loop state to continue from (and `model`'s weights restored), or None."""
        raise NotImplementedError


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, method: Method | None = None,
        progress: Progress = no_progress,
        on_epoch_end: Callable[[EpochLog], None] | None = None,
        resume: ResumeFile | None = None) -> list[EpochLog]:
    """Train `model` in place with `method`; returns one log per epoch. With the method's
    `keep_best`, the weights of the best validation epoch (the starting weights included)
    are loaded at the end."""
    method = method or Method()
    dist = current()
    if cfg.amp is not None and not method.amp_safe:
        raise UserError(f"--amp is for full-precision training; {method.name} trains quantizers")
    if dist.active and cfg.batch_size % dist.world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over "
                        f"{dist.world} processes")
    set_seed(cfg.seed)
    opts = method.optimizers(model, cfg)
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler(torch.device(data.device).type, enabled=cfg.amp == "fp16")
    state = {"epoch": 0, "logs": [], "best_val": -1.0, "best_state": None}
    if resume is not None:
        state = _restore(resume, model, opts, method) or state
    if method.keep_best and state["epoch"] == 0:
        # The starting weights compete too: a stage whose training diverges (measured: a
        # fine-tune at too high a rate for its decision) hands back what it was given, not
        # its least bad epoch.
        state["best_val"], state["best_state"] = evaluate(model, data), _cpu_copy(model)
    steps = data.num_batches("train", cfg.batch_size, world=dist.world)
    ddp = _wrap(model, method)
    with synced_batchnorm(model, cfg.sync_bn):
        for epoch in range(state["epoch"], cfg.epochs):
            t0 = time.perf_counter()
            totals = _train_epoch(ddp, model, data, cfg, method, opts, scaler, epoch, steps,
                                  progress if dist.is_main else no_progress, dist)
            dist.average_buffers(model)
            extra = method.end_epoch(epoch)
            if method.rebuild():
                opts = method.optimizers(model, cfg)
                ddp = _wrap(model, method)
            loss_sum, correct, seen = dist.sum(totals, data.device)
            log = EpochLog(epoch + 1, loss_sum / seen, correct / seen, evaluate(model, data),
                           time.perf_counter() - t0, extra)
            state["logs"].append(log.as_dict())
            state["epoch"] = epoch + 1
            if method.keep_best and log.val_acc > state["best_val"]:
                state["best_val"], state["best_state"] = log.val_acc, _cpu_copy(model)
            if resume is not None:
                _checkpoint(resume, model, opts, method, state, dist)
            if on_epoch_end is not None and dist.is_main:
                on_epoch_end(log)
    if method.keep_best and state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return [EpochLog.from_dict(d) for d in state["logs"]]


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, progress: Progress = no_progress,
          params: Iterable[Tensor] | None = None, keep_best: bool = True,
          on_epoch_end: Callable[[EpochLog], None] | None = None) -> list[EpochLog]:
    """Plain supervised training of `model` (or only `params`) through `fit`."""
    method = Method(params)
    method.keep_best = keep_best
    return fit(model, data, cfg, method, progress, on_epoch_end)


def _train_epoch(ddp: nn.Module, model: nn.Module, data: Dataset, cfg: TrainConfig,
                 method: Method, opts: list, scaler: torch.amp.GradScaler, epoch: int,
                 steps: int, progress: Progress, dist: Dist) -> list[float]:
    """One epoch over this rank's shard; returns (loss sum, correct, images) of this rank."""
    total_steps = cfg.epochs * steps
    loss_sum = correct = seen = 0.0
    model.train()
    batches = data.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch,
                           rank=dist.rank, world=dist.world)
    bar = progress(batches, steps, f"{method.name} {epoch + 1}/{cfg.epochs}")
    for i, (x, y) in enumerate(bar):
        step = epoch * steps + i
        factor = method.lr_factor(step, total_steps)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        method.begin_step(step)
        with _autocast(x, cfg.amp):
            logits = ddp(x)
            loss = method.loss(F.cross_entropy(logits, y), step)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        method.before_update(step)
        if cfg.grad_clip is not None:
            _clip_gradients(model, opts, scaler, cfg.grad_clip)
        for opt in opts:
            scaler.step(opt)
        scaler.update()
        method.end_step(step)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        if hasattr(bar, "set_postfix_str") and i % 5 == 0:
            status = method.postfix()
            bar.set_postfix_str(f"loss {loss.item():.3f} acc {correct / seen:.1%}"
                                + (f" {status}" if status else ""), refresh=False)
    return [loss_sum, correct, seen]


def _clip_gradients(model: nn.Module, opts: list, scaler: torch.amp.GradScaler,
                    max_norm: float) -> None:
    """Clip the global gradient norm (after DDP averaged it, so every rank clips alike). The
    scaler's factor comes off first, or the clip would act on scaled gradients."""
    for opt in opts:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                   max_norm)


def _wrap(model: nn.Module, method: Method) -> nn.Module:
    """The model DDP trains under torchrun (gradients averaged over ranks in backward), or the
    model itself. DDP takes the model's own device, so CPU and CUDA share this line."""
    if not current().active:
        return model
    return DistributedDataParallel(model, find_unused_parameters=method.find_unused_parameters)


def _autocast(x: Tensor, amp: str | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=AMP_DTYPES[amp])


def _restore(resume: ResumeFile, model: nn.Module, opts: list, method: Method) -> dict | None:
    state = resume.load(model)
    if state is None:
        return None
    for opt, sd in zip(opts, state.pop("optimizers"), strict=True):
        opt.load_state_dict(sd)
    method.load_state_dict(state.pop("method"))
    return state


def _checkpoint(resume: ResumeFile, model: nn.Module, opts: list, method: Method, state: dict,
                dist: Dist) -> None:
    """Rank 0 writes; the others wait, so no rank runs ahead of a state that is not on disk."""
    if dist.is_main:
        resume.save(model, {**state, "optimizers": [o.state_dict() for o in opts],
                            "method": method.state_dict()})
    dist.barrier()


def _cpu_copy(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def param_groups(source: nn.Module | Iterable[Tensor], weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: decaying BN scales, biases, clips and
    thresholds would pull them toward zero for no reason (nanoGPT's rule)."""
    params = source.parameters() if isinstance(source, nn.Module) else source
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def accuracy_metrics(model: nn.Module, data: Dataset) -> dict:
    """What a checkpoint reports: `top1` on the test split, `val_top1` on the validation split
    (the one that chose the weights), and which split each is, with their sizes."""
    return {"top1": evaluate(model, data, "test"), "val_top1": evaluate(model, data, "val"),
            "splits": {"top1": "test", "val_top1": "val", **{
                f"{k}_images": v for k, v in data.split_sizes().items()}}}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, split: str = "val", batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode on `split` ("val" for choosing, "test" for reporting). Under
    torchrun each rank counts its own shard and the counts are summed: every rank gets the same
    figure, and every rank must call this."""
    dist = current()
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in data.batches(split, batch_size * dist.world, rank=dist.rank, world=dist.world):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    correct, total = dist.sum([correct, total], data.device)
    return correct / max(total, 1)
