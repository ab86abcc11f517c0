"""`abs pretrain`, `abs search`, `abs bops`: parse, call the library, print."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import click

from abs_deploy import bops
from abs_deploy.checkpoint import load_checkpoint, save_checkpoint
from abs_deploy.cli.common import (
    CliError,
    Command,
    FiniteFloat,
    bits_list,
    checkpoint_data_options,
    data_dir_option,
    echo_on,
    epoch_printer,
    fmt_count,
    guarded,
    input_shape_option,
    model_code_options,
    progress,
    train_options,
    training_processes,
)
from abs_deploy.data import DATASETS, dataset_for, load_dataset
from abs_deploy.decision import FLOAT_BITS
from abs_deploy.device import resolve_device
from abs_deploy.distributed import Dist
from abs_deploy.errors import UserError
from abs_deploy.files import check_output
from abs_deploy.models.registry import build_model, create_model, data_kwargs, default_input_shape
from abs_deploy.search.finetune import GRAD_CLIP
from abs_deploy.train import TrainConfig

if TYPE_CHECKING:
    from abs_deploy.latency_table import LatencyTable

BITS = click.IntRange(2, 8)


@click.command(cls=Command)
@click.option("--model", "model_name", required=True,
              help="Zoo name (e.g. digits_cnn, resnet20) or import path pkg.module:factory.")
@click.option("--model-kwargs", default="{}", help="JSON keyword arguments for the builder.")
@click.option("--dataset", type=click.Choice(DATASETS), default="digits", show_default=True)
@data_dir_option
@click.option("--image-size", type=click.IntRange(8), default=32, show_default=True,
              help="Side of the square crop for --dataset imagefolder.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@train_options(epochs=30, lr=0.1)
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None,
              help="Mixed-precision autocast for this full-precision stage (the quantizing "
                   "stages always train in float32).")
@guarded
def pretrain(model_name, model_kwargs, dataset, data_dir, image_size, output, epochs, lr,
             batch_size, seed, device, workers, sync_bn, amp):
    """Train the full-precision starting point."""
    from abs_deploy.pretrain import pretrain as run

    check_output(output)
    resolve_device(device)      # a device this machine lacks: one line, before any work
    kwargs = _json_kwargs(model_kwargs)
    with training_processes(device) as (dist, device):
        data = load_dataset(dataset, data_dir, image_size=image_size).on(device, workers)
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          sync_bn=sync_bn, amp=amp)
        ckpt = run(model_name, data, cfg, kwargs, progress, epoch_printer("pretrain"))
        _write(ckpt, output, dist)
    m = ckpt["metrics"]
    echo_on(dist)(f"FP {model_name} on {dataset}: test top-1 {100 * m['top1']:.2f}%  "
                  f"MACs {fmt_count(m['macs'])}  BOPs {fmt_count(m['bops'])}  -> {output}")


def _write(ckpt: dict, output: str, dist: Dist) -> None:
    """Rank 0 writes the stage's one checkpoint; the others wait until it is on disk."""
    if dist.is_main:
        save_checkpoint(ckpt, output)
    dist.barrier()


# Per-method training defaults: QAT and fine-tune start from trained weights (small lr); the
# searches train gates and weights together for longer.
# Fine-tune trains the BN-folded network, which has no normalisation left to absorb a large
# step: ResNet-20 (digits32) diverged to 10% top-1 at lr >= 0.003 and trains at 0.001
# (measured for ABS and BSQ searches alike).
_DEFAULTS = {"uniform": (10, 0.01), "abs": (15, 0.01), "bsq": (15, 0.01), "finetune": (10, 0.001)}


@click.command(cls=Command)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--method", type=click.Choice(["uniform", "abs", "bsq"]), default="abs",
              show_default=True)
@click.option("--target-bops", default=None,
              help="abs/bsq: BOP target as a ratio of FP (0.05), a factor (64x) or a count "
                   "(35M, 1.2G).")
@click.option("--target-latency", default=None,
              help="abs: latency target as a fraction of the float original's (0.5x) or in ms "
                   "(3.2ms), in the runtime and setting --lut was measured in.")
@click.option("--lut", type=click.Path(dir_okay=False), default=None,
              help="abs: latency table from `abs profile` (needed by --target-latency).")
@click.option("--target-size", default=None,
              help="abs: bytes the weights take as export stores them (150KB, 1.5MB).")
