"""Validation in ONNX Runtime (CPU) against the PyTorch reference (DESIGN §9).

Three checks, each over the same test batches:

- Pruning: the pruned float model equals the masked unpruned one (logits and every layer's
  output at its kept channels, to 1e-5 relative), in PyTorch and as `model.fp32.onnx` in ORT.
- QCDQ, optimizations off: ORT computes DequantizeLinear in float, the reference's own math;
  the logits of the last segment (everything after the last activation quantizer), fed the
  reference's codes, must match to 1e-4 relative (the end-to-end difference is recorded, not
  limited).
- QCDQ, all optimizations: ORT fuses the QDQ groups into int8 kernels (QLinearConv, QGemm)
  whose requantization rounds once where the reference rounds twice, so a code may move by
  one: top-1 must agree on >= 99.5% of the images, and the integer codes every quantized layer
  reads must be equal on >= 99.9% of the elements and never more than 1 apart.

Float sums taken in another order move a value across a rounding boundary now and then: one
code. A coarse quantizer feeding a fine one magnifies that step (one 2-bit step is many 8-bit
steps) and an untrained network can carry it to the logits, so the codes and the logits of
the float mode are compared layer by layer: in a copy of the model cut at every quantizer,
each layer reads the reference's codes (through a copy of its own quantizer, so the runtime
fuses it as in the file) and each quantizer's output is a graph output. Accuracy and top-1
agreement come from the file as it is, run end to end (its end-to-end logit error is recorded
as `end_to_end_logits_rel` and shown in every report view, with no limit). A miss names the
first layer, in execution order, whose codes diverge. Codes are compared as the reference's:
the file stores signed ones offset by their zero point (qdq.zero_point).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from abs_deploy.errors import UserError
from abs_deploy.export import qdq
from abs_deploy.export.collapse import LayerQuant
from abs_deploy.export.errors import ExportFailed
from abs_deploy.export.parity import Agreement
from abs_deploy.progress import Progress, no_progress

Batches = list[tuple[Tensor, Tensor]]

OFF_LOGITS_RTOL = 1e-4
FULL_TOP1_AGREEMENT = 0.995
FULL_CODES_EQUAL = 0.999
FULL_CODES_MAX_DIFF = 1
PRUNE_RTOL = 1e-5



@dataclass
class LayerCodes:
    layer: str
    count: int = 0
    equal: int = 0
    max_diff: int = 0

    @property
    def equal_fraction(self) -> float:
        return self.equal / self.count if self.count else 1.0


@dataclass
class ModeParity:
    """ORT in one optimization mode against the reference."""

    mode: str  # "off" | "all"
    images: int = 0
    accuracy: float = 0.0
    top1_agreement: float = 0.0  # of the file as it is, end to end
    logits_rel: float = 0.0  # max |ort - ref| / max |ref|, last segment fed reference codes
    end_to_end_logits_rel: float = 0.0  # the same, the file run end to end
    codes_equal: float | None = None  # over every quantized input of every layer
    codes_max_diff: int | None = None
    layers: list[LayerCodes] = field(default_factory=list)
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None

    def as_dict(self) -> dict:
        return {"mode": self.mode, "images": self.images, "accuracy": self.accuracy,
                "top1_agreement": self.top1_agreement, "logits_rel": self.logits_rel,
                "end_to_end_logits_rel": self.end_to_end_logits_rel,
                "codes_equal": self.codes_equal, "codes_max_diff": self.codes_max_diff,
                "passed": self.passed, "failure": self.failure,
                "layers": [{"layer": c.layer, "elements": c.count,
                            "equal": c.equal_fraction, "max_diff": c.max_diff}
                           for c in self.layers]}


@dataclass
class PruneParity:
    """The pruned float model against the masked unpruned one."""

    logits_rel: float = 0.0  # PyTorch pruned vs masked
    onnx_logits_rel: float = 0.0  # model.fp32.onnx in ORT vs masked
    worst_layer: str | None = None
    worst_layer_rel: float = 0.0
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None

    def as_dict(self) -> dict:
        return {"logits_rel": self.logits_rel, "onnx_logits_rel": self.onnx_logits_rel,
                "worst_layer": self.worst_layer, "worst_layer_rel": self.worst_layer_rel,
                "passed": self.passed, "failure": self.failure}


def session(model: onnx.ModelProto | bytes | str, optimize: bool = True,
            threads: int | None = None, spin: bool = False) -> ort.InferenceSession:
    """A CPU session; `optimize=False` runs the graph as written (float DQ math)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    if not spin:
        # Idle pool threads that spin steal the cores PyTorch needs between ORT runs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types from C++
        mode = "optimized" if optimize else "unoptimized"
        raise ExportFailed(f"ONNX Runtime cannot load the {mode} model: "
                           f"{str(e).strip().splitlines()[0][:240]}") from e


