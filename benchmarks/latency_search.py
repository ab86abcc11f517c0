"""Issue #16's ResNet-20 points: a search driven by measured latency, BOPs-driven searches at
several targets, and one driven by the weights' stored size, each fine-tuned and exported,
then measured together.

ResNet-20 on digits32, ONNX Runtime, batch 32, 1 thread (the LUT's setting). The stages run as
a user runs them, each a CLI command in its own process, and each stage's file is kept in
`results/latency_search/` (checkpoints there are not committed). A stage is redone when its
file is missing or was made by another command or from other inputs (a `.made` file beside
it records both), so a stopped run resumes where it stopped and a changed setting redoes what
it touches.

1. `abs pretrain` the float model; `abs profile` its latency table (layers as export emits them
   with residual-stream quantizers: every model is fine-tuned `--streams`, the form in which ORT
   runs every conv and add on integer kernels).
2. `abs search --target-latency 0.5x --lut` (issue #16 (b)), and at 0.45x (for (c)).
3. `abs search --target-bops B` for B at fractions of the BOPs the latency-targeted decision
   reached (1, 1/2, 1/4): issue #16 (c) compares at equal top-1, and at equal BOPs the BOPs
   search keeps more accuracy than the latency one. The latency search keeps only the table's
   kept counts, multiples of 8 (int8 kernels run others much slower), so the BOPs searches at
   1 and 1/2 run again with `--channel-multiple 8` (`bops*_m8`): what (c) compares against
   is then also a BOPs search that knows the kernels' multiple.
4. `abs search --target-size S --weights int4`.
5. `abs finetune --streams` each, `abs-export` each (the latency model three times: its own
   latency table moves between exports), then one latency table of the float original and
   every QCDQ file, taking turns run by run (`abs_deploy.export.latency.measure`, the export's
   own method); (b) and (c) are read off it.

    python benchmarks/latency_search.py [--dataset digits32|fashion-mnist] [--search-epochs 6]
        [--bops-fractions 1,0.5,0.25]

writes results/latency_search.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from provenance import load_note, provenance, provenance_markdown, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "latency_search"
BIN = Path(sys.executable).parent
SETTING = {"batch": 32, "threads": 1}
INFLATED = ("Latencies are inflated by the other work; the ratios between models (they take "
            "turns run by run) are what to compare.")


def run(cmd: list[str], out: Path, inputs: tuple[Path, ...] = (), resumes: bool = False) -> None:
    """Run one stage unless its output exists and was made by this very command from these
    very `inputs` (recorded in a `.made` file beside it: a changed setting, or a redone stage
    upstream, redoes it); the command's output goes to a log beside it. A command that
    `resumes` its own output (abs profile) is always run: it measures only what the file
    lacks, and a file it was stopped writing must not count as done."""
    made = out.with_suffix(out.suffix + ".made")
    key = {"command": [_portable(a) for a in cmd],
           "inputs": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs}}
    # A finished table is not handed to abs profile again: it would rewrite the file (same
    # measurements, new date) and so redo every stage that reads it.
    done = out.exists() and (not resumes or json.loads(out.read_text()).get("complete"))
    if done and made.exists() and json.loads(made.read_text()) == key:
        print(f"cached   {out.name}", flush=True)
        return
    print(f"running  {' '.join(cmd)}", flush=True)
    made.unlink(missing_ok=True)
    with open(out.with_suffix(out.suffix + ".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    made.write_text(json.dumps(key, indent=1) + "\n")


def _portable(arg: str) -> str:
    """A command argument without this checkout's paths, so a moved clone keeps its cache."""
    return arg.replace(str(WORK), "<work>").replace(str(BIN), "<bin>")


def abs_cmd(*args: str) -> list[str]:
    return [str(BIN / "abs"), *args]


def load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def export(ckpt: Path, folder: str, *extra: str) -> dict:
    out = WORK / folder
    out.mkdir(exist_ok=True)
    onnx = out / "model.onnx"
    run([str(BIN / "abs-export"), str(ckpt), "--onnx", "-o", str(onnx), "--threads", "1",
         *extra], onnx, inputs=(ckpt,))
    return json.loads((out / "report.json").read_text())


