"""`report.html`: the export report (DESIGN §9) as one self-contained page.

Everything comes from the report dict, exactly what `report.json` holds, so `abs report` can
rebuild the page from that file alone. The plots are inline SVG drawn here: the page loads
nothing (its Content-Security-Policy forbids it), opens offline, and stays small and crisp at
any zoom. Every string from the report is user data (layer names, paths, notes) and is
escaped. Sections the report lacks (latency skipped, no training history) are replaced by one
line saying why.

Labels and figure formatting come from `report_format.py`, which the views share, so the
page words and writes a figure as report.md does.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from abs_deploy.export.report_format import (
    MODEL_LABELS,
    PARITY_TERMS,
    bits,
    count,
    float_accuracy_row,
    is_float,
    kernel_sentences,
    model_label,
    parity_sentences,
    pct,
    target_cells,
    target_notes,
    totals_labels,
    uses_openvino,
)

_PLOT_H = 170  # height of one plot area in px
_PLOT_W = 880  # width the per-layer plots aim at before they grow a scrollbar
_MAX_LABEL = 22  # longer layer names are shortened on the axis (the tooltip has them whole)


def render(report: dict) -> str:
    """The whole page for one report dict."""
    r = report
    title = f"Export report: {r['checkpoint']}"
    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p class=\"sub\">{_header_line(r)}</p>",
        # Only a checkpoint searched for targets has them; any other page is as before.
        *([_section("targets", "Targets", _targets_table(r["targets"]))]
          if r.get("targets") else []),
        _section("totals", "Totals", _totals_table(r["totals"])),
        _section("accuracy", "Accuracy (top-1)", _accuracy_table(r["accuracy"])),
        _section("parity", "Parity", _parity_list(r["parity"])),
        _section("kernels", "Kernels", _kernel_list(r.get("kernels"))),
        _section("bits", "Bits per layer", _bits_plot(r["layers"])),
        _section("kept", "Kept filters per layer", _kept_plot(r["layers"])),
        _section("bops", "BOPs per layer: FP vs compressed", _bops_plot(r["layers"])),
        _section("trajectory", "Search trajectory", _trajectory(r.get("history"), r)),
        _section("latency", "Latency", _latency(r.get("latency"))),
        _section("layers", "Layers", _layer_table(r["layers"], r["parity"])),
    ]
    if r.get("notes"):
        body.append(_section("notes", "Notes", "<ul>" + "".join(
            f"<li>{esc(n)}</li>" for n in r["notes"]) + "</ul>"))
    body.append(_footer(r))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        # The page must open offline and never call home: forbid every fetch outright.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def ratio(v: float | None) -> str:
    # A ratio over zero: Python's json writes and reads it as Infinity, stricter tools null.
    if v is None:
        return "n/a"
    return "&infin;" if math.isinf(v) else f"{v:.2f}x"


# --- tables ----------------------------------------------------------------------------------


def _header_line(r: dict) -> str:
    opts = r.get("options", {})
    parts = [f"<b>{esc(r['arch'])}</b>", f"stage {esc(r['stage'])}",
             f"method <b>{esc(r['method'])}</b>",
             f"dataset <b>{esc(r['dataset'])}</b> ({esc(r['accuracy'].get('images', '?'))} "
             "test images)", f"input {esc(r.get('input_shape'))}"]
    if opts:
        parts.append(f"ONNX opset {esc(opts.get('opset'))}, weights {esc(opts.get('weights'))}"
                     + (", simplified" if opts.get("simplified") else ""))
    parts.append(f"checkpoint <code>{esc(r['checkpoint'])}</code>")
    return " &middot; ".join(parts)


def _targets_table(rows: list[dict]) -> str:
    notes = target_notes(rows)
    return (_table(("target", "predicted", "measured", "error"),
                   [tuple(esc(c) for c in target_cells(row)) for row in rows],
                   numeric_from=1, numeric_to=2)
            + ("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>" if notes
               else ""))


def _totals_table(t: dict) -> str:
    rows = [(label, count(t["fp"][key]), count(t["exported"][key]),
             ratio(t["ratios"].get(key)))
            for key, label in totals_labels(t)]
    return _table(("", "FP original", "exported", "FP / exported"), rows, numeric_from=1)


def _accuracy_table(a: dict) -> str:
    label, value, note = float_accuracy_row(a)
    rows = [("FP original", pct(a["fp_original"]), esc(a.get("fp_source", ""))),
            (label, pct(value), note),
            ("integer reference (PyTorch)", pct(a["reference"]), "what the ONNX file must equal"),
            ("ONNX Runtime", pct(a["ort"]), "all graph optimizations (int8 kernels)"),
            ("ONNX Runtime, no optimizations", pct(a["ort_unoptimized"]), "")]
    return _table(("model", "top-1", "note"), rows, numeric_from=1, numeric_to=2)


def _kernel_list(kernels: dict | None) -> str:
    items = kernel_sentences(kernels)
    if not items:
        return "<p>not counted in this report</p>"
    return ("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>"
            + _caption("Counted in each runtime's own graph after its optimizations: a layer "
                       "on integer kernels is a QLinearConv/QGemm in ONNX Runtime, a u8/i8 "
                       "convolution or fully-connected layer in OpenVINO."))


def _parity_list(p: dict) -> str:
    items = [esc(s) for s in parity_sentences(p)]
    return ("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
            + _caption(esc(PARITY_TERMS)))


def _layer_table(layers: list[dict], parity: dict) -> str:
    codes = {d.get("layer"): d.get("equal")
             for d in parity.get("ort_optimized", {}).get("layers", []) or []}
    rows = []
    for i, row in enumerate(layers):
        w = _bits(row["w_bits"]) + (f" (stored {esc(row['w_store_bits'])})"
                                    if row.get("w_store_bits", row["w_bits"]) != row["w_bits"]
                                    else "")
        a = _bits(row["a_bits"]) + (" signed" if row.get("a_signed") and
                                    not is_float(row["a_bits"]) else "")
        clip = row.get("act_clip")
        rows.append((
            str(i), f"<code>{esc(row['name'])}</code>", esc(row.get("kind", "")), w, a,
            f"{esc(row['kept'])}/{esc(row['total'])}",
            f"{esc(row.get('in_kept', '?'))}/{esc(row.get('in_total', '?'))}",
            count(row["macs"]), count(row["fp_bops"]), count(row["bops"]),
            ratio(row["fp_bops"] / row["bops"] if row["bops"] else None),
            count(row["weight_bytes"]),
            "float" if clip is None else f"[{esc(clip[0])}, {esc(clip[1])}]",
            pct(codes.get(row["name"]), 3)))
    return _table(("#", "layer", "kind", "w bits", "a bits", "kept filters", "in channels",
                   "MACs", "FP BOPs", "BOPs", "FP / ours", "weight bytes", "act. codes",
                   "codes = ref. (ORT)"), rows, numeric_from=3)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 0,
           numeric_to: int | None = None, row_class: Sequence[str] | None = None) -> str:
    """Cells are already HTML; columns numeric_from..numeric_to are right-aligned."""
    def cls(j: int) -> str:
        return " class=\"num\"" if numeric_from <= j < (numeric_to or len(head)) else ""
    out = ["<div class=\"wide\"><table><thead><tr>"
           + "".join(f"<th{cls(j)}>{h}</th>" for j, h in enumerate(head))
           + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        rc = f" class=\"{row_class[i]}\"" if row_class and row_class[i] else ""
        out.append(f"<tr{rc}>" + "".join(f"<td{cls(j)}>{c}</td>" for j, c in enumerate(row))
                   + "</tr>")
    return "".join(out) + "</tbody></table></div>"


def _footer(r: dict) -> str:
    files = r.get("files") or {}
    secs = r.get("seconds") or {}
    parts = []
    if files:
        parts.append("Files: " + ", ".join(f"<code>{esc(v)}</code>" for v in files.values()))
    if secs.get("total") is not None:
        steps = ", ".join(f"{esc(k)} {v:.1f} s" for k, v in secs.items() if k != "total")
        parts.append(f"Export took {secs['total']:.1f} s ({steps}).")
    parts.append("Rebuild this page from report.json with <code>abs report</code>.")
    return "<footer>" + "<br>".join(parts) + "</footer>"


# --- per-layer plots -------------------------------------------------------------------------


@dataclass
class _Series:
    label: str
    css: str  # class of its bars: the colour comes from the page's style sheet
    values: list[float | None]  # None: no bar
    titles: list[str]  # one tooltip per bar (already escaped)


def _bits_plot(layers: list[dict]) -> str:
    names = [r["name"] for r in layers]
    top = 8 if all(max(r["w_bits"], r["a_bits"]) <= 8 for r in layers) else 16

    def series(key: str, label: str, css: str) -> _Series:
        # Float is 32 bits in the report; drawn at the top of the axis (the tick says "fp").
        return _Series(label, css, [min(r[key], top) for r in layers],
                       [f"{esc(r['name'])}: {label} {_bits(r[key])}" for r in layers])
    ticks = [(b, str(b)) for b in (2, 4, 6, 8)] if top == 8 else \
        [(b, str(b)) for b in (2, 4, 8)] + [(16, "16+/fp")]
    svg = _bar_chart("plot-bits", names, [series("w_bits", "weight bits", "s-w"),
                                          series("a_bits", "activation bits", "s-a")],
                     lambda v: v / top, ticks, "bits")
    return svg + _caption("Bits of each layer's weights and of its input activations, in "
                          "execution order. Hover a bar for its value."
                          + (" Float (not quantized) is drawn at 16." if top == 16 else ""))


def _kept_plot(layers: list[dict]) -> str:
    names = [r["name"] for r in layers]
    s = _Series("kept fraction", "s-kept", [r["kept"] / r["total"] for r in layers],
                [f"{esc(r['name'])}: {esc(r['kept'])}/{esc(r['total'])} filters kept"
                 for r in layers])
    svg = _bar_chart("plot-kept", names, [s], lambda v: v,
                     [(f, f"{f:.2f}".rstrip("0").rstrip(".")) for f in (0.25, 0.5, 0.75, 1.0)],
                     "kept", tops=[f"{r['kept']}/{r['total']}" for r in layers], legend=False)
    pruned = sum(r["total"] - r["kept"] for r in layers)
    total = sum(r["total"] for r in layers)
    return svg + _caption(f"Fraction of each layer's output filters the export keeps "
                          f"({pruned} of {total} filters removed in all).")


def _bops_plot(layers: list[dict]) -> str:
    names = [r["name"] for r in layers]
    values = [v for r in layers for v in (r["fp_bops"], r["bops"]) if v > 0]
    lo = 10 ** math.floor(math.log10(min(values))) if values else 1.0
    hi = 10 ** math.ceil(math.log10(max(values))) if values else 10.0
    hi = max(hi, lo * 10)

    def scale(v: float) -> float:
        return math.log10(v / lo) / math.log10(hi / lo) if v > 0 else 0.0
    ticks, d = [], lo
    while d <= hi * 1.0001:
        ticks.append((d, _decade(d)))
        d *= 10
    fp = _Series("FP (32 x 32 bits)", "s-fp", [r["fp_bops"] for r in layers],
                 [f"{esc(r['name'])}: FP {count(r['fp_bops'])} BOPs" for r in layers])
    ours = _Series("compressed", "s-ours", [r["bops"] for r in layers],
                   [f"{esc(r['name'])}: {count(r['bops'])} BOPs ({_bits(r['w_bits'])} x "
                    f"{_bits(r['a_bits'])}, {esc(r['kept'])}/{esc(r['total'])} filters)"
                    for r in layers])
    svg = _bar_chart("plot-bops", names, [fp, ours], scale, ticks, "BOPs (log)")
    return svg + _caption("Bit operations (MACs x weight bits x activation bits) of each layer, "
                          "the FP original against the exported model; logarithmic axis.")


def _bar_chart(chart_id: str, names: list[str], series: list[_Series],
               scale: Callable[[float], float], ticks: list[tuple[float, str]], y_label: str,
               tops: list[str] | None = None, legend: bool = True) -> str:
    """Grouped vertical bars, one group per layer. `scale` maps a value to 0..1 of the axis."""
    n, k = len(names), len(series)
    slot = max(8.0 * k + 8, _PLOT_W / max(n, 1))
    left, right, top = 70, 12, 30 if legend else 18
    longest = min(max((len(s) for s in names), default=1), _MAX_LABEL)
    bottom = 18 + int(longest * 6.3 * 0.71)  # labels at -45 degrees
    width, height = left + slot * n + right, top + _PLOT_H + bottom
    base = top + _PLOT_H
    out = [_svg_open(chart_id, width, height)]
    out.append(_y_axis(left, width - right, top, scale, ticks, y_label))
    bar_w = min(22.0, (slot - 6) / k)
    for i, name in enumerate(names):
        x0 = left + i * slot + (slot - bar_w * k) / 2
        for j, s in enumerate(series):
            v = s.values[i]
            if v is None:
                continue
            h = _PLOT_H * _clip01(scale(v))
            out.append(f"<rect class=\"bar {s.css}\" x=\"{x0 + j * bar_w:.1f}\" "
                       f"y=\"{base - h:.1f}\" width=\"{bar_w - 1:.1f}\" height=\"{h:.1f}\">"
                       f"<title>{s.titles[i]}</title></rect>")
        if tops and slot >= 30:
            out.append(f"<text class=\"val\" x=\"{left + (i + 0.5) * slot:.1f}\" y=\"{top - 4}\""
                       f" text-anchor=\"middle\">{esc(tops[i])}</text>")
        short = name if len(name) <= _MAX_LABEL else name[:_MAX_LABEL - 1] + "\u2026"
        out.append(f"<text class=\"name\" transform=\"translate({left + (i + 0.5) * slot:.1f},"
                   f"{base + 12}) rotate(-45)\" text-anchor=\"end\">{esc(short)}"
                   f"<title>{esc(name)}</title></text>")
    out.append(f"<line class=\"axisline\" x1=\"{left}\" x2=\"{width - right:.1f}\" "
               f"y1=\"{base}\" y2=\"{base}\"/>")
    if legend:
        out.append(_legend(left, 14, [(s.label, s.css) for s in series]))
    return _scroll("".join(out) + "</svg>")


# --- search trajectory -----------------------------------------------------------------------


def _trajectory(history: list[dict] | None, r: dict) -> str:
    if history is None:
        return _missing("This report predates the training history in report.json; export "
                        "again to see the trajectory.")
    entries = [h for h in history if isinstance(h, dict) and _num(h.get("val_acc"))]
    if not entries:
        return _missing("The checkpoint records no training history (no epochs to plot).")
    # Pretraining (entries without a stage) usually runs far longer than the search and would
    # squeeze it into a corner: the plot starts at the first search or fine-tuning epoch.
    first = next((i for i, h in enumerate(entries) if h.get("stage")), 0)
    pre, entries = entries[:first], entries[first:]
    labels = [_stage(h) for h in entries]
    segments: list[tuple[int, int, str]] = []
    for i, label in enumerate(labels):
        if segments and segments[-1][2] == label:
            segments[-1] = (segments[-1][0], i, label)
        else:
            segments.append((i, i, label))
    n = len(entries)
    left, right = 70, 12
    step = max(_PLOT_W / n, 6.0)
    width = left + step * n + right

    def x(i: int) -> float:
        return left + (i + 0.5) * step

    acc = [100 * h["val_acc"] for h in entries]
    a_lo, a_hi, a_ticks = _nice_range(min(acc), max(acc), floor=0, ceil=100)
    parts = [_panel("plot-acc", width, x, segments, n, step, left, right,
                    [(i, v) for i, v in enumerate(acc)], lambda v: (v - a_lo) / (a_hi - a_lo),
                    [(t, f"{t:g}%") for t in a_ticks], "val top-1", "pt-acc", "ln-acc",
                    [f"{esc(labels[i])} epoch {esc(h.get('epoch'))}: val {acc[i]:.2f}%"
                     for i, h in enumerate(entries)], [], epochs=False)]
    bops = [(i, float(h["bops"])) for i, h in enumerate(entries)
            if _num(h.get("bops")) and h["bops"] > 0]
    if bops:
        exported = r["totals"]["exported"]["bops"]
        vals = [v for _, v in bops] + [exported]
        lo = 10 ** math.floor(math.log10(min(vals)))
        hi = max(10 ** math.ceil(math.log10(max(vals))), lo * 10)
        ticks = [(lo * 10 ** e, _decade(lo * 10 ** e))
                 for e in range(round(math.log10(hi / lo)) + 1)]
        parts.append(_panel(
            "plot-traj-bops", width, x, segments, n, step, left, right, bops,
            lambda v: math.log10(v / lo) / math.log10(hi / lo), ticks, "BOPs (log)",
            "pt-bops", "ln-bops",
            [f"{esc(labels[i])} epoch {esc(entries[i].get('epoch'))}: {count(v)} BOPs"
             for i, v in bops], [(exported, f"exported {count(exported)}")], epochs=True))
    else:
        parts.append(_missing("The history records no BOPs per epoch (uniform quantization "
                              "and fine-tuning keep them fixed)."))
    note = f" {len(pre)} pretraining epochs (final val top-1 {pct(pre[-1]['val_acc'])}) are " \
           "left out." if pre else ""
    return "".join(parts) + _caption(
        f"Validation top-1 and BOPs after each epoch, {n} epochs over "
        f"{len(segments)} stage(s) ({', '.join(esc(s[2]) for s in segments)}).{note} "
        "Hover a point for its value.")


def _panel(chart_id: str, width: float, x: Callable[[int], float],
           segments: list[tuple[int, int, str]], n: int, step: float, left: int, right: int,
           points: list[tuple[int, float]], scale: Callable[[float], float],
           ticks: list[tuple[float, str]], y_label: str, pt_css: str, ln_css: str,
           titles: list[str], refs: list[tuple[float, str]], epochs: bool) -> str:
    """One trajectory panel: shaded stages, a line per stage through the epoch points, and
    horizontal reference lines. The BOPs panel (epochs=True) carries the epoch axis."""
    top, bottom = 20, 34 if epochs else 8
    base = top + _PLOT_H
    height = base + bottom
    out = [_svg_open(chart_id, width, height)]
    for j, (a, b, label) in enumerate(segments):
        x0, x1 = left + a * step, left + (b + 1) * step
        if j % 2:
            out.append(f"<rect class=\"band\" x=\"{x0:.1f}\" y=\"{top}\" "
                       f"width=\"{x1 - x0:.1f}\" height=\"{_PLOT_H}\"/>")
        out.append(f"<text class=\"stage\" x=\"{x0 + 4:.1f}\" y=\"{top - 6}\">{esc(label)}"
                   "</text>")
    out.append(_y_axis(left, width - right, top, scale, ticks, y_label))
    for value, label in refs:
        y = base - _PLOT_H * _clip01(scale(value))
        out.append(f"<line class=\"ref\" x1=\"{left}\" x2=\"{width - right:.1f}\" "
                   f"y1=\"{y:.1f}\" y2=\"{y:.1f}\"/><text class=\"reflabel\" "
                   f"x=\"{width - right - 4:.1f}\" y=\"{y - 4:.1f}\" text-anchor=\"end\">"
                   f"{esc(label)}</text>")
    coords = {i: (x(i), base - _PLOT_H * _clip01(scale(v))) for i, v in points}
    for a, b, _ in segments:
        line = [coords[i] for i in range(a, b + 1) if i in coords]
        if len(line) > 1:
            out.append(f"<polyline class=\"{ln_css}\" points=\""
                       + " ".join(f"{px:.1f},{py:.1f}" for px, py in line) + "\"/>")
    for (i, _), title in zip(points, titles, strict=True):
        px, py = coords[i]
        out.append(f"<circle class=\"{pt_css}\" cx=\"{px:.1f}\" cy=\"{py:.1f}\" r=\"3\">"
                   f"<title>{title}</title></circle>")
    out.append(f"<line class=\"axisline\" x1=\"{left}\" x2=\"{width - right:.1f}\" "
               f"y1=\"{base}\" y2=\"{base}\"/>")
    if epochs:
        every = max(1, math.ceil(n / 30))
        for a, b, _ in segments:
            for i in range(a, b + 1):
                if (i - a) % every == 0 or i == b:
                    out.append(f"<text class=\"tick\" x=\"{x(i):.1f}\" y=\"{base + 14}\" "
                               f"text-anchor=\"middle\">{i - a + 1}</text>")
        out.append(f"<text class=\"axis\" x=\"{left + n * step / 2:.1f}\" y=\"{base + 30}\" "
                   "text-anchor=\"middle\">epoch of each stage</text>")
    return _scroll("".join(out) + "</svg>")


def _y_axis(left: float, right: float, top: float, scale: Callable[[float], float],
            ticks: list[tuple[float, str]], label: str) -> str:
    """Grid lines with their tick labels, and the axis title, for a plot area of height
    `_PLOT_H` from `top` between x = `left` and `right`."""
    out = []
    for value, text in ticks:
        y = top + _PLOT_H * (1 - _clip01(scale(value)))
        out.append(f"<line class=\"grid\" x1=\"{left}\" x2=\"{right:.1f}\" y1=\"{y:.1f}\" "
                   f"y2=\"{y:.1f}\"/><text class=\"tick\" x=\"{left - 6}\" y=\"{y + 4:.1f}\" "
                   f"text-anchor=\"end\">{esc(text)}</text>")
    out.append(f"<text class=\"axis\" transform=\"translate(14,{top + _PLOT_H / 2:.0f}) "
               f"rotate(-90)\" text-anchor=\"middle\">{esc(label)}</text>")
    return "".join(out)


def _stage(entry: dict) -> str:
    stage = str(entry.get("stage") or "pretrain")
    return f"{stage} ({entry['phase']})" if entry.get("phase") else stage


def _nice_range(lo: float, hi: float, floor: float, ceil: float
                ) -> tuple[float, float, list[float]]:
    """An axis from a round number below `lo` to one above `hi`, with at most 6 ticks."""
    span = max(hi - lo, 1.0)
    step = next(s for s in (0.5, 1, 2, 5, 10, 20, 25, 50) if span / s <= 5)
    a = max(floor, math.floor(lo / step) * step)
    b = min(ceil, math.ceil(hi / step) * step)
    if b <= a:
        a, b = max(floor, a - step), min(ceil, b + step)
    ticks, t = [], a
    while t <= b + 1e-9:
        ticks.append(round(t, 6))
        t += step
    return a, b, ticks


# --- latency ---------------------------------------------------------------------------------


def _latency(lat: dict | None) -> str:
    if not lat or not lat.get("rows"):
        return _missing("Latency was not measured (exported with --skip-latency).")
    rows = lat["rows"]
    settings = list(dict.fromkeys((row["batch"], row["threads"]) for row in rows))
    fastest = {s: min((row for row in rows if (row["batch"], row["threads"]) == s),
                      key=lambda row: row["median_ms"])["model"] for s in settings}
    speed = lat.get("speedup_vs_fp_original") or {}
    runs = sorted({row.get("runs") for row in rows if row.get("runs")})
    warmup = f"{esc(lat['warmup'])} untimed warm-up runs" if lat.get("warmup") else \
        "untimed warm-up runs"
    runtimes = ("ONNX Runtime (CPU execution provider, all graph optimizations)"
                + (" and OpenVINO (CPU plugin; rows marked OpenVINO)"
                   if uses_openvino(row["model"] for row in rows) else ""))
    method = (f"{runtimes}, on "
              f"<b>{esc(lat.get('cpu', 'unknown CPU'))}</b>. Each figure is the median and the "
              f"90th percentile of {esc('/'.join(str(r) for r in runs) or '?')} timed runs after "
              f"{warmup}; within a setting the models take turns run by run, so other load on "
              "the machine slows them alike.")
    table_rows, classes = [], []
    for s in settings:
        for row in (row for row in rows if (row["batch"], row["threads"]) == s):
            mark = row["model"] == fastest[s]
            sp = speed.get(f"bs{s[0]}_t{s[1]}", {}).get(row["model"])
            table_rows.append((
                esc(model_label(row["model"])) + (" &#9733;" if mark else ""),
                esc(row["batch"]), esc(row["threads"]), f"{row['median_ms']:.3f}",
                f"{row['p90_ms']:.3f}", ratio(sp)))
            classes.append("fastest" if mark else "")
    headline = ""
    if lat.get("headline") and lat.get("fastest"):
        headline = (f" The summary quotes {esc(lat['headline'])} (the largest batch on one "
                    f"thread, the setting other load disturbs least): fastest there is "
                    f"{esc(model_label(lat['fastest']))}.")
    return (f"<p class=\"method\">{method}</p>" + _latency_bars(rows, settings, fastest)
            + _caption("Bars: median; whisker: 90th percentile; &#9733; the fastest model of "
                       "each setting. Each setting has its own scale." + headline)
            + _table(("model", "batch", "threads", "median ms", "p90 ms",
                      "speed vs FP original"), table_rows, numeric_from=1,
                     row_class=classes))


def _latency_bars(rows: list[dict], settings: list[tuple[int, int]],
                  fastest: dict[tuple[int, int], str]) -> str:
    left, bar_area, label_area = 120, 520, 250
    row_h, head_h, gap = 18, 22, 10
    width = left + bar_area + label_area
    height = 6 + sum(head_h + row_h * sum(1 for r in rows if (r["batch"], r["threads"]) == s)
                     + gap for s in settings)
    out = [_svg_open("plot-latency", width, height)]
    y = 6
    for s in settings:
        group = [r for r in rows if (r["batch"], r["threads"]) == s]
        scale = max(max(r["p90_ms"], r["median_ms"]) for r in group) or 1.0
        out.append(f"<text class=\"setting\" x=\"4\" y=\"{y + 15}\">batch {esc(s[0])}, "
                   f"{esc(s[1])} thread{'s' if s[1] != 1 else ''}</text>")
        y += head_h
        for r in group:
            model = r["model"]
            css = f"m-{model}" if model in MODEL_LABELS else "m-other"
            w_med = bar_area * r["median_ms"] / scale
            w_p90 = bar_area * r["p90_ms"] / scale
            mark = model == fastest[s]
            label = f"{r['median_ms']:.3f} ms (p90 {r['p90_ms']:.3f})"
            out.append(
                f"<text class=\"name\" x=\"{left - 8}\" y=\"{y + 13}\" text-anchor=\"end\">"
                f"{esc(model_label(model))}</text>"
                f"<rect class=\"lat {css}{' fastest' if mark else ''}\" x=\"{left}\" "
                f"y=\"{y + 2}\" width=\"{max(w_med, 1):.1f}\" height=\"{row_h - 5}\">"
                f"<title>{esc(model_label(model))} batch {esc(s[0])}, "
                f"{esc(s[1])} threads: "
                f"{label}</title></rect>"
                f"<line class=\"whisker\" x1=\"{left + w_med:.1f}\" x2=\"{left + w_p90:.1f}\" "
                f"y1=\"{y + 8.5}\" y2=\"{y + 8.5}\"/><line class=\"whisker\" "
                f"x1=\"{left + w_p90:.1f}\" x2=\"{left + w_p90:.1f}\" y1=\"{y + 4}\" "
                f"y2=\"{y + 13}\"/>"
                f"<text class=\"val{' best' if mark else ''}\" x=\"{left + bar_area + 8}\" "
                f"y=\"{y + 13}\">{label}{' &#9733; fastest' if mark else ''}</text>")
            y += row_h
        y += gap
    return _scroll("".join(out) + "</svg>")


# --- small pieces ----------------------------------------------------------------------------


def _section(anchor: str, title: str, content: str) -> str:
    return f"<section id=\"{anchor}\"><h2>{esc(title)}</h2>{content}</section>"


def _missing(why: str) -> str:
    return f"<p class=\"missing\">{why}</p>"


def _caption(text: str) -> str:
    return f"<p class=\"caption\">{text}</p>"


def _scroll(svg: str) -> str:
    # Wide models get a horizontal scrollbar rather than unreadably thin bars.
    return f"<div class=\"plot\">{svg}</div>"


def _svg_open(chart_id: str, width: float, height: float) -> str:
    return (f"<svg id=\"{chart_id}\" xmlns=\"http://www.w3.org/2000/svg\" "
            f"width=\"{width:.0f}\" height=\"{height:.0f}\" "
            f"viewBox=\"0 0 {width:.0f} {height:.0f}\" role=\"img\">")


def _legend(x: float, y: float, items: list[tuple[str, str]]) -> str:
    out = []
    for label, css in items:
        out.append(f"<rect class=\"{css}\" x=\"{x:.1f}\" y=\"{y - 9}\" width=\"10\" "
                   f"height=\"10\"/><text class=\"legend\" x=\"{x + 14:.1f}\" y=\"{y}\">"
                   f"{esc(label)}</text>")
        x += 24 + 6.5 * len(label)
    return "".join(out)


def _bits(b: int) -> str:
    return esc(bits(b))


def _decade(v: float) -> str:
    """A power of ten as an axis label: "100 M", not "100.00 M"."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= div:
            return f"{v / div:g} {unit}"
    return f"{v:g}"


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _clip01(v: float) -> float:
    return min(max(v, 0.0), 1.0)


