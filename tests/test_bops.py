import pytest

from abs_deploy import bops
from abs_deploy.models import create_model


@pytest.fixture(scope="module")
def r20_costs():
    return bops.layer_costs(create_model("resnet20", num_classes=100), (1, 3, 32, 32))


def test_fp_resnet20_cifar100_bops_match_published(r20_costs):
    total = bops.totals(bops.bops_table(r20_costs))["bops"]
    assert round(total / 1e6, 1) == 41798.6


def test_resnet20_4bit_middle_8bit_edges_bops_match_published(r20_costs):
    rows = bops.bops_table(r20_costs, bops.default_bits(r20_costs, 4, 4))
    assert round(bops.totals(rows)["bops"] / 1e6, 1) == 674.6
    assert (rows[0].w_bits, rows[-1].a_bits, rows[1].w_bits) == (8, 8, 4)


def test_pruning_scales_producer_outputs_and_consumer_inputs(r20_costs):
    conv = next(c for c in r20_costs if c.name == "layer1.0.conv2")
    assert conv.macs_kept(out_kept=8, in_kept=4) == conv.macs // 2 // 4


def test_depthwise_macs_scale_with_kept_channels_only():
    costs = bops.layer_costs(create_model("digits_cnn"), (1, 1, 8, 8))
    dw = next(c for c in costs if c.name == "block2.dw")
    assert dw.macs_kept(out_kept=dw.c_out // 2, in_kept=1) == dw.macs // 2


@pytest.mark.parametrize("text,expected", [("0.05", 50.0), ("20x", 50.0), ("35M", 35e6),
                                           ("1.2G", 1.2e9), ("700", 700.0)])
def test_parse_bops_accepts_ratio_factor_and_counts(text, expected):
    assert bops.parse_bops(text, 1000.0) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["abc", "-3", "0x", ""])
def test_parse_bops_rejects_nonsense(text):
    with pytest.raises(ValueError):
        bops.parse_bops(text, 1000.0)
