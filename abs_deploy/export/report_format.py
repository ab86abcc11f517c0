"""How the views of an export report word and write what `report.json` holds: the labels of
models, runtimes, totals and parity checks, and the formatting of counts, percentages and bits.
report.md, report.html and the `abs-export` summary take them from here, so a label or a
figure reads the same in each (the summary's one-line counts are the CLI's `fmt_count`, as
every command prints them). This module reads nothing but the report dict and imports no view
and no exporter code: `abs report` renders from the JSON alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from abs_deploy.decision import FLOAT_BITS

# How report.json writes "not quantized": bits at or above it are float. It is part of the file
# format (abs-deploy-report/1), so it is fixed here rather than taken from the exporter, whose

MODEL_LABELS = {"fp_original": "FP original", "fp_pruned": "pruned FP", "qcdq": "QCDQ",
                "fp_original_openvino": "FP original (OpenVINO)",
                "fp_pruned_openvino": "pruned FP (OpenVINO)", "qcdq_openvino": "QCDQ (OpenVINO)"}

PARITY_TERMS = ("Relative = max |runtime - reference| / max |reference| over every image and "
                "class. \"Fed the reference's codes\": a copy of the file cut at every "
                "activation quantizer, each segment reading the PyTorch reference's integer "
                "codes through a copy of its own quantizer, so one code of float-order rounding "
                "upstream is not magnified downstream; \"end to end\": the file as it is.")


def model_label(model: object) -> str:
    """A latency row's model as a reader knows it; a name this version does not know (or a
    hand-edited value) is shown as it is."""
    return MODEL_LABELS.get(model, model) if isinstance(model, str) else str(model)


def models_of(rows: list[dict]) -> list[str]:
    """The models of the latency rows, in the order they were timed."""
    return list(dict.fromkeys(row["model"] for row in rows))


def uses_openvino(models: Iterable[object]) -> bool:
    # The export times every model a second time in OpenVINO under the name + "_openvino".
    return any(str(m).endswith("_openvino") for m in models)


def runtimes(models: Iterable[object]) -> str:
    """The runtimes the latency rows were timed in."""
    return "ONNX Runtime and OpenVINO" if uses_openvino(models) else "ONNX Runtime"


def totals_labels(totals: dict) -> list[tuple[str, str]]:
    """(key, label) of each figure in `totals`, in the order the views list them."""
    file_label = "file bytes (FP: its float32 parameters)" if totals.get("fp_file_estimated") \
        else "file bytes"
    return [("bops", "BOPs"), ("macs", "MACs"), ("params", "parameters"),
            ("weight_bytes", "layer weight bytes"), ("file_bytes", file_label)]


def parity_sentences(p: dict) -> list[str]:
    """What each parity check compares, with its figures and limits, as plain text: the one
    wording that report.md and report.html both show (PARITY_TERMS defines the terms). `.get`
    throughout, so a report.json written before a figure existed still renders."""
    pr, off, full = p["pruning"], p["ort_unoptimized"], p["ort_optimized"]
    return [
        f"pruned vs masked float model: logits {sci(pr.get('logits_rel'))} relative in "
        f"PyTorch, {sci(pr.get('onnx_logits_rel'))} as model.fp32.onnx in ORT (all "
        f"optimizations); worst layer output {pr.get('worst_layer')} "
        f"{sci(pr.get('worst_layer_rel'))} (PyTorch, kept channels); limit 1e-5",
        f"ORT without optimizations vs reference: last segment (after the last quantizer) fed "
        f"the reference's codes: logits {sci(off.get('logits_rel'))} relative (limit 1e-4); "
        f"file end to end: logits {sci(off.get('end_to_end_logits_rel'))} relative (no "
        f"limit), top-1 agreement {pct(off.get('top1_agreement'))}; every layer's input codes, "
        f"its segment fed the reference's codes: equal {pct(off.get('codes_equal'), 3)}, max "
        f"difference {off.get('codes_max_diff')} (no limit)",
        f"ORT optimized (int8 kernels) vs reference: file end to end: top-1 agreement "
        f"{pct(full.get('top1_agreement'))} (needs 99.5%), logits "
        f"{sci(full.get('end_to_end_logits_rel'))} relative (no limit); every layer's input "
        f"codes, its segment fed the reference's codes: equal "
        f"{pct(full.get('codes_equal'), 3)} (needs 99.9%), max difference "
        f"{full.get('codes_max_diff')} (limit 1)",
        *(_further_check(name, extra) for name, extra in p.items()
          if name not in ("pruning", "ort_unoptimized", "ort_optimized")
          and isinstance(extra, dict)),
    ]


def _further_check(name: str, extra: dict) -> str:
    """A further runtime or file format checked against the same reference (OpenVINO, the
    .ort file): whatever of the usual figures its entry carries."""
    figures = [f"{label} {fmt(extra[key])}" for key, label, fmt in _PARITY_FIGURES
               if _finite(extra.get(key))]
    return f"{name} vs reference: " + (", ".join(figures) or "checked")


_PARITY_FIGURES: list[tuple[str, str, Callable[[float], str]]] = [
    # Lambdas: pct is defined further down.
    ("accuracy", "top-1", lambda v: pct(v)),
    ("top1_agreement", "top-1 agreement", lambda v: pct(v)),
    ("logits_rel", "logits relative (last segment fed the reference's codes)",
     lambda v: f"{v:.1e}"),
    ("end_to_end_logits_rel", "logits relative end to end", lambda v: f"{v:.1e}"),
    ("codes_equal", "codes equal", lambda v: pct(v, 3)),
    ("codes_max_diff", "max code difference", lambda v: f"{v:g}")]


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RUNTIME_LABELS = {"onnxruntime": "ONNX Runtime (all optimizations)", "openvino": "OpenVINO CPU"}


def kernel_sentences(kernels: dict | None) -> list[str]:
    """What each runtime runs the QCDQ file's layers on (export/kernels.py), one sentence a
    runtime; none for a report.json written before the count existed."""
    out = []
    for rt, k in (kernels or {}).items():
        layers = k["integer_layers"] + k["float_layers"]
        name = _RUNTIME_LABELS.get(rt, rt)
        text = f"{name}: {k['integer_layers']} of {layers} layers on integer kernels"
        if k.get("integer_adds") is not None:
            text += f", {k['integer_adds']} of {k['adds']} residual adds"
        if k.get("weights_dequantized") is not None:
            text += (f"; {k['weights_dequantized']} weight tensors dequantized to float on "
                     "every run")
        out.append(text)
    return out


_RUNTIME_SHORT = {"onnxruntime": "ORT", "openvino": "OpenVINO"}
_TARGET_KINDS = {"bops": "BOPs", "latency": "latency", "size": "size"}


def target_cells(row: dict) -> tuple[str, str, str, str]:
    """A row of report.json's "targets" as (target, predicted, measured, error), the cells
    of the views' Targets table."""
    unit = row.get("unit")
    target = f"{_TARGET_KINDS.get(row['kind'], row['kind'])} {amount(row['value'], unit)}"
    if row.get("text"):
        target += f" ({row['text']})"
    if row.get("measured") is None:
        measured = row.get("not_measured") or "not measured"
    else:
        measured = f"{amount(row['measured'], unit)} ({target_setting(row)})" + \
            _relative(row.get("relative"))
    return target, amount(row.get("predicted"), unit), measured, target_error(row)