@torch.no_grad()
def accuracy(model: nn.Module, batches: Batches) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
    return correct / max(1, sum(len(y) for _, y in batches))


# --- pruning ---------------------------------------------------------------------------------


@torch.no_grad()
def check_pruning(masked: nn.Module, pruned: nn.Module, fp32_onnx: onnx.ModelProto,
                  layers: dict[str, LayerQuant], batches: Batches,
                  progress: Progress = no_progress) -> PruneParity:
    result = PruneParity()
    sess = session(fp32_onnx)
    num = {n: 0.0 for n in layers}
    den = {n: 0.0 for n in layers}
    logit = [0.0, 0.0, 0.0]  # max |pruned - masked|, max |onnx - masked|, max |masked|
    for x, _ in progress(batches, len(batches), "check pruning"):
        out_m, acts_m = _run_with_outputs(masked, layers, x)
        out_p, acts_p = _run_with_outputs(pruned, layers, x)
        out_o = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        for name, lq in layers.items():
            kept = torch.tensor(lq.kept)
            ref = acts_m[name].index_select(1, kept)
            num[name] = max(num[name], (acts_p[name] - ref).abs().max().item())
            den[name] = max(den[name], ref.abs().max().item())
        logit[0] = max(logit[0], (out_p - out_m).abs().max().item())
        logit[1] = max(logit[1], (out_o - out_m).abs().max().item())
        logit[2] = max(logit[2], out_m.abs().max().item())
    rel = {n: num[n] / max(den[n], 1e-30) for n in layers}
    result.logits_rel = logit[0] / max(logit[2], 1e-30)
    result.onnx_logits_rel = logit[1] / max(logit[2], 1e-30)
    result.worst_layer = max(rel, key=rel.get)
    result.worst_layer_rel = rel[result.worst_layer]
    first = next((n for n in layers if rel[n] > PRUNE_RTOL), None)
    if first is not None:
        result.failure = (f"pruned float model differs from the masked one at {first} "
                          f"({rel[first]:.2e} relative, limit {PRUNE_RTOL:g})")
    elif result.logits_rel > PRUNE_RTOL:
        result.failure = (f"pruned float model's logits differ from the masked one by "
                          f"{result.logits_rel:.2e} relative (limit {PRUNE_RTOL:g})")
    elif result.onnx_logits_rel > PRUNE_RTOL:
        result.failure = (f"model.fp32.onnx in ORT differs from the masked PyTorch model by "
                          f"{result.onnx_logits_rel:.2e} relative (limit {PRUNE_RTOL:g})")
    return result


