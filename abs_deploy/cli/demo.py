"""`abs demo`: the whole user path on the embedded digits data, in a few minutes on 2 cores."""

from __future__ import annotations

import time
from pathlib import Path

import click

from abs_deploy.checkpoint import save_checkpoint
from abs_deploy.cli.common import epoch_printer, fmt_count, guarded, progress
from abs_deploy.cli.train import print_decision
from abs_deploy.data import load_dataset
from abs_deploy.train import TrainConfig


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@guarded
def demo(out, seed):
    """Pretrain a digits CNN, quantize it uniformly at 4/4 bits (the baseline), and report."""
    from abs_deploy.pretrain import pretrain
    from abs_deploy.search.uniform import uniform_qat

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("digits")

    click.echo("== 1/2 pretrain digits_cnn (full precision)")
    fp = pretrain("digits_cnn", data, TrainConfig(epochs=30, lr=0.1, seed=seed), None,
                  progress, epoch_printer("pretrain"))
    save_checkpoint(fp, out / "fp.pt")

    click.echo("== 2/2 uniform QAT at 4/4 bits (first/last layer 8/8)")
    uni = uniform_qat(fp, data, 4, 4, TrainConfig(epochs=10, lr=0.01, seed=seed), 8, progress,
                      epoch_printer("qat w4a4"))
    save_checkpoint(uni, out / "uniform_w4a4.pt")
    print_decision(uni)

    click.echo("")
    click.echo(f"{'model':<22} {'top-1':>8} {'BOPs':>12} {'vs FP':>8}")
    fp_bops = fp["metrics"]["bops"]
    for label, ck in (("FP 32/32", fp), ("uniform 4/4", uni)):
        m = ck["metrics"]
        click.echo(f"{label:<22} {100 * m['top1']:7.2f}% {fmt_count(m['bops']):>12} "
                   f"{fp_bops / m['bops']:7.1f}x")
    click.echo(f"checkpoints in {out}/  ({time.perf_counter() - t0:.0f} s)")
