"""Issue #16's ResNet-20 points: a search driven by measured latency, one driven by BOPs, and
one driven by the weights' stored size, each fine-tuned and exported, then measured together.

ResNet-20 on digits32, ONNX Runtime, batch 32, 1 thread (the LUT's setting). The stages run as
a user runs them, each a CLI command in its own process, and each stage's file is kept in
`results/latency_search/` (checkpoints there are not committed): a stopped run resumes at the
first missing file. A stage is redone only when its file is deleted.

1. `abs pretrain` the float model; `abs profile` its latency table (layers as export emits them
   with residual-stream quantizers: every model is fine-tuned `--streams`, the form in which ORT
   runs every conv and add on integer kernels).
2. `abs search --target-latency 0.5x --lut`, `abs finetune`.
3. `abs search --target-bops B` with B the BOPs the latency-targeted decision reached (equal
   BOPs: the comparison the issue asks for is at equal top-1; at equal BOPs on digits the two
   reach the same top-1 within the split's noise, and the table shows both), `abs finetune`.
4. `abs search --target-size S --weights int4`, `abs finetune`.
5. `abs-export` each (their reports: every target's predicted and measured value), then one
   latency table of the float original and the three QCDQ files, taking turns run by run
   (`abs_deploy.export.latency.measure`, the export's own method).

    python benchmarks/latency_search.py [--search-epochs 6] [--ft-epochs 8] [--size 110KB]

writes results/latency_search.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from provenance import load_note, provenance, provenance_markdown

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "latency_search"
BIN = Path(sys.executable).parent
SETTING = {"batch": 32, "threads": 1}
INFLATED = ("Latencies are inflated by the other work; the ratios between models (they take "
            "turns run by run) are what to compare.")


def run(cmd: list[str], out: Path, resumes: bool = False) -> None:
    """Run one stage unless its output exists; the command's output goes to a log beside it.
    A command that `resumes` its own output (abs profile) is always run: it measures only what
    the file lacks, and a file it was stopped writing must not count as done."""
    if out.exists() and not resumes:
        print(f"cached   {out.name}", flush=True)
        return
    print(f"running  {' '.join(cmd)}", flush=True)
    with open(out.with_suffix(out.suffix + ".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def abs_cmd(*args: str) -> list[str]:
    return [str(BIN / "abs"), *args]


def load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def export(ckpt: Path, name: str, *extra: str) -> dict:
    folder = WORK / f"{name}_export"
    folder.mkdir(exist_ok=True)
    onnx = folder / "model.onnx"
    run([str(BIN / "abs-export"), str(ckpt), "--onnx", "-o", str(onnx), "--threads", "1",
         *extra], onnx)
    return json.loads((folder / "report.json").read_text())


def stages(args: argparse.Namespace) -> dict:
    fp, lut = WORK / "fp.pt", WORK / "lut.json"
    run(abs_cmd("pretrain", "--model", "resnet20", "--dataset", "digits32", "--epochs",
                str(args.pretrain_epochs), "-o", str(fp)), fp)
    run(abs_cmd("profile", str(fp), "--runtime", "ort", "--batch", str(SETTING["batch"]),
                "--threads", str(SETTING["threads"]), "--max-prune", str(args.max_prune),
                "--streams", "-o", str(lut)), lut, resumes=True)
    search = ["--dataset", "digits32", "--epochs", str(args.search_epochs), "--max-prune",
              str(args.max_prune)]
    tune = ["--dataset", "digits32", "--epochs", str(args.ft_epochs), "--lr", str(args.ft_lr),
            "--streams"]
    out = {}
    lat = WORK / "latency.pt"
    run(abs_cmd("search", str(fp), "--target-latency", args.latency, "--lut", str(lut),
                *search, "-o", str(lat)), lat)
    bops_target = f"{load(lat)['metrics']['bops']:.0f}"
    plans = {"latency": (lat, ()),
             "bops": (WORK / "bops.pt", ("--target-bops", bops_target)),
             "size": (WORK / "size.pt", ("--target-size", args.size, "--weights", "int4"))}
    for name, (ckpt, how) in plans.items():
        run(abs_cmd("search", str(fp), *how, *search, "-o", str(ckpt)), ckpt)
        ft = WORK / f"{name}_ft.pt"
        run(abs_cmd("finetune", str(ckpt), *tune, "-o", str(ft)), ft)
        report = export(ft, name, *(("--weights", "int4") if name == "size" else ()))
        out[name] = {"checkpoint": ft.name, "searched_top1": load(ckpt)["metrics"]["top1"],
                     "top1": load(ft)["metrics"]["top1"], "fp_top1": load(ft)["metrics"][
                         "fp_top1"], "report": _report_part(report)}
    return out


def _report_part(report: dict) -> dict:
    keep = ("targets", "totals", "accuracy", "latency")
    return {k: report.get(k) for k in keep}


def one_table(runs: dict) -> list[dict]:
    """The float original and every QCDQ file, taking turns run by run in one process."""
    import onnx

    from abs_deploy.export.latency import measure

    models = {}
    for name in runs:
        folder = WORK / f"{name}_export"
        models[f"{name}-targeted"] = onnx.load(folder / "model.onnx")
    models["fp_original"], input_shape = _fp_original()
    timings = measure(models, input_shape, batches=(SETTING["batch"],),
                      threads=(SETTING["threads"],), runs=100)
    return [t.as_dict() for t in timings]


def _fp_original():
    """The float original as the export times it (its `original` file), and its input."""
    from abs_deploy.checkpoint import load_checkpoint
    from abs_deploy.export.collapse import collapse
    from abs_deploy.export.onnx_graph import build_onnx, capture

    col = collapse(load_checkpoint(WORK / "latency_ft.pt", stages=("finetuned",)))
    return (build_onnx(capture(col.original, col.input_shape), col.input_shape).model,
            col.input_shape)


def markdown(r: dict) -> str:
    lines = ["# Searching for latency, BOPs and size: ResNet-20 on digits32, ORT, batch 32, "
             "1 thread", "",
             "| search | searched top-1 | fine-tuned top-1 | FP top-1 | target | predicted | "
             "measured | BOPs | latency, same run (ms) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    same = {t["model"]: t["median_ms"] for t in r["same_run"]}
    for name, v in r["runs"].items():
        targets = v["report"].get("targets") or []
        bops = v["report"]["totals"]["exported"]["bops"]
        for t in targets or [{}]:
            lines.append(f"| {name} | {100 * v['searched_top1']:.2f}% | {100 * v['top1']:.2f}% | "
                         f"{100 * v['fp_top1']:.2f}% | "
                         f"{t.get('text', '')} ({t.get('kind', '')}) | "
                         f"{_num(t.get('predicted'))} | {_num(t.get('measured'))} | "
                         f"{bops / 1e6:.1f} M | {same.get(f'{name}-targeted', 0):.2f} |")
    lines += ["", f"Float original, same run: {same['fp_original']:.2f} ms "
              f"(median of {r['same_run'][0]['runs']} runs after 10 warm-up, models taking "
              "turns run by run).", "", r["load_note"], "", provenance_markdown(r["provenance"])]
    return "\n".join(lines) + "\n"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:,.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--search-epochs", type=int, default=6)
    # At fine-tune's default 1e-3 the latency-targeted decision (8-bit, 75% of inner channels
    # pruned) diverged in its first epoch, with or without streams (loss 8.2, 31% top-1).
    # Of 4 epochs at 1e-4 and 8 at 3e-4, the second had the better validation top-1 on it
    # (98.3% against 97.5%). Every run here gets the same schedule.
    ap.add_argument("--ft-epochs", type=int, default=8)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--latency", default="0.5x")
    ap.add_argument("--size", default="110KB")
    # Without residual-stream quantizers ORT runs QCDQ ResNet-20 slower than the pruned float
    # model (export_resnet20.md), and even with them half the channels pruned is about 0.5x:
    # a 0.5x target needs the streams and room to prune further.
    ap.add_argument("--max-prune", type=float, default=0.75)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    prov = provenance(threads=SETTING["threads"])
    runs = stages(args)
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "settings": vars(args) | SETTING, "runs": runs, "same_run": one_table(runs)}
    result["load_note"] = load_note(prov, list(os.getloadavg()), INFLATED)
    (RESULTS / "latency_search.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "latency_search.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
