"""Issue #15 (d): where OpenVINO's CPU plugin spends the time of the QCDQ ResNet-20, and why
its fused conv + residual add is inexact.

    python benchmarks/openvino_profile.py [--work DIR] [--baseline NAME=PATH ...] [--runs 60]

1. Exports the ResNet-20 of benchmarks/export_resnet20.py (digits32, 4/4, half of each inner
   group pruned, random weights; `build_checkpoint` there) with the checked-out code, without
   and with residual-stream quantizers (`abs_deploy.export.export_model`, latency off), into
   `--work` (kept: a second run reuses the files; delete the folder to re-export).
2. Per-node performance counters (`PERF_COUNT`, `get_profiling_info`) of the pruned float file
   and the QCDQ file (and any `--baseline` QCDQ file, e.g. one exported at an older commit), at
   batch 1 and 32 on 1 and 2 threads, the models taking turns run by run; per node the median
   over the runs, summed by executed node type and kernel.
3. Latency without counters (`abs_deploy.export.latency.measure`: warm-up, models taking turns
   run by run, medians) in OpenVINO and ONNX Runtime.
4. The inexact conv + add: a three-conv model (stem conv -> 4-bit stream -> conv -> conv ->
   8-bit Q/DQ -> Add(stream) -> 4-bit Q/Clip/DQ) in several graph forms of the same integers,
   OpenVINO's output codes against ORT without optimizations (checked against numpy).
5. The residual-stream file in OpenVINO: no workaround (inexact), the float values of both
   add operands as extra outputs (before 055f6ef), the codes of the conv-made operands
   (`residual_add_operands` now), against the pruned float file.

Writes benchmarks/results/openvino_profile.{json,md}. Run on an idle machine if you can: the
ratios survive load (turns), the absolute times do not.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from provenance import load_note, provenance, provenance_markdown, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = ((1, 1), (32, 1), (1, 2), (32, 2))
OV_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
INFLATED = ("Absolute times are inflated by the other work; compare the models within one "
            "setting (they take turns run by run).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/abs_openvino_profile"))
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME=PATH",
                    help="another QCDQ file of the same model to profile and time beside")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    prov = provenance()
    files = export_files(args.work)
    qcdq = {"qcdq": files["plain"] / "model.onnx",
            **{k: Path(v) for k, v in (b.split("=", 1) for b in args.baseline)}}
    models = {"fp_pruned": files["plain"] / "model.fp32.onnx", **qcdq}
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "files": {k: str(v) for k, v in models.items()}}
    result["profile"] = {f"bs{b}_t{t}": profile(models, b, t, args.runs if b == 1 else
                                                max(10, args.runs // 4))
                         for b, t in SETTINGS}
    result["latency"] = latency({k: onnx.load(v) for k, v in models.items()}, args.runs)
    result["fused_add"] = fused_add_forms()
    result["streams"] = streams_workarounds(files["streams"], args.runs)
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.results.mkdir(parents=True, exist_ok=True)
    write_results(args.results, "openvino_profile", result, markdown(result))


def export_files(work: Path) -> dict[str, Path]:
    """The plain and the residual-stream export of the benchmark's ResNet-20, reused if there."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from export_resnet20 import build_checkpoint

    from abs_deploy.export import ExportOptions, export_model

    out = {}
    for kind in ("plain", "streams"):
        folder = work / kind
        if not (folder / "model.onnx").exists():
            folder.mkdir(parents=True, exist_ok=True)
            build_checkpoint(folder / "ck.pt", with_streams=kind == "streams")
            export_model(folder / "ck.pt", ExportOptions(output=folder / "model.onnx",
                                                         latency=False, weights="int8"))
        out[kind] = folder
    return out


