"""Train the full-precision starting point and package it as an `fp` checkpoint."""

from __future__ import annotations

from typing import Any

from abs_deploy import bops
from abs_deploy.checkpoint import make_checkpoint
from abs_deploy.data import Dataset
from abs_deploy.models.registry import arch_record, check_fits, create_model, data_kwargs
from abs_deploy.progress import Progress, no_progress
from abs_deploy.train import (
    EpochLog,
    TrainConfig,
    accuracy_metrics,
    set_seed,
    train,
)


def pretrain(model_name: str, data: Dataset, cfg: TrainConfig,
             model_kwargs: dict[str, Any] | None = None, progress: Progress = no_progress,
             on_epoch_end=None) -> dict:
    """Train `model_name` on `data`; the returned checkpoint holds the best-validation weights
    and reports their test top-1."""
    kwargs = data_kwargs(model_name, data.num_classes, data.input_shape[1], model_kwargs)
    arch = arch_record(model_name, **kwargs)
    set_seed(cfg.seed)   # before building: initial weights are part of the run
    model = create_model(model_name, **kwargs)
    check_fits(model, model_name, data.input_shape, data.num_classes)
    model.to(data.device)
    logs: list[EpochLog] = train(model, data, cfg, progress, on_epoch_end=on_epoch_end)
    fp_bops = bops.totals(bops.bops_table(bops.layer_costs(model, data.input_shape)))
    return make_checkpoint("fp", arch, data.input_spec(), data.num_classes, model.state_dict(),
                           metrics={**accuracy_metrics(model, data), "fp_bops": fp_bops["bops"],
                                    "bops": fp_bops["bops"], "macs": fp_bops["macs"]},
                           history=[log.as_dict() for log in logs], method="fp")

