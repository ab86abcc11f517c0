"""`abs pretrain`, `abs search`, `abs bops`: parse, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path

import click

from abs_deploy import bops
from abs_deploy.checkpoint import load_checkpoint, save_checkpoint
from abs_deploy.cli.common import (
    CliError,
    data_dir_option,
    epoch_printer,
    fmt_count,
    guarded,
    progress,
    train_options,
)
from abs_deploy.data import DATASETS, dataset_for, load_dataset
from abs_deploy.errors import UserError
from abs_deploy.models.registry import build_model, create_model, default_input_shape
from abs_deploy.train import TrainConfig

BITS = click.IntRange(2, 8)


@click.command()
@click.option("--model", "model_name", required=True,
              help="Zoo name (e.g. digits_cnn, resnet20) or import path pkg.module:factory.")
@click.option("--model-kwargs", default="{}", help="JSON keyword arguments for the builder.")
@click.option("--dataset", type=click.Choice(DATASETS), default="digits", show_default=True)
@data_dir_option
@click.option("--image-size", type=click.IntRange(8), default=32, show_default=True,
              help="Side of the square crop for --dataset imagefolder.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@train_options(epochs=30, lr=0.1)
@guarded
def pretrain(model_name, model_kwargs, dataset, data_dir, image_size, output, epochs, lr,
             batch_size, seed):
    """Train the full-precision starting point."""
    from abs_deploy.pretrain import pretrain as run

    data = load_dataset(dataset, data_dir, image_size=image_size)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    ckpt = run(model_name, data, cfg, _json_kwargs(model_kwargs), progress,
               epoch_printer("pretrain"))
    save_checkpoint(ckpt, output)
    m = ckpt["metrics"]
    click.echo(f"FP {model_name} on {dataset}: top-1 {100 * m['top1']:.2f}%  "
               f"MACs {fmt_count(m['macs'])}  BOPs {fmt_count(m['bops'])}  -> {output}")


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--method", type=click.Choice(["uniform"]), default="uniform", show_default=True)
@click.option("--w-bits", type=BITS, default=4, show_default=True)
@click.option("--a-bits", type=BITS, default=4, show_default=True)
@click.option("--edge-bits", type=BITS, default=8, show_default=True,
              help="Bits of the first and last layer.")
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Default: the dataset the checkpoint was trained on.")
@data_dir_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@train_options(epochs=10, lr=0.01)
@guarded
def search(checkpoint, method, w_bits, a_bits, edge_bits, dataset, data_dir, output, epochs,
           lr, batch_size, seed):
    """Search per-layer bits and pruning from a trained FP checkpoint."""
    from abs_deploy.search.uniform import uniform_qat

    fp = load_checkpoint(checkpoint, stages=("fp",))
    data = dataset_for(fp["input"], data_dir, dataset)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    ckpt = uniform_qat(fp, data, w_bits, a_bits, cfg, edge_bits, progress,
                       epoch_printer(f"qat w{w_bits}a{a_bits}"))
    save_checkpoint(ckpt, output)
    print_decision(ckpt)


def print_decision(ckpt: dict) -> None:
    """Per-layer bits, kept filters and BOPs, then the totals against FP."""
    rows = {r.name: r for r in bops.decision_bops(ckpt["decision"], ckpt["arch"],
                                                  ckpt["input"]["shape"])}
    click.echo(f"{'layer':<28} {'w':>2} {'a':>2} {'kept':>9} {'BOPs':>12}")
    for name, d in ckpt["decision"].items():
        r = rows[name]
        click.echo(f"{name:<28} {d['w_bits']:>2} {d['a_bits']:>2} "
                   f"{len(d['kept']):>4}/{r.c_out:<4} {fmt_count(r.bops):>12}")
    m = ckpt["metrics"]
    click.echo(f"top-1 {100 * m['top1']:.2f}% (FP {100 * m['fp_top1']:.2f}%)  "
               f"BOPs {fmt_count(m['bops'])} = FP/{m['fp_bops'] / m['bops']:.1f}")


@click.command("bops")
@click.argument("model")
@click.option("--num-classes", type=click.IntRange(1), default=None)
@click.option("--input-shape", default=None, help="C,H,W (default: what the model is built for)")
@click.option("--w-bits", type=click.IntRange(1, 32), default=32, show_default=True)
@click.option("--a-bits", type=click.IntRange(1, 32), default=32, show_default=True)
@click.option("--edge-bits", type=click.IntRange(1, 32), default=8, show_default=True,
              help="Bits of the first and last layer when --w-bits/--a-bits are given.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guarded
def bops_cmd(model, num_classes, input_shape, w_bits, a_bits, edge_bits, as_json):
    """Per-layer MACs and BOPs of a zoo model or a checkpoint (FP counts as 32x32 bits)."""
    if Path(model).suffix == ".pt" or Path(model).is_file():
        ckpt = load_checkpoint(model)
        if ckpt["decision"]:
            rows = bops.decision_bops(ckpt["decision"], ckpt["arch"], ckpt["input"]["shape"])
        else:
            rows = _uniform_rows(build_model(ckpt["arch"]), ckpt["input"]["shape"],
                                 w_bits, a_bits, edge_bits)
    else:
        kwargs = {"num_classes": num_classes} if num_classes else {}
        shape = _shape(input_shape) if input_shape else default_input_shape(model)
        net = create_model(model, **kwargs, **({"in_chans": shape[0]} if ":" not in model
                                                 else {}))
        rows = _uniform_rows(net, [1, *shape], w_bits, a_bits, edge_bits)
    fp = sum(r.macs for r in rows) * bops.FP_BITS ** 2
    tot = bops.totals(rows)
    if as_json:
        click.echo(json.dumps({"layers": bops.rows_as_dicts(rows), "macs": tot["macs"],
                               "bops": tot["bops"], "fp_bops": fp,
                               "ratio": fp / tot["bops"]}, indent=1))
        return
    click.echo(f"{'layer':<30} {'MACs':>12} {'w':>3} {'a':>3} {'BOPs':>14}")
    for r in rows:
        click.echo(f"{r.name:<30} {r.macs:>12,} {r.w_bits:>3} {r.a_bits:>3} {r.bops:>14,}")
    click.echo(f"total MACs {tot['macs'] / 1e6:,.2f} M   BOPs {tot['bops'] / 1e6:,.1f} M   "
               f"(FP {fp / 1e6:,.1f} M, ratio {fp / tot['bops']:.1f}x)")


def _uniform_rows(net, shape, w_bits, a_bits, edge_bits):
    costs = bops.layer_costs(net, tuple(shape))
    quantized = w_bits < 32 or a_bits < 32
    return bops.bops_table(costs, bops.default_bits(costs, w_bits, a_bits, edge_bits)
                           if quantized else None)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise CliError(f"--input-shape must be C,H,W, got '{text}'") from None
    return c, h, w


def _json_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--model-kwargs is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UserError("--model-kwargs must be a JSON object")
    return value