def plans(args: argparse.Namespace, fp: Path, lut: Path) -> dict[str, tuple[Path, tuple]]:
    """Every search: name -> (its checkpoint, its target options). Runs the latency search
    (cached as any stage), because the BOPs searches are at fractions of the BOPs its decision
    reached: at equal BOPs the BOPs search
    keeps more accuracy (it spends them on bits ORT does not run faster), so the comparison at
    equal top-1 needs a lower BOPs target; which fraction lands there is found by the sweep."""
    lat = WORK / "latency.pt"
    out = {"latency": (lat, ("--target-latency", args.latency, "--lut", str(lut)))}
    run(search_cmd(args, fp, out["latency"][1], lat), lat, inputs=(fp, lut))
    for text in args.more_latency:
        out[f"latency_{text}"] = (WORK / f"latency_{text}.pt",
                                  ("--target-latency", text, "--lut", str(lut)))
    lat_bops = load(lat)["metrics"]["bops"]
    for f in args.bops_fractions:
        name = "bops" if f == 1 else f"bops_{f:g}"
        out[name] = (WORK / f"{name}.pt", ("--target-bops", f"{f * lat_bops:.0f}"))
    # The same BOPs searches keeping multiples of 8 channels only: what a user who knows the
    # int8 kernels' preference gets without a latency table.
    for f in args.aligned_bops_fractions:
        name = ("bops" if f == 1 else f"bops_{f:g}") + "_m8"
        out[name] = (WORK / f"{name}.pt", ("--target-bops", f"{f * lat_bops:.0f}",
                                           "--channel-multiple", "8"))
    if args.size:
        out["size"] = (WORK / "size.pt", ("--target-size", args.size, "--weights", "int4"))
    return out


def search_cmd(args: argparse.Namespace, fp: Path, how: tuple, out: Path) -> list[str]:
    return abs_cmd("search", str(fp), *how, "--dataset", args.dataset, "--epochs",
                   str(args.search_epochs), "--max-prune", str(args.max_prune), "-o", str(out))


def stages(args: argparse.Namespace) -> dict:
    fp, lut = WORK / "fp.pt", WORK / "lut.json"
    run(abs_cmd("pretrain", "--model", "resnet20", "--dataset", args.dataset, "--epochs",
                str(args.pretrain_epochs), "-o", str(fp)), fp)
    run(abs_cmd("profile", str(fp), "--runtime", "ort", "--batch", str(SETTING["batch"]),
                "--threads", str(SETTING["threads"]), "--max-prune", str(args.max_prune),
                "--channel-multiple", "8", "--streams", "-o", str(lut)), lut, resumes=True)
    tune = ["--dataset", args.dataset, "--streams",
            *(("--epochs", str(args.ft_epochs)) if args.ft_epochs else ()),
            *(("--lr", str(args.ft_lr)) if args.ft_lr else ())]
    searches = plans(args, fp, lut)
    for ckpt, how in searches.values():    # every search first: the long stages
        run(search_cmd(args, fp, how, ckpt), ckpt, inputs=(fp, lut) if "--lut" in how
            else (fp,))
    out = {}
    for name, (ckpt, _) in searches.items():
        ft = WORK / f"{name}_ft.pt"
        run(abs_cmd("finetune", str(ckpt), *tune, "-o", str(ft)), ft, inputs=(ckpt,))
        storage = ("--weights", "int4") if name == "size" else ()
        # The export's own latency table is one 50-run median per model; between exports of
        # one file it has moved by 25% on this machine, so the latency model is exported more
        # than once and (b) is read from the median of its exports.
        repeats = args.export_repeats if name == "latency" else 1
        reports = [export(ft, f"{name}_export" + (f"_{i + 1}" if i else ""), *storage)
                   for i in range(repeats)]
        metrics = load(ft)["metrics"]
        out[name] = {"checkpoint": ft.name, "searched_top1": load(ckpt)["metrics"]["top1"],
                     "top1": metrics["top1"], "val_top1": metrics.get("val_top1"),
                     "test_images": metrics.get("splits", {}).get("test_images"),
                     "fp_top1": metrics["fp_top1"], "report": _report_part(reports[0]),
                     "exports": [_own_latency(r) for r in reports]}
    return out


def _own_latency(report: dict) -> dict | None:
    """The latency target's row as one export measured it (its own table)."""
    for t in report.get("targets") or []:
        if t["kind"] == "latency":
            rel = t.get("relative") or {}
            return {"measured_ms": t["measured"], "fp_original_ms": rel.get("fp_original_ms"),
                    "relative": rel.get("measured")}
    return None


def _report_part(report: dict) -> dict:
    keep = ("targets", "totals", "accuracy", "latency")
    return {k: report.get(k) for k in keep}


