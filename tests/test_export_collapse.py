import pytest
import torch
from torch import nn

from abs_deploy.checkpoint import load_checkpoint, make_checkpoint
from abs_deploy.decision import Decision
from abs_deploy.errors import UserError
from abs_deploy.export.collapse import collapse
from abs_deploy.fold import fold_bn
from abs_deploy.graph import following_norm
from abs_deploy.models.registry import arch_record, build_model
from abs_deploy.quant import REDUCED_BITS, fake_quant

ARCH = arch_record("digits_cnn")
SHAPE = [1, 1, 8, 8]


def _checkpoint(bits=(4, 4), seed=0, record_change=None, **extra) -> dict:
    """Every layer at `bits`, nothing pruned, clips from the weights and a fixed input range.
    `record_change` edits the plain decision record, which the checkpoint then holds as it is:
    what a file would hold (`load_checkpoint` reads it)."""
    torch.manual_seed(seed)
    model = build_model(ARCH).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
            m.running_mean.normal_(0, 0.1)
            m.weight.data.uniform_(0.5, 1.5)
    norms = following_norm(model, torch.zeros(SHAPE))
    state = model.state_dict()
    decision = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            signed = name == "stem"  # the normalised image is signed, the rest follow ReLUs
            decision[name] = {"w_bits": bits[0], "a_bits": bits[1], "a_signed": signed,
                              "kept": list(range(m.weight.shape[0])), "bn": norms[name]}
            state[f"{name}.w_clip"] = m.weight.abs().flatten(1).amax(1)
            state[f"{name}.a_clip"] = torch.tensor(3.0)
    spec = {"shape": SHAPE, "mean": [0.0], "std": [1.0], "dataset": "digits"}
    if record_change is not None:
        record_change(decision)
        return {**make_checkpoint("searched", ARCH, spec, 10, state, **extra),
                "decision": decision}
    return make_checkpoint("searched", ARCH, spec, 10, state,
                           Decision.from_record(decision, model), **extra)


def _training_model(ckpt: dict) -> nn.Module:
    """The searched model as training computes it: BN(conv(fq(x), fq(w)))."""
    model = build_model(ARCH).eval()
    model.load_state_dict(ckpt["state_dict"], strict=False)
    state = ckpt["state_dict"]
    for name, d in ckpt["decision"].items():
        layer = model.get_submodule(name)
        if d.w_bits < 32:
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            clip = (state[f"{name}.w_clip"].abs() + 1e-8).view(shape)
            layer.weight.data = fake_quant(layer.weight.data, clip, d.w_bits, True)
        if d.a_bits < 32:
            a_clip = state[f"{name}.a_clip"].abs() + 1e-8
            layer.register_forward_pre_hook(
                lambda m, i, a=a_clip, d=d: (fake_quant(i[0], a, d.a_bits, d.a_signed),))
    return model


@pytest.mark.parametrize("bits", [(4, 32), (32, 4), (2, 32)])
def test_reference_computes_what_training_computed(bits):
    ckpt = _checkpoint(bits)
    x = torch.randn(64, *SHAPE[1:])
    with torch.no_grad():
        ref = collapse(ckpt).reference(x)
        train = _training_model(ckpt)(x)
    assert (ref - train).abs().max() <= 1e-5 * train.abs().max()


def test_int32_bias_moves_a_layer_output_by_at_most_half_an_accumulator_step():
    """With both tensors quantized the bias is stored as int32 at scale s_x * s_w: the only
    difference to training, a layer's output moves by at most half of that scale."""
    ckpt = _checkpoint((4, 4))
    x = torch.randn(64, *SHAPE[1:])
    col = collapse(ckpt)
    train = _training_model(ckpt)
    with torch.no_grad():
        ref = col.reference.stem(x)
        expected = train.bn(train.stem(x))
    stem = col.reference.stem
    half = (0.5 * stem.a_scale * stem.w_scale).view(1, -1, 1, 1)
    assert ((ref - expected).abs() <= half + 1e-6).all()


def test_weights_are_folded_then_quantized_with_the_clip_scaled_by_bn():
    ckpt = _checkpoint((4, 4))
    col = collapse(ckpt)
    fp = build_model(ARCH).eval()
    fp.load_state_dict(ckpt["state_dict"], strict=False)
    _, _, k = fold_bn(fp.stem.weight, None, fp.bn)
    stem = col.reference.stem
    assert stem.weight.abs().max() <= 8 and torch.equal(stem.weight, stem.weight.round())
    scale = (ckpt["state_dict"]["stem.w_clip"] + 1e-8) * k.abs() / 8
    assert torch.allclose(stem.w_scale, scale)
    assert isinstance(col.reference.bn, nn.Identity)


def test_eight_bit_weights_meeting_eight_bit_or_signed_inputs_keep_seven_bits():
    col = collapse(_checkpoint((8, 8)))
    assert all(lq.w_store_bits == REDUCED_BITS for lq in col.layers.values())
    assert col.reference.head.weight.abs().max() <= 64
    assert all(lq.w_store_bits == 8
               for lq in collapse(_checkpoint((8, 4))).layers.values() if not lq.a_signed)
    assert collapse(_checkpoint((8, 8)), reduce_range=False).layers["head"].w_store_bits == 8


def test_masked_channels_are_zero_in_every_model_but_the_original():
    ckpt = _checkpoint((4, 4))
    ckpt["decision"] = ckpt["decision"].replace("block1.conv1", kept=(0, 2, 5))
    col = collapse(ckpt)
    for model in (col.masked_float, col.reference):
        layer = model.get_submodule("block1.conv1")
        assert layer.weight[1].abs().sum() == 0 and layer.bias[1] == 0
    assert col.original.block1.conv1.weight[1].abs().sum() > 0


@pytest.mark.parametrize("change,message", [
    (lambda r: r.pop("fc"), "no entry for layer 'fc'"),
    (lambda r: r.update(extra=dict(r["fc"])), "'extra'"),
    (lambda r: r["fc"].update(kept=[3, 1]), "sorted"),
    (lambda r: r["fc"].update(kept=[]), "empty"),
    (lambda r: r["head"].update(a_bits=1), "a_bits"),
])
def test_a_decision_record_that_does_not_fit_is_refused_when_the_file_is_read(
        change, message, tmp_path):
    """Every stage reads the decision through `load_checkpoint`, which checks it once."""
    torch.save(_checkpoint(record_change=change), tmp_path / "bad.pt")
    with pytest.raises(UserError, match=f"bad.pt: .*{message}") as err:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(err.value)


def test_a_bn_that_is_not_the_one_after_its_layer_is_refused_by_export():
    """Only a graph capture tells which BatchNorm follows a layer: export's check."""
    ckpt = _checkpoint()
    ckpt["decision"] = ckpt["decision"].replace("head", bn="bn")
    with pytest.raises(UserError, match="bn is 'bn' but the BatchNorm directly after head is "
                                        "'bn_head'"):
        collapse(ckpt)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(stage="fp"), "searched or finetuned"),
    (lambda c: c.update(decision=Decision()), "no decision record"),
    (lambda c: c["state_dict"].pop("head.w_clip"), "head.w_clip"),
    (lambda c: c["state_dict"].pop("head.weight"), "lacks"),
    (lambda c: c["state_dict"].update({"ghost.weight": torch.zeros(1)}), "ghost.weight"),
    (lambda c: c.update(input={"shape": [8, 8]}), "input shape"),
])
def test_a_checkpoint_that_does_not_fit_is_one_user_error(change, message):
    ckpt = _checkpoint()
    change(ckpt)
    with pytest.raises(UserError, match=message):
        collapse(ckpt)