_CSS = """
body{margin:0;background:#fff;color:#222;font:14px/1.45 system-ui,-apple-system,"Segoe UI",
Roboto,"DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:22px;margin:4px 0 2px;word-break:break-all}
h2{font-size:17px;margin:26px 0 8px;padding-bottom:3px;border-bottom:1px solid #ddd}
.sub{color:#444;margin:2px 0 8px}
code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:left;white-space:nowrap}
th{background:#f4f4f4;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.fastest td{font-weight:600;background:#fff6e0}
.plot,.wide{overflow-x:auto;margin:4px 0}
svg text{font-family:system-ui,"DejaVu Sans",sans-serif;font-size:11px;fill:#333}
svg .axis{font-size:12px;fill:#555}
svg .stage{font-size:11px;fill:#666;font-style:italic}
svg .setting{font-size:12px;font-weight:600}
svg .val.best{font-weight:700;fill:#b35c00}
.grid{stroke:#e6e6e6;stroke-width:1}
.axisline{stroke:#888;stroke-width:1}
.band{fill:#f5f5f5}
.ref{stroke:#e45756;stroke-width:1;stroke-dasharray:5 4}
.reflabel{fill:#c0392b}
.s-w{fill:#4c78a8}.s-a{fill:#f58518}.s-kept{fill:#54a24b}
.s-fp{fill:#b8b0ac}.s-ours{fill:#e45756}
.m-fp_original{fill:#9d9d9d}.m-fp_pruned{fill:#4c78a8}.m-qcdq{fill:#f58518}
.m-fp_original_openvino{fill:#cfcfcf}.m-fp_pruned_openvino{fill:#9ecae9}
.m-qcdq_openvino{fill:#ffbf79}
.m-other{fill:#b279a2}
rect.fastest{stroke:#222;stroke-width:1.5}
.whisker{stroke:#333;stroke-width:1.2}
.ln-acc{fill:none;stroke:#4c78a8;stroke-width:1.8}.pt-acc{fill:#4c78a8}
.ln-bops{fill:none;stroke:#e45756;stroke-width:1.8}.pt-bops{fill:#e45756}
.caption{color:#555;font-size:12.5px;margin:2px 0 10px;max-width:900px}
.method{margin:4px 0 8px;max-width:900px}
.missing{color:#777;font-style:italic}
footer{margin-top:30px;color:#666;font-size:12px;border-top:1px solid #ddd;padding-top:8px}
"""
