"""The export report (DESIGN §9): `report.json` (everything), `report.md` (the same for a
reader), a PNG with per-layer bits and kept-filter fractions, and `report.html` (tables and
plots in one self-contained page, see `html_report.py`). The three views are made from the
JSON alone, so `rebuild` can remake them from a `report.json`.

Counting conventions: MACs and BOPs as in `bops.py` (full precision is 32x32); a layer's weight
bytes are its kept weights packed at the decided bits plus its bias (int32 or float32, 4
bytes each); parameters count every tensor of the model (the FP side includes its BNs).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from abs_deploy import bops
from abs_deploy.errors import UserError
from abs_deploy.export import html_report
from abs_deploy.export.collapse import FLOAT_BITS, LayerQuant
from abs_deploy.export.latency import Timing, headline_setting, speedups
from abs_deploy.export.qdq import ActQuant
from abs_deploy.export.report_format import (
    PARITY_TERMS,
    count,
    model_label,
    models_of,
    parity_sentences,
    pct,
    runtimes,
    totals_labels,
)
from abs_deploy.export.validate import ModeParity, PruneParity
from abs_deploy.files import check_output, discard, reason, remove_stale, temp_path

FORMAT = "abs-deploy-report/1"
# What `load` insists on before it renders a file: enough to tell our report from any JSON.
_REQUIRED = ("checkpoint", "stage", "method", "arch", "dataset", "layers", "totals", "accuracy",
             "parity")


@dataclass
class Accuracy:
    fp_original: float  # as the checkpoint records it (the search side measured the FP model)
    fp_source: str  # "checkpoint" or, without that record, "float weights"
    float_weights: float  # the checkpoint's own weights run in float: no quantizer, no mask
    reference: float
    ort: float
    ort_unoptimized: float
    images: int


def layer_rows(layers: dict[str, LayerQuant], costs: list[bops.LayerCost],
               in_kept: dict[str, int], pruned: nn.Module, original: nn.Module,
               quant: dict[str, ActQuant]) -> list[dict]:
    """One row per decided layer, in execution order."""
    cost = {c.name: c for c in costs}
    rows = []
    for name, lq in layers.items():
        c = cost[name]
        fp_macs = c.macs
        macs = c.macs_kept(len(lq.kept), in_kept.get(name))
        layer = pruned.get_submodule(name)
        weights, biases = layer.weight.numel(), layer.weight.shape[0]
        fp_params = sum(p.numel() for p in original.get_submodule(name).parameters())
        aq = quant.get(name)
        rows.append({
            "name": name, "kind": lq.kind, "w_bits": lq.w_bits, "a_bits": lq.a_bits,
            "a_signed": lq.a_signed, "w_store_bits": lq.w_store_bits,
            "kept": len(lq.kept), "total": lq.total,
            "in_kept": in_kept.get(name, c.c_in), "in_total": c.c_in,
            "macs": macs, "fp_macs": fp_macs, "bops": macs * lq.w_bits * lq.a_bits,
            "fp_bops": fp_macs * FLOAT_BITS * FLOAT_BITS,
            "params": weights + biases, "fp_params": fp_params,
            "weight_bytes": math.ceil(weights * lq.w_bits / 8) + 4 * biases,
            "fp_weight_bytes": 4 * fp_params,
            "act_clip": list(aq.bounds) if aq else None,
            "act_folded": aq.folded if aq else None,
        })
    return rows


def totals(rows: list[dict], fp_params: int, params: int, fp_file: int | None,
           file: int) -> dict:
    """FP against exported. Without the FP original's file (it is built only to time it), its
    size is taken as its float32 parameters, which is all but a few KB of such a file."""
    fp = {"macs": sum(r["fp_macs"] for r in rows), "bops": sum(r["fp_bops"] for r in rows),
          "params": fp_params, "file_bytes": fp_file if fp_file is not None else 4 * fp_params,
          "weight_bytes": sum(r["fp_weight_bytes"] for r in rows)}
    ours = {"macs": sum(r["macs"] for r in rows), "bops": sum(r["bops"] for r in rows),
            "params": params, "file_bytes": file,
            "weight_bytes": sum(r["weight_bytes"] for r in rows)}
    ratios = {k: fp[k] / ours[k] if ours[k] else math.inf for k in fp}
    return {"fp": fp, "exported": ours, "ratios": ratios, "fp_file_estimated": fp_file is None}


def latency_section(timings: list[Timing], cpu: str, warmup: int | None = None) -> dict | None:
    if not timings:
        return None
    speed = speedups(timings)
    setting = headline_setting(timings)
    head = speed.get(setting, {})
    return {"cpu": cpu, "warmup": warmup, "rows": [t.as_dict() for t in timings],
            "speedup_vs_fp_original": speed, "headline": setting,
            "fastest": max(head, key=head.get) if head else None}


def parity_section(pruning: PruneParity, off: ModeParity, full: ModeParity) -> dict:
    return {"pruning": pruning.as_dict(), "ort_unoptimized": off.as_dict(),
            "ort_optimized": full.as_dict()}


def history_section(history: object) -> list[dict]:
    """The checkpoint's per-epoch log (pretraining, search, fine-tuning: `EpochLog.as_dict()`
    plus the method's extras such as `bops`), plain scalars only: it is carried into
    report.json, which must hold whatever a search method chose to log."""
    out = []
    for entry in history if isinstance(history, list) else []:
        if isinstance(entry, dict):
            out.append({str(k): None if isinstance(v, float) and not math.isfinite(v) else v
                        for k, v in entry.items()
                        if v is None or isinstance(v, (bool, int, float, str))})
    return out


def write(report: dict, folder: Path) -> dict[str, Path]:
    """report.json, report.md, report.png and report.html in `folder`; returns their paths."""
    path = folder / "report.json"
    text = json.dumps(report, indent=1, default=_jsonable) + "\n"
    views = _views(report, folder)
    _write_all({path: lambda tmp: tmp.write_text(text, encoding="utf-8"), **views})
    return {"json": path, **{p.suffix[1:]: p for p in views}}


def load(path: str | os.PathLike) -> dict:
    """A report.json (or the run folder holding one), checked to be an export report; any
    problem is one `UserError` line."""
    path = _json_path(Path(path))
    try:
        rep = json.loads(path.read_bytes())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise UserError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(rep, dict):
        raise UserError(f"{path}: not an abs-deploy export report (a JSON "
                        f"{type(rep).__name__}, not an object)")
    if rep.get("format", FORMAT) != FORMAT:
        raise UserError(f"{path}: report format {str(rep['format'])[:60]!r}, this version "
                        f"reads {FORMAT}")
    missing = [k for k in _REQUIRED if k not in rep]
    if missing:
        raise UserError(f"{path}: not an abs-deploy export report (no "
                        f"{', '.join(repr(k) for k in missing)})")
    if not isinstance(rep["layers"], list) or not rep["layers"] or \
            not all(isinstance(r, dict) for r in rep["layers"]):
        raise UserError(f"{path}: malformed report ('layers' is not a list of layer rows)")
    return rep


def rebuild(path: str | os.PathLike) -> dict[str, Path]:
    """`abs report`: remake report.md, report.png and report.html beside a report.json from
    it alone; the JSON itself is left as it is. Returns the paths written."""
    json_path = _json_path(Path(path))
    for view in ("md", "png", "html"):
        check_output(json_path.with_name(f"report.{view}"), [json_path])
    rep = load(json_path)
    try:
        views = _views(rep, json_path.parent)
        _write_all(views)
    # The keys `load` checks are there, but a hand-edited file can still hold a string where
    # a number belongs, or a zero count; say so in one line rather than with a traceback.
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        raise UserError(f"{json_path}: malformed report ({type(e).__name__}: "
                        f"{str(e)[:100]})") from None
    return {p.suffix[1:]: p for p in views}


def _json_path(path: Path) -> Path:
    if path.is_dir():
        if not (path / "report.json").is_file():
            raise UserError(f"{path}: no report.json in this folder")
        return path / "report.json"
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    return path


def _views(report: dict, folder: Path) -> dict[Path, Callable[[Path], None]]:
    """The three views, rendered now (so a report that cannot be drawn fails before any file
    is touched) and written by `_write_all`."""
    md, page = markdown(report), html_report.render(report)
    return {folder / "report.md": lambda tmp: tmp.write_text(md, encoding="utf-8"),
            folder / "report.png": lambda tmp: plot(report["layers"], tmp),
            folder / "report.html": lambda tmp: tmp.write_text(page, encoding="utf-8")}


def _write_all(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Each file under a temporary name beside its target, renamed only when all are written:
    a reader never sees half a file, and a failure (a full or read-only disk) leaves the old
    files as they were and no temporary file behind."""
    temps: dict[Path, Path] = {}
    for folder in {path.parent for path in writers}:
        remove_stale(folder)
    try:
        for path, write_to in writers.items():
            # Created by the writer itself, not mkstemp, whose files are private (0600): a
            # report is for others to open.
            temps[path] = temp_path(path)
            write_to(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {reason(e)}") from None
    finally:
        for tmp in temps.values():
            discard(tmp)


def _jsonable(v: object) -> object:
    if isinstance(v, float) and math.isinf(v):
        return None
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"cannot write {type(v).__name__} to JSON")


