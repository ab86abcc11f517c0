"""Export (DESIGN §9-10): collapse, prune, QCDQ ONNX, simplify, validate in ONNX Runtime, report.

`export_model(checkpoint, ExportOptions(...)) -> ExportResult` is the whole path;
`validate_file(path, dataset)` checks an exported file on its own.
"""

from abs_deploy.export.errors import ExportFailed
from abs_deploy.export.pipeline import ExportOptions, ExportResult, export_model, validate_file

__all__ = ["ExportFailed", "ExportOptions", "ExportResult", "export_model", "validate_file"]