@click.option("--weights", type=click.Choice(["int8", "int4"]), default="int8",
              show_default=True,
              help="abs: the storage --target-size counts (int4: weights of <= 4 bits packed two "
                   "a byte, as `abs-export --weights int4` writes them).")
@click.option("--lam", type=FiniteFloat(min=0), default=None,
              help="abs: fixed BOP-loss weight (the paper's mode) instead of a target.")
@click.option("--candidates", default="2,4,8", show_default=True,
              help="abs: candidate bitwidths, ascending.")
@click.option("--max-prune", type=FiniteFloat(0, 1, max_open=True), default=0.5,
              show_default=True, help="abs: largest fraction of a layer's filters to remove.")
@click.option("--channel-multiple", type=click.IntRange(1), default=1, show_default=True,
              help="abs: keep only multiples of this many channels in each prunable group (or "
                   "all of them): int8 kernels run other counts much slower (8 for ONNX "
                   "Runtime on x86). With --lut the table's grid counts are kept instead.")
@click.option("--resume", is_flag=True,
              help="abs: continue an interrupted search from OUTPUT's .partial state file.")
@click.option("--alpha", type=FiniteFloat(min=0), default=0.5, show_default=True,
              help="bsq: bit-level group Lasso strength (adapted when --target-bops is given).")
@click.option("--act-bits", type=BITS, default=4, show_default=True,
              help="bsq: fixed activation bits.")
@click.option("--w-bits", type=BITS, default=4, show_default=True, help="uniform: weight bits.")
@click.option("--a-bits", type=BITS, default=4, show_default=True,
              help="uniform: activation bits.")
@click.option("--edge-bits", type=BITS, default=8, show_default=True,
              help="Bits of the first and last layer.")
@checkpoint_data_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@train_options()
@model_code_options
@guarded
def search(checkpoint, method, target_bops, target_latency, lut, target_size, weights, lam,
           candidates, max_prune, channel_multiple, resume, alpha, act_bits, w_bits, a_bits,
           edge_bits, dataset, data_dir, output, epochs, lr, batch_size, seed, device, workers,
           sync_bn):
    """Search per-layer bits (and, for abs, pruned filters) from a trained FP checkpoint."""
    check_output(output, [checkpoint] + ([lut] if lut else []))
    resolve_device(device)
    state = Path(f"{output}.partial")
    if method == "abs":
        check_output(state, [checkpoint])
    fp = load_checkpoint(checkpoint, stages=("fp",))
    cands = bits_list(candidates)
    table = _latency_table(lut, fp, cands, edge_bits) if lut else None
    targets = _unit_targets(method, target_latency, table, target_size)
    if channel_multiple > 1 and method != "abs":
        raise CliError("--channel-multiple is for --method abs")
    if method == "abs" and target_bops is None and lam is None and not targets:
        raise CliError("abs needs a target (--target-bops, --target-latency or --target-size) "
                       "or --lam for a fixed weight")
    if method == "abs" and state.exists() and not resume:
        raise CliError(f"{state} holds an interrupted search: add --resume to continue it, "
                       "or delete it to start over")
    if method == "abs" and resume and state.exists():
        load_checkpoint(state, stages=("searched",))  # an input too: refused before any work
    target = _target(target_bops, fp) if target_bops else None
    if table is not None and target_latency and target_latency.strip().lower().endswith("ms"):
        note = table.speed_note()
        if note:     # after every check of the inputs: a refused search prints only its error
            click.echo(f"note: {note}")
    with training_processes(device) as (dist, device):
        data = dataset_for(fp["input"], data_dir, dataset).on(device, workers)
        cfg = _config("uniform" if method == "uniform" else method, epochs, lr, batch_size,
                      seed, sync_bn)
        ckpt = _run_search(method, fp, data, cfg, target, lam, cands, max_prune, alpha,
                           act_bits, w_bits, a_bits, edge_bits, str(state),
                           {"targets": targets, "lut": table, "weights": weights,
                            "channel_multiple": channel_multiple})
        _write(ckpt, output, dist)
    if method == "abs" and dist.is_main:
        state.unlink(missing_ok=True)
    if dist.is_main:
        print_decision(ckpt, target)
        click.echo(f"-> {output}")


