"""`abs-export` and `abs validate`: parse, call the export library, print one screen."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
import onnx

from abs_deploy.cli.common import (
    CliError,
    Command,
    ValidationFailed,
    data_dir_option,
    fmt_count,
    guarded,
    model_code_options,
    progress,
)
from abs_deploy.data import DATASETS
from abs_deploy.export.report_format import (
    kernel_sentences,
    model_label,
    models_of,
    pct,
    runtimes,
    target_line,
)

if TYPE_CHECKING:
    from abs_deploy.export.pipeline import ExportResult


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--onnx", "to_onnx", is_flag=True, default=True,
              help="Write ONNX (QCDQ) files; the only target, so also the default.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The QCDQ model's path (default: the checkpoint's name with .onnx). "
                   "The pruned float model and report.{json,md,png} go beside it.")
@click.option("--opset", type=click.IntRange(13, onnx.defs.onnx_opset_version()), default=21,
              show_default=True)
@click.option("--weights", type=click.Choice(["int8", "int4"]), default=None,
              help="int4: packed INT4 initializers for weights of <= 4 bits (default: the "
                   "storage the checkpoint's size target was counted for, else int8).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--skip-latency", is_flag=True, help="Skip the ORT latency measurement.")
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Validation data (default: the dataset the checkpoint names).")
@data_dir_option
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True,
              help="Validation batch size.")
@click.option("--max-images", type=click.IntRange(1), default=None,
              help="Validate on the first N test images only.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Threads of the 'all threads' latency runs (default: every core).")
@click.option("--runs", type=click.IntRange(50), default=50, show_default=True,
              help="Timed runs per latency figure.")
@click.option("--no-reduce-range", is_flag=True,
              help="Keep 8-bit weights at 8 bits where they meet 8-bit or signed inputs "
                   "(ORT's u8s8 kernels on AVX2 without VNNI may then saturate).")
@click.option("--check-runtime", "check_runtimes", type=click.Choice(["openvino"]),
              multiple=True, help="Also validate (and time) the QCDQ model in this runtime; "
                                  "openvino needs the extra: pip install 'abs-deploy[openvino]'.")
@click.option("--ort-format", is_flag=True,
              help="Also write model.ort, the file ONNX Runtime Mobile loads, and validate it.")
@model_code_options
@guarded
def export_main(checkpoint, to_onnx, output, opset, weights, no_simplify, skip_latency,
                dataset, data_dir, batch_size, max_images, threads, runs, no_reduce_range,
                check_runtimes, ort_format):
    """Collapse, prune and export a searched or fine-tuned CHECKPOINT as QCDQ ONNX, validate
    it in ONNX Runtime against the PyTorch reference, and report BOPs, parity and latency."""
    from abs_deploy.export.pipeline import ExportOptions, export_model

    if not to_onnx:
        raise CliError("nothing to do: --onnx is the only export target")
    opts = ExportOptions(output=output, opset=opset, weights=weights, simplify=not no_simplify,
                         latency=not skip_latency, dataset=dataset, data_dir=data_dir,
                         batch_size=batch_size, threads=threads, latency_runs=runs,
                         reduce_range=not no_reduce_range, max_images=max_images,
                         check_runtimes=tuple(dict.fromkeys(check_runtimes)),
                         ort_format=ort_format)
    result = export_model(checkpoint, opts, progress, on_step=_announce)
    print_summary(result)


def _announce(step: str) -> None:
    if sys.stderr.isatty():
        click.echo(f"  {step} ...", err=True)


def print_summary(result: ExportResult) -> None:
    """One screen: files, each target against its measurement, BOPs and size ratios,
    accuracy, parity, latency, the fastest file."""
    r = result.report
    click.echo(f"exported {r['arch']} ({r['stage']}, {r['method']}) in {result.seconds:.1f} s "
               f"-> {result.files['onnx'].parent}/")
    click.echo("  files   " + ", ".join(
        f"{p.name} ({_size(p.stat().st_size)})" if p.suffix in (".onnx", ".ort") else p.name
        for p in result.files.values()))
    for i, row in enumerate(r.get("targets") or []):
        click.echo(("  targets " if i == 0 else "          ") + target_line(row))
    _print_totals(r["totals"])
    _print_accuracy(r["accuracy"], r["dataset"])
    _print_parity(r["parity"])
    for i, sentence in enumerate(kernel_sentences(r.get("kernels"))):
        click.echo(("  kernels " if i == 0 else "          ") + sentence)
    _print_latency(r.get("latency"))


def _print_totals(t: dict) -> None:
    ratio = t["ratios"]
    versus = " (vs its float32 weights)" if t.get("fp_file_estimated") else ""
    click.echo(f"  BOPs    {fmt_count(t['fp']['bops'])} -> {fmt_count(t['exported']['bops'])}"
               f"  ({ratio['bops']:.1f}x fewer)   MACs {ratio['macs']:.2f}x   "
               f"params {ratio['params']:.2f}x   file {ratio['file_bytes']:.1f}x smaller{versus}")


def _print_accuracy(acc: dict, dataset: str) -> None:
    source = "" if acc["fp_source"] == "float weights" else f" ({acc['fp_source']})"
    click.echo(f"  top-1   FP original {pct(acc['fp_original'])}{source}   reference "
               f"{pct(acc['reference'])}   ORT {pct(acc['ort'])}   ORT no-opt "
               f"{pct(acc['ort_unoptimized'])}   ({acc['images']} images of {dataset})")


def _print_parity(par: dict) -> None:
    p, off, full = par["pruning"], par["ort_unoptimized"], par["ort_optimized"]
    click.echo(f"  parity  pruned = masked to {max(p['logits_rel'], p['onnx_logits_rel']):.0e}"
               f"  |  ORT no-opt logits: last segment {off['logits_rel']:.0e}, end to end "
               f"{off.get('end_to_end_logits_rel', float('nan')):.0e}"
               f"  |  ORT int8: top-1 agree {pct(full['top1_agreement'])}, codes equal "
               f"{pct(full['codes_equal'], 3)}, max diff {full['codes_max_diff']}")
    ov = par.get("openvino")
    if ov:
        click.echo(f"          OpenVINO: top-1 {pct(ov['accuracy'])}, agree "
                   f"{pct(ov['top1_agreement'])}, codes equal {pct(ov['codes_equal'], 3)}, "
                   f"max diff {ov['codes_max_diff']}")
    mobile = par.get("ort_format")
    if mobile:
        click.echo(f"          .ort: top-1 {pct(mobile['accuracy'])}, agree "
                   f"{pct(mobile['top1_agreement'])}, logits vs .onnx "
                   f"{mobile['onnx_logits_rel']:.0e}")
    click.echo("          all checks passed")


def _print_latency(lat: dict | None) -> None:
    """A table of models by setting (batch, threads), then the headline setting's speeds."""
    if not lat:
        click.echo("  latency skipped")
        return
    rows = lat["rows"]
    cols = sorted({(row["batch"], row["threads"]) for row in rows})
    models = models_of(rows)
    click.echo(f"  latency in {runtimes(models)}, median / p90 ms ({rows[0]['runs']} runs), "
               f"{lat['cpu']}")
    width = max(len(model_label(m)) for m in models) + 1
    click.echo("    " + " " * width + "".join(f"{f'bs{b} {n}t':>18}" for b, n in cols))
    for model in models:
        cells = {(row["batch"], row["threads"]): row for row in rows if row["model"] == model}
        click.echo("    " + f"{model_label(model):<{width}}" + "".join(
            f"{cells[c]['median_ms']:>9.2f} /{cells[c]['p90_ms']:>7.2f}" for c in cols))
    setting = lat["headline"]
    speed = lat["speedup_vs_fp_original"].get(setting, {})
    fastest = lat["fastest"]
    click.echo(f"  fastest {model_label(fastest)} at {setting}: "
               + ", ".join(f"{model_label(m)} {v:.2f}x" for m, v in speed.items())
               + " the speed of the FP original")