def _run_with_outputs(model: nn.Module, layers: Iterable[str], x: Tensor
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    return _run_observing(model, layers, x, lambda module, inputs, output: output)


def _run_observing(model: nn.Module, names: Iterable[str], x: Tensor,
                   pick: Callable[[nn.Module, tuple, Tensor], object]
                   ) -> tuple[Tensor, dict[str, object]]:
    """`model(x)` and, for each named submodule, `pick(module, inputs, output)` of its call."""
    seen: dict[str, object] = {}

    def hook_for(name):
        def hook(module, inputs, output):
            seen[name] = pick(module, inputs, output)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


# --- QCDQ against the reference --------------------------------------------------------------


@dataclass
class QcdqParity:
    """The QCDQ file against its integer reference, in every runtime checked."""

    reference_accuracy: float  # the reference against the labels alone
    off: ModeParity  # ORT without optimizations
    full: ModeParity  # ORT with all optimizations
    others: dict[str, ModeParity]  # runtime -> its parity, by the criteria of `full`

    @property
    def failures(self) -> list[str]:
        return [m.failure for m in (self.off, self.full, *self.others.values()) if m.failure]


@torch.no_grad()
def check_qcdq(model: onnx.ModelProto, quantizers: Mapping[str, qdq.ActQuant],
               reference: nn.Module, batches: Batches, progress: Progress = no_progress,
               runtimes: tuple[str, ...] = ()) -> QcdqParity:
    """The file in ORT's two modes and in each runtime of `runtimes` against `reference`.
    `quantizers`: each quantized layer's activation quantizer as the ONNX builder wrote it."""
    quantizers = distinct(quantizers)
    codes = _code_tensors(model, quantizers)
    cut = layerwise(model, codes, quantizers)
    whole = {"off": session(model, optimize=False), "all": session(model, optimize=True)}
    layer_cut = {"off": session(cut, optimize=False), "all": session(cut, optimize=True)}
    for rt in runtimes:
        whole[rt], layer_cut[rt] = runtime_session(model, rt), runtime_session(cut, rt)
    modes = {m: _ModeStats(m, list(codes)) for m in whole}
    reference_count = Agreement()
    for x, y in progress(batches, len(batches),
                         "validate in " + " + ".join(["ORT", *(_LABEL[r] for r in runtimes)])):
        ref_logits, ref_codes = _reference(reference, codes, x)
        reference_count.add(ref_logits.numpy(), ref_logits.numpy(), y.numpy())
        feed = {"input": x.numpy()}
        cut_feed = {**feed, **_fed_values(quantizers, ref_codes)}
        for mode in whole:
            logits = whole[mode].run(None, feed)[0]
            cut_logits, *got = layer_cut[mode].run(None, cut_feed)
            modes[mode].add(logits, cut_logits, ref_logits.numpy(), y.numpy(),
                            _as_reference(quantizers, dict(zip(codes, got, strict=True))),
                            ref_codes)
    total = reference_count.images
    return QcdqParity(reference_count.accuracy, modes["off"].result(total),
                      modes["all"].result(total),
                      {rt: modes[rt].result(total) for rt in runtimes})


_LABEL = {"off": "ORT without optimizations", "all": "ORT with all optimizations",
          "openvino": "OpenVINO CPU"}


def runtime_session(model: onnx.ModelProto, runtime: str = "onnxruntime",
                    threads: int | None = None) -> object:
    """An optimized session of `model` in `runtime`: ORT's, or OpenVINO's `OVSession`, which
    answers the same `get_inputs()` and `run(None, feed)`."""
    if runtime == "onnxruntime":
        return session(model, optimize=True, threads=threads)
    if runtime == "openvino":
        from abs_deploy.export.openvino_runtime import OVSession

        return OVSession(model, threads=threads)
    raise UserError(f"unknown runtime {runtime!r}; known: onnxruntime, openvino")


def distinct(quantizers: Mapping[str, qdq.ActQuant]) -> dict[str, qdq.ActQuant]:
    """Each quantizer once, under the first name that wrote it: layers reading a stream that
    shares their codes (streams.py) hold the stream's own quantizer, and the layer-cut copy
    must cut each tensor once. The reference gives every one of those names the same codes
    (a layer requantizing them with the same quantizer is the identity), so the first
    stands for all."""
    out: dict[str, qdq.ActQuant] = {}
    for name, aq in quantizers.items():
        if aq not in out.values():
            out[name] = aq
    return out


def _code_tensors(model: onnx.ModelProto, quantizers: Mapping[str, qdq.ActQuant]
                  ) -> dict[str, str]:
    """Layer -> the tensor holding the integer codes it reads in `model`: the output of the
    last node of its quantizer, which must have survived simplification under its name."""
    out_of = {n.name: n.output[0] for n in model.graph.node}
    codes = {}
    for name, aq in quantizers.items():
        last = aq.nodes[-1]
        if last not in out_of:
            raise ExportFailed(f"the quantizer of {name} ({last}) is not in the ONNX model")
        codes[name] = out_of[last]
    return codes


def layerwise(model: onnx.ModelProto, codes: dict[str, str],
              quantizers: Mapping[str, qdq.ActQuant]) -> onnx.ModelProto:
    """A copy of `model` cut at every quantizer: the codes each layer computes become outputs,
    and each layer reads instead a new float input through a copy of its own quantizer (fed
    the reference's codes times the scale, which that quantizer maps back to the same codes).
    Fed the reference's codes, each layer's codes then depend only on its own kernels, not on
    a one-code difference upstream that a fine quantizer after a coarse one would magnify.
    Feeding through a quantizer, not integers straight into the DequantizeLinear, keeps every
    layer's input the Q -> DQ pair the runtime fuses in the file itself (measured: OpenVINO
    fed int8 codes as a graph input runs the stem conv with other kernels, up to 0.16 off)."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    node = {n.name: n for n in cut.graph.node}
    readers = {i: n for n in cut.graph.node if n.op_type == "DequantizeLinear"
               for i in n.input[:1]}
    shapes = _shapes(model)
    fed_nodes = []
    for name, tensor in codes.items():
        aq = quantizers[name]
        shape = shapes.get(tensor)
        fed = _fed(name)
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(qdq.CODES))
        cut.graph.input.append(onnx.helper.make_tensor_value_info(
            fed, onnx.TensorProto.FLOAT, shape))
        cut.graph.output.append(onnx.helper.make_tensor_value_info(tensor, elem, shape))
        last = fed
        for original in (node[n] for n in aq.nodes):
            copy = onnx.NodeProto()
            copy.CopyFrom(original)
            copy.name, copy.input[0] = f"{original.name}.fed", last
            del copy.output[:]
            copy.output.append(f"{fed}.{original.op_type}")
            fed_nodes.append(copy)
            last = copy.output[0]
        readers[tensor].input[0] = last
    # They read only graph inputs and initializers: first in the list keeps it sorted.
    nodes = fed_nodes + list(cut.graph.node)
    del cut.graph.node[:]
    cut.graph.node.extend(nodes)
    return cut


def _fed_values(quantizers: Mapping[str, qdq.ActQuant],
                codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float inputs of `layerwise`'s copy that reproduce the reference's `codes`: c * s,
    which its DequantizeLinear computes as (c + zp - zp) * s from the file's codes c + zp."""
    return {_fed(n): (c.astype(np.float32) * np.float32(quantizers[n].scale)).astype(np.float32)
            for n, c in codes.items()}


def _as_reference(quantizers: Mapping[str, qdq.ActQuant],
                  codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The file's codes as the reference's: minus the zero point (signed codes are stored
    offset, see qdq.zero_point)."""
    return {n: c.astype(np.int32) - np.int32(quantizers[n].zero) for n, c in codes.items()}


def _shapes(model: onnx.ModelProto) -> dict[str, list[str | int] | None]:
    """Tensor -> its shape with the batch dimension left symbolic (OpenVINO needs the rank of
    every graph input; ORT does not mind)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, list[str | int] | None] = {}
    for vi in inferred.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims[1:]):
            out[vi.name] = ["N", *(d.dim_value for d in dims[1:])]
    return out


