"""Kept channel counts off a multiple of 8 against the multiples around them: why `abs profile`
profiles (and a latency search keeps) multiples of 8 by default.

ResNet-20 on digits32 with residual-stream quantizers (shared codes), every layer 8/8, exported
with `abs-export`'s pipeline (random weights: latency does not depend on their values). Each
prunable group keeps a share of its channels:

- `unaligned`: 60% of each inner group, moved off a multiple of 8 (10, 19, 38 of 16, 32, 64),
- `aligned up`: those counts rounded up to multiples of 8 (16, 24, 40: more channels),
- `aligned down`: rounded down (8, 16, 32), and `unpruned`.

The four QCDQ files (and the pruned float ones beside them) take turns run by run in one
process (`export/latency.measure`), `--rounds` rounds of 50 runs after 10 warm-up; per model
the median of the rounds' medians, every round shown. Batch 32, one thread, wall clock and
CPU clock.

    python benchmarks/channel_alignment.py [--runtime ort|openvino] [--rounds 3]

writes results/channel_alignment[_openvino].{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

from provenance import load_note, provenance, provenance_markdown, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BATCH, THREADS = 32, 1
VARIANTS = {
    "unaligned": lambda c: _off_multiple(round(0.6 * c)),
    "aligned up": lambda c: math.ceil(round(0.6 * c) / 8) * 8,
    "aligned down": lambda c: max(8, round(0.6 * c) // 8 * 8),
    "unpruned": lambda c: c,
}
INFLATED = ("Times are inflated by the other work; the models take turns run by run, so "
            "compare their ratios.")


def _off_multiple(n: int) -> int:
    return n - 1 if n % 8 == 0 else n


def build(tmp: Path) -> tuple[dict, dict]:
    """name -> (QCDQ model, pruned float model), and name -> the kept counts per group."""
    sys.path.insert(0, str(ROOT / "runtime_tests"))
    import onnx
    import torch
    from rt_checkpoints import dataset_for, random_checkpoint

    from abs_deploy import graph
    from abs_deploy.checkpoint import save_checkpoint
    from abs_deploy.decision import Decision
    from abs_deploy.export.pipeline import ExportOptions, export_model
    from abs_deploy.models.registry import build_model

    data = dataset_for("digits32")
    models, counts = {}, {}
    for name, count in VARIANTS.items():
        ckpt = random_checkpoint("resnet20", data, seed=7, bits=(8,), edge_bits=8, prune=False,
                                 with_streams=True, shared_codes=True)
        model = build_model(ckpt["arch"])
        groups = graph.channel_groups(model, torch.zeros(ckpt["input"]["shape"]))
        rng, kept = random.Random(1), {}
        counts[name] = []
        for g in groups:
            if g.prunable and g.producers:
                n = count(g.channels)
                counts[name].append([g.channels, n])
                idx = tuple(sorted(rng.sample(range(g.channels), n)))
                kept.update(dict.fromkeys(g.producers, idx))
        ckpt["decision"] = Decision({n: dataclasses.replace(d, kept=kept.get(n, d.kept))
                                     for n, d in ckpt["decision"].items()})
        path = tmp / f"{name.replace(' ', '_')}.pt"
        save_checkpoint(ckpt, path)
        out = tmp / f"{name.replace(' ', '_')}.onnx"
        result = export_model(path, ExportOptions(output=out, latency=False, max_images=64))
        models[name] = (onnx.load(result.files["onnx"]), onnx.load(result.files["fp32"]))
        print(f"{name}: exported", flush=True)
    return models, counts


def measure_rounds(models: dict, runtime: str, rounds: int) -> dict:
    from abs_deploy.export.latency import measure

    flat = {f"{name} | {kind}": m for name, pair in models.items()
            for kind, m in zip(("qcdq", "pruned float"), pair, strict=True)}
    runtimes = dict.fromkeys(flat, "onnxruntime" if runtime == "ort" else "openvino")
    out: dict[str, dict[str, list[float]]] = {}
    for clock in ("wall", "cpu"):
        per = {k: [] for k in flat}
        for r in range(rounds):
            for t in measure(flat, [1, 3, 32, 32], (BATCH,), (THREADS,), clock=clock,
                             runtimes=runtimes):
                per[t.model].append(t.median_ms)
            print(f"{clock} round {r + 1}/{rounds}", flush=True)
        out[clock] = per
    return out


def markdown(r: dict) -> str:
    label = {"ort": "ONNX Runtime", "openvino": "OpenVINO"}[r["runtime"]]
    lines = [f"# Kept channels off a multiple of 8: ResNet-20 (digits32, streams, 8/8) in {label}, "
             f"batch {BATCH}, {THREADS} thread", "",
             "| kept counts (of 16, 32, 64) | QCDQ ms (wall) | vs unpruned | pruned float ms "
             "(wall) | QCDQ ms (CPU clock) |", "|---|---:|---:|---:|---:|"]
    wall, cpu = r["times"]["wall"], r["times"]["cpu"]
    med = {k: statistics.median(v) for k, v in wall.items()}
    base = med["unpruned | qcdq"]
    for name in VARIANTS:
        kept = sorted({n for _, n in r["counts"][name]})
        lines.append(f"| {name}: {', '.join(map(str, kept))} | {med[f'{name} | qcdq']:.2f} | "
                     f"{med[f'{name} | qcdq'] / base:.2f}x | "
                     f"{med[f'{name} | pruned float']:.2f} | "
                     f"{statistics.median(cpu[f'{name} | qcdq']):.2f} |")
    lines += ["", f"Each cell: the median over {r['rounds']} rounds of each round's median of 50 "
              "runs after 10 warm-up, all eight files taking turns run by run. Rounds (wall, "
              "ms): " + "; ".join(f"{k} " + ", ".join(f"{v:.2f}" for v in vals)
                                  for k, vals in wall.items()) + ".", "",
              r["load_note"], "", provenance_markdown(r["provenance"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", choices=("ort", "openvino"), default="ort")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    stem = "channel_alignment" + ("" if args.runtime == "ort" else f"_{args.runtime}")
    prov = provenance(threads=THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        models, counts = build(Path(tmp))
    times = measure_rounds(models, args.runtime, args.rounds)
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "runtime": args.runtime, "rounds": args.rounds, "counts": counts,
              "times": times}
    result["load_note"] = load_note(prov, list(os.getloadavg()), INFLATED)
    write_results(RESULTS, stem, result, markdown(result))


if __name__ == "__main__":
    main()
