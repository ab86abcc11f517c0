"""Issue #12 acceptance (a): the user's path on Fashion-MNIST, command by command.

`abs pretrain` (fashion_cnn, width 8) -> `abs search --method abs --target-bops 64x` ->
`abs finetune` -> `abs-export --onnx`, each in a fresh process exactly as a user types it, on the
Debian `dataset-fashion-mnist` files; then the export report's accuracy (PyTorch reference, ONNX
Runtime with optimizations on and off, on all 10,000 test images) and its parity verdicts.
Epochs are shortened (`--epochs`) so that it runs in about ten minutes on one thread; the
numbers are what this short path reaches, not the Pareto benchmark's.

    python benchmarks/fashion_cli.py [--epochs 3] [--fp-epochs 3]

writes benchmarks/results/fashion_cli.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance, provenance_markdown, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="search and fine-tune epochs")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    prov = provenance(1)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        commands = [
            ["abs", "pretrain", "--model", "fashion_cnn", "--model-kwargs", '{"width": 8}',
             "--dataset", "fashion-mnist", "--epochs", str(args.fp_epochs), "--batch-size",
             "128", "-o", str(t / "fp.pt")],
            ["abs", "search", str(t / "fp.pt"), "--method", "abs", "--target-bops", "64x",
             "--epochs", str(args.epochs), "--batch-size", "128", "-o", str(t / "searched.pt")],
            ["abs", "finetune", str(t / "searched.pt"), "--epochs", str(args.epochs),
             "--batch-size", "128", "-o", str(t / "finetuned.pt")],
            ["abs-export", str(t / "finetuned.pt"), "--onnx", "-o", str(t / "model.onnx"),
             "--skip-latency"],
        ]
        for cmd in commands:
            shown = " ".join(cmd).replace(tmp, "$TMP")
            print(f"$ {shown}", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], env=env, text=True,
                                  capture_output=True)
            seconds = time.perf_counter() - t0
            out = (done.stdout + done.stderr).replace(tmp, "$TMP")
            steps.append({"command": shown, "exit_code": done.returncode, "seconds": seconds,
                          "output_tail": out.strip().splitlines()[-12:]})
            if done.returncode != 0:
                print(out, file=sys.stderr)
                raise SystemExit(f"step failed with exit {done.returncode}: {shown}")
        report = json.loads((t / "report.json").read_text())
    acc, parity = report["accuracy"], report["parity"]
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "steps": steps, "accuracy": acc, "parity": parity,
              "bops": report["totals"], "passed": all(p.get("passed") for p in parity.values())}
    write_results(args.results, "fashion_cli", result, _markdown(result))


def _markdown(r: dict) -> str:
    a = r["accuracy"]
    lines = ["# Fashion-MNIST through the CLI: pretrain, ABS search at 64x, fine-tune, export",
             "", "| step | exit | seconds |", "|---|---:|---:|"]
    lines += [f"| `{s['command']}` | {s['exit_code']} | {s['seconds']:.0f} |"
              for s in r["steps"]]
    lines += ["", f"Test top-1 on {a['images']:,} images: FP (checkpoint) "
              f"{100 * a['fp_original']:.2f}%, PyTorch reference {100 * a['reference']:.2f}%, "
              f"ONNX Runtime optimized {100 * a['ort']:.2f}%, optimizations off "
              f"{100 * a['ort_unoptimized']:.2f}%.", "",
              "Parity verdicts (criteria in the README, 'Parity'): " + ", ".join(
                  f"{k} {'passed' if v.get('passed') else '**failed**'}"
                  for k, v in r["parity"].items()) + ".", "",
              provenance_markdown(r["provenance"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