def one_table(runs: dict, rounds: int) -> list[dict]:
    """The float original and every QCDQ file, taking turns run by run in one process, in
    `rounds` rounds: per model the median over rounds of each round's median, with the rounds'
    own medians beside it. On this machine one round's figures moved by up to 40% between
    otherwise equal runs (the 0.5x model at 0.545x of the float original in one, 0.72x in the
    next), more than any difference (c) looks at."""
    import onnx

    from abs_deploy.export.latency import measure

    models = {}
    for name in runs:
        folder = WORK / f"{name}_export"
        models[f"{name}-targeted"] = onnx.load(folder / "model.onnx")
    models["fp_original"], input_shape = _fp_original()
    per_round = [measure(models, input_shape, batches=(SETTING["batch"],),
                         threads=(SETTING["threads"],), runs=100) for _ in range(rounds)]
    out = []
    for k, t in enumerate(per_round[0]):
        medians = [r[k].median_ms for r in per_round]
        out.append({**t.as_dict(), "median_ms": statistics.median(medians),
                    "round_medians_ms": medians, "rounds": rounds})
    return out


def _fp_original():
    """The float original as the export times it (its `original` file), and its input."""
    from abs_deploy.checkpoint import load_checkpoint
    from abs_deploy.export.collapse import collapse
    from abs_deploy.export.onnx_graph import build_onnx, capture

    col = collapse(load_checkpoint(WORK / "latency_ft.pt", stages=("finetuned",)))
    return (build_onnx(capture(col.original, col.input_shape), col.input_shape).model,
            col.input_shape)


def _images(r: dict) -> str:
    """` (N images: one image is P points)` from the checkpoints' records, when they have it."""
    n = next((v.get("test_images") for v in r["runs"].values() if v.get("test_images")), None)
    return f" ({n} images: one image is {100 / n:.2g} points)" if n else ""


