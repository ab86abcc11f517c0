import dataclasses

import pytest
import torch

from abs_deploy import streams
from abs_deploy.errors import UserError
from abs_deploy.search.abs_search import abs_search
from abs_deploy.search.finetune import finetune
from abs_deploy.search.qmodel import model_from_checkpoint
from abs_deploy.search.uniform import uniform_qat
from abs_deploy.train import TrainConfig, evaluate


@pytest.fixture(scope="module")
def small_digits(digits):
    return dataclasses.replace(digits, train_x=digits.train_x[:256],
                               train_y=digits.train_y[:256])


@pytest.fixture(scope="module")
def abs_searched(fp_digits, small_digits):
    target = fp_digits["metrics"]["fp_bops"] / 64
    ckpt = abs_search(fp_digits, small_digits, target, TrainConfig(epochs=2, lr=0.01),
                      refine_epochs=0)
    # Prune one group by hand so the masks are exercised whatever the short search chose.
    d = ckpt["decision"]
    if len(d["block1.conv1"].kept) == 16:
        ckpt["decision"] = d.replace("block1.conv1", kept=tuple(range(12)))
    return ckpt


def test_folding_bn_keeps_the_searched_accuracy(abs_searched, small_digits):
    """Fine-tune starts where search ended: the folded model computes the same function."""
    model = model_from_checkpoint(abs_searched)
    before = evaluate(model, small_digits, "test")
    tuned = finetune(abs_searched, small_digits, TrainConfig(epochs=1, lr=0.01))
    assert tuned["metrics"]["start_top1"] == pytest.approx(before, abs=1 / 360)


def test_finetuned_checkpoint_is_bn_folded_and_loads_back(abs_searched, small_digits):
    tuned = finetune(abs_searched, small_digits, TrainConfig(epochs=1, lr=0.01))
    assert tuned["stage"] == "finetuned" and tuned["bn_folded"] is True
    assert tuned["method"] == "abs"
    assert tuned["decision"] == abs_searched["decision"]
    assert not any(k.startswith("block1.bn1.") for k in tuned["state_dict"])
    assert "block1.conv1.bias" in tuned["state_dict"]
    for key in ("top1", "bops", "fp_bops", "fp_top1"):
        assert key in tuned["metrics"]
    model = model_from_checkpoint(tuned)
    assert evaluate(model, small_digits, "test") == pytest.approx(tuned["metrics"]["top1"])


def test_pruned_channels_stay_exactly_zero_after_finetune(abs_searched, small_digits):
    tuned = finetune(abs_searched, small_digits, TrainConfig(epochs=1, lr=0.01))
    model = model_from_checkpoint(tuned).eval()
    seen = {}
    model.block1.conv1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        model(next(small_digits.batches("val", 32))[0])
    pruned = sorted(set(range(16)) - set(tuned["decision"]["block1.conv1"].kept))
    assert pruned
    # attach_masks puts the mask on the layer itself once BN is folded away.
    assert seen["out"][:, pruned].abs().max() == 0


def test_finetune_accepts_a_uniform_searched_checkpoint(fp_digits, small_digits):
    searched = uniform_qat(fp_digits, small_digits, 4, 4, TrainConfig(epochs=1, lr=0.01))
    tuned = finetune(searched, small_digits, TrainConfig(epochs=1, lr=0.01))
    assert tuned["method"] == "uniform" and tuned["bn_folded"]


def test_finetune_refuses_an_fp_checkpoint(fp_digits, small_digits):
    with pytest.raises(UserError, match="searched"):
        finetune(fp_digits, small_digits, TrainConfig(epochs=1))


def test_finetune_with_streams_trains_them_and_the_checkpoint_reloads(abs_searched,
                                                                      small_digits):
    tuned = finetune(abs_searched, small_digits, TrainConfig(epochs=1, lr=0.01),
                     with_streams=True)
    assert tuned["streams"] == streams.SHARED
    clips = [k for k in tuned["state_dict"] if k.startswith("stream_quant.")]
    assert clips and all(k.endswith(".clip") for k in clips)
    model = model_from_checkpoint(tuned)
    assert len(streams.names(model)) == len(clips)
    # A shared stream's clip is its readers' input clip, after training and after reloading.
    shared = [model.get_submodule(n) for n in streams.names(model)
              if model.get_submodule(n).readers]
    assert shared
    for q in shared:
        for r in q.readers:
            assert model.get_submodule(r).a_clip is q.clip
            assert torch.equal(tuned["state_dict"][f"{r}.a_clip"],
                               tuned["state_dict"][f"{q.name}.clip"])
    assert evaluate(model, small_digits, "test") == pytest.approx(tuned["metrics"]["top1"])


def test_finetune_with_8_bit_streams_writes_the_key_older_checkpoints_hold(abs_searched,
                                                                            small_digits):
    tuned = finetune(abs_searched, small_digits, TrainConfig(epochs=1, lr=0.01),
                     with_streams=True, shared_codes=False)
    assert tuned["streams"] is True
    model = model_from_checkpoint(tuned)
    assert streams.names(model) and all(
        model.get_submodule(n).bits == 8 and not model.get_submodule(n).readers
        for n in streams.names(model))


def test_finetune_without_streams_writes_no_streams_key(abs_searched, small_digits):
    tuned = finetune(abs_searched, small_digits, TrainConfig(epochs=1, lr=0.01))
    assert "streams" not in tuned and not streams.names(model_from_checkpoint(tuned))
