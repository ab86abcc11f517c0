"""abs-deploy: mixed-precision search and integer ONNX export for CNNs."""

__version__ = "0.1.0"
