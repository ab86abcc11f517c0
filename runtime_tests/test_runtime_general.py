"""Architectures written the way common libraries write them (tests/general_nets.py: VGG's
flatten into a Linear stack, view, bottlenecks, grouped convs, concatenation, squeeze-excite)
either export with parity in both ORT modes or are refused with one line naming the cause."""

import sys
from pathlib import Path

import pytest
from rt_checkpoints import random_checkpoint

from abs_deploy.checkpoint import save_checkpoint
from abs_deploy.errors import UserError
from abs_deploy.export import ExportOptions, export_model
from abs_deploy.models.registry import trusted_imports

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import general_nets  # noqa: E402  (loaded by import path "general_nets:<factory>")

# mobilenetv2_style is the zoo's MobileNetV2, which test_runtime_zoo.py already exports.
FACTORIES = [f for f in general_nets.ALL if f != "mobilenetv2_style"]
# The ones export must refuse, and the words the refusal must hold: the op, the module, and
# the list of what export writes (from the op table).
REFUSED = {"bilinear_net": ("aten.upsample_bilinear2d", "BilinearNet",
                            "aten.upsample_nearest2d")}


@pytest.fixture(autouse=True)
def trust_general_nets():
    """The checkpoints here name general_nets factories by import path; the tests wrote them,
    so they allow that code, as a user does with --model."""
    with trusted_imports(*(f"general_nets:{f}" for f in general_nets.ALL)):
        yield


@pytest.mark.parametrize("factory", FACTORIES)
def test_exports_with_parity_or_is_refused_by_name(factory, datasets, tmp_path):
    ckpt = random_checkpoint(f"general_nets:{factory}", datasets("digits32"), seed=7)
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    if factory in REFUSED:
        with pytest.raises(UserError) as refusal:
            export_model(path, ExportOptions(latency=False, max_images=32))
        message = str(refusal.value)
        assert "\n" not in message and all(w in message for w in REFUSED[factory]), message
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
        return
    result = export_model(path, ExportOptions(latency=False, max_images=32))
    assert all(p["passed"] for p in result.report["parity"].values())



def test_an_fpn_level_exports_through_nearest_upsampling(datasets, tmp_path):
    """The op table's nearest-upsample entry: the FPN level (a lateral 1x1 conv added to the
    upsampled top-down map), refused by name before the entry, passes parity in both ORT modes
    with the upsample written as one Resize (nearest)."""
    import onnx

    ckpt = random_checkpoint("general_nets:fpn_level", datasets("digits32"), seed=7)
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    result = export_model(path, ExportOptions(latency=False, max_images=32))
    parity = result.report["parity"]
    assert {"ort_unoptimized", "ort_optimized"} <= set(parity), parity
    assert all(p["passed"] for p in parity.values())
    resizes = [n for n in onnx.load(result.files["onnx"]).graph.node if n.op_type == "Resize"]
    assert len(resizes) == 1 and {a.name: a.s for a in resizes[0].attribute}["mode"] == b"nearest"


def test_an_fpn_level_passes_in_openvino(datasets, tmp_path):
    """This decision's stem reads signed 2-bit codes: written as int8 behind a Clip, OpenVINO ran
    the stem conv with halved weights on CPUs without VNNI (down.0's codes 48 apart). Stored as
    uint8 with a zero point (qdq.zero_point) it passes like ORT."""
    pytest.importorskip("openvino")
    ckpt = random_checkpoint("general_nets:fpn_level", datasets("digits32"), seed=7)
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    result = export_model(path, ExportOptions(latency=False, max_images=32,
                                              check_runtimes=("openvino",)))
    parity = result.report["parity"]
    assert {"ort_unoptimized", "ort_optimized", "openvino"} <= set(parity), parity
    assert all(p["passed"] for p in parity.values())
