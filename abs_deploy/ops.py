"""The one op table: every ATen op the tool understands, with how channels flow through it (for
the channel-dependency groups of `graph.py`) and how export writes it in ONNX
(`export/onnx_graph.py`). Both walkers dispatch from here, and export's refusal lists what is here.

Adding an op is one entry (and, for a new kind of ONNX writing, one `_Translator` method of that
name). Fail closed stays the rule: an op not in the table makes the groups it reads unprunable,
and export refuses it by name.

`channels` names a `graph._Walk` rule:
  conv, linear, batch_norm  the layers and norms themselves
  harmless        reads shapes or metadata only
  passthrough     channel-wise and 0 -> 0: a pruned channel stays zero
  nonzero_at_zero channel-wise but 0 -> non-zero: its group becomes unprunable
  clamp           passthrough when its bounds keep 0 at 0
  spatial         acts on the last two dims only (pooling, upsampling, 2-d padding)
  reshape, permute, reduce, binary, cat, pad, slice  see the rule of that name

`onnx` is how export writes it: the name of a `_Translator` method, "identity" (the input,
unchanged), "skip" (nothing: shape queries), "unary:<OnnxOp>" or "binary:<OnnxOp>"; None when
export cannot write it (the graph analysis still knows its channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abs_deploy import streams

aten = torch.ops.aten


@dataclass(frozen=True)
class Op:
    channels: str
    onnx: str | None = None


OPS: dict[object, Op] = {
    # layers and norms
    aten.conv2d: Op("conv", "conv"),
    aten.convolution: Op("conv", "conv"),
    aten.linear: Op("linear", "linear"),
    aten.batch_norm: Op("batch_norm", "batch_norm"),
    aten._native_batch_norm_legit_no_training: Op("batch_norm", "batch_norm"),
    # shape queries and assertions
    aten.sym_size: Op("harmless", "skip"),
    aten.sym_numel: Op("harmless", "skip"),
    aten.sym_stride: Op("harmless", "skip"),
    aten._assert_tensor_metadata: Op("harmless", "skip"),
    # channel-wise, 0 -> 0
    aten.relu: Op("passthrough", "unary:Relu"),
    aten.relu_: Op("passthrough", "unary:Relu"),
    aten.relu6: Op("passthrough", "clamp"),
    aten.silu: Op("passthrough", "silu"),
    aten.silu_: Op("passthrough"),
    aten.hardswish: Op("passthrough", "unary:HardSwish"),
    aten.hardswish_: Op("passthrough", "unary:HardSwish"),
    aten.gelu: Op("passthrough", "gelu"),
    aten.tanh: Op("passthrough", "unary:Tanh"),
    aten.leaky_relu: Op("passthrough"),
    aten.elu: Op("passthrough"),
    aten.selu: Op("passthrough"),
    aten.celu: Op("passthrough"),
    aten.mish: Op("passthrough"),
    aten.dropout: Op("passthrough", "identity"),
    aten.feature_dropout: Op("passthrough", "identity"),
    aten.clone: Op("passthrough", "identity"),
    aten.contiguous: Op("passthrough", "identity"),
    aten.alias: Op("passthrough", "identity"),
    aten.detach: Op("passthrough", "identity"),
    aten.lift_fresh_copy: Op("passthrough", "identity"),
    aten._to_copy: Op("passthrough"),
    aten.to: Op("passthrough"),
    aten.neg: Op("passthrough"),
    aten.abs: Op("passthrough"),
    # channel-wise, 0 -> non-zero
    aten.sigmoid: Op("nonzero_at_zero", "unary:Sigmoid"),
    aten.hardsigmoid: Op("nonzero_at_zero", "hardsigmoid"),
    aten.softplus: Op("nonzero_at_zero"),
    aten.exp: Op("nonzero_at_zero"),
    # clamps
    aten.hardtanh: Op("clamp", "clamp"),
    aten.hardtanh_: Op("clamp", "clamp"),
    aten.clamp: Op("clamp", "clamp"),
    # the last two dims only
    aten.max_pool2d: Op("spatial", "max_pool"),
    aten.max_pool2d_with_indices: Op("spatial"),
    aten.avg_pool2d: Op("spatial", "avg_pool"),
    aten.adaptive_avg_pool2d: Op("spatial", "adaptive_avg_pool"),
    aten._adaptive_avg_pool2d: Op("spatial"),
    aten.adaptive_max_pool2d: Op("spatial"),
    aten.upsample_nearest2d: Op("spatial", "upsample_nearest"),
    aten.upsample_bilinear2d: Op("spatial"),
    aten.reflection_pad2d: Op("spatial"),
    aten.replication_pad2d: Op("spatial"),
    # shapes
    aten.view: Op("reshape", "reshape"),
    aten.reshape: Op("reshape", "reshape"),
    aten._unsafe_view: Op("reshape", "reshape"),
    aten.flatten: Op("reshape", "flatten"),
    aten.unflatten: Op("reshape"),
    aten.squeeze: Op("reshape"),
    aten.unsqueeze: Op("reshape"),
    aten.permute: Op("permute", "permute"),
    aten.transpose: Op("permute", "permute"),
    aten.t: Op("permute", "permute"),
    aten.mean: Op("reduce", "mean"),
    aten.sum: Op("reduce"),
    aten.amax: Op("reduce"),
    aten.amin: Op("reduce"),
    # several inputs
    aten.add: Op("binary", "binary:Add"),
    aten.sub: Op("binary", "binary:Sub"),
    aten.mul: Op("binary", "binary:Mul"),
    aten.div: Op("binary", "binary:Div"),
    aten.cat: Op("cat", "cat"),
    aten.pad: Op("pad"),
    aten.constant_pad_nd: Op("pad"),
    aten.slice: Op("slice"),
    aten.select: Op("slice"),
    # a residual-stream quantizer's marker in a float model (streams.py): identity, 0 -> 0
    streams.MARKER: Op("passthrough", "stream_quant"),
}


def op_of(target: object) -> Op | None:
    """The table's entry for a graph node's target (an ATen overload), if any."""
    return OPS.get(getattr(target, "overloadpacket", None))


def name_of(packet: object) -> str:
    """"aten.conv2d" and the like."""
    return str(packet).replace("::", ".")


def exportable() -> list[str]:
    """The ops export writes, by ATen name, for its refusal message."""
    return sorted({name_of(p) for p, op in OPS.items() if op.onnx not in (None, "skip")})
