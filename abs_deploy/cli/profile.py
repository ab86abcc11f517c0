"""`abs profile`: parse, call export/profile.py, print."""

from __future__ import annotations

from pathlib import Path

import click

from abs_deploy.checkpoint import load_checkpoint
from abs_deploy.cli.common import (
    Command,
    FiniteFloat,
    bits_list,
    guarded,
    input_shape_option,
    model_code_options,
    progress,
)
from abs_deploy.export.latency import MIN_RUNS, WARMUP
from abs_deploy.files import check_output
from abs_deploy.models.registry import arch_record, data_kwargs, default_input_shape

RUNTIME_NAMES = {"ort": "onnxruntime", "openvino": "openvino"}


@click.command("profile", cls=Command)
@click.argument("model")
@click.option("--runtime", type=click.Choice(sorted(RUNTIME_NAMES)), default="ort",
              show_default=True)
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--clock", type=click.Choice(["auto", "cpu", "wall"]), default="auto",
              show_default=True,
              help="Time runs by this process's CPU time (auto: on one thread, where other "
                   "work on the machine then does not count) or by the wall clock.")
@click.option("--candidates", default="2,4,8", show_default=True,
              help="Bit widths the search may choose for weights and activations.")
@click.option("--edge-bits", type=click.IntRange(2, 8), default=8, show_default=True,
              help="Bits of the first and last layer.")
@click.option("--max-prune", type=FiniteFloat(min=0, max=1, max_open=True), default=0.5,
              show_default=True, help="Kept channels are profiled from (1 - this) * C to C.")
@click.option("--grid-points", type=click.IntRange(1, 8), default=4, show_default=True,
              help="Kept-channel counts profiled per prunable side of a layer.")
@click.option("--channel-multiple", type=click.IntRange(1), default=None,
              help="Profile (and so let a search keep) only channel counts that are multiples "
                   "of this, or a layer's full count. Default: 8 for ort (its int8 kernels run "
                   "other counts much slower here), 1 (any count) for openvino.")
@click.option("--streams", is_flag=True,
              help="Profile exports with residual-stream quantizers (abs finetune --streams).")
@click.option("--num-classes", type=click.IntRange(1), default=None,
              help="For a zoo name: classes of the output layer.")
@click.option("--input-shape", default=None,
              help="For a zoo name: C,H,W (default: what the model is built for).")
@click.option("--runs", type=click.IntRange(MIN_RUNS), default=MIN_RUNS, show_default=True,
              help="Timed runs per piece and whole model (after warm-up).")
@click.option("--warmup", type=click.IntRange(0), default=WARMUP, show_default=True)
@click.option("--fit-decisions", type=click.IntRange(2), default=6, show_default=True,
              help="Random decisions exported whole to fit the overhead.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@model_code_options
@guarded
def profile_cmd(model, runtime, batch, threads, clock, candidates, edge_bits, max_prune,
                grid_points, channel_multiple, streams, num_classes, input_shape, runs, warmup,
                fit_decisions, output):
    """Latency lookup table of MODEL (zoo name or fp checkpoint) on this machine: each layer
    as the export emits it, per candidate bits and kept channels, plus the whole FP model.
    An existing OUTPUT of the same model, runtime, machine and setting is reused and
    extended, not measured again."""
    from abs_deploy.export.profile import ProfileOptions, profile

    check_output(output, [model] if Path(model).is_file() else [])
    arch, shape = _model(model, num_classes, input_shape)
    opts = ProfileOptions(RUNTIME_NAMES[runtime], batch, threads, clock, bits_list(candidates),
                          edge_bits, max_prune, grid_points, channel_multiple, streams, runs,
                          warmup, fit_decisions)
    r = profile(arch, shape, output, opts, progress)
    t = r.table
    click.echo(f"{len(t.layers())} layers on {t.runtime} {t.runtime_version} "
               f"(batch {t.batch}, {t.threads} thread(s), {t.clock} clock): measured "
               f"{r.measured} layer piece(s) and {r.whole_models} whole model(s) in "
               f"{r.exports} export(s), reused {r.reused} grid cell(s); {r.seconds:.0f} s")
    constant, _ = t.overhead()
    fit = t.fit
    click.echo(f"FP original {t.fp_original_ms:.3f} ms; overhead {constant:.3f} ms + per "
               f"channel terms, fit on {fit['decisions']} decisions: rms "
               f"{fit['rms_ms']:.3f} ms, max {100 * fit['max_rel']:.1f}%  -> {output}")
    note = t.speed_note()
    if note:
        click.echo(f"note: {note}")


def _model(model: str, num_classes: int | None, input_shape: str | None
           ) -> tuple[dict, list[int]]:
    """The architecture record and input shape of a zoo name or an fp checkpoint (whose
    weights are not needed: latency does not depend on them)."""
    if Path(model).suffix == ".pt" or Path(model).is_file():
        ckpt = load_checkpoint(model)
        return ckpt["arch"], list(ckpt["input"]["shape"])
    shape = input_shape_option(input_shape) if input_shape else default_input_shape(model)
    return (arch_record(model, **data_kwargs(model, num_classes, shape[0])), [1, *shape])
