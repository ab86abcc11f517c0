"""`report.md`: the export report (DESIGN §9) as Markdown, made from the report dict alone
(what `report.json` holds), with the labels and figures of `report_format.py`."""

from __future__ import annotations

import re

from abs_deploy.export.report_format import (
    PARITY_TERMS,
    count,
    float_accuracy_row,
    kernel_sentences,
    model_label,
    models_of,
    parity_sentences,
    pct,
    runtimes,
    target_cells,
    target_notes,
    totals_labels,
)


def markdown(r: dict) -> str:
    """report.md. Every value quoted from the report goes through `_md`: a report.json is
    anyone's file, and Markdown viewers render the HTML a string may hold."""
    sections = [_heading(r), _targets(r.get("targets")), _totals(r["totals"]),
                _accuracy(r["accuracy"]), _parity(r["parity"]), _kernels(r.get("kernels")),
                _latency(r.get("latency")), _layers(r["layers"]), _notes(r.get("notes"))]
    # Each section a block of lines; one blank line between blocks.
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _heading(r: dict) -> list[str]:
    opts = r["options"]
    return [f"# Export report: {_md(r['checkpoint'])}", "",
            f"{_md(r['arch'])} ({_md(r['stage'])}, {_md(r['method'])}), input "
            f"{_md(r['input_shape'])}, validated on the test split of {_md(r['dataset'])} "
            f"({_md(r['accuracy']['images'])} images). ONNX opset {_md(opts['opset'])}, weights "
            f"{_md(opts['weights'])}."]


def _targets(rows: list[dict] | None) -> list[str]:
    """The checkpoint's targets, predicted and measured; none for a checkpoint without."""
    if not rows:
        return []
    lines = ["## Targets", "", "| target | predicted | measured | error |", "|---|---:|---|---|"]
    lines += ["| " + " | ".join(_md(c) for c in target_cells(row)) + " |" for row in rows]
    notes = target_notes(rows)
    return lines + ([""] + [f"- {_md(n)}" for n in notes] if notes else [])


def _totals(t: dict) -> list[str]:
    lines = ["## Totals", "", "| | FP original | exported | ratio |", "|---|---:|---:|---:|"]
    for key, label in totals_labels(t):
        lines.append(f"| {label} | {count(t['fp'][key])} | {count(t['exported'][key])} | "
                     f"{t['ratios'][key]:.2f}x |")
    return lines


def _accuracy(acc: dict) -> list[str]:
    label, value, note = float_accuracy_row(acc)
    return ["## Accuracy (top-1)", "",
            f"| FP original | {label} | reference | ORT | "
            "ORT (no optimizations) |", "|---:|---:|---:|---:|---:|",
            f"| {pct(acc['fp_original'])} ({_md(acc['fp_source'])}) | "
            f"{pct(value)} | {pct(acc['reference'])} | {pct(acc['ort'])} | "
            f"{pct(acc['ort_unoptimized'])} |", "", f"{label}: {note}."]


def _parity(par: dict) -> list[str]:
    return (["## Parity", ""] + [f"- {_md(s)}" for s in parity_sentences(par)]
            + ["", _md(PARITY_TERMS)])


def _kernels(kernels: dict | None) -> list[str]:
    sentences = kernel_sentences(kernels)
    return ["## Kernels", "", *(f"- {_md(s)}" for s in sentences)] if sentences else []


def _latency(lat: dict | None) -> list[str]:
    if not lat:
        return []
    models = models_of(lat["rows"])
    warm = f"{_md(lat['warmup'])} warm-up runs" if lat.get("warmup") else "warm-up"
    lines = [f"## Latency in {runtimes(models)}", "", f"CPU: {_md(lat['cpu'])}. Median / p90 "
             f"in ms over {_md(lat['rows'][0]['runs'])} runs after {warm}; within a setting "
             "the models take turns run by run.", "",
             "| model | batch | threads | median | p90 |", "|---|---:|---:|---:|---:|"]
    for row in lat["rows"]:
        lines.append(f"| {_label(row['model'])} | {_md(row['batch'])} | "
                     f"{_md(row['threads'])} | {row['median_ms']:.3f} | "
                     f"{row['p90_ms']:.3f} |")
    lines += ["", "Speed relative to the FP original (its median over each model's):", "",
              "| setting | " + " | ".join(_label(m) for m in models) + " |",
              "|---|" + "---:|" * len(models)]
    for setting, speed in lat["speedup_vs_fp_original"].items():
        lines.append(f"| {_md(setting)} | " + " | ".join(
            f"{speed[m]:.2f}x" if m in speed else "n/a" for m in models) + " |")
    return lines + ["", f"Fastest at {_md(lat['headline'])}: {_label(lat['fastest'])}."]


def _layers(rows: list[dict]) -> list[str]:
    lines = ["## Layers", "",
             "| layer | w | a | kept | MACs | BOPs | weight bytes | act. codes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        clip = "float" if row["act_clip"] is None else \
            f"[{_md(row['act_clip'][0])}, {_md(row['act_clip'][1])}]"
        w = _md(row["w_bits"]) + (f" (stored {_md(row['w_store_bits'])})"
                                  if row["w_store_bits"] != row["w_bits"] else "")
        lines.append(f"| {_md(row['name'])} | {w} | {_md(row['a_bits'])} | "
                     f"{_md(row['kept'])}/{_md(row['total'])} | {count(row['macs'])} | "
                     f"{count(row['bops'])} | {count(row['weight_bytes'])} | {clip} |")
    return lines


def _notes(notes: list[str] | None) -> list[str]:
    return ["## Notes", ""] + [f"- {_md(n)}" for n in notes] if notes else []


# What Markdown (CommonMark, GitHub's tables and strikethrough) reads as markup in the middle
# of a line: each is backslash-escaped. <, > and & become entities, so no tag or entity of the
# source survives. Parentheses stay: with [ and ] escaped they cannot form a link.
_MD_MARKUP = re.compile(r"([\\`*_\[\]|~])")
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _md(value: object) -> str:
    """`value` as literal Markdown text on one line."""
    text = " ".join(str(value).split())
    text = "".join(_MD_ENTITIES.get(c, c) for c in text)
    return _MD_MARKUP.sub(r"\\\1", text)


def _label(model: object) -> str:
    return _md(model_label(model))
