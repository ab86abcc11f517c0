"""The export, end to end: checkpoint -> collapse -> prune -> ONNX -> simplify -> validate ->
latency -> report. Every file is written to a temporary folder beside the output and moved into
place only after all checks passed, so a failed export leaves nothing behind."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from abs_deploy import bops, graph
from abs_deploy.checkpoint import load_checkpoint
from abs_deploy.data import Dataset, dataset_for
from abs_deploy.errors import UserError
from abs_deploy.export import openvino_runtime, ort_format, report, targets
from abs_deploy.export.collapse import Collapsed, clipped, collapse
from abs_deploy.export.errors import ExportFailed
from abs_deploy.export.kernels import Kernels, onnxruntime_kernels, openvino_kernels
from abs_deploy.export.latency import MIN_RUNS, WARMUP, Timing, all_threads, measure
from abs_deploy.export.onnx_graph import build_onnx, capture
from abs_deploy.export.prune import prune
from abs_deploy.export.qdq import ActQuant
from abs_deploy.export.simplify import simplify
from abs_deploy.export.validate import (
    Batches,
    FileCheck,
    ModeParity,
    PruneParity,
    accuracy,
    check_file,
    check_pruning,
    check_qcdq,
)
from abs_deploy.files import check_output, discard, reason, same_file, temp_dir
from abs_deploy.machine import cpu_name, runtime_version
from abs_deploy.progress import Progress, no_progress
from abs_deploy.quant import int_range

FORMAT = "abs-deploy-qcdq/1"
WEIGHTS = ("int8", "int4")


@dataclass
class ExportOptions:
    output: str | os.PathLike | None = None  # default: the checkpoint's name with .onnx
    opset: int = 21
    # "int4": packed INT4 initializers for weights of <= 4 bits. None: the storage the
    # checkpoint's size target was counted for, else int8.
    weights: str | None = None
    simplify: bool = True
    latency: bool = True
    dataset: str | None = None  # default: the one the checkpoint names
    data_dir: str | None = None
    batch_size: int = 256
    threads: int | None = None  # the "all threads" latency setting (default: every core)
    latency_runs: int = MIN_RUNS
    latency_batches: tuple[int, ...] = (1, 32)
    reduce_range: bool = True  # 7-bit weights where 8-bit weights meet unsigned 8-bit inputs
    max_images: int | None = None  # validate on the first N test images only
    check_runtimes: tuple[str, ...] = ()  # more runtimes to validate and time ("openvino")
    ort_format: bool = False  # also write model.ort (ONNX Runtime Mobile) and validate it


@dataclass
class ExportResult:
    files: dict[str, Path]  # onnx, fp32, json, md, png
    report: dict
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)


def export_model(checkpoint: str | os.PathLike, options: ExportOptions | None = None,
                 progress: Progress = no_progress,
                 on_step: Callable[[str], None] | None = None) -> ExportResult:
    """Export a `searched`/`finetuned` checkpoint (DESIGN §9). Raises `UserError` for bad input
    and `ExportFailed` when a check misses; in both cases no file is left behind."""
    opts = options or ExportOptions()
    with one_torch_thread():
        return _export(Path(checkpoint), opts, progress, on_step)


@contextlib.contextmanager
def one_torch_thread():
    """PyTorch's OpenMP pool and ONNX Runtime's pool take turns on the same cores during
    validation; with two OpenMP threads every parallel region waits for a descheduled peer
    whenever anything else runs (measured: the export takes twice as long on a busy 2-core
    machine). One torch thread costs little on this small work; the setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _export(ckpt_path: Path, opts: ExportOptions, progress: Progress,
            on_step: Callable[[str], None] | None) -> ExportResult:
    t0 = time.perf_counter()
    steps: dict[str, float] = {}
    step = _Steps(steps, on_step)
    out = _output_path(ckpt_path, opts)
    _check_options(opts)
    tmp = temp_dir(out)
    try:
        with step("load"):
            ckpt = load_checkpoint(ckpt_path, stages=("searched", "finetuned"))
            goals = targets.read(ckpt)
            opts = _with_weights(opts, goals)
        with step("collapse"):
            col = collapse(ckpt, opts.reduce_range)
        with step("data"):
            data = _dataset(ckpt, opts.dataset, opts.data_dir, col.input_shape)
            batches = _batches(data, opts.batch_size, opts.max_images)
        with step("prune"):
            pruned = _prune(col)
        with step("onnx"):
            files = _Files.build(col, pruned, _metadata(ckpt, ckpt_path, col, data.name, opts),
                                 opts)
        if opts.simplify:
            with step("simplify"):
                files.qcdq, files.fp32 = simplify(files.qcdq), simplify(files.fp32)
        with step("validate"):
            checks = _validate(col, pruned, files, batches, progress, opts.check_runtimes)
        with step("kernels"):
            used = _kernels(files.qcdq, opts.check_runtimes)
        ort_file = None
        if opts.ort_format:
            with step("ort format"):
                ort_file = _ort_format(files, pruned, checks, batches, progress,
                                       tmp / f"{out.stem}.ort")
        timed = _TargetLatency.of(goals, opts)
        timings: list[Timing] = []
        if opts.latency:
            with step("latency"):
                timings = _latency(files, col.input_shape, opts, progress, timed)
        with step("report"):
            paths = _save_models(files, tmp, out, ort_file)
            rep = _report(ckpt, ckpt_path, col, pruned, files, checks, timings=timings,
                          kernels=used, dataset=data.name, opts=opts, paths=paths,
                          steps=steps, started=t0, goals=goals, timed=timed)
            paths.update(report.write(rep, tmp))
        final = _move_into_place(paths, out.parent)
    finally:
        discard(tmp)
    return ExportResult(final, rep, time.perf_counter() - t0, steps)


