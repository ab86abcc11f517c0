"""The export report (DESIGN §9): the dict that `report.json` holds (everything), its sections
built here, and the files written from it. Its three file views are made from that dict alone,
each in its own module: `report.md` (md_report.py, the same for a reader), `report.png`
(png_report.py, per-layer bits and kept-filter fractions) and `report.html` (html_report.py,
tables and plots in one self-contained page); so `rebuild` can remake them from a
`report.json`. The views share their wording and number formats through report_format.py.

Counting conventions: MACs and BOPs as in `bops.py` (full precision is 32x32); a layer's weight
bytes are its kept weights packed at the decided bits plus its bias (int32 or float32, 4
bytes each); parameters count every tensor of the model (the FP side includes its BNs).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from abs_deploy import bops
from abs_deploy.decision import FLOAT_BITS
from abs_deploy.errors import UserError
from abs_deploy.export import html_report, md_report, png_report
from abs_deploy.export.collapse import LayerQuant
from abs_deploy.export.latency import Timing, headline_setting, speedups
from abs_deploy.export.qdq import ActQuant
from abs_deploy.export.validate import ModeParity, PruneParity
from abs_deploy.files import check_output, discard, reason, remove_stale, temp_path

FORMAT = "abs-deploy-report/1"
# The files `write` puts in its folder, by the key `write` returns each under.
FILES = {key: f"report.{key}" for key in ("json", "md", "png", "html")}
# What `load` insists on before it renders a file: enough to tell our report from any JSON.
_REQUIRED = ("checkpoint", "stage", "method", "arch", "dataset", "layers", "totals", "accuracy",
             "parity")


@dataclass
class Accuracy:
    fp_original: float  # as the checkpoint records it (the search side measured the FP model)
    fp_source: str  # "checkpoint" or, without that record, "float weights"
    # The checkpoint's own weights run in float, no quantizer and no mask: a pruned decision's
    # filters come back with whatever weights they were left with. The reports show
    # `pruned_float` instead and keep this in the JSON.
    float_weights: float
    # The pruned float model, the file model.fp32.onnx: float weights, each quantized
    # activation clipped to its range, no rounding.
    pruned_float: float
    reference: float
    ort: float
    ort_unoptimized: float
    images: int
    # Reports written before model.fp32.onnx clipped its activations lack this: their pruned
    # float model ran unclipped and could be near chance after a fine-tune (10-20% on the
    # stream ResNet-20s of latency_search).
    pruned_float_clipped: bool = True


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
    path = folder / FILES["json"]
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
        check_output(json_path.with_name(FILES[view]), [json_path])
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
        if not (path / FILES["json"]).is_file():
            raise UserError(f"{path}: no report.json in this folder")
        return path / FILES["json"]
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    return path


def _views(report: dict, folder: Path) -> dict[Path, Callable[[Path], None]]:
    """The three views, rendered now (so a report that cannot be drawn fails before any file
    is touched) and written by `_write_all`."""
    md, page = md_report.markdown(report), html_report.render(report)
    return {folder / FILES["md"]: lambda tmp: tmp.write_text(md, encoding="utf-8"),
            folder / FILES["png"]: lambda tmp: png_report.plot(report["layers"], tmp),
            folder / FILES["html"]: lambda tmp: tmp.write_text(page, encoding="utf-8")}


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
