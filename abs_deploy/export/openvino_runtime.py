"""OpenVINO's CPU plugin as a second runtime for the exported files (an optional extra:
`pip install 'abs-deploy[openvino]'`).

OpenVINO reads the QCDQ ONNX as it is: its ONNX front end turns each QuantizeLinear ->
Clip -> DequantizeLinear into a FakeQuantize, and its low-precision transformations run the
layers between them with integer kernels. `OVSession` gives a compiled model the two methods
of an ONNX Runtime session that validation and latency use (`get_inputs`, `run`), so both
runtimes go through the same checks and the same timing loop.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import onnx

from abs_deploy.errors import UserError
from abs_deploy.export.errors import ExportFailed
from abs_deploy.export.qdq import quantizer_of

RUNTIMES = ("onnxruntime", "openvino")


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def require() -> None:
    if not available():
        raise UserError("OpenVINO is not installed; install the extra: "
                        "pip install 'abs-deploy[openvino]'")


@dataclass
class _Input:
    name: str


class OVSession:
    """One ONNX model compiled for OpenVINO's CPU plugin (f32 precision hint: the integer
    layers come from the file's Q/DQ, not from a lowered float precision)."""

    def __init__(self, model: onnx.ModelProto, threads: int | None = None,
                 profile: bool = False) -> None:
        require()
        import openvino as ov

        data = model.SerializeToString()
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY",
                                     "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if profile:
            config["PERF_COUNT"] = True
        try:
            core = ov.Core()
            read = core.read_model(data)
            operands = residual_add_operands(model)
            if operands:
                read.add_outputs(operands)
            self._compiled = core.compile_model(read, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses from C++
            raise ExportFailed("OpenVINO cannot load the model: "
                               f"{str(e).strip().splitlines()[0][:240]}") from e
        self._request = self._compiled.create_infer_request()
        self._inputs = [_Input(p.get_any_name()) for p in self._compiled.inputs]
        # Outputs in the ONNX graph's order, found by name: run() returns them like ORT does.
        by_name = {}
        for port in self._compiled.outputs:
            for n in port.get_names():
                by_name[n] = port
        self._outputs = [by_name[o.name] for o in model.graph.output]

    def get_inputs(self) -> list[_Input]:
        return self._inputs

    def run(self, output_names: object, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # Shared, then copied by hand: `infer` would copy every output, the extra ones
        # `residual_add_operands` adds too (measured: 1.4x the run at batch 32).
        self._request.infer(feed, share_outputs=True)
        return [np.array(self._request.get_tensor(port).data, copy=True)
                for port in self._outputs]

    def last_run_profile(self) -> list[tuple[str, float]]:
        """("node type [kernel]", microseconds) of every node the last `run` executed (needs
        `profile=True`)."""
        return [(f"{i.node_type} [{i.exec_type}]", i.real_time.total_seconds() * 1e6)
                for i in self._request.get_profiling_info() if i.status == i.Status.EXECUTED]

    def executed_layers(self) -> list[tuple[str, str]]:
        """(layer type, precision) of every layer of the compiled model as the plugin runs it."""
        out = []
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            out.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str)))
        return out


def residual_add_operands(model: onnx.ModelProto) -> list[str]:
    """The integer codes of every residual-add operand that a conv's output quantizer makes
    (an Add reading two DequantizeLinear outputs, streams.py), which `OVSession` makes outputs
    of the compiled model so that OpenVINO computes the add exactly. Anyone deploying such a
    file on OpenVINO's CPU plugin must do the same: `model.add_outputs(residual_add_operands(m))`
    on the `ov.Model` before `compile_model`.

    Why: the plugin fuses Conv -> FakeQuantize (the stream's Q/DQ on the conv's output) ->
    Add -> FakeQuantize into one int8 convolution with a "sum" post-op, and when that
    FakeQuantize is the conv's first post-op with a sum and another FakeQuantize after it, it
    drops its rounding (Convolution / DnnlPostOpsComposer, "drop rounding one special residual
    pattern / TODO: validate this unsafe optimization"; measured with OpenVINO 2026.4 on a
    three-conv model, benchmarks/openvino_profile.py: 97% of the add's codes equal, the rest
    1 apart; ResNet-20 top-1 agreement 70%). No configuration turns that off, and no other
    form of the same integers tried there avoids it (float Clip, int8 codes, equal scales,
    swapped operands, a - (-b)). A second reader of the conv's output keeps the FakeQuantize
    as its last post-op, which rounds, and the Add runs as its own Eltwise on u8 codes: every
    conv still on integer kernels, codes exact. The codes (not their float values) and only
    the conv-made operand: the extra output is then a u8 copy, and no float Convert/Subtract
    is computed for it (measured: 1.5x faster than both operands' float values at batch 32)."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        producers = [made_by.get(i) for i in node.input]
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in producers):
            continue
        for dq in producers:
            codes = dq.input[0]
            quantize = quantizer_of(made_by, codes)
            source = made_by.get(quantize.input[0]) if quantize is not None else None
            if (source is not None and source.op_type == "Conv" and codes not in outputs
                    and codes not in names):
                names.append(codes)
    return names


def device_name() -> str:
    require()
    import openvino as ov

    cpu = ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    return f"OpenVINO {ov.__version__.split('-')[0]} CPU plugin ({cpu})"