def _with_weights(opts: ExportOptions, goals: list[dict]) -> ExportOptions:
    """`weights` left open: the storage the checkpoint's size target counted (else int8), so
    the file's weights take the bytes the search aimed at. One given explicitly stays; the
    size target's row then says that its storage differs."""
    if opts.weights is not None:
        return opts
    weights = targets.size_storage(goals) or "int8"
    if weights not in WEIGHTS:
        raise UserError(f"the checkpoint's size target counts {weights!r} weights; this "
                        f"version stores {', '.join(WEIGHTS)}")
    if weights == "int4" and opts.opset < 21:
        raise UserError(f"the checkpoint's size target counts packed int4 weights, which need "
                        f"opset 21 or later (got --opset {opts.opset}); give --opset 21, or "
                        "--weights int8 to store them a byte each")
    return dataclasses.replace(opts, weights=weights)


@dataclass
class _TargetLatency:
    """The setting a latency target was predicted for, if this export times it, and why not
    otherwise: a target is never left blank without a reason."""
    setting: tuple[str, int, int] | None = None  # (runtime, batch, threads)
    missing: str | None = None

    @classmethod
    def of(cls, goals: list[dict], opts: ExportOptions) -> _TargetLatency:
        target = targets.find(goals, "latency")
        setting = targets.latency_setting(target)
        if target is None or setting is None:
            return cls()  # nothing to time, or targets.section says what the record lacks
        if not opts.latency:
            return cls(missing="not measured: the export ran with --skip-latency")
        if setting[0] not in openvino_runtime.RUNTIMES:
            return cls(missing=f"not measured: the table's runtime {setting[0]!r} is unknown "
                               f"here (known: {', '.join(openvino_runtime.RUNTIMES)})")
        if setting[0] == "openvino" and not openvino_runtime.available():
            return cls(missing="not measured: the table is OpenVINO's and OpenVINO is not "
                               "installed (pip install 'abs-deploy[openvino]')")
        return cls(setting)

    @property
    def openvino(self) -> bool:
        return self.setting is not None and self.setting[0] == "openvino"