def profile(models: dict[str, Path], batch: int, threads: int, runs: int) -> dict:
    """Wall median and per-node medians (by executed type and kernel) of each model."""
    import openvino as ov

    core = ov.Core()
    config = {**OV_CONFIG, "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    requests = {k: core.compile_model(core.read_model(str(p)), "CPU", config)
                .create_infer_request() for k, p in models.items()}
    x = np.random.default_rng(0).standard_normal([batch, 3, 32, 32]).astype(np.float32)
    wall = {k: [] for k in models}
    nodes: dict[str, dict[tuple[str, str, str], list[float]]] = {
        k: collections.defaultdict(list) for k in models}
    for i in range(-5, runs):
        for k, r in requests.items():
            t0 = time.perf_counter()
            r.infer({0: x}, share_outputs=True)
            dt = time.perf_counter() - t0
            if i < 0:
                continue
            wall[k].append(dt * 1e3)
            for p in r.get_profiling_info():
                if p.status == p.Status.EXECUTED:
                    nodes[k][p.node_name, p.node_type, p.exec_type].append(
                        p.real_time.total_seconds() * 1e6)
    out = {}
    for k in models:
        per_node = {key: statistics.median(v) for key, v in nodes[k].items()}
        by_type: dict[str, list[float]] = {}
        for (_, kind, kernel), us in per_node.items():
            row = by_type.setdefault(f"{kind} [{kernel}]", [0, 0.0])
            row[0] += 1
            row[1] += us
        out[k] = {"wall_median_ms": statistics.median(wall[k]),
                  "nodes": len(per_node), "node_sum_us": sum(per_node.values()),
                  "by_type": {t: {"count": c, "us": round(us, 1)} for t, (c, us) in
                              sorted(by_type.items(), key=lambda kv: -kv[1][1])}}
    return out


def latency(models: dict[str, onnx.ModelProto], runs: int) -> dict:
    from abs_deploy.export.latency import measure

    named = {**{f"{k} (ORT)": m for k, m in models.items()},
             **{f"{k} (OpenVINO)": m for k, m in models.items()}}
    rows = measure(named, [1, 3, 32, 32], (1, 32), (1, 2), runs,
                   runtimes={k: "openvino" for k in named if k.endswith("(OpenVINO)")})
    return {"runs": runs, "rows": [r.as_dict() for r in rows],
            "load_avg": [round(v, 2) for v in os.getloadavg()]}


# --- the fused conv + add ------------------------------------------------------------------

C, H = 16, 16
FORMS = {
    "as exported": "conv -> Q(8-bit, zp 128)/DQ -> Add(stream) -> Q/Clip/DQ",
    "float_clip": "a float Clip to the 8-bit range in front of the conv's Q",
    "int8_codes": "the conv's codes as int8, zero point 0",
    "equal_scales": "the conv's stream quantizer with the shortcut's scale",
    "swap": "Add(stream, conv) instead of Add(conv, stream)",
    "sub_neg": "Sub(conv, Neg(stream)) instead of Add",
    "codes_as_output": "as exported, the conv's codes an extra output (the workaround)",
}


