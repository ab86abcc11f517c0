"""PyTorch model -> ONNX graph, written node by node with `onnx.helper` from the model's
torch.export ATen graph (graph.capture).

The same translation makes all three files: the FP original and the pruned float model (no
`integer` layers given) and the QCDQ model (each decided layer's Conv/Gemm reads the Q/DQ/Clip
nodes and integer initializers of `qdq.py`, taken from the integer reference layer of the same
name). The pruned float model is given `float_clips` (collapse.py): a float Clip where the QCDQ
model quantizes, the same model without its rounding.

torch's own ONNX exporter is not used: its TorchScript path is deprecated in torch 2.9+ and the
dynamo path needs onnxscript, and neither would give the layer-named QDQ nodes we want.

An op this file does not know is a `UserError` naming it (fail closed, never a silent guess).
The batch dimension is dynamic (`N`): the graph is traced at batch 2 and a reshape that repeats
the traced batch size copies the input's batch dimension instead.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.fx import Node

from abs_deploy import __version__, graph, ops
from abs_deploy.errors import UserError
from abs_deploy.export import qdq
from abs_deploy.export.onnx_builder import GraphBuilder

aten = torch.ops.aten
TRACE_BATCH = 2
INPUT, OUTPUT = "input", "logits"
MIN_OPSET = 13  # per-axis DequantizeLinear


@dataclass
class Built:
    model: onnx.ModelProto
    quant: dict[str, qdq.ActQuant] = field(default_factory=dict)  # layer -> its quantizer


def capture(model: nn.Module, input_shape: list[int]) -> torch.export.ExportedProgram:
    """The graph `build_onnx` translates (traced at batch TRACE_BATCH). One capture serves
    every file made from the same module structure (the pruned float and the QCDQ model)."""
    return graph.capture(model, torch.zeros([TRACE_BATCH, *input_shape[1:]]))


def build_onnx(ep: torch.export.ExportedProgram, input_shape: list[int], *, opset: int = 21,
               integer: Mapping[str, nn.Module] | None = None, weights: str = "int8",
               float_clips: Mapping[str, tuple[float, float]] | None = None,
               metadata: Mapping[str, str] | None = None, name: str = "abs_deploy") -> Built:
    """The ONNX model of a captured module (see module docstring), checked with the full
    checker. `integer` maps layer names to the integer reference layers to quantize with;
    `float_clips` layer or stream names not among them to the float range to clip them to."""
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"opset {opset} is not supported: use {MIN_OPSET}.."
                        f"{onnx.defs.onnx_opset_version()}")
    if weights == "int4" and opset < 21:
        raise UserError(f"--weights int4 needs opset 21 or later, got {opset}")
    t = _Translator(ep, dict(integer or {}), weights, opset, dict(float_clips or {}))
    t.run()
    t.shared_inputs()
    out_val = t.output_node.meta["val"]
    g = helper.make_graph(
        t.b.nodes, name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *input_shape[1:]])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, _dims(out_val.shape))],
        t.b.initializers)
    ops = [helper.make_opsetid("", opset)]
    m = helper.make_model(g, opset_imports=ops, producer_name="abs-deploy",
                          producer_version=__version__)
    m.ir_version = helper.find_min_ir_version_for(ops)
    _remove_dead(m)
    if metadata:
        helper.set_model_props(m, dict(metadata))
    onnx.checker.check_model(m, full_check=True)
    return Built(m, t.quant)


def _dims(shape: torch.Size) -> list[int | str]:
    return ["N" if i == 0 else int(s) for i, s in enumerate(shape)]


def _remove_dead(m: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (a float ReLU6 whose only reader was a quantizer
    that absorbed it) and initializers no node reads."""
    g = m.graph
    live = _live(list(g.node), {o.name for o in g.output})
    for n in [n for n in g.node if n not in live]:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)


def _live(nodes: list[onnx.NodeProto], outputs: set[str] = frozenset({OUTPUT})
          ) -> list[onnx.NodeProto]:
    """The nodes some graph output depends on."""
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            return live
        nodes = live


# --- the translator ------------------------------------------------------------------------



