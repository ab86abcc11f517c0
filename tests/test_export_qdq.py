import numpy as np
import onnx
import pytest
import torch

from abs_deploy.export import qdq
from abs_deploy.export.collapse import LayerQuant
from abs_deploy.export.onnx_builder import GraphBuilder
from abs_deploy.quant import int_range, quantize_int


def _layer(w_bits=4, a_bits=4, a_signed=False) -> LayerQuant:
    return LayerQuant("block.conv", "conv", w_bits, a_bits, a_signed, (0, 1), 2, None, w_bits)


@pytest.mark.parametrize("bits,signed", [(2, False), (4, False), (8, False), (4, True)])
@pytest.mark.parametrize("clamp", [(0.0, 6.0), (0.0, None), (-1.0, 1.0), (0.5, 0.7)])
def test_folded_clamp_gives_the_codes_of_clamp_then_quantize(bits, signed, clamp):
    """round(clamp(x)/s) == clamp(round(x/s), folded bounds): ReLU6 can leave the float graph."""
    x = torch.randn(100_000) * 4
    s = torch.tensor(0.37 / 2 ** bits)
    lo, hi = qdq.fold_clamp(*int_range(bits, signed), s, *clamp)
    expected = quantize_int(x.clamp(clamp[0], clamp[1]), s, bits, signed)
    got = torch.clamp(torch.round(x / s), lo, hi)
    assert torch.equal(expected, got)


def test_activation_quantizer_is_q_clip_dq_named_after_layer_and_bits():
    b = GraphBuilder()
    aq = qdq.activation(b, "x", _layer(4, 4), torch.tensor(0.1))
    assert [n.op_type for n in b.nodes] == ["QuantizeLinear", "Clip", "DequantizeLinear"]
    assert [n.name for n in b.nodes] == ["block.conv.w4a4.act_q", "block.conv.w4a4.act_clip",
                                         "block.conv.w4a4.act_dq"]
    assert aq.bounds == (0, 15) and aq.codes == "block.conv.w4a4.act_clip"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in b.initializers}
    assert inits["block.conv.act_zero"].dtype == np.uint8
    assert (inits["block.conv.act_min"], inits["block.conv.act_max"]) == (0, 15)


def test_activation_quantizer_reports_the_nodes_and_scale_it_wrote():
    """Validation reads this record instead of rebuilding node names: it must name what is in
    the graph and carry the scale as stored."""
    b = GraphBuilder()
    b.node("Relu", ["x"], "block.conv.w4a4.act_q")  # a clash: the writer must report its rename
    aq = qdq.activation(b, "x", _layer(4, 4), torch.tensor(0.1))
    written = {n.name: n for n in b.nodes}
    assert aq.quantize != "block.conv.w4a4.act_q"
    assert written[aq.quantize].op_type == "QuantizeLinear"
    assert written[aq.clip].op_type == "Clip" and aq.nodes == (aq.quantize, aq.clip)
    assert written[aq.output].op_type == "DequantizeLinear"
    scale = {i.name: onnx.numpy_helper.to_array(i) for i in b.initializers}[
        written[aq.quantize].input[1]]
    assert aq.scale == float(scale) and aq.zero == 0


@pytest.mark.parametrize("bits,clamp,bounds", [(2, (None, None), (-2, 1)),
                                               (4, (None, None), (-8, 7)),
                                               (4, (0.0, None), (0, 7))])
def test_signed_codes_are_uint8_offset_by_half_the_range(bits, clamp, bounds):
    """Signed codes are stored as uint8 + 2^(b-1) (OpenVINO's CPU plugin runs int8 codes behind a
    Clip with weights halved on CPUs without VNNI): the file's Clip is the reference's range
    moved by the zero point, and `bounds` stays in the reference's codes."""
    b = GraphBuilder()
    aq = qdq.activation(b, "x", _layer(4, bits, True), torch.tensor(0.1), clamp)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in b.initializers}
    zp = 2 ** (bits - 1)
    assert aq.bounds == bounds and aq.zero == zp
    assert inits["block.conv.act_zero"].dtype == np.uint8 and inits["block.conv.act_zero"] == zp
    assert (inits["block.conv.act_min"], inits["block.conv.act_max"]) == \
        (bounds[0] + zp, bounds[1] + zp)


@pytest.mark.parametrize("signed", [False, True])
def test_clip_is_left_out_at_eight_bits(signed):
    b = GraphBuilder()
    aq = qdq.activation(b, "x", _layer(8, 8, signed), torch.tensor(0.1))
    assert [n.op_type for n in b.nodes] == ["QuantizeLinear", "DequantizeLinear"]
    assert aq.clip is None and aq.nodes == (aq.quantize,) and aq.zero == (128 if signed else 0)


def test_int4_packing_stores_weights_of_four_bits_or_fewer():
    codes = torch.tensor([[-8.0, 7.0, 0.0], [1.0, -1.0, 3.0]])
    b = GraphBuilder()
    qdq.weight(b, _layer(4, 4), codes, torch.tensor([0.1, 0.2]), packing="int4")
    w = next(i for i in b.initializers if i.name == "block.conv.weight_q")
    assert w.data_type == onnx.TensorProto.INT4
    assert onnx.numpy_helper.to_array(w).astype(int).tolist() == codes.int().tolist()
    # Two codes a byte, low nibble first: -8 -> 0x8, 7 -> 0x7, ... and nothing in int32_data.
    assert w.raw_data == bytes([0x78, 0x10, 0x3F]) and not w.int32_data
    b8 = GraphBuilder()
    qdq.weight(b8, _layer(8, 4), codes * 10, torch.tensor([0.1, 0.2]), packing="int4")
    assert next(i for i in b8.initializers if i.name == "block.conv.weight_q").data_type == \
        onnx.TensorProto.INT8


def test_weight_codes_outside_the_range_are_refused():
    with pytest.raises(ValueError, match="outside"):
        qdq.weight(GraphBuilder(), _layer(2, 4), torch.tensor([[2.0]]), torch.tensor([0.1]))
