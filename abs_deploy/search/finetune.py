"""Fine-tune a searched decision in its deployable form (DESIGN §1, §9): BatchNorm folded into
the conv/linear weights before quantization, the fixed bits of the decision, pruned channels
masked to exactly zero. What this trains is what export collapses, with no BN left to move the
quantization grid after training."""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice

import torch

from abs_deploy import bops, streams
from abs_deploy.checkpoint import make_checkpoint
from abs_deploy.data import Dataset
from abs_deploy.errors import UserError
from abs_deploy.models.registry import build_model
from abs_deploy.progress import Progress, no_progress
from abs_deploy.search.qmodel import add_streams, fold_batchnorm, model_from_checkpoint
from abs_deploy.train import (
    EpochLog,
    TrainConfig,
    accuracy_metrics,
    evaluate,
    train,
)

# The BN-folded network has no normalisation left to absorb a large step. Measured on a
# ResNet-20 (digits32) decision at 8 bits with 75% of its inner channels pruned: at lr 1e-3 the
# gradient's norm grew from ~3 to ~150 within 3 steps and top-1 fell to 20-31%; clipped to 5
# (about 40% of its first epoch's steps clip) it trains. The 4-bit decisions of the same
# benchmark run at norms of 1-1.5, below it.
GRAD_CLIP = 5.0


def finetune(ckpt: dict, data: Dataset, cfg: TrainConfig, progress: Progress = no_progress,
             on_epoch_end: Callable[[EpochLog], None] | None = None,
             with_streams: bool = False, shared_codes: bool = True) -> dict:
    """Train a `searched` checkpoint's decision (any method: uniform, abs, bsq) with BN folded;
    returns a `finetuned` checkpoint (`bn_folded=True`) with the best-validation weights.
    `with_streams` (off by default, #15) adds residual-stream quantizers (streams.py),
    calibrated on training batches and trained with the rest; the checkpoint says so.
    `shared_codes` (with streams): a stream whose readers all quantize it alike is quantized
    by their quantizer (one clip) instead of an 8-bit one of its own; False: 8 bits on all."""
    if ckpt.get("stage") != "searched" or not ckpt.get("decision"):
        raise UserError(f"fine-tune needs a searched checkpoint with a decision record, got "
                        f"stage '{ckpt.get('stage')}'")
    model = model_from_checkpoint(ckpt)
    if not ckpt.get("bn_folded"):
        fold_batchnorm(model, ckpt["decision"])
    if with_streams and not ckpt.get(streams.CHECKPOINT_KEY):
        batches = [x.cpu() for x, _ in islice(data.batches("train", 64, shuffle=True,
                                                           seed=cfg.seed), 4)]
        inputs = {n: (d.a_bits, d.a_signed) for n, d in ckpt["decision"].items()} \
            if shared_codes else None
        model = add_streams(model, torch.zeros(data.input_shape), batches, inputs)
    model.to(data.device)
    start_top1 = evaluate(model, data, "test")
    logs = train(model, data, cfg, progress, on_epoch_end=on_epoch_end)
    rows = bops.decision_bops(ckpt["decision"], ckpt["arch"], data.input_shape)
    fp = bops.totals(bops.bops_table(bops.layer_costs(build_model(ckpt["arch"]),
                                                      data.input_shape)))
    metrics = {**ckpt.get("metrics", {}), **accuracy_metrics(model, data),
               "searched_top1": ckpt.get("metrics", {}).get("top1"),
               "start_top1": start_top1, "bops": bops.totals(rows)["bops"],
               "macs": bops.totals(rows)["macs"], "fp_bops": fp["bops"], "fp_macs": fp["macs"]}
    method = ckpt.get("method", "unknown")
    history = list(ckpt.get("history", [])) + [{"stage": "finetune", **log.as_dict()}
                                               for log in logs]
    extra = {k: v for k, v in ckpt.items()
             if k not in ("format", "stage", "arch", "input", "num_classes", "state_dict",
                          "decision", "metrics", "history", "method", "bn_folded", "resume",
                          streams.CHECKPOINT_KEY)}
    if ckpt.get(streams.CHECKPOINT_KEY):
        extra[streams.CHECKPOINT_KEY] = ckpt[streams.CHECKPOINT_KEY]  # the form it trained
    elif with_streams:
        extra[streams.CHECKPOINT_KEY] = streams.SHARED if shared_codes else True
    return make_checkpoint("finetuned", ckpt["arch"], ckpt["input"], ckpt["num_classes"],
                           model.state_dict(), ckpt["decision"], metrics, history,
                           method=method, bn_folded=True, **extra)