def _check_options(opts: ExportOptions) -> None:
    if opts.weights is not None and opts.weights not in WEIGHTS:
        raise UserError(f"--weights must be one of {', '.join(WEIGHTS)}, got {opts.weights!r}")
    for rt in opts.check_runtimes:
        if rt != "openvino":
            raise UserError(f"unknown runtime {rt!r} to check; known: openvino")
        openvino_runtime.require()


@dataclass
class EmittedFiles:
    """The models `export_model` would write for a collapsed checkpoint, unchecked."""

    qcdq: onnx.ModelProto  # simplified unless the options turn that off
    fp32: onnx.ModelProto  # the pruned float model
    original: onnx.ModelProto | None  # the FP original, built when the options time it
    quant: dict[str, ActQuant]  # layer -> what its activation quantizer became


def emitted_files(col: Collapsed, opts: ExportOptions | None = None) -> EmittedFiles:
    """Every model `export_model` writes for `col`, without any check: for timing or profiling
    the files as they would be emitted (`abs profile`, the benchmarks), where the checks have
    nothing to check."""
    opts = opts or ExportOptions()
    files = _Files.build(col, _prune(col), {}, opts)
    qcdq = simplify(files.qcdq) if opts.simplify else files.qcdq
    return EmittedFiles(qcdq, files.fp32, files.original, files.quant)


def qcdq_files(col: Collapsed, opts: ExportOptions | None = None
               ) -> tuple[onnx.ModelProto, dict[str, ActQuant], onnx.ModelProto | None]:
    """`emitted_files`' QCDQ model, its activation quantizers and the FP original."""
    files = emitted_files(col, opts)
    return files.qcdq, files.quant, files.original


@dataclass
class _Pruned:
    float_model: torch.nn.Module  # the masked float model without its pruned channels
    reference: torch.nn.Module  # the integer reference, likewise
    in_kept: dict[str, int]  # input channels each consumer keeps


def _prune(col: Collapsed) -> _Pruned:
    kept = {n: list(lq.kept) for n, lq in col.layers.items()}
    if all(len(lq.kept) == lq.total for lq in col.layers.values()):
        return _Pruned(col.masked_float, col.reference, {})
    return _Pruned(prune(col.masked_float, col.groups, kept),
                   prune(col.reference, col.groups, kept), graph.input_kept(col.groups, kept))


@dataclass
class _Files:
    qcdq: onnx.ModelProto
    fp32: onnx.ModelProto  # the pruned float model
    original: onnx.ModelProto | None  # the FP original, built only to time it
    quant: dict[str, ActQuant]  # layer -> what its activation quantizer became

    @classmethod
    def build(cls, col: Collapsed, pruned: _Pruned, meta: dict[str, str],
              opts: ExportOptions) -> _Files:
        # One capture of the pruned float model serves both files made from it.
        ep = capture(pruned.float_model, col.input_shape)
        fp32 = build_onnx(ep, col.input_shape, opset=opts.opset, float_clips=col.clips,
                          metadata={**meta, "abs_deploy.kind": "fp32-pruned"}).model
        integer = {n: pruned.reference.get_submodule(n) for n in [*col.layers, *col.streams]}
        qcdq = build_onnx(ep, col.input_shape, opset=opts.opset, integer=integer,
                          weights=opts.weights, metadata=meta)
        original = build_onnx(capture(col.original, col.input_shape), col.input_shape,
                              opset=opts.opset).model if opts.latency else None
        return cls(qcdq.model, fp32, original, qcdq.quant)


@dataclass
class _Checks:
    pruning: PruneParity
    reference_accuracy: float
    off: ModeParity
    full: ModeParity
    float_accuracy: float  # the checkpoint's weights run in float (the `original` model)
    pruned_float_accuracy: float  # the pruned float model (model.fp32.onnx's PyTorch twin)
    others: dict[str, ModeParity] = field(default_factory=dict)  # runtime -> its parity
    ort_format: ort_format.OrtFormatParity | None = None


