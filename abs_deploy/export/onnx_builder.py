"""Nodes and initializers collected under unique names: what the ATen translator
(`onnx_graph.py`) and the quantizer writer (`qdq.py`) both write into."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Collects nodes and initializers under unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def initializer(self, name: str, value: np.ndarray | TensorProto) -> str:
        name = self.unique(name)
        if isinstance(value, TensorProto):
            value.name = name
            self.initializers.append(value)
        else:
            self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1,
             **attrs: object) -> str:
        """Add a node; its name and (single) output tensor share one unique name, returned."""
        name = self.unique(name)
        outs = [name if outputs == 1 else f"{name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0]
