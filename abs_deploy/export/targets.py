"""The checkpoint's targets (BOPs, latency, size in the user's units) against the exported
artifact: for each, what the search predicted and what the export measured, and how.

A search driven by targets records them in the checkpoint (`ckpt["targets"]`, one dict each:
kind, value, unit, text, predicted; a latency target also `lut`, where its prediction came
from; a size target `weights`, the storage its bytes counted). The export measures each on what
it wrote: BOPs exactly from the exported decision, size from the QCDQ file's weight
initializers, latency in the export's own latency table at the prediction's runtime and setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from abs_deploy.errors import UserError
from abs_deploy.export.latency import Timing

KINDS = ("bops", "latency", "size")
# The operators whose weight input holds a layer's weights (through DequantizeLinear when
# quantized); what lies between an initializer and them only reinterprets it.
_WEIGHT_CONSUMERS = {"Conv", "Gemm", "MatMul"}
_PASS_THROUGH = {"DequantizeLinear", "Transpose", "Identity", "Reshape"}
_STORED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4,
                onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
                onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
                onnx.TensorProto.FLOAT: 32, onnx.TensorProto.INT32: 32,
                onnx.TensorProto.DOUBLE: 64}
SIZE_COUNTED = ("stored bytes of the weight initializers feeding Conv/Gemm/MatMul (directly or "
                "through DequantizeLinear): 1 byte an int8 weight, half a byte packed INT4, 4 "
                "bytes float; no biases, scales or graph")
# Which latency row measures the QCDQ file in each runtime (pipeline.py names them).
QCDQ_MODEL = {"onnxruntime": "qcdq", "openvino": "qcdq_openvino"}
FP_MODEL = {"onnxruntime": "fp_original", "openvino": "fp_original_openvino"}


def read(ckpt: dict) -> list[dict]:
    """The checkpoint's target records ([] without any), checked enough that the report can
    rely on their kind and numbers: a checkpoint is anyone's file."""
    targets = ckpt.get("targets") or []
    ok = isinstance(targets, list) and all(
        isinstance(t, dict) and t.get("kind") in KINDS and _number(t.get("value"))
        and (t.get("predicted") is None or _number(t["predicted"]))
        for t in targets)
    if not ok:
        raise UserError("the checkpoint's 'targets' are malformed (a list of records with kind "
                        f"in {', '.join(KINDS)}, a positive value and its prediction expected)")
    return targets


def find(targets: Sequence[dict], kind: str) -> dict | None:
    return next((t for t in targets if t["kind"] == kind), None)


def latency_setting(target: dict | None) -> tuple[str, int, int] | None:
    """(runtime, batch, threads) the latency target was predicted for; None without a
    latency target or without the record of its table."""
    lut = (target or {}).get("lut")
    if not isinstance(lut, dict) or not all(
            isinstance(lut.get(k), int) and lut[k] > 0 for k in ("batch", "threads")):
        return None
    return str(lut.get("runtime", "onnxruntime")), lut["batch"], lut["threads"]


def size_storage(targets: Sequence[dict]) -> str | None:
    """The weight storage ("int8" or "int4") the size target's bytes were counted for."""
    size = find(targets, "size")
    return size.get("weights") if size else None


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes the weight initializers of `model` take as stored: those feeding a Conv, Gemm or
    MatMul (through DequantizeLinear, Transpose, ...), each counted once, INT4 packed two a
    byte as ONNX stores it."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    found: set[str] = set()
    for node in model.graph.node:
        if node.op_type in _WEIGHT_CONSUMERS:
            # Input 1 is the weight of Conv and Gemm; MatMul's may be either side.
            for name in node.input[:2] if node.op_type == "MatMul" else node.input[1:2]:
                source = _initializer_behind(name, producer)
                if source in inits:
                    found.add(source)
    return sum(_stored_bytes(inits[name]) for name in sorted(found))


def _initializer_behind(name: str, producer: dict[str, onnx.NodeProto]) -> str:
    while name in producer and producer[name].op_type in _PASS_THROUGH:
        name = producer[name].input[0]
    return name


def _stored_bytes(t: onnx.TensorProto) -> int:
    if t.data_type not in _STORED_BITS:
        raise ValueError(f"weight initializer {t.name} has an element type "
                         f"({onnx.TensorProto.DataType.Name(t.data_type)}) not counted here")
    return math.ceil(math.prod(t.dims) * _STORED_BITS[t.data_type] / 8)


# --- the report section ------------------------------------------------------------------------