def markdown(r: dict) -> str:
    same = {t["model"]: t["median_ms"] for t in r["same_run"]}
    dataset = r["settings"].get("dataset", "digits32")
    lines = [f"# Searching for latency, BOPs and size: ResNet-20 on {dataset}, ORT, batch 32, "
             "1 thread", "",
             "| search | searched top-1 | fine-tuned top-1 | FP top-1 | target | predicted | "
             "measured | BOPs | latency, same run (ms) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name, v in r["runs"].items():
        bops = v["report"]["totals"]["exported"]["bops"]
        for t in v["report"].get("targets") or [{}]:
            lines.append(f"| {name} | {100 * v['searched_top1']:.2f}% | {100 * v['top1']:.2f}% | "
                         f"{100 * v['fp_top1']:.2f}% | "
                         f"{t.get('text', '')} ({t.get('kind', '')}) | "
                         f"{_num(t.get('predicted'))} | {_num(t.get('measured'))} | "
                         f"{bops / 1e6:.1f} M | {same.get(f'{name}-targeted', 0):.2f} |")
    rounds = r["same_run"][0].get("rounds", 1)
    spread = {t["model"]: t.get("round_medians_ms", [t["median_ms"]]) for t in r["same_run"]}
    lines += ["", "Latency, same run: in each of " + str(rounds) + " rounds every model's "
              f"median of {r['same_run'][0]['runs']} runs after 10 warm-up, the models taking "
              "turns run by run; the table gives the median of the rounds. Round by round "
              "(ms): " + "; ".join(f"{m} " + ", ".join(f"{v:.2f}" for v in vals)
                                   for m, vals in spread.items()) + ".", "",
              f"Float original: {same['fp_original']:.2f} ms. Top-1 on the test split"
              f"{_images(r)}; the fine-tune's epoch was chosen on the validation split.", "",
              *verdicts(r, same), "", r["load_note"], "", provenance_markdown(r["provenance"])]
    return "\n".join(lines) + "\n"


def verdicts(r: dict, same: dict) -> list[str]:
    """Issue #16's (b) and (c), read off the runs."""
    lat = r["runs"]["latency"]
    own = [e for e in lat["exports"] if e and e["relative"] is not None]
    rel = statistics.median(e["relative"] for e in own)
    target = float(r["settings"]["latency"].rstrip("x"))
    gap = 100 * (lat["fp_top1"] - lat["top1"])
    each = ", ".join(f"{e['relative']:.3f}x ({e['measured_ms']:.2f} of "
                     f"{e['fp_original_ms']:.2f} ms)" for e in own)
    out = ["## Issue #16 (b) and (c)", "",
           f"- (b) The latency-targeted model by the export's own latency table, {len(own)} "
           f"exports of the same file: {each}; median **{rel:.3f}x** against the target "
           f"{target:g}x ({100 * (rel / target - 1):+.1f}%: "
           f"{'within' if abs(rel / target - 1) <= 0.10 else 'outside'} 10%). Top-1 "
           f"{100 * lat['top1']:.2f}% against FP {100 * lat['fp_top1']:.2f}%: {gap:.2f} points "
           f"below ({'within' if gap <= 1.0 + 1e-9 else 'more than'} 1 point)."]
    bops_runs = {n: v for n, v in r["runs"].items() if n.startswith("bops")}
    lat_runs = {n: v for n, v in r["runs"].items() if n.startswith("latency")}
    if bops_runs:
        out.append("- (c) Each latency-targeted model against the BOPs-targeted one nearest its "
                   "top-1, same run:")
        for name, v in lat_runs.items():
            near = min(bops_runs, key=lambda n: (abs(bops_runs[n]["top1"] - v["top1"]),
                                                  same[f"{n}-targeted"]))
            ms_lat, ms_b = same[f"{name}-targeted"], same[f"{near}-targeted"]
            out.append(f"  - `{name}` {100 * v['top1']:.2f}% at {ms_lat:.2f} ms against "
                       f"`{near}` {100 * bops_runs[near]['top1']:.2f}% at {ms_b:.2f} ms: "
                       f"**{ms_b / ms_lat:.2f}x** {'faster' if ms_b > ms_lat else 'slower'}")
        out.append("  Every BOPs-targeted model: " + "; ".join(
            f"`{n}` {100 * v['top1']:.2f}% at {same[f'{n}-targeted']:.2f} ms"
            for n, v in bops_runs.items()) + ".")
    return out


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:,.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # digits32 is the setting; fashion-mnist (1x28x28) is where pruning costs accuracy,
    # which (c) needs to tell a latency search from a BOPs one (on digits both reach the same
    # max-pruned corner at the same top-1). Other datasets write latency_search_<dataset>.*.
    ap.add_argument("--dataset", default="digits32", choices=("digits32", "fashion-mnist"))
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--search-epochs", type=int, default=6)
    # Chosen on validation, on the latency-targeted decision (all 8-bit, 60-70% of the inner
    # channels pruned; its starting top-1 with the stream quantizers is 88%): 10 epochs at
    # 3e-4 reached 97.9% validation top-1, at finetune's default 1e-3 97.5%. (Before the
    # gradient clip, 1e-3 diverged on such a decision.) Every run gets the same schedule.
    ap.add_argument("--ft-epochs", type=int, default=None)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--bops-fractions", type=lambda t: [float(x) for x in t.split(",")],
                    default=[1.0, 0.5, 0.25],
                    help="BOPs targets as fractions of the latency-targeted decision's BOPs")
    ap.add_argument("--aligned-bops-fractions",
                    type=lambda t: [float(x) for x in t.split(",") if x], default=[1.0, 0.5],
                    help="BOPs searches with --channel-multiple 8, at these fractions")
    ap.add_argument("--export-repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the same-run table")
    ap.add_argument("--latency", default="0.5x", help="the target of (b)")
    # (c) compares at equal top-1, and a BOPs search at a low enough target can prune further
    # than a 0.5x latency search needs to (measured: 237 M BOPs, 97.22%, 14.3 ms against the
    # 0.5x model's 17.3 ms at 97.50%): more latency targets put both on one curve (0.4x is
    # below what --max-prune 0.75 reaches, 0.445x).
    ap.add_argument("--more-latency", type=lambda t: [x for x in t.split(",") if x],
                    default=["0.45x"],
                    help="further latency targets for (c), comma-separated")
    ap.add_argument("--size", default="110KB", help="the --target-size search ('' for none)")
    # Without residual-stream quantizers ORT runs QCDQ ResNet-20 slower than the pruned float
    # model (export_resnet20.md), and even with them half the channels pruned is about 0.5x:
    # a 0.5x target needs the streams and room to prune further.
    ap.add_argument("--max-prune", type=float, default=0.75)
    args = ap.parse_args()
    stem = "latency_search" + ("" if args.dataset == "digits32" else f"_{args.dataset}")
    global WORK  # every stage's files live here; one folder per dataset
    WORK = RESULTS / stem
    WORK.mkdir(parents=True, exist_ok=True)
    prov = provenance(threads=SETTING["threads"])
    runs = stages(args)
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "settings": vars(args) | SETTING, "runs": runs,
              "same_run": one_table(runs, args.rounds)}
    result["load_note"] = load_note(prov, list(os.getloadavg()), INFLATED)
    write_results(RESULTS, stem, result, markdown(result))


if __name__ == "__main__":
    main()
