import pytest
import torch
from torch import nn

from abs_deploy.models import create_model
from abs_deploy.quant import fake_quant
from abs_deploy.search.abs_search import to_superbit
from abs_deploy.search.superbit import (
    SuperBitConv2d,
    SuperBitLinear,
    bits_from_gates,
    filter_gate,
    nested_reference,
    step_ste,
    super_quant,
)


def _inputs(signed: bool, per_channel: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 5, generator=gen) * 1.5
    if not signed:
        x = x.relu()
    clip = torch.rand(6, 1, 1, 1, generator=gen) + 0.3 if per_channel else torch.tensor(1.3)
    return x, clip


CASES = [(True, True), (True, False), (False, False)]   # weights, signed act, unsigned act


@pytest.mark.parametrize("signed,per_channel", CASES)
def test_all_gates_open_equals_q8(signed, per_channel):
    x, clip = _inputs(signed, per_channel)
    gates = torch.ones(2)
    assert torch.equal(nested_reference(x, clip, gates, (2, 4, 8), signed),
                       fake_quant(x, clip, 8, signed))
    assert torch.equal(super_quant(x, clip, gates, (2, 4, 8), signed),
                       fake_quant(x, clip, 8, signed))


@pytest.mark.parametrize("signed,per_channel", CASES)
def test_g8_closed_equals_q4(signed, per_channel):
    x, clip = _inputs(signed, per_channel)
    gates = torch.tensor([1.0, 0.0])
    assert torch.equal(nested_reference(x, clip, gates, (2, 4, 8), signed),
                       fake_quant(x, clip, 4, signed))
    assert torch.equal(super_quant(x, clip, gates, (2, 4, 8), signed),
                       fake_quant(x, clip, 4, signed))


@pytest.mark.parametrize("signed,per_channel", CASES)
def test_g4_closed_equals_q2_whatever_g8(signed, per_channel):
    x, clip = _inputs(signed, per_channel)
    for g8 in (0.0, 1.0):
        gates = torch.tensor([0.0, g8])
        assert torch.equal(nested_reference(x, clip, gates, (2, 4, 8), signed),
                           fake_quant(x, clip, 2, signed))
        assert torch.equal(super_quant(x, clip, gates, (2, 4, 8), signed),
                           fake_quant(x, clip, 2, signed))


@pytest.mark.parametrize("signed,per_channel", CASES)
def test_any_ascending_candidate_set_nests(signed, per_channel):
    x, clip = _inputs(signed, per_channel)
    bits = (2, 3, 4, 6, 8)
    for level, b in enumerate(bits):
        gates = (torch.arange(4) < level).float()
        assert torch.equal(nested_reference(x, clip, gates, bits, signed),
                           fake_quant(x, clip, b, signed))


@pytest.mark.parametrize("signed,per_channel", CASES)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_fast_quantizer_gradients_equal_the_nested_decomposition(signed, per_channel, level):
    x, clip = _inputs(signed, per_channel)
    gates = (torch.arange(2) < level).float()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (super_quant, nested_reference):
        xs, cs, gs = (t.clone().requires_grad_() for t in (x, clip, gates))
        (fn(xs, cs, gs, (2, 4, 8), signed) * upstream).sum().backward()
        grads.append((xs.grad, cs.grad, gs.grad))
    for fast, ref in zip(*grads, strict=True):
        assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4)


def test_gate_is_hard_forward_and_sigmoid_backward():
    r = torch.tensor([0.1, 0.3], requires_grad=True)
    g = step_ste(torch.tensor([0.2, 0.2]) - r)
    assert g.tolist() == [1.0, 0.0]
    g.sum().backward()
    z = (torch.tensor([0.2, 0.2]) - r.detach()) / 0.1
    expected = -torch.sigmoid(z) * (1 - torch.sigmoid(z)) / 0.1
    assert torch.allclose(r.grad, expected)


def test_bits_telescope_from_gates():
    bits = (2, 4, 8)
    assert bits_from_gates(torch.tensor([1.0, 1.0]), bits).item() == 8
    assert bits_from_gates(torch.tensor([1.0, 0.0]), bits).item() == 4
    assert bits_from_gates(torch.tensor([0.0, 1.0]), bits).item() == 2


def test_thresholds_start_at_zero_so_layers_start_at_top_bits():
    conv = SuperBitConv2d.from_float(nn.Conv2d(3, 8, 3))
    lin = SuperBitLinear.from_float(nn.Linear(8, 4))
    for m in (conv, lin):
        assert m.w_thr.abs().sum() == 0 and m.a_thr.abs().sum() == 0
        assert (m.w_bits, m.a_bits) == (8, 8)