def section(targets: Sequence[dict], *, bops: float, size: int, weights: str, file: str,
            timings: Sequence[Timing], latency_missing: str | None, warmup: int,
            versions: dict[str, str], cpu: str) -> list[dict]:
    """report.json's "targets": one row per target, in the checkpoint's order. `bops` is the
    exported decision's count, `size` the file's `weight_bytes`, `weights` its storage,
    `file` its name; `latency_missing` why no latency was measured (None: it was);
    `versions` each runtime's version; `cpu` this machine's CPU."""
    rows = []
    for t in targets:
        row = _base(t)
        if t["kind"] == "bops":
            _measured(row, float(bops), {"counted": "exact BOPs of the exported decision: "
                                         "kept filters and input channels, w_bits x a_bits "
                                         "per MAC"})
        elif t["kind"] == "size":
            _size(row, t, size, weights, file)
        else:
            _latency(row, t, timings, latency_missing, file, warmup, versions, cpu)
        rows.append(row)
    return rows


def _base(t: dict) -> dict:
    return {"kind": t["kind"], "value": float(t["value"]), "unit": t.get("unit"),
            "text": t.get("text"), "predicted": t.get("predicted"), "measured": None,
            "error_vs_target": None, "error_vs_predicted": None, "not_measured": None,
            "how": {}, "notes": []}


def _measured(row: dict, value: float, how: dict) -> None:
    row["measured"] = value
    row["error_vs_target"] = value / row["value"] - 1
    if row["predicted"]:
        row["error_vs_predicted"] = value / row["predicted"] - 1
    row["how"] = how


def _size(row: dict, t: dict, size: int, weights: str, file: str) -> None:
    _measured(row, float(size), {"counted": SIZE_COUNTED, "artifact": file,
                                 "weights": weights})
    counted_for = t.get("weights")
    if counted_for and counted_for != weights:
        row["notes"].append(f"the target counted {counted_for} weight storage; this file "
                            f"stores {weights} (--weights {weights}), so its size is not the "
                            "one searched for")


def _latency(row: dict, t: dict, timings: Sequence[Timing], missing: str | None, file: str,
             warmup: int, versions: dict[str, str], cpu: str) -> None:
    setting = latency_setting(t)
    if setting is None:
        row["not_measured"] = "the checkpoint does not record the setting of its latency table"
        return
    runtime, batch, threads = setting
    ours = _median(timings, QCDQ_MODEL.get(runtime), batch, threads)
    if missing or ours is None:
        row["not_measured"] = missing or f"no {runtime} timing at batch {batch}, {threads} " \
                                         "thread(s)"
        return
    _measured(row, ours.median_ms, {
        "artifact": file, "model": ours.model, "runtime": runtime,
        "runtime_version": versions.get(runtime), "batch": batch, "threads": threads,
        "runs": ours.runs, "warmup": warmup, "statistic": "median", "clock": "wall",
        "order": "the models take turns run by run"})
    fp = _median(timings, FP_MODEL[runtime], batch, threads)
    fp_then = t["lut"].get("fp_original_ms")
    if str(row["text"]).strip().lower().endswith("x") and fp and _number(fp_then):
        row["relative"] = {"target": row["value"] / fp_then,
                           "measured": ours.median_ms / fp.median_ms,
                           "fp_original_ms": fp.median_ms}
    row["notes"] += _table_differs(t["lut"], versions.get(runtime), cpu)


def _median(timings: Sequence[Timing], model: str | None, batch: int, threads: int
            ) -> Timing | None:
    return next((r for r in timings if (r.model, r.batch, r.threads) == (model, batch, threads)),
                None)


def _table_differs(lut: dict, version: str | None, cpu: str) -> list[str]:
    """Where the latency table the prediction came from was measured otherwise than now:
    another runtime version or CPU predicts another machine."""
    notes = []
    if lut.get("clock", "wall") != "wall":
        # On one thread `abs profile` times by CPU time, which other work on the machine does
        # not inflate; this table's wall clock does, so a loaded machine shows as a miss.
        notes.append(f"the prediction comes from a table timed by {lut['clock']} time, this "
                     "measurement is wall-clock time")
    if lut.get("runtime_version") and version and lut["runtime_version"] != version:
        notes.append(f"the latency table was measured with {lut.get('runtime')} "
                     f"{lut['runtime_version']}, this export uses {version}")
    their_cpu = (lut.get("machine") or {}).get("cpu")
    if their_cpu and their_cpu not in cpu:
        notes.append(f"the latency table was measured on {their_cpu}, this export on {cpu}")
    return notes


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