def _validate(col: Collapsed, pruned: _Pruned, files: _Files, batches: Batches,
              progress: Progress, runtimes: tuple[str, ...] = ()) -> _Checks:
    # model.fp32.onnx clips where the QCDQ model quantizes; its PyTorch twins do the same.
    masked, pruned_float = clipped(col.masked_float, col.clips), \
        clipped(pruned.float_model, col.clips)
    pruning = check_pruning(masked, pruned_float, files.fp32, col.layers, batches, progress)
    qcdq = check_qcdq(files.qcdq, files.quant, pruned.reference, batches, progress, runtimes)
    failures = [f for f in (pruning.failure, *qcdq.failures) if f]
    if failures:
        raise ExportFailed(" | ".join(failures))
    return _Checks(pruning, qcdq.reference_accuracy, qcdq.off, qcdq.full,
                   accuracy(col.original, batches), accuracy(pruned_float, batches),
                   qcdq.others)


def _ort_format(files: _Files, pruned: _Pruned, checks: _Checks, batches: Batches,
               progress: Progress, path: Path) -> Path:
    """model.ort at `path`, checked against the QCDQ file; its parity joins `checks`."""
    ort_file = ort_format.convert(files.qcdq, path)
    checks.ort_format = ort_format.check(ort_file, files.qcdq, pruned.reference, batches,
                                         progress)
    if checks.ort_format.failure:
        raise ExportFailed(checks.ort_format.failure)
    return ort_file


def _latency(files: _Files, input_shape: list[int], opts: ExportOptions,
             progress: Progress, timed: _TargetLatency) -> list[Timing]:
    """Every model at every batch and thread count asked for, and at the setting a latency
    target was predicted for, so that the target is measured in the same run as the rest."""
    batches, threads = set(opts.latency_batches), {1, opts.threads or all_threads()}
    if timed.setting:
        batches.add(timed.setting[1])
        threads.add(timed.setting[2])
    models = {"fp_original": files.original, "fp_pruned": files.fp32, "qcdq": files.qcdq}
    runtimes = {}
    if "openvino" in opts.check_runtimes or timed.openvino:
        # All three again: a runtime is judged against its own float baseline.
        for name in list(models):
            models[f"{name}_openvino"] = models[name]
            runtimes[f"{name}_openvino"] = "openvino"
    return measure(models, input_shape, tuple(sorted(batches)), tuple(sorted(threads)),
                   opts.latency_runs, progress=progress, runtimes=runtimes)


def _save_models(files: _Files, folder: Path, out: Path, ort_file: Path | None
                 ) -> dict[str, Path]:
    """Writes the QCDQ and the pruned float ONNX files into `folder`; returns every model file
    by key, the .ort file (already written) included."""
    paths = {"onnx": folder / out.name, "fp32": folder / f"{out.stem}.fp32.onnx"}
    if ort_file:
        paths["ort"] = ort_file
    _save_onnx(files.qcdq, paths["onnx"])
    _save_onnx(files.fp32, paths["fp32"])
    return paths


def _kernels(model: onnx.ModelProto, runtimes: tuple[str, ...]) -> list[Kernels]:
    """What ORT (and each runtime checked) runs the QCDQ file's layers on."""
    return [onnxruntime_kernels(model)] + [openvino_kernels(model) for rt in runtimes
                                           if rt == "openvino"]


