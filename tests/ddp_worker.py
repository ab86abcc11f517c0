"""Run by tests/test_distributed.py, once on its own and once under `torchrun --nproc-per-node 2`
(gloo): a few ABS search steps through the shared loop on the same images, then every
parameter and buffer, the lam and the decision of this rank written to OUT_DIR/rank<R>.pt.

    python tests/ddp_worker.py OUT_DIR STEPS [--sync-bn] [--f64] [--disagree]

`--f64` runs in float64: the two runs then differ only by what the algorithm does, not by the
order float32 sums are taken in (BatchNorm biases' gradients are sums that nearly cancel, and
after two steps their float32 values differ by up to 5e-4 of their largest between the runs).
`--disagree` makes rank 1 report another decision, to show the cross-rank check catches it.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from abs_deploy import bops, distributed
from abs_deploy.data import load_dataset
from abs_deploy.models.registry import create_model
from abs_deploy.search import superbit
from abs_deploy.search.abs_search import GATE_LR, AbsMethod, start_thresholds, to_superbit
from abs_deploy.search.controller import RELAY, LambdaController
from abs_deploy.search.costs import Target
from abs_deploy.search.qmodel import calibrate
from abs_deploy.train import TrainConfig, fit, set_seed

GLOBAL_BATCH = 64


def main(out_dir: str, steps: int, sync_bn: bool, f64: bool, disagree: bool) -> None:
    torch.set_num_threads(1)
    if f64:
        torch.set_default_dtype(torch.float64)
    dist, device = distributed.start("cpu")
    # The activation statistic samples every k-th element, k set by the batch a process holds;
    # over every element it is an exact mean, and a mean of equal-sized shards is the mean.
    superbit.A_SAMPLE = 1 << 30
    data = load_dataset("digits")
    n = GLOBAL_BATCH * steps
    data = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    set_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_chans=1)
    example = torch.zeros(data.input_shape)
    costs = bops.layer_costs(model, data.input_shape)
    fp_bops = float(bops.totals(bops.bops_table(costs))["bops"])
    net = to_superbit(model, example)
    first = [next(data.batches("train", 128))[0]]
    calibrate(model, first)
    start_thresholds(net, first)
    target = fp_bops / 64
    ctl = LambdaController(1.0, 0.05, RELAY, 0.0)
    # A large gate rate and a standing lam, so that some gates close within the few steps.
    method = AbsMethod(net, fp_bops, 0.5, ctl, GATE_LR * 20, [Target("bops", target, "64x")],
                       None)
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=GLOBAL_BATCH, sync_bn=sync_bn)
    fit(model, data, cfg, method)
    decision = net.decision().to_record()
    if disagree and dist.rank == 1:
        first_layer = next(iter(decision))
        decision[first_layer]["w_bits"] += 1
    try:
        dist.same_on_all_ranks(decision, "the decision")
        agreed = True
    except RuntimeError:
        agreed = False
    torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "lam": method.lam, "decision": decision, "agreed": agreed,
                "world": dist.world},
               f"{out_dir}/rank{dist.rank}.pt")
    distributed.stop()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--sync-bn" in sys.argv, "--f64" in sys.argv,
         "--disagree" in sys.argv)