def test_layer_state_keys_are_the_float_keys_plus_clips_and_gates_under_its_prefix():
    conv = SuperBitConv2d.from_float(nn.Conv2d(3, 8, 3, bias=True))
    keys = set(conv.state_dict())
    assert {"weight", "bias", "w_clip", "a_clip", "w_thr", "a_thr"} <= keys
    assert conv.w_clip.shape == (8,) and conv.a_clip.dim() == 0


def test_filter_gate_never_prunes_more_than_max_prune_and_keeps_one():
    norms = torch.linspace(0.1, 1.0, 10)
    assert filter_gate(norms, torch.tensor(2.0), 0.5).sum().item() == 5
    assert filter_gate(torch.rand(1), torch.tensor(2.0), 0.9).sum().item() == 1
    assert filter_gate(norms, torch.tensor(0.0), 0.5).sum().item() == 10


@pytest.mark.parametrize("train_mode", [True, False])
def test_closed_filter_gate_gives_exactly_zero_channels_after_bn(train_mode):
    torch.manual_seed(0)
    model = create_model("digits_cnn")
    net = to_superbit(model, torch.zeros(1, 1, 8, 8), max_prune=0.5)
    group = net.group_of["block1.conv1"]
    with torch.no_grad():
        net.layers[group.owner].f_thr.fill_(1.0)
    seen = {}
    model.block1.bn1.register_forward_hook(lambda m, i, o: seen.setdefault("bn", o))
    model.train(train_mode)
    model(torch.randn(4, 1, 8, 8))
    kept = net.kept()["block1.conv1"]
    pruned = sorted(set(range(16)) - set(kept))
    assert len(pruned) == 8
    assert torch.equal(seen["bn"][:, pruned], torch.zeros_like(seen["bn"][:, pruned]))
    assert seen["bn"][:, kept].abs().sum() > 0


@pytest.mark.parametrize("signed,per_channel", CASES)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_superbit_clip_learns_as_the_fixed_bit_quantizer_of_its_level(signed, per_channel,
                                                                      level):
    """The search path and QAT/fine-tune train a clip alike: at hard gates the super-bit
    quantizer's clip gradient is `fake_quant`'s at the selected bits, LSQ's scale included
    (without it the search's clips moved sqrt(elements x top code) times faster)."""
    x, clip = _inputs(signed, per_channel)
    gates = (torch.arange(2) < level).float()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (lambda xs, cs: super_quant(xs, cs, gates, (2, 4, 8), signed),
               lambda xs, cs: fake_quant(xs, cs, (2, 4, 8)[level], signed)):
        xs, cs = x.clone().requires_grad_(), clip.clone().requires_grad_()
        (fn(xs, cs) * upstream).sum().backward()
        grads.append((xs.grad, cs.grad))
    for fast, ref in zip(*grads, strict=True):
        assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-6)


def test_unscaled_clip_path_is_the_raw_lsq_gradient():
    """`lsq_scale=False` (the ablation's old path) gives the clip the unscaled gradient."""
    x, clip = _inputs(True, False)
    gates = torch.ones(2)
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for scaled in (True, False):
        cs = clip.clone().requires_grad_()
        (super_quant(x, cs, gates, (2, 4, 8), True, lsq_scale=scaled) * up).sum().backward()
        grads.append(cs.grad)
    top = 2 ** 7 - 1
    assert torch.allclose(grads[0] * (x.numel() * top) ** 0.5, grads[1], rtol=1e-4)


def _tracked(x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    conv = SuperBitConv2d.from_float(nn.Conv2d(x.shape[1], 4, 3))
    conv.train()
    conv(x)
    return conv.a_m.clone()


def test_activation_residuals_ignore_pruned_input_channels():
    """A pruned channel in front is exactly zero; the gate statistic `a_m` is the same with 12
    of 16 input channels zeroed as for the 4 live ones alone (counted, it fell to a quarter and
    closed the layer's bit gates because its producer was pruned)."""
    x = torch.randn(8, 4, 6, 6).relu() * 3
    padded = torch.zeros(8, 16, 6, 6)
    padded[:, ::4] = x
    live_only, with_zeros = _tracked(x), _tracked(padded)
    assert torch.allclose(live_only, with_zeros, rtol=1e-5)
    assert (live_only > 0).all()
