import os

import pytest
import torch
from torch import nn

from abs_deploy.checkpoint import FORMAT, load_checkpoint, make_checkpoint, save_checkpoint
from abs_deploy.errors import UserError
from abs_deploy.models import create_model


def _ckpt():
    model = create_model("digits_cnn")
    return make_checkpoint("fp", {"name": "digits_cnn", "kwargs": {}},
                           {"shape": [1, 1, 8, 8], "mean": [0.3], "std": [0.4]}, 10,
                           model.state_dict(), metrics={"top1": 0.5})


def test_roundtrip_keeps_every_field_and_tensor(tmp_path):
    ckpt = _ckpt()
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "m.pt"))
    assert loaded["format"] == FORMAT and loaded["metrics"] == {"top1": 0.5}
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in ckpt["state_dict"].items())


def test_save_leaves_no_temporary_file(tmp_path):
    save_checkpoint(_ckpt(), tmp_path / "m.pt")
    assert os.listdir(tmp_path) == ["m.pt"]


def test_save_into_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        save_checkpoint(_ckpt(), tmp_path / "nope" / "m.pt")


def test_file_with_pickled_objects_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": _Evil()}, path)
    with pytest.raises(UserError, match="pickled objects"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (open, (str(_Evil.target), "w"))


@pytest.fixture(autouse=True)
def _evil_target(tmp_path):
    _Evil.target = tmp_path / "pwned"


def test_truncated_file_is_a_user_error(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_foreign_torch_file_is_named_as_such(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "f.pt")
    with pytest.raises(UserError, match="not an abs-deploy checkpoint"):
        load_checkpoint(tmp_path / "f.pt")


def test_newer_format_names_both_versions(tmp_path):
    ckpt = _ckpt()
    ckpt["format"] = "abs-deploy/9"
    torch.save({**ckpt, "decision": {}}, tmp_path / "n.pt")
    with pytest.raises(UserError, match="abs-deploy/9.*abs-deploy/1"):
        load_checkpoint(tmp_path / "n.pt")


def test_wrong_stage_is_refused(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "m.pt")
    with pytest.raises(UserError, match="stage 'fp'"):
        load_checkpoint(path, stages=("searched",))


def test_decision_is_a_plain_record_in_the_file_and_a_decision_once_read(tmp_path):
    from abs_deploy.decision import Decision, LayerDecision

    model = create_model("digits_cnn")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    decision = Decision({n: LayerDecision(4, 8, n == "stem", tuple(range(m.weight.shape[0])))
                         for n, m in layers.items()})
    ckpt = {**_ckpt(), "stage": "searched", "decision": decision}
    path = save_checkpoint(ckpt, tmp_path / "s.pt")
    raw = torch.load(path, weights_only=True)["decision"]
    assert raw == decision.to_record() and isinstance(raw["stem"]["kept"], list)
    loaded = load_checkpoint(path)["decision"]
    assert isinstance(loaded, Decision) and loaded == decision and list(loaded) == list(layers)


def test_saving_a_raw_record_in_place_of_a_decision_is_a_programming_error(tmp_path):
    with pytest.raises(TypeError, match="Decision"):
        save_checkpoint({**_ckpt(), "decision": {}}, tmp_path / "m.pt")
