"""Issue #16 acceptance (a): does the latency table predict what the exported file runs at?

ResNet-20 on digits32 in ONNX Runtime, batch 32, one thread. `abs profile` builds the table
(`benchmarks/results/lut_resnet20_ort.json`, reused when it is there and matches); then five
random decisions, none of them one the table's overhead was fitted on (random (w, a) per layer
from the candidates, first and last layer 8/8, per prunable channel group a random count of
the table's grid from (1 - max_prune) * C to C, multiples of 8 for ORT, the counts a search
with the table keeps), are exported with `abs-export`'s own pipeline, timed whole
(the five take turns run by run, `export/latency.measure`) and compared with
`LatencyTable.predict_ms`. Each must be within 15%, by the clock the table was timed with
(`abs profile` on one thread times runs by the process's CPU time, so other work on the
machine does not count); the wall clock errors are reported beside them.

    python benchmarks/lut_check.py [--decisions 5] [--fresh] [--runtime openvino] [--streams]

Resumable: each finished measurement is kept in benchmarks/results/lut_check.json, which a
new run of the same table continues (`--fresh` starts over, the table included). Writes
benchmarks/results/lut_check.{json,md} (`--runtime openvino`: lut_check_openvino.*, the table
lut_resnet20_openvino.json; `--streams`, the form `abs finetune --streams` trains and the
latency search benchmark profiles: lut_check_streams.*, lut_resnet20_ort_streams.json, the
decisions with shared-code residual-stream quantizers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import load_note, provenance, provenance_markdown

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LIMIT = 0.15
BATCH, THREADS, CANDIDATES, EDGE, MAX_PRUNE = 32, 1, (2, 4, 8), 8, 0.5
INFLATED = ("Both the table and the whole models were timed under that load, at different "
            "moments; the errors include its changes between them.")


def _stamp(lut: Path, prov: dict, profile: dict) -> None:
    """The table is a result file too: it gets the commit and the command that made it (the
    table format ignores keys it does not know)."""
    record = json.loads(lut.read_text())
    record.update(commit=prov["commit"], command=profile.get("command"))
    lut.write_text(json.dumps(record) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decisions", type=int, default=5)
    ap.add_argument("--fresh", action="store_true",
                    help="ignore earlier partial results and profile the table anew")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--runtime", choices=("ort", "openvino"), default="ort")
    ap.add_argument("--streams", action="store_true",
                    help="table and decisions with residual-stream quantizers (shared codes)")
    args = ap.parse_args()
    form = "_streams" if args.streams else ""
    lut = RESULTS / f"lut_resnet20_{args.runtime}{form}.json"
    stem = "lut_check" + ("" if args.runtime == "ort" else f"_{args.runtime}") + form
    prov = provenance(threads=1)
    out_json = args.results / f"{stem}.json"
    state = _resume(out_json, args.fresh)
    if args.fresh:
        # The table too: one extended over several sessions sits on the median level of all
        # its timed batches (its anchors), and this machine's speed moved by 20% between
        # sessions (batch scales 0.72-1.19 in one such table), while the check times the
        # decisions at today's speed: it read -19..-26% against a table last extended a day
        # before, which says nothing about the table's method.
        lut.unlink(missing_ok=True)
    state.setdefault("provenance", prov)
    state["streams"] = args.streams

    if "profile" not in state:
        state["profile"] = build_table(lut, args.runtime, args.streams)
        _stamp(lut, state["provenance"], state["profile"])
        _save(out_json, state)
    from abs_deploy.latency_table import LatencyTable

    table = LatencyTable.load(lut)
    state["table"] = {"fp_original_ms": table.fp_original_ms, "overhead": table.fit,
                      "clock": table.clock,
                      "channel_multiple": table.record.get("channel_multiple", 1),
                      "overhead_constant_ms": table.overhead()[0],
                      "runtime": f"{table.runtime} {table.runtime_version}",
                      "machine": table.machine}
    fitted = [s["choice"] for s in table.fit["samples"]]

    todo = [k for k in range(args.decisions) if str(k) not in state.setdefault("checks", {})]
    if todo:
        measured = check_decisions(todo, table, fitted, args.streams)
        state["checks"].update(measured)
        _save(out_json, state)
    rows = [state["checks"][str(k)] for k in range(args.decisions)]
    state.update({"commit": state["provenance"]["commit"],
                  "command": state["provenance"]["command"],
                  "load_avg_end": [round(v, 2) for v in os.getloadavg()],
                  "limit": LIMIT, "passed": all(abs(r["error"]) <= LIMIT for r in rows),
                  "complete": True})
    _save(out_json, state)
    (args.results / f"{stem}.md").write_text(markdown(state, rows))
    print(markdown(state, rows))


def build_table(lut: Path, runtime: str, streams: bool) -> dict:
    """`abs profile` as a user runs it (fresh process, Python start-up included)."""
    exe = Path(sys.executable).with_name("abs")
    cmd = [str(exe), "profile", "resnet20", "--runtime", runtime, "--num-classes", "10",
           "--input-shape", "3,32,32",
           "--batch", str(BATCH), "--threads", str(THREADS), "--candidates",
           ",".join(map(str, CANDIDATES)), "--edge-bits", str(EDGE), "--max-prune",
           str(MAX_PRUNE), *(("--streams",) if streams else ()), "-o", str(lut)]
    reused = lut.exists()
    load = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(done.stdout, flush=True)
    return {"command": "abs " + " ".join(cmd[1:-1]) + " " + str(lut.relative_to(ROOT)),
            "wall_s": wall, "summary": done.stdout.strip(), "file_existed": reused,
            "load_avg_start": load}


def check_decisions(todo: list[int], table, fitted: list[dict],
                    streams: bool) -> dict[str, dict]:
    sys.path.insert(0, str(ROOT / "runtime_tests"))
    import onnx
    from rt_checkpoints import dataset_for

    from abs_deploy.checkpoint import save_checkpoint
    from abs_deploy.export.latency import measure
    from abs_deploy.export.pipeline import ExportOptions, export_model
    from abs_deploy.export.profile import table_anchors

    data = dataset_for("digits32")
    models, choices = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in todo:
            ckpt, choice = random_decision(data, table, seed=100 + k, streams=streams)
            table.check_for(ckpt["arch"], ckpt["input"]["shape"])
            assert choice not in fitted, "a checked decision must not be a fitted one"
            path = Path(tmp) / f"d{k}.pt"
            save_checkpoint(ckpt, path)
            opts = ExportOptions(output=Path(tmp) / f"d{k}.onnx", latency=False,
                                 max_images=256)
            export_model(path, opts)
            models[str(k)] = onnx.load(Path(tmp) / f"d{k}.onnx")
            choices[str(k)] = choice
            print(f"decision {k} exported", flush=True)
    load = [round(v, 2) for v in os.getloadavg()]
    # The table's anchor pieces take turns with the decisions, as they did with every batch
    # of the table: scaled by the table's level over their total here, a decision's time is
    # on the table's level (profile.table_anchors), whatever state the machine is in now.
    anchors, level = table_anchors(table)
    both = {**models, **anchors}
    shapes = {k: [1, *(d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:])]
              for k, m in both.items()}
    runtimes = dict.fromkeys(both, table.runtime)
    # By the table's own clock (what the prediction is in), and by the wall clock as well.
    timed = {clock: {t.model: t for t in measure(both, shapes, (BATCH,), (THREADS,),
                                                 clock=clock, runtimes=runtimes)}
             for clock in dict.fromkeys((table.clock, "wall"))}
    scale = level / sum(timed[table.clock][a].median_ms for a in anchors)
    out = {}
    for k, choice in choices.items():
        predicted = table.predict_ms({n: tuple(v) for n, v in choice.items()})
        t = timed[table.clock][k]
        out[k] = {"decision": int(k), "measured_ms": t.median_ms * scale, "p90_ms": t.p90_ms,
                  "raw_ms": t.median_ms, "anchor_scale": scale,
                  "predicted_ms": predicted, "error": predicted / (t.median_ms * scale) - 1,
                  "raw_error": predicted / t.median_ms - 1,
                  "wall_ms": timed["wall"][k].median_ms,
                  "wall_error": predicted / timed["wall"][k].median_ms - 1,
                  "load_avg": load, "mean_bits": _mean_bits(choice),
                  "kept": _kept_share(choice, table), "choice": choice}
    return out


def random_decision(data, table, seed: int, streams: bool = False
                    ) -> tuple[dict, dict[str, list[int]]]:
    """A checkpoint with random bits and, per prunable group, a random count of the table's
    grid (the counts a search with the table keeps: `SuperBitNet.snap_to`), and its choice for
    `predict_ms` (layer -> [w, a, out_kept, in_kept])."""
    import torch
    from rt_checkpoints import random_checkpoint

    from abs_deploy import graph
    from abs_deploy.models.registry import build_model

    ckpt = random_checkpoint("resnet20", data, seed=seed, bits=CANDIDATES, edge_bits=EDGE,
                             prune=False, with_streams=streams, shared_codes=streams)
    rng = random.Random(seed)
    model = build_model(ckpt["arch"])
    groups = graph.channel_groups(model, torch.zeros(ckpt["input"]["shape"]))
    kept: dict[str, tuple[int, ...]] = {}
    in_kept: dict[str, int] = {}
    for g in groups:
        if g.prunable and g.producers:
            n = rng.choice(table.grid(g.producers[0])[0])
            idx = tuple(sorted(rng.sample(range(g.channels), n)))
            kept.update(dict.fromkeys(g.producers, idx))
            in_kept.update(dict.fromkeys(g.consumers, n))
        else:
            in_kept.update(dict.fromkeys(g.consumers, g.channels))
    from abs_deploy.decision import Decision

    decision = Decision({n: dataclasses.replace(d, kept=kept.get(n, d.kept))
                         for n, d in ckpt["decision"].items()})
    ckpt["decision"] = decision
    choice = {n: [d.w_bits, d.a_bits, len(d.kept), in_kept[n]] for n, d in decision.items()}
    return ckpt, choice


def _clock(clock: str) -> str:
    return ("CPU time of the process (one thread: the latency of an idle machine, whatever "
            "else runs)" if clock == "cpu" else "wall clock")


def _mean_bits(choice: dict) -> float:
    return sum(v[0] + v[1] for v in choice.values()) / (2 * len(choice))


def _kept_share(choice: dict, table) -> float:
    """Kept output channels over all channels, of the layers the table lets prune."""
    kept = total = 0
    for n, v in choice.items():
        out_grid, _ = table.grid(n)
        if len(out_grid) > 1:
            kept, total = kept + v[2], total + out_grid[-1]
    return kept / total if total else 1.0


def _resume(path: Path, fresh: bool) -> dict:
    if fresh or not path.exists():
        return {}
    old = json.loads(path.read_text())
    if old.get("complete"):
        # A finished run is redone (another commit, another load); its table is reused by
        # `abs profile` itself when it still matches.
        return {}
    return old


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


def _counts(multiple: int) -> str:
    return f"multiples of {multiple}" if multiple > 1 else "counts"


def markdown(state: dict, rows: list[dict]) -> str:
    t, p = state["table"], state["profile"]
    fit = t["overhead"]
    form = ", residual-stream quantizers with shared codes" if state.get("streams") else ""
    lines = [f"# Latency table against the exported files (ResNet-20, digits32, {t['runtime']}"
             f"{form})",
             "",
             f"Table: `{p['command']}`: {p['wall_s']:.0f} s wall in a fresh process"
             + (" (the file existed: reused and extended, not measured again)"
                if p["file_existed"] else "")
             + f", 1-minute load {p['load_avg_start'][0]:.2f} at its start. "
             + p["summary"].replace("\n", " "), "",
             f"Runtime {t['runtime']}, batch {BATCH}, {THREADS} thread, timed by the "
             f"{_clock(t['clock'])}; FP original "
             f"{t['fp_original_ms']:.2f} ms. Overhead: constant {t['overhead_constant_ms']:.2f} "
             f"ms plus per-channel terms, least squares on {fit['decisions']} other random "
             f"decisions: residual rms {fit['rms_ms']:.2f} ms, largest "
             f"{100 * fit['max_rel']:.1f}%.", "",
             f"Five random decisions (bits from {{{', '.join(map(str, CANDIDATES))}}} per "
             f"layer, first/last {EDGE}/{EDGE}, a count of the table's grid per prunable "
             f"group: {_counts(t.get('channel_multiple', 1))} from "
             f"{100 * (1 - MAX_PRUNE):.0f}% to 100%), "
             "exported with `abs-export`'s pipeline and timed whole, the five and the "
             "table's three anchor pieces taking turns run by run (median of 50 runs after 10 "
             "warm-up), by the table's clock and then by the wall clock. **Measured** is on "
             "the table's level: the time as taken, scaled by the table's median anchor total "
             "over the anchors' total here (the table puts each of its batches on that level "
             "the same way; this machine's speed moves between two states about 1.4x apart "
             "within minutes). The time as taken and its error are beside it:", "",
             "| decision | mean bits | kept (prunable) | measured ms | predicted ms | error "
             "| as taken ms (scale) | error vs as taken | wall-clock ms | error vs wall |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        raw = (f"{r['raw_ms']:.2f} (x{r['anchor_scale']:.3f}) | {100 * r['raw_error']:+.1f}%"
               if "raw_ms" in r else " | ")
        lines.append(f"| {r['decision']} | {r['mean_bits']:.1f} | {100 * r['kept']:.0f}% | "
                     f"{r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | "
                     f"{100 * r['error']:+.1f}% | {raw} | {r['wall_ms']:.2f} | "
                     f"{100 * r['wall_error']:+.1f}% |")
    worst = max(abs(r["error"]) for r in rows)
    lines += ["", f"Largest error {100 * worst:.1f}% (limit {100 * LIMIT:.0f}%): "
              + ("**pass**" if state["passed"] else "**fail**") + ".", "",
              load_note(state["provenance"], state["load_avg_end"], INFLATED), "",
              provenance_markdown(state["provenance"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
