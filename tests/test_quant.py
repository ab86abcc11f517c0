import pytest
import torch
from torch import nn

from abs_deploy.quant import CLIP_EPS, fake_quant, int_range, quantize_int, scale
from abs_deploy.search.qlayers import QConv2d, mse_weight_clip
from abs_deploy.search.qmodel import calibrate, quantize_model


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_integer_codes_stay_in_range(bits, signed):
    x = torch.randn(10_000) * 5
    q = quantize_int(x, scale(torch.tensor(1.0), bits, signed), bits, signed)
    lo, hi = int_range(bits, signed)
    assert q.min() >= lo and q.max() <= hi and torch.equal(q, q.round())
    assert q.min() == lo and q.max() == hi   # the range is used, not just respected


@pytest.mark.parametrize("signed", [True, False])
def test_zero_is_exactly_representable(signed):
    out = fake_quant(torch.zeros(5), torch.tensor(0.37), 3, signed)
    assert torch.equal(out, torch.zeros(5))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("low,high", [(2, 4), (4, 8), (2, 8), (3, 6), (6, 8)])
def test_low_bit_levels_are_high_bit_levels(low, high, signed):
    clip = torch.tensor(0.8)
    lo, hi = int_range(low, signed)
    levels = torch.arange(lo, hi + 1, dtype=torch.float32) * scale(clip, low, signed)
    requantized = fake_quant(levels, clip, high, signed)
    assert torch.equal(requantized, levels)


def test_gradients_reach_the_clip_and_pass_straight_through_inside_the_range():
    clip = torch.tensor(1.0, requires_grad=True)
    x = (torch.randn(1000) * 2).requires_grad_()
    fake_quant(x, clip, 4, True).sum().backward()
    assert clip.grad is not None and clip.grad.abs() > 0
    # 4-bit signed, clip 1: codes -8..7 at step 1/8, so inputs outside [-1, 0.875] saturate.
    xs = x.detach()
    inside = (xs > -0.99) & (xs < 0.86)
    outside = (xs < -1.07) | (xs > 0.94)
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(x.grad[outside], torch.zeros(int(outside.sum())))


def test_qconv_computes_conv_of_quantized_input_weight_and_accumulator_bias():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    q = QConv2d.from_float(conv, 4, 4, False)
    x = torch.rand(2, 3, 5, 5)
    # The clips as the layer uses them: |clip| + CLIP_EPS, which moves a float32 weight clip,
    # so a reference without it lands on the other side of a rounding now and then.
    a_clip, w_clip = q.a_clip.abs() + CLIP_EPS, q.w_clip.abs() + CLIP_EPS
    xq = fake_quant(x, a_clip, 4, False)
    wq = fake_quant(conv.weight, w_clip.view(-1, 1, 1, 1), 4, True)
    s_acc = scale(a_clip, 4, False) * scale(w_clip, 4, True)   # the int32 bias grid
    bq = torch.round(conv.bias / s_acc) * s_acc
    assert not torch.equal(bq, conv.bias)
    assert torch.allclose(q(x), nn.functional.conv2d(xq, wq, bq, padding=1))


def test_mse_clip_beats_max_clip_at_two_bits():
    w = torch.randn(8, 64)
    w[:, 0] = 6.0   # an outlier per channel
    best = mse_weight_clip(w, 2)
    def err(c):
        return (fake_quant(w, c.view(-1, 1), 2, True) - w).pow(2).mean()
    assert err(best) < err(w.abs().amax(1))


def test_calibration_makes_inputs_after_relu_unsigned():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    quantize_model(model, {"0": (8, 8), "2": (4, 4)})
    calibrate(model, [torch.randn(8, 1, 6, 6)])
    assert model[0].a_signed and not model[2].a_signed
    assert model[2].a_clip.item() > 0