def fused_add_forms() -> dict:
    """Each form: OpenVINO's output codes against ORT's (no optimizations), and what the
    plugin fused the last conv with."""
    out = {}
    x = (np.random.default_rng(1).standard_normal((1, C, H, H)) * 2).astype(np.float32)
    for form in FORMS:
        m = fused_add_model(form)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        ref = ort.InferenceSession(m.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"]).run(["out"], {"x": x})[0]
        got, fused = _ov_run(m, x, ["yq"] if form == "codes_as_output" else [])
        d = np.abs(np.rint(got / S_OUT) - np.rint(ref / S_OUT))
        unrounded = np.abs(np.rint(got / S_OUT) - np.rint(_numpy_reference(m, x, False) / S_OUT))
        out[form] = {"what": FORMS[form], "codes_equal": float((d == 0).mean()),
                     "codes_equal_unrounded_formula": float((unrounded == 0).mean()),
                     "codes_max_diff": int(d.max()), "last_conv_fused_with": fused,
                     "ort_equals_numpy": bool(np.array_equal(ref, _numpy_reference(m, x)))}
    return out


S_X, S_IN, S_M, S_C, S_OUT = 0.05, 0.25, 0.3, 0.06, 0.45


def fused_add_model(form: str = "as exported", seed: int = 0) -> onnx.ModelProto:
    """stem conv -> u4 stream s -> conv -> u4 -> conv -> Q/DQ (8 bits) -> Add(s) -> u4."""
    rng = np.random.default_rng(seed)
    w0, w1, w2 = (rng.integers(-7, 8, size=(C, C, 3, 3)).astype(np.int8) for _ in range(3))
    ws = (rng.uniform(0.5, 1.5, C) * 0.01).astype(np.float32)
    b = rng.integers(-200, 200, C).astype(np.int32)
    s_c = S_IN if form == "equal_scales" else S_C
    f = np.float32
    consts = {"s_x": f(S_X), "s_in": f(S_IN), "s_m": f(S_M), "s_c": f(s_c), "s_o": f(S_OUT),
              "z0": np.uint8(0), "z15": np.uint8(15), "z128": np.uint8(128), "zi8": np.int8(0),
              "w0": w0, "w1": w1, "w2": w2, "ws": ws, "wz": np.zeros(C, np.int8), "b": b,
              "bs0": (S_X * ws).astype(f), "bs1": (S_IN * ws).astype(f),
              "bs2": (S_M * ws).astype(f), "lo_c": f(-128 * s_c), "hi_c": f(127 * s_c)}
    inits = [nh.from_array(np.asarray(v), k) for k, v in consts.items()]
    n = []

    def conv(x: str, w: str, bs: str, y: str) -> None:
        n.extend([helper.make_node("DequantizeLinear", [w, "ws", "wz"], [w + "d"], axis=0),
                  helper.make_node("DequantizeLinear", ["b", bs], [bs + "d"], axis=0),
                  helper.make_node("Conv", [x, w + "d", bs + "d"], [y], pads=[1, 1, 1, 1],
                                   kernel_shape=[3, 3])])

    def qcdq(x: str, s: str, z: str, y: str, clip: bool = True) -> None:
        n.append(helper.make_node("QuantizeLinear", [x, s, z], [y + "q"]))
        codes = y + "q"
        if clip:
            n.append(helper.make_node("Clip", [codes, "z0", "z15"], [y + "c"]))
            codes = y + "c"
        n.append(helper.make_node("DequantizeLinear", [codes, s, z], [y + "d"]))

    qcdq("x", "s_x", "z128", "x0", clip=False)
    conv("x0d", "w0", "bs0", "x1")
    qcdq("x1", "s_in", "z0", "s")           # the residual stream (4 bits)
    conv("sd", "w1", "bs1", "m")            # a block's first conv: the conv meeting the
    qcdq("m", "s_m", "z0", "m")             # add must not read the stream itself, or the
    conv("md", "w2", "bs2", "y")            # plugin does not fuse the add
    y = "y"
    if form == "float_clip":
        n.append(helper.make_node("Clip", ["y", "lo_c", "hi_c"], ["yclip"]))
        y = "yclip"
    zp = "zi8" if form == "int8_codes" else "z128"
    qcdq(y, "s_c", zp, "y", clip=False)
    if form == "sub_neg":
        n += [helper.make_node("Neg", ["sd"], ["sneg"]),
              helper.make_node("Sub", ["yd", "sneg"], ["a"])]
    else:
        pair = ["sd", "yd"] if form == "swap" else ["yd", "sd"]
        n.append(helper.make_node("Add", pair, ["a"]))
    qcdq("a", "s_o", "z0", "a")
    n.append(helper.make_node("Identity", ["ad"], ["out"]))
    g = helper.make_graph(n, "conv_qdq_add",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, H])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                         [1, C, H, H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def _numpy_reference(m: onnx.ModelProto, x: np.ndarray, round_conv: bool = True
                     ) -> np.ndarray:
    """The same integers by hand: int64 accumulation, round half to even. `round_conv=False`:
    the last conv's 8-bit quantizer clips without rounding (what OpenVINO is suspected of)."""
    v = {i.name: nh.to_array(i) for i in m.graph.initializer}
    f = np.float32

    def q(t: np.ndarray, s: float, z: int, lo: int, hi: int) -> np.ndarray:
        return np.clip(np.rint(t.astype(f) / f(s)) + z, lo, hi)

    def conv(codes: np.ndarray, w: np.ndarray, s_in: float) -> np.ndarray:
        xp = np.pad(codes, ((0, 0), (0, 0), (1, 1), (1, 1))).astype(np.int64)
        acc = sum(np.einsum("nchw,oc->nohw", xp[:, :, i:i + H, j:j + H],
                            w[:, :, i, j].astype(np.int64)) for i in range(3) for j in range(3))
        acc = acc + v["b"][None, :, None, None]
        return (acc.astype(f) * (f(s_in) * v["ws"])[None, :, None, None]).astype(f)

    s = q(conv(q(x, v["s_x"], 128, 0, 255) - 128, v["w0"], v["s_x"]), v["s_in"], 0, 0, 15)
    mm = q(conv(s, v["w1"], v["s_in"]), v["s_m"], 0, 0, 15)
    y2 = conv(mm, v["w2"], v["s_m"])
    y = (q(y2, v["s_c"], 128, 0, 255) - 128 if round_conv else
         np.clip(y2 / f(v["s_c"]), -128, 127))
    a = (y * f(v["s_c"])).astype(f) + (s * f(v["s_in"])).astype(f)
    return (q(a, v["s_o"], 0, 0, 15) * f(v["s_o"])).astype(f)


def _ov_run(m: onnx.ModelProto, x: np.ndarray, keep: list[str]) -> tuple[np.ndarray, str]:
    import openvino as ov

    core = ov.Core()
    read = core.read_model(m.SerializeToString())
    if keep:
        read.add_outputs(keep)
    compiled = core.compile_model(read, "CPU", {**OV_CONFIG, "INFERENCE_NUM_THREADS": 1})
    request = compiled.create_infer_request()
    request.infer({"x": x})
    port = next(p for p in compiled.outputs if "out" in p.get_names())
    fused = [op.get_rt_info()["originalLayersNames"].astype(str)
             for op in compiled.get_runtime_model().get_ordered_ops()
             if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    return np.array(request.get_tensor(port).data), fused[-1]


# --- the residual-stream file ----------------------------------------------------------------

def streams_workarounds(folder: Path, runs: int) -> dict:
    """The stream file in OpenVINO with each workaround, timed taking turns with the pruned
    float file; logits against ORT without optimizations."""
    import openvino as ov

    from abs_deploy.export.openvino_runtime import residual_add_operands

    model = onnx.load(folder / "model.onnx")
    made_by = {o: n for n in model.graph.node for o in n.output}
    both_values = []  # what residual_add_operands returned before 055f6ef
    for n in model.graph.node:
        if n.op_type == "Add" and all(made_by.get(i) is not None and made_by[i].op_type ==
                                      "DequantizeLinear" for i in n.input):
            both_values += [i for i in n.input if i not in both_values]
    forms = {"none (inexact)": [], "both operands' float values": both_values,
             "conv-made operands' codes": residual_add_operands(model)}
    x = np.random.default_rng(0).standard_normal([64, 3, 32, 32]).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    ref = ort.InferenceSession(model.SerializeToString(), so,
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    core = ov.Core()

    def compiled(path: Path, keep: list[str], threads: int) -> object:
        read = core.read_model(str(path))
        if keep:
            read.add_outputs(keep)
        return core.compile_model(read, "CPU", {**OV_CONFIG, "INFERENCE_NUM_THREADS": threads})

    out: dict = {"extra_outputs": {k: len(v) for k, v in forms.items()}, "logits": {},
                 "latency_ms": {}}
    for k, keep in forms.items():
        c = compiled(folder / "model.onnx", keep, 1)
        r = c.create_infer_request()
        r.infer({0: x})
        y = np.array(r.get_tensor(c.output("logits")).data)
        out["logits"][k] = {"max_abs_diff_vs_ort": float(np.abs(y - ref).max()),
                            "top1_agreement": float((y.argmax(1) == ref.argmax(1)).mean())}
    for b, t in SETTINGS:
        reqs = {"fp_pruned": compiled(folder / "model.fp32.onnx", [], t)}
        reqs.update({k: compiled(folder / "model.onnx", keep, t) for k, keep in forms.items()})
        ports = {k: c.output("logits") for k, c in reqs.items()}
        reqs = {k: c.create_infer_request() for k, c in reqs.items()}
        xb = x[:b].copy()
        times: dict[str, list[float]] = {k: [] for k in reqs}
        n = runs if b == 1 else max(10, runs // 4)
        for i in range(-5, n):
            for k, r in reqs.items():
                t0 = time.perf_counter()
                r.infer({0: xb}, share_outputs=True)
                np.array(r.get_tensor(ports[k]).data, copy=True)
                if i >= 0:
                    times[k].append((time.perf_counter() - t0) * 1e3)
        out["latency_ms"][f"bs{b}_t{t}"] = {k: statistics.median(v) for k, v in times.items()}
    return out


# --- report ----------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    p = r["provenance"]
    lines = ["# OpenVINO CPU: where the QCDQ ResNet-20's time goes, and the fused residual add",
             "", load_note(p, r["load_avg_end"], INFLATED), "",
             "Models: " + ", ".join(f"`{k}` = {v}" for k, v in r["files"].items()) + ".", "",
             "## Per-node profile (PERF_COUNT), summed by executed node type [kernel]", "",
             "Per node the median over the runs (µs), then summed; the models took turns run "
             "by run. Wall = median of the infer call with counters on.", ""]
    for setting, models in r["profile"].items():
        lines += [f"### {setting}", "", "| model | wall ms | nodes | sum of nodes µs | "
                  "by type (count × µs) |", "|---|---:|---:|---:|---|"]
        for k, v in models.items():
            types = "; ".join(f"{t} {d['count']}× {d['us']:.0f}" for t, d in
                              v["by_type"].items())
            lines.append(f"| {k} | {v['wall_median_ms']:.3f} | {v['nodes']} | "
                         f"{v['node_sum_us']:.0f} | {types} |")
        lines.append("")
    lat = r["latency"]
    lines += ["## Latency without counters (median ms; models taking turns, "
              f"{lat['runs']} runs after warm-up; load at the end {lat['load_avg'][0]:.2f})", "",
              "| model | bs1 t1 | bs32 t1 | bs1 t2 | bs32 t2 |", "|---|---:|---:|---:|---:|"]
    table: dict[str, dict[str, float]] = {}
    for row in lat["rows"]:
        table.setdefault(row["model"], {})[f"bs{row['batch']}_t{row['threads']}"] = \
            row["median_ms"]
    for model, cells in table.items():
        lines.append(f"| {model} | " + " | ".join(f"{cells.get(f'bs{b}_t{t}', float('nan')):.3f}"
                                                   for b, t in SETTINGS) + " |")
    lines += ["", "## The fused conv + residual add: graph forms of the same integers", "",
              "OpenVINO's output codes against ORT without optimizations (which equals numpy: "
              + ", ".join(f"{k} {v['ort_equals_numpy']}" for k, v in r["fused_add"].items())
              + ").", "",
              "| form | what | codes equal | max diff | codes equal to the formula without "
              "the conv quantizer's rounding | last conv fused with |",
              "|---|---|---:|---:|---:|---|"]
    for k, v in r["fused_add"].items():
        lines.append(f"| {k} | {v['what']} | {100 * v['codes_equal']:.1f}% | "
                     f"{v['codes_max_diff']} | "
                     f"{100 * v['codes_equal_unrounded_formula']:.1f}% | "
                     f"{v['last_conv_fused_with']} |")
    s = r["streams"]
    lines += ["", "## Residual-stream file in OpenVINO: workarounds", "",
              "Logits against ORT without optimizations (64 random inputs), and latency (median "
              "ms, taking turns with the pruned float file; only the logits copied).", "",
              "| form | extra outputs | max abs diff | top-1 agreement |", "|---|---:|---:|---:|"]
    for k, v in s["logits"].items():
        lines.append(f"| {k} | {s['extra_outputs'][k]} | {v['max_abs_diff_vs_ort']:.3f} | "
                     f"{100 * v['top1_agreement']:.1f}% |")
    keys = list(next(iter(s["latency_ms"].values())))
    lines += ["", "| setting | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for setting, row in s["latency_ms"].items():
        lines.append(f"| {setting} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    lines += ["", provenance_markdown(p)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
