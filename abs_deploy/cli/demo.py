"""`abs demo`: the whole user path on the embedded digits data, in a few minutes on 2 cores:
pretrain -> uniform 4/4 QAT (the baseline) -> ABS search at 64x -> fine-tune -> export."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from abs_deploy.checkpoint import save_checkpoint
from abs_deploy.cli.common import Command, epoch_printer, fmt_count, guarded, progress
from abs_deploy.cli.train import print_decision
from abs_deploy.data import Dataset, load_dataset
from abs_deploy.train import TrainConfig

TARGET = 64.0   # the BOP compression factor the demo searches for


@click.command(cls=Command)
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--skip-export", is_flag=True, help="Stop after fine-tuning.")
@click.option("--streams/--no-streams", default=False, show_default=True,
              help="Fine-tune with residual-stream quantizers (abs finetune --streams).")
@guarded
def demo(out, seed, skip_export, streams):
    """Pretrain, quantize uniformly (baseline), search with ABS at 64x, fine-tune, export."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("digits")
    steps = 4 if skip_export else 5
    runs = _train(out, data, seed, steps, streams)
    if not skip_export:
        runs.exported = _export(runs.model_path, steps)
    click.echo("")
    _print_comparison(runs, data)
    click.echo(f"files in {out}/  ({time.perf_counter() - t0:.0f} s)")


@dataclass
class _Runs:
    """What each stage of the demo produced, for the closing comparison."""

    fp: dict
    uniform: dict
    searched: dict
    tuned: dict
    target: float
    model_path: Path
    exported: Any = None  # export.pipeline.ExportResult, imported only when exporting


def _train(out: Path, data: Dataset, seed: int, steps: int, streams: bool = False) -> _Runs:
    """Stages 1-4, each checkpoint written to `out` as it is made."""
    from abs_deploy.pretrain import pretrain
    from abs_deploy.search.abs_search import abs_search
    from abs_deploy.search.finetune import GRAD_CLIP, finetune
    from abs_deploy.search.uniform import uniform_qat

    click.echo(f"== 1/{steps} pretrain digits_cnn (full precision)")
    fp = pretrain("digits_cnn", data, TrainConfig(epochs=30, lr=0.1, seed=seed), None,
                  progress, epoch_printer("pretrain"))
    save_checkpoint(fp, out / "fp.pt")

    click.echo(f"== 2/{steps} baseline: uniform QAT at 4/4 bits (first/last layer 8/8)")
    uni = uniform_qat(fp, data, 4, 4, TrainConfig(epochs=10, lr=0.01, seed=seed), 8, progress,
                      epoch_printer("qat w4a4"))
    save_checkpoint(uni, out / "uniform_w4a4.pt")

    target = fp["metrics"]["fp_bops"] / TARGET
    click.echo(f"== 3/{steps} ABS search, target FP/{TARGET:.0f} = {fmt_count(target)} BOPs")
    searched = abs_search(fp, data, target, TrainConfig(epochs=15, lr=0.01, seed=seed),
                          progress=progress, on_epoch_end=epoch_printer("abs"))
    save_checkpoint(searched, out / "searched.pt")

    click.echo(f"== 4/{steps} fine-tune the chosen configuration (BN folded)")
    tuned = finetune(searched, data, TrainConfig(epochs=10, lr=0.005, seed=seed,
                                                     grad_clip=GRAD_CLIP), progress,
                     epoch_printer("finetune"), with_streams=streams)
    model_path = save_checkpoint(tuned, out / "model.pt")
    print_decision(tuned, target)
    return _Runs(fp, uni, searched, tuned, target, model_path)


def _export(model_path: Path, steps: int) -> Any:
    """Stage 5: the fine-tuned checkpoint to ONNX, validated in ONNX Runtime."""
    from abs_deploy.cli.export import print_summary
    from abs_deploy.export.pipeline import ExportOptions, export_model

    click.echo(f"== {steps}/{steps} export {model_path} -> ONNX, validate in ONNX Runtime")
    exported = export_model(model_path, ExportOptions(output=model_path.with_suffix(".onnx")),
                            progress)
    print_summary(exported)
    return exported


def _print_comparison(runs: _Runs, data: Dataset) -> None:
    """Top-1 and BOPs of every stage's model side by side, then ABS against the target."""
    click.echo(f"{'model':<26} {'test top-1':>10} {'BOPs':>12} {'vs FP':>8}")
    fp_bops = runs.fp["metrics"]["bops"]
    for label, ck in (("FP 32/32", runs.fp), ("uniform 4/4 (QAT)", runs.uniform),
                      ("ABS searched", runs.searched), ("ABS fine-tuned", runs.tuned)):
        m = ck["metrics"]
        click.echo(f"{label:<26} {100 * m['top1']:9.2f}% {fmt_count(m['bops']):>12} "
                   f"{fp_bops / m['bops']:7.1f}x")
    if runs.exported is not None:
        acc = runs.exported.report.get("accuracy", {})
        if "ort" in acc:
            click.echo(f"{'ABS in ONNX Runtime':<26} {100 * acc['ort']:9.2f}%")
    m, u, sizes = runs.tuned["metrics"], runs.uniform["metrics"], data.split_sizes()
    click.echo(f"ABS vs target FP/{TARGET:.0f}: BOPs {100 * (m['bops'] / runs.target - 1):+.1f}%;  "
               f"top-1 vs FP {100 * (m['top1'] - runs.fp['metrics']['top1']):+.2f} points, "
               f"vs uniform 4/4 {100 * (m['top1'] - u['top1']):+.2f} points "
               f"(test split, {sizes['test']} images; best epochs chosen on "
               f"{sizes['val']} validation images)")
