"""Issue #4's ResNet-20 point: `abs-export` wall time and the latency of every artifact.

ResNet-20 on digits32 with half of every inner channel group pruned, 4-bit weights and
activations, first and last layer at 8/8 (`runtime_tests/rt_checkpoints.random_checkpoint`:
random weights, so accuracies mean nothing here; time and latency do not depend on them).
`abs-export` runs as a user runs it, in a fresh process with latency on, `--repeats` times;
the wall time includes Python start-up and imports. The latency table is the one of the last
run's report (ONNX Runtime, optionally OpenVINO too).

    python benchmarks/export_resnet20.py [--repeats 3] [--openvino] [--weights int4] [--streams
        [--stream-codes shared|8bit]]

writes benchmarks/results/export_resnet20{,_openvino}{,_int4}{,_streams,_streams8}.{json,md},
each with the file sizes and what each runtime runs the layers on (the report's "kernels").
`--streams` builds the checkpoint with residual-stream quantizers (abs_deploy/streams.py), so
ONNX Runtime runs every conv and residual add on integer kernels: sharing their readers' codes
(what `abs finetune --streams` makes), or with `--stream-codes 8bit` all of 8 bits (the form
checkpoints written before shared codes hold; `_streams8`). Run it on an otherwise idle machine: the
ratios between artifacts survive some load (the models take turns run by run), wall times do
not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import load_note, provenance, provenance_markdown, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INFLATED = ("Wall times and latencies are inflated by the other work; the speed ratios (the "
            "models take turns run by run) are what to compare.")


def build_checkpoint(path: Path, with_streams: bool = False, shared_codes: bool = True) -> None:
    sys.path.insert(0, str(ROOT / "runtime_tests"))
    from rt_checkpoints import dataset_for, random_checkpoint

    from abs_deploy.checkpoint import save_checkpoint

    ckpt = random_checkpoint("resnet20", dataset_for("digits32"), fixed=(4, 4),
                             prune_fraction=0.5, edge_bits=8, single_channel=False,
                             with_streams=with_streams, shared_codes=shared_codes)
    save_checkpoint(ckpt, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--openvino", action="store_true",
                    help="also --check-runtime openvino (its latency rows too)")
    ap.add_argument("--weights", choices=("int8", "int4"), default="int8",
                    help="abs-export --weights (int4: packed 4-bit weight initializers)")
    ap.add_argument("--streams", action="store_true",
                    help="checkpoint with residual-stream quantizers (streams.py), so ORT "
                    "fuses every conv and residual add")
    ap.add_argument("--stream-codes", choices=("shared", "8bit"), default="shared",
                    help="with --streams: streams share their readers' codes (abs finetune "
                    "--streams), or all have 8 bits of their own (older checkpoints)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    # abs-export runs with torch's default thread count, the one recorded here; the latency
    # rows name their own.
    prov = provenance()
    exe = Path(sys.executable).with_name("abs-export")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "resnet20_half_w4a4.pt"
        build_checkpoint(ckpt, args.streams, args.stream_codes == "shared")
        walls, report = [], {}
        for i in range(args.repeats):
            out = Path(tmp) / f"run{i}"
            out.mkdir()
            cmd = [str(exe), str(ckpt), "--onnx", "-o", str(out / "model.onnx")]
            if args.openvino:
                cmd += ["--check-runtime", "openvino"]
            cmd += ["--weights", args.weights]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t0)
            report = json.loads((out / "report.json").read_text())
            sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())
                     if p.suffix in (".onnx", ".ort")}
            print(f"run {i + 1}: {walls[-1]:.1f} s wall", flush=True)
    # commit and command also at the top level: that is where a reader (and the repository's
    # hook) looks first.
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "wall_s": walls, "wall_median_s": statistics.median(walls),
              "steps_s": report["seconds"], "latency": report["latency"],
              "totals": report["totals"], "kernels": report.get("kernels"), "bytes": sizes,
              "load_avg_end": [round(v, 2) for v in os.getloadavg()],
              "streams": args.streams and args.stream_codes,
              "export_command": "abs-export ck.pt --onnx" + (" --check-runtime openvino"
                                                             if args.openvino else "")
              + f" --weights {args.weights}"}
    args.results.mkdir(parents=True, exist_ok=True)
    stem = ("export_resnet20" + ("_openvino" if args.openvino else "")
            + ("_int4" if args.weights == "int4" else "")
            + (STREAM_STEMS[args.stream_codes] if args.streams else ""))
    write_results(args.results, stem, result, markdown(result))


STREAM_STEMS = {"shared": "_streams", "8bit": "_streams8"}
STREAM_TITLES = {"shared": ", residual-stream quantizers sharing their readers' codes",
                 "8bit": ", 8-bit residual-stream quantizers"}


def markdown(r: dict) -> str:
    from abs_deploy.export.report_format import kernel_sentences, model_label

    lat = r["latency"]
    # "streams" was True (8-bit, before shared codes), now the form or False.
    form = r.get("streams")
    streams = STREAM_TITLES["8bit" if form is True else form] if form else ""
    lines = ["# abs-export on ResNet-20 (digits32), half the inner channels pruned, 4/4 bits"
             + streams, "",
             f"`{r['export_command']}` in a fresh process: wall time {r['wall_median_s']:.1f} s "
             f"(median of {len(r['wall_s'])} runs: "
             + ", ".join(f"{w:.1f}" for w in r["wall_s"]) + " s), Python start-up included.", "",
             load_note(r["provenance"], r["load_avg_end"], INFLATED), "",
             "Steps of the last run (s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                      r["steps_s"].items()), "",
             f"Latency: {lat['cpu']}; median / p90 ms over {lat['rows'][0]['runs']} runs after "
             f"{lat.get('warmup') or 'some'} warm-up runs, the models taking turns run by run.",
             "", "| model | batch | threads | median ms | p90 ms | speed vs FP original |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in lat["rows"]:
        setting = f"bs{row['batch']}_t{row['threads']}"
        speed = lat["speedup_vs_fp_original"].get(setting, {}).get(row["model"])
        lines.append(f"| {model_label(row['model'])} | {row['batch']} | "
                     f"{row['threads']} | {row['median_ms']:.3f} | {row['p90_ms']:.3f} | "
                     + (f"{speed:.2f}x |" if speed else "n/a |"))
    t = r["totals"]["ratios"]
    lines += ["", f"BOPs {t['bops']:.1f}x fewer, MACs {t['macs']:.2f}x, parameters "
              f"{t['params']:.2f}x, file {t['file_bytes']:.1f}x smaller than the FP original.", "",
              "Files: " + ", ".join(f"{name} {size:,} bytes"
                                    for name, size in r.get("bytes", {}).items()), "",
              *(f"- {k}" for k in kernel_sentences(r.get("kernels"))), "",
              provenance_markdown(r["provenance"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