def markdown(r: dict) -> str:
    """report.md. Every value quoted from the report goes through `_md`: a report.json is
    anyone's file, and Markdown viewers render the HTML a string may hold."""
    t = r["totals"]
    acc = r["accuracy"]
    par = r["parity"]
    opts = r["options"]
    lines = [f"# Export report: {_md(r['checkpoint'])}", "",
             f"{_md(r['arch'])} ({_md(r['stage'])}, {_md(r['method'])}), input "
             f"{_md(r['input_shape'])}, validated on the test split of {_md(r['dataset'])} "
             f"({_md(acc['images'])} images). ONNX opset {_md(opts['opset'])}, weights "
             f"{_md(opts['weights'])}.", "",
             "## Totals", "",
             "| | FP original | exported | ratio |", "|---|---:|---:|---:|"]
    for key, label in totals_labels(t):
        ratio = t["ratios"][key]
        lines.append(f"| {label} | {count(t['fp'][key])} | {count(t['exported'][key])} | "
                     f"{ratio:.2f}x |")
    lines += ["", "## Accuracy (top-1)", "",
              "| FP original | checkpoint weights in float | reference | ORT | "
              "ORT (no optimizations) |", "|---:|---:|---:|---:|---:|",
              f"| {pct(acc['fp_original'])} ({_md(acc['fp_source'])}) | "
              f"{pct(acc['float_weights'])} | {pct(acc['reference'])} | {pct(acc['ort'])} | "
              f"{pct(acc['ort_unoptimized'])} |", "", "## Parity", ""]
    lines += [f"- {_md(s)}" for s in parity_sentences(par)]
    lines += ["", _md(PARITY_TERMS), ""]
    lat = r.get("latency")
    if lat:
        models = models_of(lat["rows"])
        where = runtimes(models)
        warm = f"{_md(lat['warmup'])} warm-up runs" if lat.get("warmup") else "warm-up"
        lines += [f"## Latency in {where}", "", f"CPU: {_md(lat['cpu'])}. Median / p90 in ms "
                  f"over {_md(lat['rows'][0]['runs'])} runs after {warm}; within a setting "
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
        lines += ["", f"Fastest at {_md(lat['headline'])}: {_label(lat['fastest'])}.", ""]
    lines += ["## Layers", "",
              "| layer | w | a | kept | MACs | BOPs | weight bytes | act. codes |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in r["layers"]:
        clip = "float" if row["act_clip"] is None else \
            f"[{_md(row['act_clip'][0])}, {_md(row['act_clip'][1])}]"
        w = _md(row["w_bits"]) + (f" (stored {_md(row['w_store_bits'])})"
                                  if row["w_store_bits"] != row["w_bits"] else "")
        lines.append(f"| {_md(row['name'])} | {w} | {_md(row['a_bits'])} | "
                     f"{_md(row['kept'])}/{_md(row['total'])} | {count(row['macs'])} | "
                     f"{count(row['bops'])} | {count(row['weight_bytes'])} | {clip} |")
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {_md(n)}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


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


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(rows) + 2), 6),
                                   sharex=True)
    width = 0.4
    ax1.bar([i - width / 2 for i in x], [min(r["w_bits"], 16) for r in rows], width,
            label="weights")
    ax1.bar([i + width / 2 for i in x], [min(r["a_bits"], 16) for r in rows], width,
            label="activations")
    ax1.set_ylabel("bits (float shown as 16)")
    ax1.set_yticks([2, 4, 8, 16])
    ax1.legend(loc="upper right", fontsize=8)
    ax2.bar(list(x), [r["kept"] / r["total"] for r in rows], color="tab:green")
    ax2.set_ylabel("kept filters")
    ax2.set_ylim(0, 1.05)
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # the name may be a temporary one
    plt.close(fig)

