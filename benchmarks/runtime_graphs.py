"""What each runtime makes of the exported QCDQ file (issue #15, item 3): the graph after its
own optimization and where its time goes.

For ResNet-20 and MobileNetV2-CIFAR (x0.35) on digits32, 4/4 bits with 8/8 first and last
layers and half of every prunable group removed (`rt_checkpoints.random_checkpoint`, random
weights: structure and time do not depend on them), exported with `--weights int8` without
residual-stream quantizers, with 8-bit ones (streams.py; checkpoints written before shared
codes), with streams sharing their readers' codes (what `abs finetune --streams` makes), and
with `--weights int4` and shared-code streams:

- ONNX Runtime (all optimizations): layers on integer kernels, residual adds on QLinearAdd,
  weights dequantized every run and the node types of its optimized model, counted as the
  export's report counts them (export/kernels.py); ORT's own profiler's time per node type at
  batch 32, 1 thread.
- OpenVINO (CPU plugin), compiled as the export validates and times it (OVSession: for files
  with stream quantizers, the residual adds' operands as outputs, which its exactness needs):
  the executed layers by type and precision, and its performance counters' time per layer type
  at batch 32, 1 thread.

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
from provenance import load_note, provenance, provenance_markdown, write_results

from abs_deploy.export import openvino_runtime
from abs_deploy.export.kernels import onnxruntime_kernels, openvino_kernels
from abs_deploy.export.openvino_runtime import OVSession
from abs_deploy.export.report_format import kernel_sentences

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"resnet20": {}, "mobilenetv2_cifar": {"width_mult": 0.35}}
BATCH, THREADS, WARMUP = 32, 1, 5
INFLATED = ("Times are inflated by the other work; node counts are not, and the shares of "
            "time move less than the totals.")


# (weights, streams): none, 8-bit ones of their own (older checkpoints), sharing their
# readers' codes (what `abs finetune --streams` makes).
VARIANTS = [("int8", None), ("int8", "8bit"), ("int8", "shared"), ("int4", "shared")]
STREAM_TITLES = {None: "without residual streams", "8bit": "with 8-bit residual streams",
                 "shared": "with residual streams sharing their readers' codes"}


def export(model: str, kwargs: dict, weights: str, streams: str | None, folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "runtime_tests"))
    from rt_checkpoints import dataset_for, random_checkpoint

    from abs_deploy.checkpoint import save_checkpoint
    from abs_deploy.export import ExportOptions, export_model

    ckpt = random_checkpoint(model, dataset_for("digits32"), fixed=(4, 4), prune_fraction=0.5,
                             edge_bits=8, single_channel=False, with_streams=bool(streams),
                             shared_codes=streams == "shared", **kwargs)
    tag = f"{weights}_{streams or 'nostreams'}"
    path = save_checkpoint(ckpt, folder / f"{model}_{tag}.pt")
    out = folder / tag / f"{model}.onnx"
    out.parent.mkdir(exist_ok=True)
    export_model(path, ExportOptions(output=out, weights=weights, latency=False,
                                     max_images=64))
    return out


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


def openvino_graph(model: onnx.ModelProto, runs: int) -> dict:
    """OpenVINO compiled as the export validates and times it (OVSession: with the residual
    adds' operands as outputs where the file has stream quantizers), its performance counters
    summed over `runs` inferences at BATCH after WARMUP."""
    session = OVSession(model, threads=THREADS, profile=True)
    feed = {session.get_inputs()[0].name: _input(_shape(model))}
    for _ in range(WARMUP):
        session.run(None, feed)
    per_type: collections.Counter = collections.Counter()
    for _ in range(runs):
        session.run(None, feed)
        for kind, us in session.last_run_profile():
            per_type[kind] += us
    total = sum(per_type.values())
    return {**openvino_kernels(model).as_dict(),
            "us_per_run": {k: v / runs for k, v in per_type.most_common()},
            "share": {k: v / total for k, v in per_type.most_common()}}


def _shape(model: onnx.ModelProto) -> list:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


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
                onnx_model = onnx.load(path)
                row = {"model": model, "weights": weights, "streams": streams,
                       "bytes": path.stat().st_size,
                       "ort": {**onnxruntime_kernels(onnx_model).as_dict(),
                               "profile": ort_profile(path, folder, args.runs)},
                       "openvino": (openvino_graph(onnx_model, args.runs)
                                    if openvino_runtime.available() else None)}
                rows.append(row)
                print(f"{model} {weights} streams={streams}: done", flush=True)
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "batch": BATCH, "threads": THREADS, "warmup": WARMUP, "runs": args.runs,
              "rows": rows, "load_avg_end": [round(v, 2) for v in os.getloadavg()]}
    args.results.mkdir(parents=True, exist_ok=True)
    write_results(args.results, "runtime_graphs", result, markdown(result))


def markdown(r: dict) -> str:
    lines = ["# What ONNX Runtime and OpenVINO make of the QCDQ file", "",
             f"4/4 bits (8/8 first and last layer), half of every prunable group removed, "
             f"digits32 input; batch {r['batch']}, {r['threads']} thread; times are the "
             f"runtime's own profiler summed over {r['runs']} runs after {r['warmup']} warm-up "
             "runs, per run.", "", load_note(r["provenance"], r["load_avg_end"], INFLATED), ""]
    for row in r["rows"]:
        kernels = {"onnxruntime": row["ort"], **({"openvino": row["openvino"]}
                                                 if row["openvino"] else {})}
        form = row.get("streams")
        streams = STREAM_TITLES["8bit" if form is True else (form or None)]
        lines += [f"## {row['model']}, `--weights {row['weights']}`, {streams} "
                  f"({row['bytes']:,} bytes)", "",
                  *(f"- {k}" for k in kernel_sentences(kernels)), "",
                  "ORT optimized model: " + ", ".join(
                      f"{v} {k}" for k, v in row["ort"]["node_types"].items()), "",
                  "| ORT node type | us per run | share |", "|---|---:|---:|"]
        prof = row["ort"]["profile"]
        lines += [f"| {k} | {v:,.0f} | {100 * prof['share'][k]:.1f}% |"
                  for k, v in prof["us_per_run"].items()]
        ov = row["openvino"]
        if ov:
            lines += ["", "OpenVINO executed layers: " + ", ".join(
                f"{v} {k}" for k, v in ov["node_types"].items()), "",
                "| OpenVINO layer [kernel] | us per run | share |", "|---|---:|---:|"]
            lines += [f"| {k} | {v:,.0f} | {100 * ov['share'][k]:.1f}% |"
                      for k, v in ov["us_per_run"].items() if ov["share"][k] >= 0.005]
        lines.append("")
    lines.append(provenance_markdown(r["provenance"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