@click.command("validate", cls=Command)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Default: the dataset named in the file's metadata.")
@data_dir_option
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--max-images", type=click.IntRange(1), default=None)
@click.option("--runtime", type=click.Choice(["onnxruntime", "openvino"]), default="onnxruntime",
              show_default=True, help="The runtime to check against ORT without optimizations "
                                      "(float DQ math, the reference's own).")
@guarded
def validate(model, dataset, data_dir, batch_size, max_images, runtime):
    """Accuracy of an exported MODEL in ONNX Runtime (or OpenVINO) with all graph
    optimizations, against ONNX Runtime without them, and how well the two agree."""
    from abs_deploy.export.pipeline import validate_file

    check = validate_file(model, dataset, data_dir, batch_size, max_images, progress, runtime)
    layers = check.decision or {}
    if layers:
        bits = ", ".join(f"w{d['w_bits']}a{d['a_bits']}" for d in layers.values())
        kept = sum(len(d["kept"]) for d in layers.values())
        total = sum(d["total"] for d in layers.values())
        click.echo(f"{Path(model).name}: {len(layers)} layers ({bits}), {kept}/{total} "
                   "filters kept")
    name = "OpenVINO" if runtime == "openvino" else "ORT"
    click.echo(f"top-1 on {check.images} images: {name} {pct(check.accuracy_all)}, ORT without "
               f"optimizations {pct(check.accuracy_off)}; the two agree on "
               f"{pct(check.top1_agreement)} (logits {check.logits_rel:.1e} relative)")
    if check.failure:
        raise ValidationFailed(check.failure)


def _size(n: int) -> str:
    for unit, div in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"
