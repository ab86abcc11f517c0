"""Every QuantizeLinear, DequantizeLinear and integer Clip of the export (DESIGN §10, "QCDQ").

- Weights: an int8 initializer whose values already lie in the b-bit range (or a packed INT4
  one with `--weights int4` when b <= 4), then one per-channel DequantizeLinear (axis 0).
- Activations: QuantizeLinear (uint8) -> integer Clip to the b-bit range -> DequantizeLinear.
  The Clip is left out when the range is the whole container (8 bits). Unsigned codes have
  zero point 0; signed ones are stored offset by 2^(b-1), zero point 2^(b-1) (see
  `zero_point`): the same values, the reference's codes plus the zero point.
- Bias of a layer with both tensors quantized: int32 at scale `s_x * s_w`, through a
  DequantizeLinear, the form ONNX Runtime fuses into QLinearConv / QGemm.

A float clamp (ReLU, ReLU6) directly in front of a quantizer is folded into the integer Clip
instead of being emitted between the producer and its QuantizeLinear, where it would block the
fusion: rounding is monotone, so `round(clamp(x, a, b) / s) = clamp(round(x / s), round(a / s),
round(b / s))` exactly.

A quantizer whose tensor has a float reader too (a ResNet block's input: the next conv reads
it quantized, the residual add in float) reads the clamp's output when the clamp is emitted
for that reader anyway, and clamps in float in front of its QuantizeLinear (`clip_in_float`):
the same identity read the other way, so the same codes. Neither runtime can fuse such a
quantizer into its producer (the float reader needs the tensor), and OpenVINO's CPU plugin
then fuses the ReLU into the producing conv and the float Clip into the FakeQuantize instead
of running both as separate nodes (benchmarks/results/openvino_profile.md).

Names: nodes are `<layer>.<tag>.<role>` (`layer1.0.conv1.w4a4.act_q`); the layer's own node is
`<layer>.<tag>`, so a reader of the file sees each layer's bits. Validation does not rebuild
these names: `activation` returns what it wrote (`ActQuant`), and the ONNX builder hands that
map on to validation and the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import torch

from abs_deploy.export.onnx_builder import GraphBuilder
from abs_deploy.quant import int_range

if TYPE_CHECKING:
    import onnx

    from abs_deploy.export.collapse import LayerQuant, StreamSpec

CODES = np.uint8  # every activation's codes, signed ones offset (see `zero_point`)
INT4_MAX_BITS = 4


@dataclass(frozen=True)
class ActQuant:
    """What the activation quantizer of one layer became in the graph: its nodes, the tensors
    it makes and the values it quantizes with."""

    quantize: str  # the QuantizeLinear node
    clip: str | None  # the integer Clip node; None when the range is the whole container
    output: str  # the DequantizeLinear output the layer reads
    codes: str  # the integer tensor (Clip output, or QuantizeLinear output without a Clip)
    scale: float  # the float32 scale as stored
    zero: int  # the zero point: the file's codes (uint8) are the reference's plus this
    bounds: tuple[int, int]  # the range enforced, in the reference's codes
    folded: str | None  # the float clamp folded into it, e.g. "clamp(0, 6)"
    clip_first: bool = False  # the Clip is a float one in front of the QuantizeLinear

    @property
    def nodes(self) -> tuple[str, ...]:
        """[Clip,] QuantizeLinear[, Clip], in graph order: what a copy of the quantizer
        repeats."""
        if self.clip is None:
            return (self.quantize,)
        return (self.clip, self.quantize) if self.clip_first else (self.quantize, self.clip)


def node_name(lq: LayerQuant | StreamSpec, role: str | None = None) -> str:
    base = f"{lq.name}.{lq.tag}"
    return base if role is None else f"{base}.{role}"


def zero_point(a_bits: int, signed: bool) -> int:
    """The zero point of a layer's activation codes in the file (uint8).

    Signed codes are stored offset by 2^(b-1), not as int8: OpenVINO's CPU plugin runs a Conv
    reading int8 codes through an integer Clip with a signed-input kernel, and on CPUs without
    VNNI oneDNN halves (rounds) every weight of that kernel to avoid int16 overflow, so odd
    weights come out wrong (measured: the result is exactly the conv with round(w / 2) * 2).
    uint8 codes with a zero point take its unsigned kernels, exact everywhere. Without a Clip
    (8 bits) its low-precision transformations shifted int8 to uint8 + 128 themselves, as ORT
    does on x64 (QDQS8ToU8Transformer): the stored form is what both runtimes ran already.
    """
    return 2 ** (a_bits - 1) if signed else 0


def activation(b: GraphBuilder, x: str, lq: LayerQuant | StreamSpec, a_scale: torch.Tensor,
               clamp: tuple[float | None, float | None] = (None, None)) -> ActQuant:
    """QuantizeLinear -> [Clip] -> DequantizeLinear in front of layer `lq` (or on residual
    stream `lq`), reading `x`."""
    lo, hi = int_range(lq.a_bits, lq.a_signed)
    folded = None
    if clamp != (None, None):
        lo, hi = fold_clamp(lo, hi, a_scale, *clamp)
        folded = f"clamp({_num(clamp[0])}, {_num(clamp[1])})"
    zp = zero_point(lq.a_bits, lq.a_signed)
    s = f32(a_scale).reshape(())
    scale = b.initializer(f"{lq.name}.act_scale", s)
    zero = b.initializer(f"{lq.name}.act_zero", np.array(zp, CODES))
    quantize = codes = b.node("QuantizeLinear", [x, scale, zero], node_name(lq, "act_q"))
    clip = None
    if (lo + zp, hi + zp) != (0, 255):
        lo_t = b.initializer(f"{lq.name}.act_min", np.array(lo + zp, CODES))
        hi_t = b.initializer(f"{lq.name}.act_max", np.array(hi + zp, CODES))
        clip = codes = b.node("Clip", [codes, lo_t, hi_t], node_name(lq, "act_clip"))
    out = b.node("DequantizeLinear", [codes, scale, zero], node_name(lq, "act_dq"))
    return ActQuant(quantize, clip, out, codes, float(s), zp, (lo, hi), folded)


def clip_in_float(b: GraphBuilder, aq: ActQuant) -> ActQuant:
    """`aq` with its integer Clip replaced by a float Clip to the same codes' values in front
    of its QuantizeLinear (see the module docstring), in `b`'s nodes. Exact:
    `round((c * s) / s) = c` for every code c of the range, as in `fold_clamp`."""
    if aq.clip is None or aq.clip_first:
        return aq
    node = {n.name: n for n in b.nodes}
    q, clip = node[aq.quantize], node[aq.clip]
    s = np.float32(aq.scale)
    lo = b.initializer(f"{aq.clip}.min", np.array(np.float32(aq.bounds[0]) * s, np.float32))
    hi = b.initializer(f"{aq.clip}.max", np.array(np.float32(aq.bounds[1]) * s, np.float32))
    for n in b.nodes:  # the DequantizeLinear now reads the codes straight from the Quantize
        n.input[:] = [q.output[0] if i == clip.output[0] else i for i in n.input]
    clip.input[:] = [q.input[0], lo, hi]
    q.input[0] = clip.output[0]
    b.nodes.remove(clip)
    b.nodes.insert(b.nodes.index(q), clip)
    return dataclasses.replace(aq, codes=q.output[0], clip_first=True)


def fold_clamp(lo: int, hi: int, a_scale: torch.Tensor, c_min: float | None,
               c_max: float | None) -> tuple[int, int]:
    """The integer bounds of `quantize(clamp(x, c_min, c_max))` for a quantizer clamping to
    [lo, hi]. Two clamps compose to the clamp between the images of -inf and +inf. `x / s` in
    float32 and rounding half to even, as the reference and QuantizeLinear compute it."""
    s = a_scale.float().reshape(())

    def code(v: float) -> int:
        return int(torch.round(torch.tensor(v, dtype=torch.float32) / s))

    new_lo = lo if c_min is None else min(max(code(c_min), lo), hi)
    new_hi = hi if c_max is None else min(max(code(c_max), lo), hi)
    return new_lo, new_hi


def weight(b: GraphBuilder, lq: LayerQuant, codes: torch.Tensor, w_scale: torch.Tensor,
           packing: str = "int8") -> str:
    """Integer weight initializer + per-channel DequantizeLinear (axis 0, zero point 0)."""
    q = codes.detach().round().to(torch.int64).numpy()
    lo, hi = int_range(lq.w_store_bits, True)
    if q.min() < lo or q.max() > hi:
        raise ValueError(f"{lq.name}: weight codes outside the {lq.w_store_bits}-bit range")
    n = q.shape[0]
    # ml_dtypes' int4 makes numpy_helper pack two codes to a byte in raw_data (low nibble
    # first, as ONNX specifies); helper.make_tensor would write one varint per code instead.
    dtype = ml_dtypes.int4 if packing == "int4" and lq.w_store_bits <= INT4_MAX_BITS \
        else np.int8
    w = b.initializer(f"{lq.name}.weight_q", q.astype(dtype))
    zero = b.initializer(f"{lq.name}.weight_zero", np.zeros(n, dtype))
    scale = b.initializer(f"{lq.name}.weight_scale", f32(w_scale))
    return b.node("DequantizeLinear", [w, scale, zero], node_name(lq, "w_dq"), axis=0)


def bias(b: GraphBuilder, lq: LayerQuant, b_int: torch.Tensor, bias_scale: torch.Tensor) -> str:
    """int32 bias at the accumulator scale `s_x * s_w[c]`."""
    q = b.initializer(f"{lq.name}.bias_q", b_int.detach().round().to(torch.int32).numpy())
    scale = b.initializer(f"{lq.name}.bias_scale", f32(bias_scale))
    return b.node("DequantizeLinear", [q, scale], node_name(lq, "b_dq"), axis=0)


def f32(t: torch.Tensor) -> np.ndarray:
    """The float32 values the file stores for `t`."""
    return t.detach().to(torch.float32).numpy().copy()


def _num(v: float | None) -> str:
    return "none" if v is None else f"{v:g}"


def quantizer_of(made_by: dict[str, onnx.NodeProto], codes: str) -> onnx.NodeProto | None:
    """The QuantizeLinear that makes `codes` in a written file, through its integer Clip if
    it has one (`made_by`: tensor -> the node that outputs it); None if no quantizer does."""
    node = made_by.get(codes)
    if node is not None and node.op_type == "Clip":
        node = made_by.get(node.input[0])
    return node if node is not None and node.op_type == "QuantizeLinear" else None