def _report(ckpt: dict, ckpt_path: Path, col: Collapsed, pruned: _Pruned, files: _Files,
            checks: _Checks, *, timings: list[Timing], kernels: list[Kernels], dataset: str,
            opts: ExportOptions, paths: dict[str, Path], steps: dict[str, float],
            started: float, goals: list[dict], timed: _TargetLatency) -> dict:
    """All of report.json. `paths` are the model files written beside it, `steps` the time
    each step took before the report, `started` the export's start on `time.perf_counter`;
    `goals` the checkpoint's targets, `timed` how their latency was timed."""
    costs = bops.layer_costs(col.original, tuple(col.input_shape))
    rows = report.layer_rows(col.layers, costs, pruned.in_kept, pruned.float_model,
                             col.original, files.quant)
    cpu = _cpu(opts, timed.openvino)
    return {
        "format": report.FORMAT,
        "checkpoint": str(ckpt_path), "stage": ckpt["stage"],
        "method": ckpt.get("method", "unknown"), "arch": _arch_name(ckpt["arch"]),
        "dataset": dataset, "input_shape": col.input_shape,
        "options": {"opset": opts.opset, "weights": opts.weights, "simplified": opts.simplify,
                    "reduce_range": opts.reduce_range},
        "layers": rows,
        "totals": report.totals(rows, _params(col.original), _params(pruned.float_model),
                                files.original.ByteSize() if files.original else None,
                                paths["onnx"].stat().st_size),
        "accuracy": dataclasses.asdict(report.Accuracy(
            *_fp_accuracy(ckpt, checks.float_accuracy), checks.float_accuracy,
            checks.pruned_float_accuracy, checks.reference_accuracy, checks.full.accuracy,
            checks.off.accuracy, checks.full.images)),
        "checkpoint_metrics": ckpt.get("metrics", {}),
        "parity": {**report.parity_section(checks.pruning, checks.off, checks.full),
                   **_more_parity(checks)},
        "latency": report.latency_section(timings, cpu, WARMUP),
        **_targets(goals, timed, rows, files.qcdq, str(opts.weights), paths["onnx"].name,
                   timings, cpu),
        "kernels": {k.runtime: k.as_dict() for k in kernels},
        "notes": col.notes + _notes(rows, bool(col.streams)),
        "history": report.history_section(ckpt.get("history")),
        "files": {**{k: p.name for k, p in paths.items()}, **report.FILES},
        # Last: the total runs until the report is complete, just before it is written.
        "seconds": {**steps, "total": time.perf_counter() - started},
    }


def _targets(goals: list[dict], timed: _TargetLatency, rows: list[dict],
             qcdq: onnx.ModelProto, weights: str, file: str, timings: list[Timing],
             cpu: str) -> dict:
    """The "targets" entry of report.json; none at all for a checkpoint without targets, whose
    report stays as it was before targets existed."""
    if not goals:
        return {}
    return {"targets": targets.section(
        goals, bops=sum(r["bops"] for r in rows), size=targets.weight_bytes(qcdq),
        weights=weights, file=file, timings=timings, latency_missing=timed.missing,
        warmup=WARMUP, versions=_versions(timings), cpu=cpu)}


def _more_parity(checks: _Checks) -> dict:
    """Parity entries beyond ORT's two modes: other runtimes and the .ort file."""
    more: dict = {rt: p.as_dict() for rt, p in checks.others.items()}
    if checks.ort_format:
        more["ort_format"] = checks.ort_format.as_dict()
    return more


def validate_file(path: str | os.PathLike, dataset: str | None = None,
                  data_dir: str | None = None, batch_size: int = 256,
                  max_images: int | None = None, progress: Progress = no_progress,
                  runtime: str = "onnxruntime") -> FileCheck:
    """`abs validate`: an exported file's accuracy in ORT with all optimizations (or in
    OpenVINO) and in ORT without them, and how well the two agree. Normalisation (and the
    default dataset) come from its metadata."""
    if runtime == "openvino":
        openvino_runtime.require()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        spec = json.loads(meta.get("abs_deploy.input", "{}"))
    except Exception as e:  # protobuf DecodeError, a JSON error in foreign metadata
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    spec = spec if isinstance(spec, dict) else {}
    dataset = dataset or spec.get("dataset")
    if not dataset:
        raise UserError(f"{path} names no dataset in its metadata; give --dataset")
    data = _with_normalisation(dataset_for(spec, data_dir, dataset), spec)
    classes = _output_classes(model)
    # Argmax over more or fewer scores than the data has classes gives a number, not a
    # measurement; the shapes say so before any image runs.
    if classes is not None and classes != data.num_classes:
        raise UserError(f"{path} outputs {classes} class scores, dataset {data.name} has "
                        f"{data.num_classes} classes")
    return check_file(str(path), _batches(data, batch_size, max_images), progress, runtime)