def _run_search(method, fp, data, cfg, target, lam, cands, max_prune, alpha, act_bits, w_bits,
                a_bits, edge_bits, state, unit_targets) -> dict:
    if method == "uniform":
        from abs_deploy.search.uniform import uniform_qat
        return uniform_qat(fp, data, w_bits, a_bits, cfg, edge_bits, progress,
                           epoch_printer(f"qat w{w_bits}a{a_bits}"))
    if method == "abs":
        from abs_deploy.search.abs_search import abs_search
        return abs_search(fp, data, target, cfg, lam=lam, candidates=cands,
                          max_prune=max_prune, edge_bits=edge_bits, progress=progress,
                          on_epoch_end=epoch_printer("abs"), resume_path=state, **unit_targets)
    from abs_deploy.search.bsq import bsq_search
    return bsq_search(fp, data, alpha, act_bits, cfg, target_bops=target, edge_bits=edge_bits,
                      progress=progress, on_epoch_end=epoch_printer("bsq"))


@click.command(cls=Command)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@checkpoint_data_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@click.option("--streams/--no-streams", default=False, show_default=True,
              help="Also quantize every tensor that meets a residual add (trained), so "
                   "the exported convs and adds all run on integer kernels in ONNX Runtime "
                   "(ResNet-20: 1.06x the pruned float model's speed there idle, more under "
                   "load; OpenVINO needs a workaround for these files, slower at batch 1; see "
                   "README).")
@click.option("--stream-codes", type=click.Choice(["shared", "8bit"]), default="shared",
              show_default=True,
              help="With --streams: 'shared' quantizes a stream that its layers all read with "
                   "the same bits by their own quantizer (one clip, no requantization); "
                   "'8bit' gives every stream an 8-bit quantizer of its own.")
@click.option("--grad-clip", type=FiniteFloat(min=0), default=GRAD_CLIP, show_default=True,
              help="Clip the gradients' global norm to this at every step (0: no clip). The "
                   "BN-folded network has no normalisation to absorb a large step; without "
                   "the clip a heavily pruned ResNet-20 diverged at the default rate.")
@train_options()
@model_code_options
@guarded
def finetune(checkpoint, dataset, data_dir, output, streams, stream_codes, grad_clip, epochs,
             lr, batch_size, seed, device, workers, sync_bn):
    """Train a searched configuration in its deployable form (BN folded, bits fixed)."""
    from abs_deploy.search.finetune import finetune as run

    check_output(output, [checkpoint])
    resolve_device(device)
    searched = load_checkpoint(checkpoint, stages=("searched",))
    with training_processes(device) as (dist, device):
        data = dataset_for(searched["input"], data_dir, dataset).on(device, workers)
        cfg = _config("finetune", epochs, lr, batch_size, seed, sync_bn,
                      grad_clip=grad_clip or None)
        ckpt = run(searched, data, cfg,
                   progress, epoch_printer("finetune"), with_streams=streams,
                   shared_codes=stream_codes == "shared")
        _write(ckpt, output, dist)
    if dist.is_main:
        print_decision(ckpt)
        click.echo(f"-> {output}")


def _config(method: str, epochs, lr, batch_size, seed, sync_bn: bool = False,
            grad_clip: float | None = None) -> TrainConfig:
    default_epochs, default_lr = _DEFAULTS[method]
    return TrainConfig(epochs=epochs or default_epochs, lr=lr or default_lr,
                       batch_size=batch_size, seed=seed, sync_bn=sync_bn, grad_clip=grad_clip)


def _target(text: str, fp: dict) -> float:
    fp_bops = (fp.get("metrics") or {}).get("fp_bops")
    try:
        target = bops.parse_bops(text, float(fp_bops) if isinstance(fp_bops, (int, float))
                                 else math.nan)
    except ValueError as e:
        raise CliError(str(e)) from None
    if not math.isfinite(target) or target <= 0:
        raise CliError(f"the checkpoint records no usable FP BOPs ({fp_bops!r}), so "
                       f"--target-bops {text} cannot be read as a ratio; give a count (35M)")
    return target


def _latency_table(path: str, fp: dict, cands: tuple[int, ...], edge_bits: int
                   ) -> LatencyTable:
    """The table, refused in one line unless it was measured for this model, on this machine,
    over these candidates (how far down its grids reach, the search checks)."""
    from abs_deploy.latency_table import LatencyTable
    from abs_deploy.machine import runtime_version

    table = LatencyTable.load(path)
    table.check_for(fp["arch"], fp["input"]["shape"])
    try:
        installed = runtime_version(table.runtime)
    except ImportError:
        raise CliError(f"{path} was measured in {table.runtime}, which is not installed "
                       "here") from None
    if installed != table.runtime_version:
        raise CliError(f"{path} was measured with {table.runtime} {table.runtime_version}; "
                       f"this machine has {installed}: profile again")
    if not set(cands) <= set(table.candidates) or (edge_bits and
                                                   edge_bits not in table.candidates):
        raise CliError(f"{path} was measured for candidates {list(table.candidates)}; this "
                       f"search uses {list(cands)} (edge {edge_bits}): profile it with them")
    return table


