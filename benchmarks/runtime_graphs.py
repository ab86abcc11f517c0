"""What each runtime makes of the exported QCDQ file (issue #15, item 3): the graph after its
own optimization and where its time goes.

For ResNet-20 and MobileNetV2-CIFAR (x0.35) on digits32, 4/4 bits with 8/8 first and last
layers and half of every prunable group removed (`rt_checkpoints.random_checkpoint`, random
weights: structure and time do not depend on them), exported with `--weights int8` without and
with residual-stream quantizers (streams.py; what `abs finetune` makes by default), and with
`--weights int4` and streams:

- ONNX Runtime (all optimizations, 1 thread): the node types of its optimized model
  (`SessionOptions.optimized_model_filepath`) against the source's Convs and residual Adds,
  the DequantizeLinears still reading a weight initializer, and ORT's own profiler's time per
  node type at batch 32.
- OpenVINO (CPU plugin, f32 precision hint, 1 thread): the executed layers by type and
  precision, and its performance counters' time per layer type at batch 32.

    python benchmarks/runtime_graphs.py [--runs 30]

writes benchmarks/results/runtime_graphs.{json,md}. Times are shares of one profiled run of
`--runs` inferences after warm-up; run it on an idle machine for absolute numbers.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from provenance import load_note, provenance, provenance_markdown

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"resnet20": {}, "mobilenetv2_cifar": {"width_mult": 0.35}}
BATCH, THREADS, WARMUP = 32, 1, 5
INFLATED = ("Times are inflated by the other work; node counts are not, and the shares of "
            "time move less than the totals.")


VARIANTS = [("int8", False), ("int8", True), ("int4", True)]  # (weights, streams)


def export(model: str, kwargs: dict, weights: str, streams: bool, folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "runtime_tests"))
    from rt_checkpoints import dataset_for, random_checkpoint

    from abs_deploy.checkpoint import save_checkpoint
    from abs_deploy.export import ExportOptions, export_model

    ckpt = random_checkpoint(model, dataset_for("digits32"), fixed=(4, 4), prune_fraction=0.5,
                             edge_bits=8, single_channel=False, with_streams=streams, **kwargs)
    tag = f"{weights}{'_streams' if streams else ''}"
    path = save_checkpoint(ckpt, folder / f"{model}_{tag}.pt")
    out = folder / tag / f"{model}.onnx"
    out.parent.mkdir(exist_ok=True)
    export_model(path, ExportOptions(output=out, weights=weights, latency=False,
                                     max_images=64))
    return out


def source_counts(model: onnx.ModelProto) -> dict:
    """The source's Convs/Gemms and its residual Adds (both inputs computed, not constants)."""
    inits = {i.name for i in model.graph.initializer}
    adds = [n for n in model.graph.node if n.op_type == "Add"
            and not any(i in inits for i in n.input)]
    return {"Conv": sum(n.op_type == "Conv" for n in model.graph.node),
            "Gemm": sum(n.op_type == "Gemm" for n in model.graph.node),
            "residual Add": len(adds)}


def ort_graph(path: Path, folder: Path) -> dict:
    """ORT's optimized model: node types, and the DequantizeLinear nodes that read an 8- or
    4-bit initializer (a weight dequantized at run time; int32 biases are not counted)."""
    optimized = folder / (path.stem + ".ort_optimized.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(optimized)
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(optimized)
    small = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4}
    weights = {i.name for i in m.graph.initializer if i.data_type in small and len(i.dims) > 1}
    weight_dq = [n.name for n in m.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in weights]
    types = collections.Counter(n.op_type for n in m.graph.node)
    return {"node_types": dict(types.most_common()), "weight_dequantize": weight_dq}


