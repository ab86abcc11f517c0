"""The training loop every stage shares (pretrain, QAT, search, fine-tune): SGD with cosine
learning rate, best-on-validation weights kept, deterministic for a seed. The validation split
chooses (best epoch); reported accuracy is on the test split, which nothing here chooses by.

Progress display is injected (`progress`), so the library never prints.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abs_deploy.data import Dataset

Progress = Callable[[Iterable, int, str], Iterable]
"""`progress(iterable, total, description)` wraps the batches of one epoch (e.g. with tqdm)."""


def no_progress(it: Iterable, total: int, desc: str) -> Iterable:
    return it


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 64
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0


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


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, progress: Progress = no_progress,
          params: Iterable[Tensor] | None = None,
          step_hook: Callable[[nn.Module, Tensor, int], Tensor] | None = None,
          epoch_hook: Callable[[nn.Module, int], dict] | None = None,
          start_epoch: int = 0, keep_best: bool = True,
          on_epoch_end: Callable[[EpochLog], None] | None = None) -> list[EpochLog]:
    """Train `model` in place. `step_hook(model, ce_loss, step)` may return a new loss (a
    regulariser); `epoch_hook(model, epoch)` runs after each epoch and returns numbers for the log.
    With `keep_best`, the weights of the best validation epoch are loaded at the end."""
    set_seed(cfg.seed)
    opt = torch.optim.SGD(_param_groups(model if params is None else params, cfg.weight_decay),
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = data.num_batches("train", cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    for _ in range(start_epoch * steps_per_epoch):
        sched.step()
    logs, best, best_state = [], -1.0, None
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        t0, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
        model.train()
        batches = data.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        for x, y in progress(batches, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}"):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if step_hook is not None:
                loss = step_hook(model, loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        extra = epoch_hook(model, epoch) if epoch_hook is not None else {}
        val = evaluate(model, data)
        log = EpochLog(epoch + 1, total_loss / seen, correct / seen, val,
                       time.perf_counter() - t0, extra)
        logs.append(log)
        if on_epoch_end is not None:
            on_epoch_end(log)
        if keep_best and val > best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)
    return logs


def _param_groups(source: nn.Module | Iterable[Tensor], weight_decay: float) -> list[dict]:
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
    """Top-1 accuracy in eval mode on `split` ("val" for choosing, "test" for reporting)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in data.batches(split, batch_size):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)
