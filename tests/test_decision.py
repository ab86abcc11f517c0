import pytest
import torch
from torch import nn

from abs_deploy.decision import Decision, LayerDecision
from abs_deploy.errors import UserError
from abs_deploy.graph import following_norm
from abs_deploy.models.registry import arch_record, build_model

ARCH = arch_record("digits_cnn")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return build_model(ARCH)


def _record(model: nn.Module) -> dict:
    """A record as a search writes it: every layer, some pruned, the BN after each."""
    norms = following_norm(model, torch.zeros(1, 1, 8, 8))
    record = {}
    for i, (name, m) in enumerate((n, m) for n, m in model.named_modules()
                                  if isinstance(m, (nn.Conv2d, nn.Linear))):
        n_out = m.weight.shape[0]
        record[name] = {"w_bits": (2, 4, 8, 32)[i % 4], "a_bits": (8, 4)[i % 2],
                        "a_signed": name == "stem", "kept": list(range(0, n_out, 1 + i % 2)),
                        "bn": norms[name]}
    return record


def test_record_round_trips_exactly_in_its_order(model):
    record = _record(model)
    decision = Decision.from_record(record, model)
    assert decision.to_record() == record
    assert list(decision.to_record()) == list(record)
    assert [list(r) for r in decision.to_record().values()] == [list(r) for r in record.values()]
    assert isinstance(decision["block1.conv1"], LayerDecision)
    assert decision["block1.conv1"].kept == tuple(record["block1.conv1"]["kept"])


def test_empty_record_is_the_empty_decision_of_an_fp_checkpoint(model):
    decision = Decision.from_record({}, model)
    assert not decision and decision.to_record() == {}


def test_a_record_without_bn_reads_as_none(model):
    record = _record(model)
    del record["fc"]["bn"]
    assert Decision.from_record(record, model)["fc"].bn is None


def test_replace_changes_one_layer_and_leaves_the_original(model):
    decision = Decision.from_record(_record(model), model)
    pruned = decision.replace("head", kept=(0, 3))
    assert pruned["head"].kept == (0, 3) and len(decision["head"].kept) > 2
    assert list(pruned) == list(decision)


@pytest.mark.parametrize("change,message", [
    (lambda r: r.pop("fc"), "no entry for layer 'fc'"),
    (lambda r: r.update(extra=dict(r["fc"])), "names 'extra'"),
    (lambda r: r.update(fc=[8, 8]), "decision for fc is not a record"),
    (lambda r: r["fc"].pop("a_signed"), "decision for fc lacks 'a_signed'"),
    (lambda r: r["head"].update(a_bits=1), "a_bits must be 2..8 or 32, got 1"),
    (lambda r: r["head"].update(w_bits=True), "w_bits must be 2..8 or 32"),
    (lambda r: r["head"].update(w_bits=16), "w_bits must be 2..8 or 32, got 16"),
    (lambda r: r["fc"].update(kept=[3, 1]), "sorted distinct indices in \\[0, 10\\)"),
    (lambda r: r["fc"].update(kept=[0, 0]), "sorted"),
    (lambda r: r["fc"].update(kept=[0, 10]), "got \\[0, 10\\]"),
    (lambda r: r["fc"].update(kept=[]), "kept is empty"),
    (lambda r: r["fc"].update(kept="0,1"), "list of channel indices"),
    (lambda r: r["head"].update(bn="relu"), "bn is 'relu', which is not a BatchNorm"),
    (lambda r: r["head"].update(bn="nothing"), "bn is 'nothing'"),
])
def test_a_record_that_does_not_fit_is_refused_in_one_line(model, change, message):
    record = _record(model)
    change(record)
    with pytest.raises(UserError, match=message) as err:
        Decision.from_record(record, model)
    assert "\n" not in str(err.value)
