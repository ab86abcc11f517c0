"""What each runtime makes of an exported file, read from its own optimized graph: how many of
the model's layers run on integer kernels, how many residual adds do, and how many weight
tensors it dequantizes to float on every run.

A "4-bit" file says nothing about speed until the runtime fuses it: ONNX Runtime never fuses
4-bit weights, and fuses a conv only with a quantizer on its output too (DESIGN §10), so the
report shows this count beside the latency it explains.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

# Node types of ORT's optimized graph that compute a conv or matrix product; the NCHWc
# transformer's own Conv lives in another domain under the same name.
_ORT_INTEGER = {"QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                "MatMulIntegerToFloat"}
_ORT_FLOAT = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
_ORT_INTEGER_ADD = {"QLinearAdd"}
_WEIGHT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                 onnx.TensorProto.UINT4}
# OpenVINO's executed layer types that compute a conv or matrix product.
_OV_LAYERS = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul",
              "FullyConnectedQuantizedLegacy", "FullyConnectedQuantized"}
_OV_INTEGER = {"u8", "i8"}


@dataclass
class Kernels:
    runtime: str  # "onnxruntime" | "openvino"
    integer_layers: int  # convs and matrix products on integer kernels
    float_layers: int  # the same computed in float
    integer_adds: int | None  # residual adds on integer kernels (ORT's QLinearAdd)
    adds: int  # the file's residual adds (both operands computed)
    weights_dequantized: int | None  # integer weight tensors turned to float on every run
    node_types: dict[str, int] = field(default_factory=dict)  # the optimized graph's nodes

    def as_dict(self) -> dict:
        return asdict(self)


def onnxruntime_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's CPU graph after all optimizations (`optimized_model_filepath`): what it runs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(path)
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(path)


def onnxruntime_kernels(model: onnx.ModelProto) -> Kernels:
    """What ORT's CPU graph runs after all optimizations, counted."""
    g = onnxruntime_optimized(model).graph
    types = collections.Counter(n.op_type for n in g.node)
    weights = {i.name for i in g.initializer if i.data_type in _WEIGHT_TYPES and len(i.dims) > 1}
    dequantized = sum(n.op_type == "DequantizeLinear" and n.input[0] in weights for n in g.node)
    return Kernels("onnxruntime", sum(types[t] for t in _ORT_INTEGER),
                   sum(types[t] for t in _ORT_FLOAT), sum(types[t] for t in _ORT_INTEGER_ADD),
                   residual_adds(model), dequantized, dict(types.most_common()))


def openvino_kernels(model: onnx.ModelProto) -> Kernels:
    """OpenVINO's CPU plugin: the layers of the compiled model as executed, by precision."""
    from abs_deploy.export.openvino_runtime import OVSession

    executed = OVSession(model).executed_layers()
    types = collections.Counter(f"{kind} ({precision})" for kind, precision in executed)
    layers = [(k, p) for k, p in executed if k in _OV_LAYERS]
    integer = sum(p in _OV_INTEGER for _, p in layers)
    return Kernels("openvino", integer, len(layers) - integer, None, residual_adds(model), None,
                   dict(types.most_common()))


def residual_adds(model: onnx.ModelProto) -> int:
    """Adds of two computed tensors (a bias add reads an initializer)."""
    inits = {i.name for i in model.graph.initializer}
    return sum(n.op_type == "Add" and not any(i in inits for i in n.input)
               for n in model.graph.node)