# --- helpers -------------------------------------------------------------------------------


def _output_classes(model: onnx.ModelProto) -> int | None:
    """The length of the first output's last axis, when the file states it."""
    if not model.graph.output:
        return None
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].dim_value > 0 else None


class _Steps:
    """Times each step into `steps` and announces it."""

    def __init__(self, steps: dict[str, float], on_step: Callable[[str], None] | None) -> None:
        self.steps, self.on_step, self.name = steps, on_step, ""

    def __call__(self, name: str) -> _Steps:
        self.name = name
        return self

    def __enter__(self) -> None:
        if self.on_step:
            self.on_step(self.name)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.steps[self.name] = time.perf_counter() - self.t0


def _output_path(ckpt: Path, opts: ExportOptions) -> Path:
    out = Path(opts.output) if opts.output else ckpt.with_suffix(".onnx")
    if out.suffix != ".onnx":
        raise UserError(f"output {out} must end in .onnx")
    if out.is_dir():
        raise UserError(f"output {out} is a folder; give a file name ending in .onnx")
    # Every file the export writes beside the model, so none of them can be the checkpoint.
    written = [out.with_name(f"{out.stem}{ext}") for ext in (".fp32.onnx", ".ort")] + \
        [out.with_name(name) for name in report.FILES.values()]
    for path in written:
        if same_file(path, ckpt):
            raise UserError(f"the export writes {path}, which is the checkpoint {ckpt}; give "
                            "another output folder")
    return check_output(out, [ckpt])