def _fed(layer: str) -> str:
    return f"{layer}.codes_in"


def _reference(reference: nn.Module, codes: dict[str, str], x: Tensor
               ) -> tuple[Tensor, dict[str, np.ndarray]]:
    return _run_observing(reference, codes, x, lambda module, inputs, output:
                          module.input_codes(inputs[0]).to(torch.int32).numpy())


class _ModeStats:
    def __init__(self, mode: str, layers: list[str]) -> None:
        self.mode = mode
        self.layers = {n: LayerCodes(n) for n in layers}
        self.file = Agreement()      # the file as it is, end to end
        self.cut = Agreement()       # the layer-cut model fed the reference's codes

    def add(self, logits: np.ndarray, cut_logits: np.ndarray, ref: np.ndarray, y: np.ndarray,
            codes: dict[str, np.ndarray], ref_codes: dict[str, np.ndarray]) -> None:
        self.file.add(logits, ref, y)
        self.cut.add(cut_logits, ref, y)
        for name, c in self.layers.items():
            d = np.abs(codes[name].astype(np.int32) - ref_codes[name])
            c.count += d.size
            c.equal += int((d == 0).sum())
            c.max_diff = max(c.max_diff, int(d.max()) if d.size else 0)

    def result(self, total: int) -> ModeParity:
        layers = list(self.layers.values())
        count = sum(c.count for c in layers)
        r = ModeParity(self.mode, total, self.file.accuracy, self.file.top1_agreement,
                       self.cut.logits_rel, self.file.logits_rel, layers=layers)
        if count:
            r.codes_equal = sum(c.equal for c in layers) / count
            r.codes_max_diff = max(c.max_diff for c in layers)
        r.failure = self._failure(r)
        return r

    def _failure(self, r: ModeParity) -> str | None:
        first_diff = next((c for c in r.layers if c.equal < c.count), None)
        if self.mode == "off":
            if r.logits_rel <= OFF_LOGITS_RTOL:
                return None
            return (f"{_LABEL['off']}: logits differ from the reference by "
                    f"{r.logits_rel:.2e} relative (limit {OFF_LOGITS_RTOL:g}); "
                    f"{_where(first_diff)}")
        bad = next((c for c in r.layers if c.max_diff > FULL_CODES_MAX_DIFF
                    or c.equal_fraction < FULL_CODES_EQUAL), None)
        problems = []
        if r.top1_agreement < FULL_TOP1_AGREEMENT:
            problems.append(f"top-1 agreement {100 * r.top1_agreement:.2f}% "
                            f"(needs {100 * FULL_TOP1_AGREEMENT:g}%)")
        if r.codes_equal is not None and r.codes_equal < FULL_CODES_EQUAL:
            problems.append(f"codes equal on {100 * r.codes_equal:.3f}% "
                            f"(needs {100 * FULL_CODES_EQUAL:g}%)")
        if r.codes_max_diff is not None and r.codes_max_diff > FULL_CODES_MAX_DIFF:
            problems.append(f"codes up to {r.codes_max_diff} apart (limit "
                            f"{FULL_CODES_MAX_DIFF})")
        if not problems:
            return None
        return (f"{_LABEL.get(self.mode, self.mode)}: {', '.join(problems)}; "
                f"{_where(bad or first_diff)}")


