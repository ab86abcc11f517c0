"""Uniform quantization-aware training: every layer at the same bits (first and last at
`edge_bits`), no pruning. The baseline every search method is compared with."""

from __future__ import annotations

from itertools import islice

import torch

from abs_deploy import bops, graph
from abs_deploy.checkpoint import make_checkpoint
from abs_deploy.data import Dataset
from abs_deploy.decision import Decision
from abs_deploy.progress import Progress, no_progress
from abs_deploy.search.qlayers import mse_weight_clip
from abs_deploy.search.qmodel import (
    calibrate,
    make_decision,
    model_from_checkpoint,
    quant_layers,
    quantize_model,
)
from abs_deploy.train import (
    TrainConfig,
    accuracy_metrics,
    evaluate,
    train,
)


def uniform_qat(fp_ckpt: dict, data: Dataset, w_bits: int, a_bits: int, cfg: TrainConfig,
                edge_bits: int = 8, progress: Progress = no_progress,
                on_epoch_end=None) -> dict:
    """Quantize an `fp` checkpoint's model at fixed bits, train it, return a `searched`
    checkpoint with a complete decision record."""
    model = model_from_checkpoint(fp_ckpt).to(data.device)
    example = torch.zeros(data.input_shape, device=data.device)
    order = graph.layer_order(model, example)
    bn_of = graph.following_norm(model, example)
    costs = bops.layer_costs(model, data.input_shape)
    fp_top1 = evaluate(model, data, "test")
    bits = bops.default_bits(costs, w_bits, a_bits, edge_bits)
    bits = {name: bits[name] for name in order}
    quantize_model(model, bits)
    model.to(data.device)        # the quantized layers' new clips
    prepare_quantizers(model, data)
    logs = train(model, data, cfg, progress, on_epoch_end=on_epoch_end)
    decision = make_decision(model, bn_of)
    return searched_checkpoint(fp_ckpt, model, decision, data, costs, fp_top1, logs,
                               method="uniform")


def prepare_quantizers(model: torch.nn.Module, data: Dataset, n_batches: int = 4) -> None:
    """Clips from data before training starts: MSE-optimal weight clips, percentile input clips."""
    with torch.no_grad():
        for m in quant_layers(model).values():
            if m.w_bits < 32:
                m.w_clip.copy_(mse_weight_clip(m.weight, m.w_bits))
    calibrate(model, (x for x, _ in islice(data.batches("train", 128, shuffle=True), n_batches)))


def searched_checkpoint(fp_ckpt: dict, model: torch.nn.Module, decision: Decision, data: Dataset,
                        costs: list[bops.LayerCost], fp_top1: float, logs: list,
                        method: str, stage: str = "searched", **extra) -> dict:
    """A `searched` checkpoint with measured accuracy and the decision's BOPs."""
    rows = bops.decision_bops(decision, fp_ckpt["arch"], data.input_shape)
    fp = bops.totals(bops.bops_table(costs))
    metrics = {**accuracy_metrics(model, data), "fp_top1": fp_top1,
               "bops": bops.totals(rows)["bops"], "fp_bops": fp["bops"],
               "macs": bops.totals(rows)["macs"], "fp_macs": fp["macs"]}
    history = list(fp_ckpt.get("history", [])) + [{"stage": method, **log.as_dict()}
                                                   for log in logs]
    return make_checkpoint(stage, fp_ckpt["arch"], fp_ckpt["input"], fp_ckpt["num_classes"],
                           model.state_dict(), decision, metrics, history, method=method,
                           **{"bn_folded": False, **extra})
