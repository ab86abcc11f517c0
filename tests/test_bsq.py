import pytest
import torch
from torch import nn

from abs_deploy import bops, quant
from abs_deploy.checkpoint import load_checkpoint, save_checkpoint
from abs_deploy.search.bitplanes import MAX_MAG_BITS, MIN_MAG_BITS, to_bitplane
from abs_deploy.search.bsq import (
    TARGET_TOLERANCE,
    adapt_alpha,
    bit_group_lasso,
    bsq_search,
    recalibrate_bn,
)
from abs_deploy.search.qlayers import QConv2d
from abs_deploy.search.qmodel import model_from_checkpoint
from abs_deploy.train import TrainConfig, evaluate


def _conv(seed: int = 0, c_in: int = 4, c_out: int = 6) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, 3, padding=1)


def _with_integers(q: torch.Tensor, n_bits: int, s: float = 0.01):
    layer = to_bitplane(_conv(), n_bits)
    layer.set_integer(q, torch.tensor(s), n_bits)
    return layer


def test_bitplanes_reproduce_the_8bit_conversion_exactly():
    for m in (_conv(), nn.Linear(10, 3)):
        w = m.weight.detach().clone()
        layer = to_bitplane(m)
        s = (w.abs().flatten(1).amax(1) / (2**MAX_MAG_BITS - 1)).view(-1, *[1] * (w.dim() - 1))
        expected = quant.quantize_int(w, s, 8, True) * s
        assert layer.n_bits == 7 and layer.w_bits == 8
        assert torch.equal(layer.quant_weight().detach(), expected)
        assert torch.equal(layer.weight, expected)
        planes = torch.cat([layer.pos, layer.neg])
        assert set(planes.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("n_bits", [1, 2, 3, 5, 7])
def test_export_quantizer_at_n_plus_1_bits_gives_the_bitplane_weight(n_bits):
    torch.manual_seed(n_bits)
    limit = 2**n_bits - 1
    q = torch.randint(-limit, limit + 1, (6, 4, 3, 3)).float()
    q[0, 0, 0, 0] = limit  # full magnitude range in use
    layer = _with_integers(q, n_bits, s=0.0123)
    assert layer.w_bits == n_bits + 1
    # The integers export stores (clip as export reads it: |clip| + 1e-8, per channel).
    s = quant.scale(layer.w_clip.abs() + 1e-8, n_bits + 1, True).view(-1, 1, 1, 1)
    assert torch.equal(quant.quantize_int(layer.weight, s, n_bits + 1, True), q)
    # The fixed-bit layer fine-tune trains: same weights, up to the clip's epsilon.
    fixed = QConv2d.from_float(_conv(), n_bits + 1, 32, True)
    fixed.load_state_dict({k: v for k, v in layer.state_dict().items()
                           if k in fixed.state_dict()})
    torch.testing.assert_close(fixed.quant_weight(), layer.weight, rtol=1e-6, atol=0)


def test_every_channel_keeps_its_largest_weight_at_one_magnitude_bit():
    # Channels of very different size: a per-layer scale would round the small one to zeros,
    # and a BN folded after it would then amplify noise (see `from_float`).
    m = _conv()
    with torch.no_grad():
        m.weight[0].mul_(1e-3)
    layer = to_bitplane(m)
    for _ in range(MAX_MAG_BITS - MIN_MAG_BITS):
        layer.drop_lsb()
    assert layer.n_bits == MIN_MAG_BITS
    assert (layer.weight.flatten(1).abs().amax(1) > 0).all()


def test_dropping_all_zero_planes_changes_no_weight():
    torch.manual_seed(0)
    q = torch.randint(-15, 16, (6, 4, 3, 3)).float() * 2  # LSB and the two MSBs of 7 are 0
    q[0, 0, 0, 0] = 30
    layer = _with_integers(q, 7)
    before = layer.weight.clone()
    event = layer.requantize()
    assert (event["before"], event["after"], event["dropped_lsb"]) == (7, 4, 1)
    assert torch.equal(layer.weight, before)
    assert torch.equal(layer.quant_weight().detach(), before)


def test_overflow_raises_precision_by_one_bit_and_changes_no_weight():
    q = torch.zeros(6, 4, 3, 3)
    q[0, 0, 0, 0], q[1, 0, 0, 0] = 7, -5
    layer = _with_integers(q, 3)
    with torch.no_grad():
        layer.pos[2, 0, 0, 0, 0] = 2.0        # 7 -> 3 + 2 * 4 = 11: needs a fourth bit
    expected = torch.round(layer.integer_weight()) * layer.scale
    event = layer.requantize()
    assert event["after"] == 4 and layer.w_bits == 5 and event["saturated"] == 0
    assert torch.equal(layer.weight, expected)


def test_precision_never_exceeds_7_magnitude_bits():
    q = torch.zeros(6, 4, 3, 3)
    q[0, 0, 0, 0] = 127
    layer = _with_integers(q, 7)
    with torch.no_grad():
        layer.pos[6, 0, 0, 0, 0] = 2.0
    event = layer.requantize()
    assert event["after"] == MAX_MAG_BITS and event["saturated"] == 1
    assert layer.weight.abs().max() == 127 * layer.scale.max()


def test_a_layer_rounding_to_zero_keeps_one_bit_and_is_reported():
    q = torch.zeros(6, 4, 3, 3)
    q[0, 0, 0, 0], q[1, 1, 1, 1] = 1, -1
    layer = _with_integers(q, 2)
    with torch.no_grad():
        layer.pos.mul_(0.3)                   # 0.3 rounds to 0: every weight would vanish
        layer.neg.mul_(0.2)
    event = layer.requantize()
    assert event["zeroed"] and layer.n_bits == MIN_MAG_BITS
    assert layer.weight[0, 0, 0, 0] > 0 > layer.weight[1, 1, 1, 1]


def test_adding_a_low_plane_is_exact_and_dropping_one_halves_the_grid():
    torch.manual_seed(1)
    q = torch.randint(-7, 8, (6, 4, 3, 3)).float()
    layer = _with_integers(q, 3)
    before = layer.weight.clone()
    layer.add_lsb()
    assert layer.n_bits == 4 and torch.equal(layer.weight, before)
    layer.drop_lsb()
    layer.drop_lsb()
    assert layer.n_bits == 2
    assert (layer.weight - before).abs().max() <= layer.scale.max() / 2 + 1e-7


def test_the_regulariser_gradient_reaches_every_plane():
    layers = {"a": to_bitplane(_conv(0)), "b": to_bitplane(nn.Linear(20, 5))}
    total = sum(m.weight.numel() for m in layers.values())
    bit_group_lasso(layers, total).backward()
    for m in layers.values():
        group_grad = (m.pos.grad.pow(2) + m.neg.grad.pow(2)).flatten(1).sum(1)
        assert (group_grad > 0).all(), "a plane the group Lasso does not reach"


def test_the_task_gradient_reaches_every_positive_and_negative_plane():
    layer = to_bitplane(_conv(0), a_bits=32)
    layer(torch.randn(2, 4, 5, 5)).square().sum().backward()
    for planes in (layer.pos.grad, layer.neg.grad):
        assert (planes.abs().flatten(1).sum(1) > 0).all()


def test_layers_at_the_minimum_precision_are_not_regularised():
    layer = _with_integers(torch.ones(6, 4, 3, 3), MIN_MAG_BITS)
    assert bit_group_lasso({"a": layer}, layer.weight.numel()).item() == 0.0


def test_alpha_rises_above_the_band_and_falls_inside_or_below():
    assert adapt_alpha(1.0, 2.0, 0.0, 5) > 1.0
    assert adapt_alpha(1.0, 2.0, 1.0, 5) < 1.0            # descending too fast: ease off
    assert adapt_alpha(1.0, 1.0 + TARGET_TOLERANCE / 2, 0.1, 5) < 1.0
    assert adapt_alpha(1.0, 0.5, 0.1, 5) < adapt_alpha(1.0, 1.0, 0.1, 5)


def test_bn_statistics_are_recomputed_for_the_current_weights(digits):
    # Landing changes weights by whole planes at once; the running averages of the weights
    # before it must not survive into the checkpoint (or into fine-tune's BN fold).
    torch.manual_seed(0)
    conv = nn.Conv2d(digits.input_shape[1], 4, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(4))
    bn = model[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(7.0)
    model.eval()
    recalibrate_bn(model, digits, 256)
    with torch.no_grad():
        means = torch.stack([conv(x).mean((0, 2, 3)) for x, _ in digits.batches("train", 256)])
    # momentum=None: the plain average over batches
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    assert bn.momentum == 0.1 and not model.training


@pytest.fixture(scope="module")
def bsq_digits(fp_digits, digits):
    target = fp_digits["metrics"]["fp_bops"] / 60
    ckpt = bsq_search(fp_digits, digits, alpha=0.5, act_bits=4,
                      cfg=TrainConfig(epochs=3, lr=0.01), target_bops=target)
    return ckpt, target


def test_bsq_search_lands_within_10_percent_of_the_target(bsq_digits):
    ckpt, target = bsq_digits
    assert abs(ckpt["metrics"]["bops"] / target - 1) <= TARGET_TOLERANCE
    rows = bops.decision_bops(ckpt["decision"], ckpt["arch"], ckpt["input"]["shape"])
    assert bops.totals(rows)["bops"] == ckpt["metrics"]["bops"]


def test_bsq_checkpoint_is_a_complete_decision_export_can_read(bsq_digits, digits, tmp_path):
    ckpt, _ = bsq_digits
    assert (ckpt["stage"], ckpt["method"], ckpt["bn_folded"]) == ("searched", "bsq", False)
    state, extra = ckpt["state_dict"], ckpt["bsq"]
    mag = extra["magnitude_bits"]
    for name, d in ckpt["decision"].items():
        c_out = state[f"{name}.weight"].shape[0]
        assert d.kept == tuple(range(c_out)), "BSQ prunes no filter"
        assert state[f"{name}.w_clip"].shape == (c_out,) and f"{name}.a_clip" in state
        if name in extra["edge_layers"]:
            assert (d.w_bits, d.a_bits) == (8, 8)
            continue
        assert d.w_bits == mag[name] + 1 and d.a_bits == 4
        # The float weight is exactly what the planes represent, on the n+1-bit grid.
        n, s = mag[name], state[f"{name}.scale"]
        signed = state[f"{name}.pos"] - state[f"{name}.neg"]
        ints = (signed * (2.0 ** torch.arange(n)).view(-1, *[1] * (signed.dim() - 1))).sum(0)
        assert torch.equal(state[f"{name}.weight"], ints * s)
        assert torch.allclose(state[f"{name}.w_clip"], s.flatten() * 2**n)
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "bsq.pt"))
    model = model_from_checkpoint(loaded)
    assert evaluate(model, digits, "test") == ckpt["metrics"]["top1"]


def test_bad_search_arguments_are_one_line_user_errors(fp_digits, digits):
    from abs_deploy.errors import UserError
    for kwargs in ({"alpha": -1.0}, {"act_bits": 1}, {"requant_every": 0}):
        args = {"alpha": 0.1, "act_bits": 4, **kwargs}
        with pytest.raises(UserError):
            bsq_search(fp_digits, digits, cfg=TrainConfig(epochs=1), **args)
