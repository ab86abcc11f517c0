"""Cost of one search training step: FP model vs super-bit model vs a multi-path super-net.

The multi-path super-net is the DNAS-style design bit sharing replaces: every layer keeps one
weight copy, one clip and one convolution per candidate bitwidth, and mixes the outputs with a
softmax over architecture logits. Same candidates, same first/last layer at 8 bits, same
optimiser (SGD, momentum) for all three.

Each configuration runs in its own subprocess so its peak memory is its own: `peak_step_mb` is the
growth of the process's peak resident set over the timed steps (activations, gradients, optimizer
state), `param_mb` the bytes of its trainable parameters. Times are medians over many steps after
a warm-up, both wall-clock and the process's CPU time (all its threads). One torch thread by
default: then a step's CPU time hardly depends on other work on the machine, and its ratios hold
on a shared one. With more threads, threads waiting on each other make both clocks depend on
the load (measured here: super-bit / FP 13.6x with 2 threads at load 4 on 2 cores, against
1.3x with one thread and about 1.5x with 2 threads on the idle machine).

    python benchmarks/search_cost.py [--steps 30] [--batch-size 64] [--threads 1]

writes benchmarks/results/search_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import load_note, provenance, provenance_markdown, write_results
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
INFLATED = ("Wall-clock step times are inflated by the other work; the ratios are what to "
            "compare, CPU-time ones above all (with one thread they hardly depend on the load).")
CONFIGS = ("fp", "superbit", "multipath")
DATASETS = ("digits32", "synthetic")


class MultiPathConv2d(nn.Module):
    """DNAS-style: one weight copy, clip and convolution per candidate, softmax-mixed."""

    def __init__(self, conv: nn.Conv2d, candidates: tuple[int, ...]) -> None:
        super().__init__()
        from abs_deploy.quant import init_weight_clip

        self.conv, self.candidates = conv, candidates
        self.weights = nn.ParameterList(
            [nn.Parameter(conv.weight.detach().clone()) for _ in candidates])
        self.w_clips = nn.ParameterList(
            [nn.Parameter(init_weight_clip(conv.weight)) for _ in candidates])
        self.a_clips = nn.ParameterList([nn.Parameter(torch.tensor(3.0)) for _ in candidates])
        self.alpha = nn.Parameter(torch.zeros(len(candidates)))
        del conv.weight   # the copies replace it

    def forward(self, x):
        from abs_deploy.quant import fake_quant

        mix = torch.softmax(self.alpha, 0)
        out = 0
        for i, b in enumerate(self.candidates):
            w = self.weights[i]
            clip = self.w_clips[i].abs().add(1e-8).view(-1, 1, 1, 1)
            xq = fake_quant(x, self.a_clips[i].abs() + 1e-8, b, True)
            out = out + mix[i] * self.conv._conv_forward(xq, fake_quant(w, clip, b, True),
                                                         self.conv.bias)
        return out


def build(config: str, data) -> tuple[nn.Module, callable]:
    """The model and its loss function for one configuration."""
    from abs_deploy.models import create_model
    from abs_deploy.modules import set_module
    from abs_deploy.search.abs_search import to_superbit
    from abs_deploy.search.qmodel import calibrate

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=data.num_classes, in_chans=3)
    example = torch.zeros(data.input_shape)
    if config == "fp":
        return model, lambda logits, y: F.cross_entropy(logits, y)
    if config == "superbit":
        net = to_superbit(model, example)
        calibrate(model, (x for x, _ in [next(data.batches("train", 64))]))
        fp = float(sum(c.macs for c in net.costs.values()) * 1024)
        return model, lambda logits, y: F.cross_entropy(logits, y) + 0.1 * torch.log(
            net.bops() / fp)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for i, name in enumerate(convs):
        cands = (8,) if i == 0 else (2, 4, 8)    # the last layer (fc) stays float as a Linear
        set_module(model, name, MultiPathConv2d(model.get_submodule(name), cands))
    return model, lambda logits, y: F.cross_entropy(logits, y)


def run_one(config: str, dataset: str, steps: int, batch_size: int, warmup: int,
            threads: int) -> dict:
    from abs_deploy.data import load_dataset

    torch.set_num_threads(threads)
    data = load_dataset(dataset)
    model, loss_fn = build(config, data)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    thresholds = [p for n, p in model.named_parameters() if n.endswith(("w_thr", "f_thr"))]
    a_thresholds = [p for n, p in model.named_parameters() if n.endswith("a_thr")]
    batches = []
    while len(batches) < steps + warmup:
        batches += list(data.batches("train", batch_size, shuffle=True, seed=len(batches)))
    batches = [b for b in batches if len(b[1]) == batch_size][:steps + warmup]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for i, (x, y) in enumerate(batches):
        # The super-bit search alternates weight and activation gate steps; so does this.
        for p in thresholds:
            p.requires_grad_(i % 2 == 0)
        for p in a_thresholds:
            p.requires_grad_(i % 2 == 1)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"config": config, "dataset": dataset, "batch_size": batch_size, "steps": steps,
            "threads": threads, "median_ms": 1e3 * statistics.median(times),
            "median_cpu_ms": 1e3 * statistics.median(cpu_times),
            # the interpolated 90th percentile, as the export's latency table computes it
            "p90_ms": 1e3 * statistics.quantiles(times, n=10, method="inclusive")[-1],
            "param_mb": params / 2**20, "peak_step_mb": max(rss1 - rss0, 0) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every configuration")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "DATASET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.batch_size,
                                 args.warmup, args.threads)))
        return
    prov = provenance(args.threads)
    rows = []
    datasets = args.datasets.split(",")
    for dataset in datasets:
        for config in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--one", config, dataset,
                                  "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--batch-size", str(args.batch_size),
                                  "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    summary = _ratios(rows, datasets)
    # commit and command also at the top level: that is where a reader (and the repository's
    # hook) looks first.
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "load_avg_end": [round(v, 2) for v in os.getloadavg()],
              "rows": rows, "ratios": summary}
    write_results(RESULTS, "search_cost", result, _markdown(result, args))


def _ratios(rows: list[dict], datasets: list[str]) -> dict:
    out = {}
    for dataset in datasets:
        r = {row["config"]: row for row in rows if row["dataset"] == dataset}
        out[dataset] = {
            "superbit_vs_fp_time": r["superbit"]["median_ms"] / r["fp"]["median_ms"],
            "superbit_vs_fp_cpu": r["superbit"]["median_cpu_ms"] / r["fp"]["median_cpu_ms"],
            "multipath_vs_superbit_time": r["multipath"]["median_ms"] /
            r["superbit"]["median_ms"],
            "multipath_vs_superbit_cpu": r["multipath"]["median_cpu_ms"] /
            r["superbit"]["median_cpu_ms"],
            "multipath_vs_superbit_params": r["multipath"]["param_mb"] / r["superbit"]["param_mb"],
            "multipath_vs_superbit_peak": r["multipath"]["peak_step_mb"] /
            max(r["superbit"]["peak_step_mb"], 1e-9)}
    return out


def _markdown(result: dict, args) -> str:
    rows, ratios, prov = result["rows"], result["ratios"], result["provenance"]
    lines = [f"# Search step cost, ResNet-20, batch {args.batch_size}, median of {args.steps} "
             f"steps ({args.threads} thread{'s' if args.threads > 1 else ''})", "",
             load_note(prov, result["load_avg_end"], INFLATED), "",
             "| data | model | median ms/step | p90 ms | median CPU ms/step | params MB | "
             "peak step MB |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['config']} | {r['median_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['median_cpu_ms']:.1f} | {r['param_mb']:.2f} | "
                     f"{r['peak_step_mb']:.1f} |")
    lines += ["", "Time ratios as wall-clock / CPU time.", "",
              "| data | super-bit / FP time | multi-path / super-bit time | "
              "multi-path / super-bit params | multi-path / super-bit peak |",
              "|---|---:|---:|---:|---:|"]
    for d, v in ratios.items():
        lines.append(f"| {d} | {v['superbit_vs_fp_time']:.2f}x / {v['superbit_vs_fp_cpu']:.2f}x | "
                     f"{v['multipath_vs_superbit_time']:.2f}x / "
                     f"{v['multipath_vs_superbit_cpu']:.2f}x | "
                     f"{v['multipath_vs_superbit_params']:.2f}x | "
                     f"{v['multipath_vs_superbit_peak']:.2f}x |")
    return "\n".join(lines + ["", provenance_markdown(prov)])


if __name__ == "__main__":
    main()