def _where(c: LayerCodes | None) -> str:
    if c is None:
        return "every layer's input codes match, the divergence is after the last quantizer"
    return (f"first diverging layer {c.layer} ({c.count - c.equal} of {c.count} input codes "
            f"differ, up to {c.max_diff})")


# --- an exported file on its own (`abs validate`) --------------------------------------------


@dataclass
class FileCheck:
    """An exported file run in ORT with and without optimizations."""

    path: str
    images: int
    accuracy_all: float
    accuracy_off: float
    top1_agreement: float
    logits_rel: float
    decision: dict | None
    failure: str | None

    @property
    def passed(self) -> bool:
        return self.failure is None


def read_metadata(model: onnx.ModelProto) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in model.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


def check_file(path: str, batches: Batches, progress: Progress = no_progress,
               runtime: str = "onnxruntime") -> FileCheck:
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    if batches and list(batches[0][0].shape[1:]) != shape:
        raise UserError(f"{path} takes inputs of shape [N, {', '.join(map(str, shape))}], the "
                        f"dataset gives {list(batches[0][0].shape)}")
    full = runtime_session(model, runtime)
    off = session(model, False)
    vs_off, off_alone = Agreement(), Agreement()   # `runtime` against unoptimized ORT
    for x, y in progress(batches, len(batches), f"validate in {runtime}"):
        feed = {model.graph.input[0].name: x.numpy()}
        a, o = full.run(None, feed)[0], off.run(None, feed)[0]
        vs_off.add(a, o, y.numpy())
        off_alone.add(o, o, y.numpy())
    meta = read_metadata(model)
    check = FileCheck(path, max(vs_off.images, 1), vs_off.accuracy, off_alone.accuracy,
                      vs_off.top1_agreement, vs_off.logits_rel, meta.get("abs_deploy.decision"),
                      None)
    if check.top1_agreement < FULL_TOP1_AGREEMENT:
        name = "optimized ORT" if runtime == "onnxruntime" else _LABEL[runtime]
        check.failure = (f"{name} and unoptimized ORT agree on top-1 for only "
                         f"{100 * check.top1_agreement:.2f}% of the images "
                         f"(needs {100 * FULL_TOP1_AGREEMENT:g}%)")
    return check
