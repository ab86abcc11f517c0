"""Simplify with onnxsim, then prove that no quantizer was lost (DESIGN §9): every
QuantizeLinear, DequantizeLinear and Clip must still be there, under its name."""

from __future__ import annotations

import onnx
import onnxsim

from abs_deploy.export.errors import ExportFailed

KEPT_OPS = ("QuantizeLinear", "DequantizeLinear", "Clip")
# Two layers reading one tensor through identical quantizers (a block's conv and its shortcut
# with equal clips) would share one merged quantizer: valid, but each layer's quantizer is
# named after it and its bits, so it stays.
SKIPPED = ["eliminate_common_subexpression"]


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    before = quantizer_nodes(model)
    try:
        simplified, ok = onnxsim.simplify(model, certify=False, skipped_optimizers=SKIPPED)
    except Exception as e:  # onnxsim raises its own and onnx's error types
        raise ExportFailed(f"onnxsim failed: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:200]}") from e
    if not ok:
        raise ExportFailed("onnxsim's own check of the simplified model failed")
    lost = sorted(before - quantizer_nodes(simplified))
    if lost:
        raise ExportFailed(f"onnxsim removed {len(lost)} quantizer node(s), first "
                           f"{lost[0][1]} ({lost[0][0]}); use --no-simplify")
    # Our metadata (the decision) goes over as it was, whatever onnxsim did to it.
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(simplified, full_check=True)
    return simplified


def quantizer_nodes(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(n.op_type, n.name) for n in model.graph.node if n.op_type in KEPT_OPS}
