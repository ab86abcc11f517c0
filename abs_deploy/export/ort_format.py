"""The `.ort` file ONNX Runtime Mobile loads, made and checked the way ORT's own converter
(`python -m onnxruntime.tools.convert_onnx_models_to_ort`) makes it by default: the "fixed"
optimization style, every graph optimization applied ahead of time except the NCHWc layout
transform, which is x86-only and would tie the file to this machine's CPU family."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from abs_deploy.export.errors import ExportFailed
from abs_deploy.export.parity import Agreement
from abs_deploy.export.validate import FULL_TOP1_AGREEMENT, Batches, session
from abs_deploy.progress import Progress, no_progress


@dataclass
class OrtFormatParity:
    images: int = 0
    accuracy: float = 0.0
    top1_agreement: float = 0.0  # with the PyTorch reference
    onnx_top1_agreement: float = 0.0  # with the .onnx file in ORT, all optimizations
    onnx_logits_rel: float = 0.0  # max |ort - onnx| / max |onnx|
    bytes: int = 0
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def convert(model: onnx.ModelProto, path: Path) -> Path:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(path)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["NchwcTransformer"])
    except Exception as e:  # ORT raises its own exception types from C++
        raise ExportFailed("ONNX Runtime cannot write the .ort file: "
                           f"{str(e).strip().splitlines()[0][:240]}") from e
    if not path.is_file():
        raise ExportFailed(f"ONNX Runtime wrote no .ort file at {path}")
    return path


@torch.no_grad()
def check(path: Path, model: onnx.ModelProto, reference: nn.Module, batches: Batches,
          progress: Progress = no_progress) -> OrtFormatParity:
    """The .ort file run in ORT against the reference (the criterion of ORT's optimized mode:
    top-1 agreement) and against the .onnx it came from (the same kernels: same logits)."""
    mobile = session(path.read_bytes(), optimize=True)
    full = session(model, optimize=True)
    r = OrtFormatParity(bytes=path.stat().st_size)
    vs_reference, vs_onnx = Agreement(), Agreement()
    reference.eval()
    for x, y in progress(batches, len(batches), "validate .ort"):
        feed = {"input": x.numpy()}
        got, want = mobile.run(None, feed)[0], full.run(None, feed)[0]
        vs_reference.add(got, reference(x).numpy(), y.numpy())
        vs_onnx.add(got, want, y.numpy())
    r.images = vs_reference.images
    r.accuracy, r.top1_agreement = vs_reference.accuracy, vs_reference.top1_agreement
    r.onnx_top1_agreement, r.onnx_logits_rel = vs_onnx.top1_agreement, vs_onnx.logits_rel
    if r.top1_agreement < FULL_TOP1_AGREEMENT:
        r.failure = (f".ort file: top-1 agreement with the reference "
                     f"{100 * r.top1_agreement:.2f}% (needs {100 * FULL_TOP1_AGREEMENT:g}%)")
    return r
