"""The BSQ curve of the Pareto benchmark (BOPs vs top-1) on digits32 ResNet-20.

`bsq_points` is what `benchmarks/pareto.py` calls (or whose rows it merges): one BSQ search per
BOP target, each fine-tuned like every other method's decision. Run as a script it trains (or
loads) the FP model and writes `benchmarks/results/pareto_bsq.json` and `.md`:

    .venv/bin/python benchmarks/pareto_bsq.py [--fp fp.pt] [--targets 50x,70x,90x]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from abs_deploy import bops
from abs_deploy.checkpoint import load_checkpoint, save_checkpoint
from abs_deploy.data import Dataset, load_dataset
from abs_deploy.pretrain import pretrain
from abs_deploy.search.bsq import bsq_search
from abs_deploy.search.finetune import finetune
from abs_deploy.train import TrainConfig

RESULTS = Path(__file__).parent / "results"
DEFAULT_TARGETS = ("50x", "70x", "90x")


def bsq_points(fp_ckpt: dict, data: Dataset, targets: Sequence[str] = DEFAULT_TARGETS,
               alpha: float = 0.5, act_bits: int = 4,
               search_cfg: TrainConfig | None = None, finetune_cfg: TrainConfig | None = None,
               on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """One point per BOP target (`bops.parse_bops` syntax: 50x, 0.02, 8M): BSQ search with
    alpha adapted toward the target, then fine-tune. Each point is a dict with `bops` and `top1`
    (after fine-tune) plus the searched top-1, the weight-bit histogram and timings."""
    search_cfg = search_cfg or TrainConfig(epochs=12, lr=0.01)
    finetune_cfg = finetune_cfg or TrainConfig(epochs=10, lr=0.01)
    fp_bops = fp_ckpt["metrics"]["fp_bops"]
    points = []
    for text in targets:
        target = bops.parse_bops(text, fp_bops)
        t0 = time.perf_counter()
        searched = bsq_search(fp_ckpt, data, alpha, act_bits, search_cfg, target_bops=target)
        t1 = time.perf_counter()
        tuned = finetune(searched, data, finetune_cfg)
        t2 = time.perf_counter()
        bits = Counter(d["w_bits"] for d in searched["decision"].values())
        point = {"method": "bsq", "target": text, "target_bops": target,
                 "bops": searched["metrics"]["bops"],
                 "ratio": fp_bops / searched["metrics"]["bops"],
                 "top1": tuned["metrics"]["top1"], "top1_searched": searched["metrics"]["top1"],
                 "fp_top1": fp_ckpt["metrics"]["top1"],
                 "w_bits_histogram": {str(b): n for b, n in sorted(bits.items())},
                 "w_bits": {n: d["w_bits"] for n, d in searched["decision"].items()},
                 "landing": searched["bsq"]["landing"], "act_bits": act_bits,
                 "search_seconds": t1 - t0, "finetune_seconds": t2 - t1}
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


def write_results(points: list[dict], meta: dict, folder: Path = RESULTS) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "pareto_bsq.json", folder / "pareto_bsq.md"
    js.write_text(json.dumps({"meta": meta, "points": points}, indent=1))
    lines = [f"# BSQ on {meta['dataset']} {meta['model']} (FP top-1 "
             f"{100 * meta['fp_top1']:.2f}%, FP BOPs {meta['fp_bops'] / 1e6:,.1f} M)", "",
             "Weights: sign-magnitude n bits counted as n+1 (two's complement); activations "
             f"{meta['act_bits']} bits; first/last layer 8/8.", "",
             "| target | BOPs (M) | FP/BOPs | top-1 searched | top-1 fine-tuned | w-bit histogram "
             "| landing | search s | fine-tune s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        hist = " ".join(f"{b}b:{n}" for b, n in p["w_bits_histogram"].items())
        landing = ", ".join(f"{k} {v:+d}" for k, v in p["landing"].items()) or "-"
        lines.append(f"| {p['target']} | {p['bops'] / 1e6:,.2f} | {p['ratio']:.1f} | "
                     f"{100 * p['top1_searched']:.2f} | {100 * p['top1']:.2f} | {hist} | "
                     f"{landing} | {p['search_seconds']:.0f} | {p['finetune_seconds']:.0f} |")
    md.write_text("\n".join(lines) + "\n")
    return js, md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp", help="FP checkpoint (default: train resnet20 on digits32 and cache)")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--act-bits", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--search-epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = load_dataset("digits32")
    fp_path = Path(args.fp) if args.fp else RESULTS / "fp_resnet20_digits32.pt"
    if fp_path.is_file():
        fp = load_checkpoint(fp_path, stages=("fp",))
    else:
        fp = pretrain("resnet20", data, TrainConfig(epochs=args.pretrain_epochs, lr=0.1))
        RESULTS.mkdir(parents=True, exist_ok=True)
        save_checkpoint(fp, fp_path)
    print(f"FP resnet20 digits32: top-1 {100 * fp['metrics']['top1']:.2f}%", flush=True)
    meta = {"model": "resnet20", "dataset": "digits32", "fp_top1": fp["metrics"]["top1"],
            "fp_bops": fp["metrics"]["fp_bops"], "alpha": args.alpha,
            "act_bits": args.act_bits, "search_epochs": args.search_epochs,
            "finetune_epochs": args.finetune_epochs, "fp_checkpoint": str(fp_path)}
    done: list[dict] = []

    def record(p: dict) -> None:
        # Written after every point: a long run stopped early still leaves its finished points.
        done.append(p)
        write_results(done, meta)
        print(f"bsq {p['target']}: BOPs {p['bops'] / 1e6:.2f} M (FP/{p['ratio']:.1f}) "
              f"top-1 {100 * p['top1']:.2f}% (searched {100 * p['top1_searched']:.2f}%)",
              flush=True)

    bsq_points(fp, data, args.targets.split(","), args.alpha, args.act_bits,
               TrainConfig(epochs=args.search_epochs, lr=0.01),
               TrainConfig(epochs=args.finetune_epochs, lr=0.01), on_point=record)
    print(f"wrote {RESULTS / 'pareto_bsq.json'} and .md")


if __name__ == "__main__":
    main()
