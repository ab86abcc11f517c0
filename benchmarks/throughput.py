"""ABS search-step throughput of 1 process against 2 DDP processes (torchrun, gloo) on this CPU.

    python benchmarks/throughput.py            # measure, write benchmarks/results/throughput.*

Each configuration runs in fresh processes: the ABS search's own steps (super-bit ResNet-20 on
digits32, global batch 64, the shared training loop with its DDP wrapping) for one epoch of
18 steps; a step is timed from one step's end to the next (data, forward, backward, gradient
all-reduce, both optimizers, threshold clamp, controller), the first WARMUP steps are dropped
and the median of the rest gives images/s = 64 / median step time. Configurations take turns,
ROUNDS times, and the table shows the median over rounds. Each process uses 1 torch thread
unless the row says otherwise: "1 process, 2 threads" is the fair single-process comparison on
a 2-core machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import load_note, provenance, provenance_markdown, write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
GLOBAL_BATCH = 64
STEPS = 18
WARMUP = 3
ROUNDS = 3
CONFIGS = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2),
           "2 DDP processes, 1 thread each": (2, 1)}
INFLATED = "Other work on the cores slows every configuration, the 2-process one most."


def worker(out: str, threads: int) -> None:
    """One configuration's process (or each of its ranks): times the search steps."""
    import dataclasses

    import torch

    from abs_deploy import bops, distributed
    from abs_deploy.data import load_dataset
    from abs_deploy.models.registry import create_model
    from abs_deploy.search.abs_search import GATE_LR, AbsMethod, start_thresholds, to_superbit
    from abs_deploy.search.controller import RELAY, LambdaController
    from abs_deploy.search.costs import Target
    from abs_deploy.search.qmodel import calibrate
    from abs_deploy.train import TrainConfig, fit, set_seed

    torch.set_num_threads(threads)
    dist, _ = distributed.start("cpu")
    data = load_dataset("digits32")
    n = GLOBAL_BATCH * STEPS
    data = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    set_seed(0)
    model = create_model("resnet20", num_classes=10)
    costs = bops.layer_costs(model, data.input_shape)
    fp_bops = float(bops.totals(bops.bops_table(costs))["bops"])
    net = to_superbit(model, torch.zeros(data.input_shape))
    first = [next(data.batches("train", 128))[0]]
    calibrate(model, first)
    start_thresholds(net, first)
    ctl = LambdaController(1.0, 0.05, RELAY, 0.0)
    stamps: list[float] = []
    method = AbsMethod(net, fp_bops, 0.0, ctl, GATE_LR, [Target("bops", fp_bops / 64, "64x")],
                       lambda b, lam: stamps.append(time.perf_counter()))
    fit(model, data, TrainConfig(epochs=1, lr=0.01, batch_size=GLOBAL_BATCH), method)
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP:]
    if dist.is_main:
        Path(out).write_text(json.dumps({"step_seconds": steps, "world": dist.world}))
    distributed.stop()


def _measure(procs: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "steps.json")
        launch = ([sys.executable] if procs == 1 else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(procs)])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([*launch, __file__, "--worker", out, str(threads)], check=True, env=env,
                       cwd=ROOT, stdout=subprocess.DEVNULL)
        steps = json.loads(Path(out).read_text())["step_seconds"]
    return GLOBAL_BATCH / statistics.median(steps)


def main() -> None:
    prov = provenance(threads=1)
    runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(ROUNDS):
        for name, (procs, threads) in CONFIGS.items():
            runs[name].append(_measure(procs, threads))
            print(f"round {r + 1}/{ROUNDS}  {name}: {runs[name][-1]:.1f} images/s", flush=True)
    rate = {name: statistics.median(v) for name, v in runs.items()}
    base = rate["1 process, 1 thread"]
    result = {"provenance": prov, "load_avg_end": [round(v, 2) for v in os.getloadavg()],
              "global_batch": GLOBAL_BATCH, "steps": STEPS, "warmup": WARMUP, "rounds": ROUNDS,
              "images_per_s": rate, "runs": runs,
              "ratio_2ddp_vs_1proc_1thread": rate["2 DDP processes, 1 thread each"] / base,
              "ratio_2ddp_vs_1proc_2threads": (rate["2 DDP processes, 1 thread each"]
                                               / rate["1 process, 2 threads"])}
    OUT.mkdir(parents=True, exist_ok=True)
    write_results(OUT, "throughput", result, _markdown(result))


def _markdown(r: dict) -> str:
    base = r["images_per_s"]["1 process, 1 thread"]
    rows = [f"| {name} | {v:.1f} | {v / base:.2f}x | "
            + ", ".join(f"{x:.1f}" for x in r["runs"][name]) + " |"
            for name, v in r["images_per_s"].items()]
    return "\n".join([
        "# ABS search-step throughput: 1 process vs 2 DDP processes (gloo, CPU)", "",
        __doc__.split("\n\n", 2)[2].strip(), "",
        "| configuration | images/s (median of rounds) | vs 1 process, 1 thread | rounds |",
        "|---|---:|---:|---|", *rows, "",
        f"2 DDP processes against 1 process with 1 thread: "
        f"**{r['ratio_2ddp_vs_1proc_1thread']:.2f}x**; against 1 process with 2 threads "
        f"(the same 2 cores): **{r['ratio_2ddp_vs_1proc_2threads']:.2f}x**.", "",
        load_note(r["provenance"], r["load_avg_end"], INFLATED), "",
        provenance_markdown(r["provenance"])])


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        main()
