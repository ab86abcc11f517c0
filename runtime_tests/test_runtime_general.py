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
# The ones export must refuse, and the words the refusal must hold: the op and the module.
REFUSED = {"upsample_net": ("aten.upsample_nearest2d", "UpsampleNet"),
           "fpn_level": ("aten.upsample_nearest2d", "FPNLevel")}


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