def _unit_targets(method: str, latency: str | None, table, size: str | None) -> list:
    from abs_deploy.search.costs import Target, parse_latency, parse_size

    if (latency or size or table) and method != "abs":
        raise CliError("--target-latency, --target-size and --lut are for --method abs")
    if latency and table is None:
        raise CliError("--target-latency needs --lut (a latency table from `abs profile`)")
    targets = []
    if latency:
        targets.append(Target("latency", parse_latency(latency, table.fp_original_ms), latency))
    if size:
        targets.append(Target("size", parse_size(size), size))
    return targets


def print_decision(ckpt: dict, target: float | None = None) -> None:
    """Per-layer bits, kept filters and BOPs, then the totals against FP (and the target)."""
    rows = {r.name: r for r in bops.decision_bops(ckpt["decision"], ckpt["arch"],
                                                  ckpt["input"]["shape"])}
    click.echo(f"{'layer':<28} {'w':>2} {'a':>2} {'kept':>9} {'BOPs':>12}")
    for name, d in ckpt["decision"].items():
        r = rows[name]
        click.echo(f"{name:<28} {d.w_bits:>2} {d.a_bits:>2} "
                   f"{len(d.kept):>4}/{r.c_out:<4} {fmt_count(r.bops):>12}")
    m = ckpt["metrics"]
    aim = f"  (target {fmt_count(target)}, off by {100 * (m['bops'] / target - 1):+.1f}%)" \
        if target else ""
    click.echo(f"test top-1 {100 * m['top1']:.2f}% (FP {100 * m['fp_top1']:.2f}%)  "
               f"BOPs {fmt_count(m['bops'])} = FP/{m['fp_bops'] / m['bops']:.1f}{aim}")
    for t in ckpt.get("targets", []):
        if t["kind"] != "bops":
            click.echo(f"{t['kind']} predicted {_unit(t, t['predicted'])}, target "
                       f"{_unit(t, t['value'])} ({t['text']}): "
                       f"{100 * (t['predicted'] / t['value'] - 1):+.1f}%")


def _unit(t: dict, value: float) -> str:
    return f"{value:.3g} ms" if t["unit"] == "ms" else f"{value / 1e3:,.1f} KB"


@click.command("bops", cls=Command)
@click.argument("model")
@click.option("--num-classes", type=click.IntRange(1), default=None)
@click.option("--input-shape", default=None, help="C,H,W (default: what the model is built for)")
@click.option("--w-bits", type=click.IntRange(1, 32), default=32, show_default=True)
@click.option("--a-bits", type=click.IntRange(1, 32), default=32, show_default=True)
@click.option("--edge-bits", type=click.IntRange(1, 32), default=8, show_default=True,
              help="Bits of the first and last layer when --w-bits/--a-bits are given.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@model_code_options
@guarded
def bops_cmd(model, num_classes, input_shape, w_bits, a_bits, edge_bits, as_json):
    """Per-layer MACs and BOPs of a zoo model or a checkpoint (FP counts as 32x32 bits)."""
    shape = input_shape_option(input_shape) if input_shape else None
    if Path(model).suffix == ".pt" or Path(model).is_file():
        ckpt = load_checkpoint(model)
        if ckpt["decision"]:
            rows = bops.decision_bops(ckpt["decision"], ckpt["arch"], ckpt["input"]["shape"])
        else:
            rows = _uniform_rows(build_model(ckpt["arch"]), ckpt["input"]["shape"],
                                 w_bits, a_bits, edge_bits)
    else:
        shape = shape or default_input_shape(model)
        net = create_model(model, **data_kwargs(model, num_classes, shape[0]))
        rows = _uniform_rows(net, [1, *shape], w_bits, a_bits, edge_bits)
    fp = sum(r.macs for r in rows) * FLOAT_BITS ** 2
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


def _json_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--model-kwargs is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UserError("--model-kwargs must be a JSON object")
    return value

