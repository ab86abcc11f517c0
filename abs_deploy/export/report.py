"""The export report (DESIGN §9): `report.json` (everything), `report.md` (the same for a
reader) and a PNG with per-layer bits and kept-filter fractions.

Counting conventions: MACs and BOPs as in `bops.py` (full precision is 32x32); a layer's weight
bytes are its kept weights packed at the decided bits plus its bias (int32 or float32, 4
bytes each); parameters count every tensor of the model (the FP side includes its BNs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from abs_deploy import bops
from abs_deploy.export.collapse import FLOAT_BITS, LayerQuant
from abs_deploy.export.latency import Timing, headline_setting, speedups
from abs_deploy.export.qdq import ActQuant
from abs_deploy.export.validate import ModeParity, PruneParity

MODEL_LABELS = {"fp_original": "FP original", "fp_pruned": "pruned FP", "qcdq": "QCDQ"}


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


def latency_section(timings: list[Timing], cpu: str) -> dict | None:
    if not timings:
        return None
    speed = speedups(timings)
    setting = headline_setting(timings)
    head = speed.get(setting, {})
    return {"cpu": cpu, "rows": [t.as_dict() for t in timings],
            "speedup_vs_fp_original": speed, "headline": setting,
            "fastest": max(head, key=head.get) if head else None}


def parity_section(pruning: PruneParity, off: ModeParity, full: ModeParity) -> dict:
    return {"pruning": pruning.as_dict(), "ort_unoptimized": off.as_dict(),
            "ort_optimized": full.as_dict()}


def write(report: dict, folder: Path) -> dict[str, Path]:
    """report.json, report.md and report.png in `folder`; returns their paths."""
    paths = {"json": folder / "report.json", "md": folder / "report.md",
             "png": folder / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report["layers"], paths["png"])
    return paths


def _jsonable(v: object) -> object:
    if isinstance(v, float) and math.isinf(v):
        return None
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"cannot write {type(v).__name__} to JSON")


def markdown(r: dict) -> str:
    t = r["totals"]
    acc = r["accuracy"]
    par = r["parity"]
    lines = [f"# Export report: {r['checkpoint']}", "",
             f"{r['arch']} ({r['stage']}, {r['method']}), input {r['input_shape']}, "
             f"validated on {r['dataset']} ({acc['images']} images). "
             f"ONNX opset {r['options']['opset']}, weights {r['options']['weights']}.", "",
             "## Totals", "",
             "| | FP original | exported | ratio |", "|---|---:|---:|---:|"]
    file_label = "file bytes (FP: its float32 parameters)" if t.get("fp_file_estimated") \
        else "file bytes"
    for key, label in (("bops", "BOPs"), ("macs", "MACs"), ("params", "parameters"),
                       ("weight_bytes", "layer weight bytes"), ("file_bytes", file_label)):
        ratio = t["ratios"][key]
        lines.append(f"| {label} | {_count(t['fp'][key])} | {_count(t['exported'][key])} | "
                     f"{ratio:.2f}x |")
    lines += ["", "## Accuracy (top-1)", "",
              "| FP original | checkpoint weights in float | reference | ORT | "
              "ORT (no optimizations) |", "|---:|---:|---:|---:|---:|",
              f"| {_pct(acc['fp_original'])} ({acc['fp_source']}) | "
              f"{_pct(acc['float_weights'])} | {_pct(acc['reference'])} | {_pct(acc['ort'])} | "
              f"{_pct(acc['ort_unoptimized'])} |", "", "## Parity", ""]
    p, off, full = par["pruning"], par["ort_unoptimized"], par["ort_optimized"]
    lines += [f"- pruned vs masked float: logits {p['logits_rel']:.1e} relative (ORT "
              f"{p['onnx_logits_rel']:.1e}), worst layer {p['worst_layer']} "
              f"{p['worst_layer_rel']:.1e}",
              f"- ORT without optimizations vs reference: logits {off['logits_rel']:.1e} "
              f"relative, top-1 agreement {_pct(off['top1_agreement'])}, codes equal "
              f"{_pct(off['codes_equal'], 3)}",
              f"- ORT optimized (int8 kernels) vs reference: top-1 agreement "
              f"{_pct(full['top1_agreement'])}, codes equal {_pct(full['codes_equal'], 3)}, "
              f"max code difference {full['codes_max_diff']}", ""]
    lat = r.get("latency")
    if lat:
        lines += ["## Latency in ONNX Runtime", "", f"CPU: {lat['cpu']}. Median / p90 in ms "
                  f"over {lat['rows'][0]['runs']} runs after warm-up.", "",
                  "| model | batch | threads | median | p90 |", "|---|---:|---:|---:|---:|"]
        for row in lat["rows"]:
            lines.append(f"| {MODEL_LABELS.get(row['model'], row['model'])} | {row['batch']} | "
                         f"{row['threads']} | {row['median_ms']:.3f} | {row['p90_ms']:.3f} |")
        lines += ["", "Speed relative to the FP original (its median over each model's):", "",
                  "| setting | " + " | ".join(MODEL_LABELS.values()) + " |",
                  "|---|" + "---:|" * len(MODEL_LABELS)]
        for setting, speed in lat["speedup_vs_fp_original"].items():
            lines.append(f"| {setting} | " + " | ".join(
                f"{speed[m]:.2f}x" if m in speed else "n/a" for m in MODEL_LABELS) + " |")
        lines += ["", f"Fastest at {lat['headline']}: "
                  f"{MODEL_LABELS.get(lat['fastest'], lat['fastest'])}.", ""]
    lines += ["## Layers", "",
              "| layer | w | a | kept | MACs | BOPs | weight bytes | act. codes |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in r["layers"]:
        clip = "float" if row["act_clip"] is None else \
            f"[{row['act_clip'][0]}, {row['act_clip'][1]}]"
        w = f"{row['w_bits']}" + (f" (stored {row['w_store_bits']})"
                                  if row["w_store_bits"] != row["w_bits"] else "")
        lines.append(f"| {row['name']} | {w} | {row['a_bits']} | "
                     f"{row['kept']}/{row['total']} | {_count(row['macs'])} | "
                     f"{_count(row['bops'])} | {_count(row['weight_bytes'])} | {clip} |")
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:,.0f}"


def _pct(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"
