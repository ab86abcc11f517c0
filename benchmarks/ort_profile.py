"""Issue #15 (d): where ONNX Runtime spends the stream QCDQ ResNet-20's time against the pruned
float model (batch 32, 1 thread), from ORT's own per-node profile.

The ResNet-20 of `export_resnet20.py --streams` (4/4, half the inner channels pruned, shared
codes). Both files are built as `abs-export` builds them (`pipeline.emitted_files`; the QCDQ
one simplified); each runs in its own session with `enable_profiling`, the two taking turns for
`--runs` runs after 10 warm-up; ORT's profile gives every node's kernel time per run. Reported:
per optimized node type, the median total per run (ms) and its count; the whole run's median
wall time beside the sum of node times (what is not in any node: the session's own overhead).

    python benchmarks/ort_profile.py [--runs 30] [--batch 32] [--threads 1]

writes results/ort_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import load_note, provenance, provenance_markdown, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def files() -> dict:
    """The stream QCDQ file and the pruned float file, as abs-export builds them."""
    import export_resnet20

    from abs_deploy.checkpoint import load_checkpoint
    from abs_deploy.export.collapse import collapse
    from abs_deploy.export.pipeline import ExportOptions, emitted_files

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "streams.pt"
        export_resnet20.build_checkpoint(path, with_streams=True)
        col = collapse(load_checkpoint(path))
    built = emitted_files(col, ExportOptions(latency=False))
    return {"qcdq (streams)": built.qcdq, "pruned float": built.fp32,
            "input_shape": col.input_shape}


def profile(models: dict, shape: list[int], runs: int, threads: int, work: Path) -> dict:
    import onnxruntime as ort

    sessions = {}
    for name, model in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(work / name.replace(" ", "_"))
        so.log_severity_level = 3
        sessions[name] = ort.InferenceSession(model.SerializeToString(), so,
                                              providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    wall = {n: [] for n in sessions}
    for i in range(10 + runs):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            if i >= 10:
                wall[name].append(1e3 * (time.perf_counter() - t0))
    out = {}
    for name, s in sessions.items():
        events = json.loads(Path(s.end_profiling()).read_text())
        out[name] = summarize(events, runs, statistics.median(wall[name]))
    return out


def summarize(events: list[dict], runs: int, wall_ms: float) -> dict:
    """Per node type: the median over the last `runs` runs of its total time per run."""
    per_run: list[collections.Counter] = []
    counts: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            per_run.append(collections.Counter())
        elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and per_run:
            op = e["args"].get("op_name", "?")
            per_run[-1][op] += e["dur"] / 1e3
            if len(per_run) == 1:
                counts[op] += 1
    # model_run events are written when a run ends, after its node events.
    per_run = per_run[-runs:]
    ops = sorted({op for r in per_run for op in r})
    rows = {op: {"ms": statistics.median(r[op] for r in per_run), "nodes": counts[op]}
            for op in ops}
    return {"wall_ms": wall_ms, "nodes_ms": sum(v["ms"] for v in rows.values()), "ops": rows}


def markdown(r: dict) -> str:
    lines = [f"# Where ORT spends the time: stream QCDQ ResNet-20 against the pruned float "
             f"model (batch {r['batch']}, {r['threads']} thread)", "",
             f"ORT's per-node profile (`enable_profiling`), the two sessions taking turns for "
             f"{r['runs']} runs after 10 warm-up; per node type the median over runs of its "
             "total kernel time in a run.", ""]
    for name, v in r["models"].items():
        lines += [f"## {name}: {v['wall_ms']:.2f} ms a run (median wall), nodes "
                  f"{v['nodes_ms']:.2f} ms", "", "| node type | nodes | ms a run | share |",
                  "|---|---:|---:|---:|"]
        for op, row in sorted(v["ops"].items(), key=lambda kv: -kv[1]["ms"]):
            lines.append(f"| {op} | {row['nodes']} | {row['ms']:.3f} | "
                         f"{100 * row['ms'] / v['nodes_ms']:.1f}% |")
        lines.append("")
    lines += [r["load_note"], "", provenance_markdown(r["provenance"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    prov = provenance(threads=args.threads)
    sys.path.insert(0, str(HERE))
    built = files()
    shape = [args.batch, *built.pop("input_shape")[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        models = profile(built, shape, args.runs, args.threads, Path(tmp))
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "batch": args.batch, "threads": args.threads, "runs": args.runs,
              "models": models}
    result["load_note"] = load_note(prov, list(os.getloadavg()),
                                    "Times are inflated by the other work; compare the two.")
    write_results(RESULTS, "ort_profile", result, markdown(result))


if __name__ == "__main__":
    main()
