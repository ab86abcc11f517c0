import pytest
import torch
from torch import nn

from abs_deploy.errors import UserError
from abs_deploy.export.prune import prune
from abs_deploy.graph import channel_groups
from abs_deploy.models import create_model


class _FlattenNet(nn.Module):
    """Conv -> BN -> ReLU -> depthwise -> flatten C x 3 x 3 into a Linear: every prune verb."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(6 * 9, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(self.pool(x).flatten(1))


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    model.eval()


def _masked(model: nn.Module, kept: dict[str, list[int]]) -> nn.Module:
    """The training model's mask: channels outside `kept` zero after each producer's BN."""
    after = {"conv": "bn", "dw": "bn2"}
    for layer, idx in kept.items():
        mask = torch.zeros(model.get_submodule(layer).weight.shape[0])
        mask[idx] = 1
        model.get_submodule(after[layer]).register_forward_hook(
            lambda m, i, o, mask=mask: o * mask.view(1, -1, 1, 1))
    return model


def test_pruned_model_equals_the_masked_one_through_depthwise_and_flatten():
    torch.manual_seed(0)
    model = _FlattenNet()
    _randomize_bn(model)
    x = torch.randn(4, 2, 6, 6)
    groups = channel_groups(model, x[:1])
    kept = {"conv": [1, 4], "dw": [1, 4]}
    pruned = prune(model, groups, kept)
    assert pruned.conv.weight.shape[0] == 2 and pruned.bn.num_features == 2
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels == 2
    assert pruned.fc.in_features == 2 * 9
    with torch.no_grad():
        assert torch.allclose(pruned(x), _masked(model, kept)(x), atol=1e-6)


def test_pruning_a_residual_group_is_an_error_not_a_skip():
    model = create_model("resnet20")
    groups = channel_groups(model, torch.zeros(1, 3, 32, 32))
    stream = next(g for g in groups if "conv1" in g.producers)
    kept = {p: [0, 1, 2] for p in stream.producers}
    with pytest.raises(UserError, match="cannot be pruned"):
        prune(model, groups, kept)


def test_producers_of_one_group_must_keep_the_same_channels():
    model = _FlattenNet()
    groups = channel_groups(model, torch.zeros(1, 2, 6, 6))
    with pytest.raises(UserError, match="different"):
        prune(model, groups, {"conv": [0, 1], "dw": [0, 2]})


def test_pruning_works_on_a_copy():
    model = _FlattenNet()
    groups = channel_groups(model, torch.zeros(1, 2, 6, 6))
    prune(model, groups, {"conv": [0], "dw": [0]})
    assert model.conv.out_channels == 6 and model.conv.weight.shape[0] == 6