def _save_onnx(model: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.save(model, path)
    except OSError as e:
        raise UserError(f"cannot write {path.name} in {path.parent.parent}: "
                        f"{reason(e)}") from None


def _move_into_place(files: dict[str, Path], folder: Path) -> dict[str, Path]:
    final: dict[str, Path] = {}
    try:
        for key, src in files.items():
            dst = folder / src.name
            os.replace(src, dst)
            final[key] = dst
    except OSError as e:
        for p in final.values():
            p.unlink(missing_ok=True)
        raise UserError(f"cannot write {folder / src.name}: {e.strerror}") from None
    return final


def _with_normalisation(data: Dataset, spec: dict) -> Dataset:
    """The model expects the normalisation it was trained with, which the checkpoint (or the
    ONNX metadata) carries; a dataset given by name may compute its own."""
    mean, std = spec.get("mean"), spec.get("std")
    channels = data.input_shape[1]
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels:
        return dataclasses.replace(data, mean=list(mean), std=list(std))
    return data


def _dataset(ckpt: dict, name: str | None, data_dir: str | None, shape: list[int]) -> Dataset:
    spec = ckpt["input"] if isinstance(ckpt["input"], dict) else {}
    name = name or spec.get("dataset")
    if not name:
        raise UserError("the checkpoint names no dataset; give --dataset (and --data-dir)")
    data = dataset_for({**spec, "shape": shape}, data_dir, name)
    if data.input_shape[1:] != shape[1:]:
        raise UserError(f"dataset {name} has images of shape {data.input_shape[1:]}, "
                        f"the model takes {shape[1:]}")
    if data.num_classes > int(ckpt["num_classes"]):
        raise UserError(f"dataset {name} has {data.num_classes} classes, the model "
                        f"{ckpt['num_classes']}")
    return _with_normalisation(data, spec)


def _batches(data: Dataset, batch_size: int, max_images: int | None) -> Batches:
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    out, seen = [], 0
    # Accuracy is reported, so it is measured on the test split (DESIGN §12); parity is
    # checked on the same images.
    for x, y in data.batches("test", batch_size):
        if max_images is not None and seen + len(y) > max_images:
            x, y = x[:max_images - seen], y[:max_images - seen]
        if len(y):
            out.append((x, y))
        seen += len(y)
        if max_images is not None and seen >= max_images:
            break
    if not out:
        raise UserError(f"dataset {data.name} has no test images")
    return out


def _metadata(ckpt: dict, path: Path, col: Collapsed, dataset: str, opts: ExportOptions
              ) -> dict[str, str]:
    decision = {n: {"w_bits": lq.w_bits, "a_bits": lq.a_bits, "a_signed": lq.a_signed,
                    "w_store_bits": lq.w_store_bits, "kept": list(lq.kept), "total": lq.total}
                for n, lq in col.layers.items()}
    spec = ckpt["input"] if isinstance(ckpt["input"], dict) else {}
    return {
        "abs_deploy.format": FORMAT,
        "abs_deploy.kind": "qcdq",
        "abs_deploy.decision": json.dumps(decision, separators=(",", ":")),
        "abs_deploy.input": json.dumps({"shape": col.input_shape, "mean": spec.get("mean"),
                                        "std": spec.get("std"), "dataset": dataset}),
        "abs_deploy.source": json.dumps({"checkpoint": path.name, "stage": ckpt["stage"],
                                         "method": ckpt.get("method"),
                                         "arch": ckpt["arch"]}),
        "abs_deploy.weights": opts.weights,
    }


def _fp_accuracy(ckpt: dict, float_accuracy: float) -> tuple[float, str]:
    """The FP original's accuracy: a fine-tuned checkpoint's weights are no longer the FP
    model's, so the figure the search side recorded (`metrics.fp_top1`) comes first."""
    recorded = (ckpt.get("metrics") or {}).get("fp_top1")
    if isinstance(recorded, (int, float)):
        return float(recorded), "checkpoint"
    return float_accuracy, "float weights"


def _cpu(opts: ExportOptions, openvino_timed: bool = False) -> str:
    if "openvino" in opts.check_runtimes or openvino_timed:
        return f"{cpu_name()}; {openvino_runtime.device_name()}"
    return cpu_name()


def _versions(timings: list[Timing]) -> dict[str, str]:
    """The version of each runtime the latency rows were timed in."""
    out = {"onnxruntime": runtime_version("onnxruntime")}
    if any(t.model.endswith("_openvino") for t in timings):
        out["openvino"] = runtime_version("openvino")
    return out


def _arch_name(arch: dict) -> str:
    return str(arch.get("name") or arch.get("import"))


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _notes(rows: list[dict], streams: bool) -> list[str]:
    notes = ["the int32 bias (scale s_x*s_w) is rounded once from the folded float bias; the "
             "reference computes with the same integers"]
    narrowed = [f"{r['name']} {r['act_folded']} -> codes {r['act_clip']}" for r in rows
                if r["act_folded"] and tuple(r["act_clip"]) != int_range(r["a_bits"],
                                                                         r["a_signed"])]
    if narrowed:
        notes.append("float clamps folded into a narrower integer Clip: " + ", ".join(narrowed))
    if streams:
        # Nothing in the file can say it; whoever deploys it on OpenVINO must know.
        notes.append("OpenVINO CPU: compile this file with the codes of its residual adds' "
                     "conv-made operands as extra outputs (model.add_outputs("
                     "abs_deploy.export.openvino_runtime."
                     "residual_add_operands(onnx_model)) before compile_model), as the OpenVINO "
                     "check here does; otherwise the plugin merges conv + add and skips the "
                     "rounding of the quantizer between them (top-1 agreement 70% measured on "
                     "ResNet-20)")
    return notes