def target_line(row: dict) -> str:
    """One target in one line, for the `abs-export` summary."""
    unit = row.get("unit")
    kind = _TARGET_KINDS.get(row["kind"], row["kind"])
    aim = f"target {amount(row['value'], unit)}" + (f" ({row['text']})" if row.get("text")
                                                     else "")
    predicted = f"predicted {amount(row.get('predicted'), unit)}"
    if row.get("measured") is None:
        return f"{kind} {row.get('not_measured') or 'not measured'}; {aim}, {predicted}"
    line = (f"{kind} {amount(row['measured'], unit)} measured ({target_setting(row)}) vs {aim}, "
            f"{predicted}: {target_error(row)}")
    return line + _relative(row.get("relative"))


def _relative(rel: dict | None) -> str:
    """A latency target given as a fraction of the FP original ("0.5x"), measured as one: the
    FP original timed in the same run and setting."""
    if not rel:
        return ""
    return (f"; {rel['measured']:.2f}x the FP original's {amount(rel['fp_original_ms'], 'ms')} "
            f"in the same run (target {rel['target']:.2f}x)")


def target_setting(row: dict) -> str:
    """How a target's value was measured, in a few words."""
    how = row.get("how") or {}
    if row["kind"] == "latency":
        threads = how.get("threads")
        return (f"{_RUNTIME_SHORT.get(how.get('runtime'), how.get('runtime'))}, batch "
                f"{how.get('batch')}, {threads} thread{'' if threads == 1 else 's'}, median of "
                f"{how.get('runs')} runs")
    if row["kind"] == "size":
        return f"{how.get('weights')} weights stored in {how.get('artifact')}"
    return "the exported decision, exact"


def target_error(row: dict) -> str:
    """Measured against the target and against the prediction, signed: +3.0% is over."""
    vs_target, vs_predicted = row.get("error_vs_target"), row.get("error_vs_predicted")
    if vs_target is None:
        return "n/a"
    text = f"{100 * vs_target:+.1f}% vs target"
    return text + (f", {100 * vs_predicted:+.1f}% vs predicted" if vs_predicted is not None
                   else "")


def target_notes(rows: list[dict] | None) -> list[str]:
    """What a reader must know beside the Targets table (a table measured elsewhere, another
    weight storage), each note naming its target."""
    return [f"{_TARGET_KINDS.get(r['kind'], r['kind'])} target: {n}" for r in rows or []
            for n in r.get("notes") or []]


# --- numbers -----------------------------------------------------------------------------------


def count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:,.0f}"


def amount(v: float | None, unit: str | None) -> str:
    """A target's value in its unit: ms, bytes (K/M steps of 1000) or a count (BOPs: the
    target's kind already names the unit)."""
    if v is None:
        return "n/a"
    if unit == "ms":
        return f"{v:.2f} ms" if v >= 1 else f"{v:.3g} ms"
    text = count(v)
    if unit == "bytes":
        return text + ("B" if text[-1].isalpha() else " B")
    return text


def pct(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def sci(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1e}"


def is_float(bits: int) -> bool:
    return bits >= FLOAT_BITS


def bits(b: int) -> str:
    return "float" if is_float(b) else str(b)


def float_accuracy_row(acc: dict) -> tuple[str, float, str]:
    """The accuracy row between the FP original and the integer reference: the pruned float
    model (reports written before it existed show the checkpoint's weights in float)."""
    if acc.get("pruned_float_clipped"):
        return ("pruned float model (model.fp32.onnx)", acc["pruned_float"],
                "the decision's filters removed, BN folded, float weights, each quantized "
                "activation clipped to its range: the QCDQ model without its rounding")
    if "pruned_float" in acc:
        return ("pruned float model (model.fp32.onnx)", acc["pruned_float"],
                "the decision's filters removed, BN folded, no quantizer: weights fine-tuned "
                "with their quantizers can be near chance here, and the file then serves as "
                "a speed reference only")
    return "checkpoint weights in float", acc["float_weights"], "no quantizer, no mask"