def _clamp_bounds(node: Node) -> tuple[float | None, float | None] | None:
    """(min, max) of a float clamp-like op with constant bounds, else None."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet in (aten.relu, aten.relu_):
        return 0.0, None
    if packet is aten.relu6:
        return 0.0, 6.0
    if packet in (aten.hardtanh, aten.hardtanh_):
        return float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0))
    if packet is aten.clamp:
        lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
        if all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            return (None if lo is None else float(lo)), (None if hi is None else float(hi))
    return None


class _Translator:
    def __init__(self, ep: torch.export.ExportedProgram, integer: dict[str, nn.Module],
                 weights: str, opset: int, float_clips: dict[str, tuple[float, float]]
                 ) -> None:
        self.ep = ep
        self.integer = integer
        self.float_clips = float_clips
        self.clips_made: dict[tuple[str, float, float], str] = {}  # one Clip per tensor+range
        self.clip_range: dict[str, tuple[float, float]] = {}  # a float Clip's output -> range
        self.weights = weights
        self.opset = opset
        self.b = GraphBuilder()
        sig = ep.graph_signature
        self.lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                       **sig.inputs_to_lifted_tensor_constants}
        self.user_inputs = list(sig.user_inputs)
        self.values = {**ep.state_dict, **ep.constants}
        self.env: dict[Node, object] = {}
        self.quant: dict[str, qdq.ActQuant] = {}
        self.clamped: dict[str, str] = {}  # QuantizeLinear -> output of the clamp it folded
        self.output_node: Node | None = None

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                self._output(node)
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            else:
                raise UserError(f"export cannot translate {node.op} {node.target}")

    def _call(self, node: Node) -> object:
        if node.target is operator.getitem:
            return self.env[node.args[0]][node.args[1]]
        op = ops.op_of(node.target)
        if op is None or op.onnx is None:
            raise UserError(f"export cannot translate op {node.target}{_module_of(node)} (node "
                            f"{node.name}); it writes: {', '.join(ops.exportable())}")
        if op.onnx == "skip":
            return None
        if op.onnx == "identity":
            return self.env[node.args[0]]
        kind, _, onnx_op = op.onnx.partition(":")
        if kind == "unary":
            return self.b.node(onnx_op, [self._t(node.args[0])], node.name)
        if kind == "binary":
            return self._binary(node, onnx_op)
        return getattr(self, f"_{op.onnx}")(node)

    def _placeholder(self, node: Node) -> None:
        if node.name in self.lifted:
            self.env[node] = _Lifted(self.lifted[node.name])
        elif node.name == self.user_inputs[0] and len(self.user_inputs) == 1:
            self.env[node] = INPUT
        else:
            raise UserError("export supports models with one tensor input")

    def _output(self, node: Node) -> None:
        outs = node.args[0]
        if not isinstance(outs, (tuple, list)) or len(outs) != 1 or not isinstance(outs[0], Node):
            raise UserError("export supports models with one tensor output")
        self.output_node = outs[0]
        name = self._t(outs[0])
        if name == INPUT:
            name = self.b.node("Identity", [name], "output")
        for n in self.b.nodes:
            n.input[:] = [OUTPUT if v == name else v for v in n.input]
            n.output[:] = [OUTPUT if v == name else v for v in n.output]

    # -- tensors --------------------------------------------------------------------------

    def _t(self, arg: object) -> str:
        """The ONNX name of a tensor argument (materialising a lifted weight on first use)."""
        value = self.env.get(arg) if isinstance(arg, Node) else None
        if isinstance(value, _Lifted):
            tensor = self.values[value.target].detach().float().numpy()
            name = self.b.initializer(value.target, tensor)
            self.env[arg] = name
            return name
        if isinstance(value, str):
            return value
        raise UserError(f"export cannot use argument {arg!r} as a tensor")

    def _const(self, base: str, value: object, dtype=np.float32) -> str:
        return self.b.initializer(base, np.asarray(value, dtype))

    def _shape(self, arg: Node) -> list[int]:
        return [int(s) for s in arg.meta["val"].shape]

    def _layer_of(self, weight: object) -> str | None:
        value = self.env.get(weight) if isinstance(weight, Node) else None
        target = value.target if isinstance(value, _Lifted) else None
        if target is None and isinstance(weight, Node):
            target = self.lifted.get(weight.name)
        return target.rpartition(".")[0] if target and target.endswith(".weight") else None

    # -- layers ---------------------------------------------------------------------------

    def _conv(self, node: Node) -> str:
        x, w = node.args[0], node.args[1]
        b = _arg(node, 2, "bias", None)
        if node.target.overloadpacket is aten.convolution:
            stride, padding, dilation = node.args[3], node.args[4], node.args[5]
            if node.args[6]:
                raise UserError(f"export does not support transposed conv (node {node.name})")
            groups = node.args[8]
        else:
            stride = _arg(node, 3, "stride", [1, 1])
            padding = _arg(node, 4, "padding", [0, 0])
            dilation = _arg(node, 5, "dilation", [1, 1])
            groups = _arg(node, 6, "groups", 1)
        kernel = self._shape(w)[2:]
        attrs: dict[str, object] = {"kernel_shape": kernel, "strides": _pair(stride),
                                    "dilations": _pair(dilation), "group": int(groups)}
        if isinstance(padding, str):
            if padding == "same":
                attrs["auto_pad"] = "SAME_UPPER"
            elif padding != "valid":
                raise UserError(f"conv padding {padding!r} is not supported")
        else:
            p = _pair(padding)
            attrs["pads"] = [p[0], p[1], p[0], p[1]]
        inputs, name = self._layer_inputs(node, x, w, b)
        return self.b.node("Conv", inputs, name, **attrs)

    def _linear(self, node: Node) -> str:
        x, w = node.args[0], node.args[1]
        b = _arg(node, 2, "bias", None)
        layer = self._layer_of(w)
        if len(self._shape(x)) != 2:
            if layer in self.integer:
                raise UserError(f"export quantizes Linear {layer} only on a (N, features) input")
            wt = self.b.node("Transpose", [self._t(w)], f"{node.name}.wT")
            out = self.b.node("MatMul", [self._t(x), wt], f"{node.name}.matmul")
            return out if b is None else self.b.node("Add", [out, self._t(b)], node.name)
        inputs, name = self._layer_inputs(node, x, w, b)
        return self.b.node("Gemm", inputs, name, transB=1)

    def _layer_inputs(self, node: Node, x: Node, w: Node, b: Node | None
                      ) -> tuple[list[str], str]:
        """The (input, weight[, bias]) names of a Conv/Gemm and its node name."""
        layer = self._layer_of(w)
        m = self.integer.get(layer) if layer is not None else None
        if m is None:
            x_name = self._float_clip(x, layer) if layer in self.float_clips else self._t(x)
            names = [x_name, self._t(w)] + ([self._t(b)] if b is not None else [])
            return names, layer or node.name
        lq = m.lq
        if lq.a_quantized:
            aq = self._same_stream_quant(x, m)
            if aq is None:
                aq = self._quantize(x, m)
            self.quant[layer] = aq
            x_name = aq.output
        else:
            x_name = self._t(x)
        if lq.w_quantized:
            w_name = qdq.weight(self.b, lq, m.weight, m.w_scale, self.weights)
        else:
            w_name = self.b.initializer(f"{layer}.weight", m.weight.detach().numpy())
        if m.b_int is not None:
            b_name = qdq.bias(self.b, lq, m.b_int, m.a_scale * m.w_scale)
        else:
            b_name = self.b.initializer(f"{layer}.bias", m.bias.detach().numpy())
        return [x_name, w_name, b_name], qdq.node_name(lq)

    def _quantize(self, x: Node, m: nn.Module) -> qdq.ActQuant:
        """The Q/[Clip]/DQ of integer layer `m` reading `x`, a float clamp in front folded
        into it (the clamp's output is remembered for `shared_inputs`)."""
        src, c_min, c_max = self._quant_source(x)
        aq = qdq.activation(self.b, self._t(src), m.lq, m.a_scale, (c_min, c_max))
        if src is not x:
            self.clamped[aq.quantize] = self._t(_through_identities(x))
        return aq

    def shared_inputs(self) -> None:
        """Every quantizer whose tensor has a float reader too reads the clamp it folded when
        that clamp is emitted anyway, and clips in float in front of its QuantizeLinear
        (qdq.py; the same codes either way). Run after the whole graph is written: only then
        are a tensor's readers known."""
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in _live(self.b.nodes):
            for i in n.input:
                readers.setdefault(i, []).append(n)
        node = {n.name: n for n in self.b.nodes}
        done: dict[qdq.ActQuant, qdq.ActQuant] = {}
        for layer, aq in self.quant.items():
            if aq not in done:
                q = node[aq.quantize]
                clamp = self.clamped.get(aq.quantize)
                if clamp is not None and readers.get(clamp):
                    readers[q.input[0]].remove(q)
                    q.input[0] = clamp
                    readers[clamp].append(q)
                float_reader = any(r.op_type != "QuantizeLinear" for r in readers[q.input[0]])
                done[aq] = qdq.clip_in_float(self.b, aq) if float_reader else aq
            self.quant[layer] = done[aq]

    def _quant_source(self, x: Node) -> tuple[Node, float | None, float | None]:
        """The tensor a quantizer should read and the float clamp it absorbs (see qdq.py)."""
        x = _through_identities(x)
        bounds = _clamp_bounds(x) if x.op == "call_function" else None
        if bounds is None:
            return x, None, None
        return x.args[0], bounds[0], bounds[1]

    def _same_stream_quant(self, x: Node, layer: nn.Module) -> qdq.ActQuant | None:
        """The stream quantizer `x` comes out of, when it is the layer's own quantizer (same
        bits, signedness and float32 scale: a stream sharing its readers' codes, streams.py).
        The layer then reads its codes as they are: a second, identical Q/[Clip]/DQ would
        compute the same codes and keep ORT from fusing the reader and the residual add."""
        x = _through_identities(x)
        if _onnx_kind(x) != "stream_quant":
            return None
        stream = self.integer.get(x.args[1])
        aq = self.quant.get(x.args[1])
        if stream is None or aq is None:
            return None
        same = (stream.lq.a_bits, stream.lq.a_signed) == (layer.lq.a_bits, layer.lq.a_signed)
        if not same or aq.scale != float(qdq.f32(layer.a_scale).reshape(())):
            return None
        return aq

    def _stream_quant(self, node: Node) -> str:
        """A residual-stream quantizer (streams.py): Q/[Clip]/DQ on the tensor itself, which all
        its readers then read; in the float files a float Clip to its range (`float_clips`)
        or, in the FP original, identity."""
        name = node.args[1]
        m = self.integer.get(name)
        if m is None:
            if name in self.float_clips:
                return self._float_clip(node.args[0], name)
            return self._t(node.args[0])
        aq = self._quantize(node.args[0], m)
        self.quant[name] = aq
        return aq.output

    def _float_clip(self, x: Node, name: str) -> str:
        """`x` clamped to the float range of quantizer `name`. Readers of the same tensor and
        range share one Clip (a tensor two layers read with the same quantizer), and a tensor
        already clipped within the range is read as it is (a layer sharing a stream's codes,
        as `_same_stream_quant` in the QCDQ file)."""
        lo, hi = self.float_clips[name]
        src = self._t(x)
        made = self.clip_range.get(src)
        if made is not None and lo <= made[0] and made[1] <= hi:
            return src
        key = (src, lo, hi)
        if key not in self.clips_made:
            ins = [src, self._const(f"{name}.clip_min", lo), self._const(f"{name}.clip_max", hi)]
            out = self.clips_made[key] = self.b.node("Clip", ins, f"{name}.clip")
            self.clip_range[out] = (lo, hi)
        return self.clips_made[key]

    def _batch_norm(self, node: Node) -> object:
        x, w, b, mean, var = node.args[:5]
        if node.target.overloadpacket is aten.batch_norm:
            if node.args[5]:
                raise UserError(f"batch norm in training mode at node {node.name}")
            eps = node.args[7]
        else:
            eps = node.args[6]
        c = self._shape(x)[1]
        scale = self._t(w) if w is not None else self._const(f"{node.name}.scale", np.ones(c))
        shift = self._t(b) if b is not None else self._const(f"{node.name}.shift", np.zeros(c))
        out = self.b.node("BatchNormalization",
                          [self._t(x), scale, shift, self._t(mean), self._t(var)],
                          node.name, epsilon=float(eps))
        if isinstance(node.meta.get("val"), (tuple, list)):
            return (out,) + (None,) * (len(node.meta["val"]) - 1)
        return out

    # -- elementwise ----------------------------------------------------------------------

    def _clamp(self, node: Node) -> str:
        bounds = _clamp_bounds(node)
        if bounds is None:
            raise UserError(f"clamp with tensor bounds is not supported (node {node.name})")
        ins = [self._t(node.args[0])]
        ins.append("" if bounds[0] is None else self._const(f"{node.name}.min", bounds[0]))
        if bounds[1] is not None:
            ins.append(self._const(f"{node.name}.max", bounds[1]))
        return self.b.node("Clip", ins, node.name)

    def _binary(self, node: Node, op: str) -> str:
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("rounding_mode") is not None:
            raise UserError(f"export cannot translate {node.target} with rounding_mode "
                            f"(node {node.name})")
        alpha = _arg(node, 2, "alpha", 1)
        names = [self._t(v) if isinstance(v, Node) else self._const(f"{node.name}.c", v)
                 for v in (a, b)]
        if alpha != 1:
            names[1] = self.b.node("Mul", [names[1], self._const(f"{node.name}.alpha", alpha)],
                                   f"{node.name}.alpha")
        return self.b.node(op, names, node.name)

    def _hardsigmoid(self, node: Node) -> str:
        return self.b.node("HardSigmoid", [self._t(node.args[0])], node.name,
                           alpha=1.0 / 6, beta=0.5)

    def _silu(self, node: Node) -> str:
        x = self._t(node.args[0])
        s = self.b.node("Sigmoid", [x], f"{node.name}.sigmoid")
        return self.b.node("Mul", [x, s], node.name)

    def _gelu(self, node: Node) -> str:
        if self.opset < 20:
            raise UserError("Gelu needs opset 20 or later")
        approx = _arg(node, 1, "approximate", "none")
        return self.b.node("Gelu", [self._t(node.args[0])], node.name, approximate=approx)

    # -- pooling and shapes ---------------------------------------------------------------

    def _adaptive_avg_pool(self, node: Node) -> str:
        x = node.args[0]
        h, w = self._shape(x)[-2:]
        oh, ow = _pair(node.args[1])
        if (oh, ow) == (1, 1):
            return self.b.node("GlobalAveragePool", [self._t(x)], node.name)
        if h % oh or w % ow:
            raise UserError(f"adaptive average pool {h}x{w} -> {oh}x{ow} is not a plain pool")
        k = [h // oh, w // ow]
        return self.b.node("AveragePool", [self._t(x)], node.name, kernel_shape=k, strides=k)

    def _avg_pool(self, node: Node) -> str:
        if _arg(node, 6, "divisor_override", None) is not None:
            raise UserError(f"avg_pool2d with divisor_override (node {node.name})")
        k = _pair(node.args[1])
        s = _pair(_arg(node, 2, "stride", None) or k)
        p = _pair(_arg(node, 3, "padding", 0))
        return self.b.node("AveragePool", [self._t(node.args[0])], node.name, kernel_shape=k,
                           strides=s, pads=[p[0], p[1], p[0], p[1]],
                           ceil_mode=int(_arg(node, 4, "ceil_mode", False)),
                           count_include_pad=int(_arg(node, 5, "count_include_pad", True)))

    def _max_pool(self, node: Node) -> str:
        k = _pair(node.args[1])
        s = _pair(_arg(node, 2, "stride", None) or k)
        p = _pair(_arg(node, 3, "padding", 0))
        d = _pair(_arg(node, 4, "dilation", 1))
        return self.b.node("MaxPool", [self._t(node.args[0])], node.name, kernel_shape=k,
                           strides=s, pads=[p[0], p[1], p[0], p[1]], dilations=d,
                           ceil_mode=int(_arg(node, 5, "ceil_mode", False)))

    def _upsample_nearest(self, node: Node) -> str:
        """Nearest upsampling by whole factors, as ONNX Resize: output pixel i reads input
        pixel floor(i / factor), which is PyTorch's nearest ("asymmetric", "floor")."""
        x = node.args[0]
        (_, _, h, w), (_, _, oh, ow) = self._shape(x), [int(v) for v in node.meta["val"].shape]
        if oh % h or ow % w:
            raise UserError(f"nearest upsampling from {h}x{w} to {oh}x{ow} (node {node.name}) "
                            "is not by a whole factor; export writes whole factors only")
        scales = self._const(f"{node.name}.scales", [1.0, 1.0, oh / h, ow / w])
        return self.b.node("Resize", [self._t(x), "", scales], node.name, mode="nearest",
                           coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def _mean(self, node: Node) -> str:
        x = node.args[0]
        rank = len(self._shape(x))
        dims = sorted(d % rank for d in _arg(node, 1, "dim", list(range(rank))))
        keep = bool(_arg(node, 2, "keepdim", False))
        if rank == 4 and dims == [2, 3]:
            pooled = self.b.node("GlobalAveragePool", [self._t(x)], f"{node.name}.pool"
                                 if not keep else node.name)
            return pooled if keep else self._flatten_batch(pooled, node.name)
        if self.opset < 18:
            raise UserError("mean over other than the spatial dims needs opset 18 or later")
        axes = self._const(f"{node.name}.axes", dims, np.int64)
        return self.b.node("ReduceMean", [self._t(x), axes], node.name, keepdims=int(keep))

    def _flatten(self, node: Node) -> str:
        x = node.args[0]
        rank = len(self._shape(x))
        start = _arg(node, 1, "start_dim", 0) % rank
        end = _arg(node, 2, "end_dim", -1) % rank
        if start == 1 and end == rank - 1:
            return self._flatten_batch(self._t(x), node.name)
        return self._reshape_to(node, x, self._shape(node))

    def _flatten_batch(self, x: str, name: str) -> str:
        """(N, ...) -> (N, features) as Reshape(0, -1), not Flatten: ORT moves a QuantizeLinear
        up through a Reshape (QDQ propagation) but not through a Flatten, so a global pool in
        front of the classifier's quantizer fuses into QLinearGlobalAveragePool only so
        (measured, ORT 1.32: a DequantizeLinear, a float pool and a QuantizeLinear otherwise)."""
        target = self._const(f"{name}.shape", [0, -1], np.int64)
        return self.b.node("Reshape", [x, target], name)

    def _reshape(self, node: Node) -> str:
        return self._reshape_to(node, node.args[0], [int(s) for s in node.args[1]])

    def _reshape_to(self, node: Node, x: Node, shape: list[int]) -> str:
        shape = list(shape)
        if shape and shape[0] == TRACE_BATCH and self._shape(x)[0] == TRACE_BATCH:
            shape[0] = 0  # Reshape's "copy this dim": keeps the batch dynamic
        elif TRACE_BATCH in shape[:1] or -1 not in shape:
            raise UserError(f"reshape at node {node.name} to {shape} mixes the batch dim")
        target = self._const(f"{node.name}.shape", shape, np.int64)
        return self.b.node("Reshape", [self._t(x), target], node.name)

    def _cat(self, node: Node) -> str:
        tensors = [self._t(t) for t in node.args[0]]
        rank = len(self._shape(node.args[0][0]))
        return self.b.node("Concat", tensors, node.name, axis=_arg(node, 1, "dim", 0) % rank)

    def _permute(self, node: Node) -> str:
        x = node.args[0]
        perm = graph.permutation(node, len(self._shape(x)))
        if perm[0] != 0:
            raise UserError(f"transpose of the batch dim at node {node.name}")
        return self.b.node("Transpose", [self._t(x)], node.name, perm=perm)


def _onnx_kind(node: Node) -> str | None:
    """How the op table writes `node` ("identity", "stream_quant", ...), None if not an op."""
    return getattr(ops.op_of(node.target), "onnx", None) if node.op == "call_function" else None


def _through_identities(x: Node) -> Node:
    """`x` followed back through the ops export writes as nothing (dropout, views, ...)."""
    while _onnx_kind(x) == "identity":
        x = x.args[0]
    return x


@dataclass(frozen=True)
class _Lifted:
    target: str  # the parameter/buffer's name in the model


def _pair(v: object) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    return v * 2 if len(v) == 1 else v


def _arg(node: Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _module_of(node: Node) -> str:
    """' in <module path> (<class>)' of the module whose forward holds `node`."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return ""
    path, cls = stack[-1]
    name = getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1]
    return f" in {path or 'the top-level module'} ({name})"
