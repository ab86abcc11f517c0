"""The uniform QAT baseline end to end on the embedded digits data."""

import torch

from abs_deploy import bops
from abs_deploy.checkpoint import load_checkpoint, save_checkpoint
from abs_deploy.search.qlayers import QUANT_TYPES
from abs_deploy.search.qmodel import model_from_checkpoint
from abs_deploy.search.uniform import uniform_qat
from abs_deploy.train import TrainConfig, evaluate


def test_fp_digits_cnn_reaches_97_percent(fp_digits):
    assert fp_digits["metrics"]["top1"] >= 0.97


def test_uniform_4bit_stays_within_1_5_points_and_records_a_full_decision(
        fp_digits, digits, tmp_path):
    ck = uniform_qat(fp_digits, digits, 4, 4, TrainConfig(epochs=6, lr=0.01))
    assert ck["stage"] == "searched" and ck["method"] == "uniform"
    assert ck["metrics"]["top1"] >= fp_digits["metrics"]["top1"] - 0.015
    dec = ck["decision"]
    names = list(dec)
    assert (dec[names[0]].w_bits, dec[names[-1]].a_bits) == (8, 8)
    assert all((dec[n].w_bits, dec[n].a_bits) == (4, 4) for n in names[1:-1])
    assert dec["block1.conv1"].bn == "block1.bn1" and not dec["block1.conv2"].a_signed
    assert dec["stem"].a_signed   # normalised image input has negative values
    costs = bops.layer_costs(model_from_checkpoint(fp_digits), (1, 1, 8, 8))
    expected = bops.totals(bops.bops_table(costs, bops.default_bits(costs, 4, 4)))["bops"]
    assert ck["metrics"]["bops"] == expected

    # The saved checkpoint rebuilds into the same quantized model with the same accuracy.
    path = save_checkpoint(ck, tmp_path / "u.pt")
    model = model_from_checkpoint(load_checkpoint(path))
    assert sum(isinstance(m, QUANT_TYPES) for m in model.modules()) == len(names)
    assert evaluate(model, digits, "test") == ck["metrics"]["top1"]
    assert evaluate(model, digits, "val") == ck["metrics"]["val_top1"]
    assert ck["metrics"]["splits"]["top1"] == "test"


def test_two_bit_weights_land_on_four_levels(fp_digits, digits):
    ck = uniform_qat(fp_digits, digits, 2, 4, TrainConfig(epochs=1, lr=0.01))
    model = model_from_checkpoint(ck)
    layer = model.block1.conv1
    w = layer.quant_weight().detach()
    per_channel = [torch.unique(w[c]).numel() for c in range(w.shape[0])]
    assert max(per_channel) <= 4


def test_finetuned_model_computes_what_export_stores(fp_digits, digits):
    """Fine-tune trains the deployable form, so export's integer reference is the same function:
    the 7-bit rule and the int32 bias rounding are shared by both sides."""
    from abs_deploy.export.collapse import collapse
    from abs_deploy.search.finetune import finetune

    searched = uniform_qat(fp_digits, digits, 4, 2, TrainConfig(epochs=1, lr=0.01))
    tuned = finetune(searched, digits, TrainConfig(epochs=1, lr=0.005))
    model = model_from_checkpoint(tuned).eval()
    ref = collapse(tuned).reference.eval()
    x = torch.cat([b for b, _ in digits.batches("val", 512)])
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