def ort_profile(path: Path, folder: Path, runs: int) -> dict:
    """ORT's profiler: microseconds per node type per run, over the last `runs` of WARMUP +
    `runs` inferences at BATCH."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(folder / f"{path.stem}_profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = _input(sess.get_inputs()[0].shape)
    for _ in range(WARMUP + runs):
        sess.run(None, {"input": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    after_warmup = starts[WARMUP]
    per_type: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") \
                and e["ts"] >= after_warmup:
            per_type[e["args"]["op_name"]] += e["dur"]
    total = sum(per_type.values())
    return {"us_per_run": {k: v / runs for k, v in per_type.most_common()},
            "share": {k: v / total for k, v in per_type.most_common()}}


def openvino_graph(path: Path, runs: int) -> dict:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": THREADS, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = _input([BATCH, *(d.get_length() for d in
                         list(compiled.inputs[0].get_partial_shape())[1:])])
    for _ in range(WARMUP):
        request.infer({0: x})
    per_type: collections.Counter = collections.Counter()
    for _ in range(runs):
        request.infer({0: x})
        for info in request.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                per_type[f"{info.node_type} [{info.exec_type}]"] += \
                    info.real_time.total_seconds() * 1e6
    layers = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        layers[f"{rt['layerType'].astype(str)} ({rt['runtimePrecision'].astype(str)})"] += 1
    total = sum(per_type.values())
    return {"layers": dict(layers.most_common()),
            "us_per_run": {k: v / runs for k, v in per_type.most_common()},
            "share": {k: v / total for k, v in per_type.most_common()}}


def _input(shape: list) -> np.ndarray:
    dims = [BATCH, *shape[1:]]
    return np.random.default_rng(0).standard_normal(dims).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    prov = provenance(threads=THREADS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model, kwargs in MODELS.items():
            for weights, streams in VARIANTS:
                path = export(model, kwargs, weights, streams, folder)
                row = {"model": model, "weights": weights, "streams": streams,
                       "bytes": path.stat().st_size,
                       "source": source_counts(onnx.load(path)),
                       "ort": {**ort_graph(path, folder),
                               "profile": ort_profile(path, folder, args.runs)}}
                try:
                    row["openvino"] = openvino_graph(path, args.runs)
                except ImportError:
                    row["openvino"] = None
                rows.append(row)
                print(f"{model} {weights} streams={streams}: done", flush=True)
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "batch": BATCH, "threads": THREADS, "warmup": WARMUP, "runs": args.runs,
              "rows": rows, "load_avg_end": [round(v, 2) for v in os.getloadavg()]}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "runtime_graphs.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.results / "runtime_graphs.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# What ONNX Runtime and OpenVINO make of the QCDQ file", "",
             f"4/4 bits (8/8 first and last layer), half of every prunable group removed, "
             f"digits32 input; batch {r['batch']}, {r['threads']} thread; times are the "
             f"runtime's own profiler summed over {r['runs']} runs after {r['warmup']} warm-up "
             "runs, per run.", "", load_note(r["provenance"], r["load_avg_end"], INFLATED), ""]
    for row in r["rows"]:
        ort_types = row["ort"]["node_types"]
        streams = "with" if row.get("streams") else "without"
        lines += [f"## {row['model']}, `--weights {row['weights']}`, {streams} residual streams "
                  f"({row['bytes']:,} bytes)",
                  "", "Source: " + ", ".join(f"{v} {k}" for k, v in row["source"].items()), "",
                  "ORT optimized model: " + ", ".join(f"{v} {k}" for k, v in ort_types.items()),
                  "", f"Weights still dequantized at run time in ORT: "
                  f"{len(row['ort']['weight_dequantize'])}", "",
                  "| ORT node type | us per run | share |", "|---|---:|---:|"]
        prof = row["ort"]["profile"]
        lines += [f"| {k} | {v:,.0f} | {100 * prof['share'][k]:.1f}% |"
                  for k, v in prof["us_per_run"].items()]
        ov = row["openvino"]
        if ov:
            lines += ["", "OpenVINO executed layers: " + ", ".join(
                f"{v} {k}" for k, v in ov["layers"].items()), "",
                "| OpenVINO layer [kernel] | us per run | share |", "|---|---:|---:|"]
            lines += [f"| {k} | {v:,.0f} | {100 * ov['share'][k]:.1f}% |"
                      for k, v in ov["us_per_run"].items() if ov["share"][k] >= 0.005]
        lines.append("")
    lines.append(provenance_markdown(r["provenance"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
