import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abs_deploy.errors import UserError
from abs_deploy.graph import (
    ChannelGroup,
    capture,
    channel_groups,
    following_norm,
    input_kept,
    layer_order,
)
from abs_deploy.models import create_model, list_models
from abs_deploy.models.registry import default_input_shape


def _x(name: str) -> torch.Tensor:
    return torch.randn(1, *default_input_shape(name))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: with several threads on a busy machine each forward pass spends
    # seconds waiting for the pool instead of milliseconds computing.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def resnet20():
    return create_model("resnet20")


@pytest.fixture(scope="module")
def resnet20_groups(resnet20):
    return channel_groups(resnet20, _x("resnet20"))


def _group_of(groups: list[ChannelGroup], producer: str) -> ChannelGroup:
    return next(g for g in groups if producer in g.producers)


def _assert_consistent(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Every member's channel count matches the group; every called layer produces one group."""
    modules = dict(model.named_modules())
    producers = [p for g in groups for p in g.producers]
    assert len(producers) == len(set(producers))
    for g in groups:
        for p in g.producers:
            m = modules[p]
            assert (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) == g.channels
        for c in g.consumers:
            m = modules[c]
            n_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            assert n_in == g.channels * g.spatial.get(c, 1)
        for d in g.depthwise:
            assert modules[d].in_channels == modules[d].groups == g.channels
        for n in g.norms:
            assert modules[n].num_features == g.channels
        assert g.prunable == (g.reason == "")


def _assert_consumers_are_the_only_readers(model: nn.Module, groups: list[ChannelGroup],
                                           x: torch.Tensor) -> None:
    """Once a channel's consumer inputs are zeroed, nothing its producers, depthwise convs or
    norms do to that channel reaches the output: the group lists every reader."""
    torch.manual_seed(0)
    model.eval()
    original = copy.deepcopy(model.state_dict())
    mods = dict(model.named_modules())
    for g in groups:
        if not g.prunable:
            continue
        c = g.channels - 1
        model.load_state_dict(original)
        with torch.no_grad():
            for name in g.consumers:
                hw = g.spatial.get(name, 1)
                mods[name].weight[:, c * hw:(c + 1) * hw] = 0
            ref = model(x)
            for name in g.producers + g.norms:
                for t in (mods[name].weight, mods[name].bias,
                          getattr(mods[name], "running_mean", None)):
                    if t is not None:
                        t[c] = torch.randn_like(t[c]) * 3 + 1
            assert torch.allclose(model(x), ref), (g.id, g.producers)


@pytest.mark.parametrize("name, kw, allow_shared", [
    ("digits_cnn", {}, False), ("mobilenetv2_cifar", {"width_mult": 0.5}, False),
    ("resnet20", {}, True)])
def test_prunable_groups_list_every_reader_of_their_channels(name, kw, allow_shared):
    model, x = create_model(name, **kw), _x(name)
    groups = channel_groups(model, x, allow_shared=allow_shared)
    _assert_consumers_are_the_only_readers(model, groups, x)


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_captures_into_consistent_groups(name):
    kw = {"width_mult": 0.5} if name.startswith("mobilenetv2") else {}
    model = create_model(name, **kw)
    groups = channel_groups(model, _x(name))  # captures with torch.export
    _assert_consistent(model, groups)
    called = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {p for g in groups for p in g.producers} == called
    assert groups[0].reason == "first layer input" and groups[-1].reason == "model output"


def test_capture_returns_an_exported_program_and_restores_training_mode():
    model = create_model("digits_cnn").train()
    assert isinstance(capture(model, _x("digits_cnn")), torch.export.ExportedProgram)
    assert model.training


def test_capture_failure_is_a_user_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(UserError, match="cannot capture DataDependent"):
        capture(DataDependent(), torch.randn(1, 3, 4, 4))


def test_resnet20_prunes_only_the_inner_conv_of_each_block(resnet20_groups):
    prunable = [g for g in resnet20_groups if g.prunable]
    assert len(prunable) == 9
    for g in prunable:
        block = g.producers[0].rpartition(".")[0]
        assert g.producers == [f"{block}.conv1"]
        assert g.consumers == [f"{block}.conv2"]
        assert g.norms == [f"{block}.bn1"]
    reasons = {g.reason for g in resnet20_groups if not g.prunable}
    assert reasons == {"first layer input", "feeds a residual add", "model output"}


def test_resnet20_residual_stream_joins_stem_shortcut_and_conv2(resnet20_groups):
    g = _group_of(resnet20_groups, "conv1")
    assert g.producers == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert "layer2.0.shortcut.0" in g.consumers
    g = _group_of(resnet20_groups, "layer2.0.shortcut.0")
    assert g.producers[:2] == ["layer2.0.conv2", "layer2.0.shortcut.0"]
    assert g.norms[:2] == ["layer2.0.bn2", "layer2.0.shortcut.1"]
    last = _group_of(resnet20_groups, "layer3.2.conv2")
    assert "fc" in last.consumers and last.spatial == {"fc": 1}


def test_allow_shared_makes_residual_groups_prunable(resnet20):
    groups = channel_groups(resnet20, _x("resnet20"), allow_shared=True)
    assert sum(g.prunable for g in groups) == 12
    assert _group_of(groups, "conv1").prunable
    assert not _group_of(groups, "fc").prunable


def test_mobilenetv2_cifar_expanded_channels_are_one_prunable_group():
    model = create_model("mobilenetv2_cifar", width_mult=0.5)
    groups = channel_groups(model, _x("mobilenetv2_cifar"))
    expanded = [g for g in groups if g.prunable and len(g.producers) == 2
                and g.producers[0].endswith("conv.0.0")]
    assert len(expanded) == 16  # one per block with t > 1
    for g in expanded:
        block = g.producers[0][: -len(".conv.0.0")]
        assert g.producers == [f"{block}.conv.0.0", f"{block}.conv.1.0"]
        assert g.depthwise == [f"{block}.conv.1.0"]
        assert g.consumers == [f"{block}.conv.2"]
        assert g.norms == [f"{block}.conv.0.1", f"{block}.conv.1.1"]
    # Block outputs that feed an add are shared, the ones that do not are private.
    assert not _group_of(groups, "features.2.conv.2").prunable
    assert _group_of(groups, "features.17.conv.2").prunable


def test_digits_cnn_groups():
    groups = channel_groups(create_model("digits_cnn"), _x("digits_cnn"))
    assert _group_of(groups, "block1.conv1").prunable
    dw = _group_of(groups, "block2.expand")
    assert dw.prunable and dw.producers == ["block2.expand", "block2.dw"]
    assert dw.norms == ["block2.bn1", "block2.bn2"]
    head = _group_of(groups, "head")
    assert head.prunable and head.consumers == ["fc"] and head.spatial == {"fc": 1}
    assert _group_of(groups, "stem").reason == "feeds a residual add"


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)).mean((2, 3))


def test_concat_makes_its_inputs_unprunable():
    groups = channel_groups(_Concat(), torch.randn(1, 3, 8, 8))
    for name in ("a", "b"):
        assert _group_of(groups, name).reason == "concat"
    assert next(g for g in groups if "c" in g.consumers).reason == "concat"


class _PadShortcut(nn.Module):
    """Option-A ResNet shortcut: the input, subsampled and padded with zero channels."""

    def __init__(self, use_cat: bool):
        super().__init__()
        self.use_cat = use_cat
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        short = x[:, :, ::2, ::2]
        if self.use_cat:
            short = torch.cat([short, torch.zeros_like(short)], 1)
        else:
            short = F.pad(short, (0, 0, 0, 0, 2, 2))
        return self.head(F.relu(self.conv2(x) + short))


@pytest.mark.parametrize("use_cat", [False, True])
def test_zero_padding_shortcut_is_unprunable(use_cat):
    groups = channel_groups(_PadShortcut(use_cat), torch.randn(1, 4, 8, 8))
    assert not any(g.prunable for g in groups)
    padded = _group_of(groups, "conv1")
    assert "concat" in padded.reason if use_cat else "pads channels" in padded.reason
    assert not _group_of(groups, "conv2").prunable


class _Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), 1))


def test_unknown_op_makes_group_unprunable_and_names_it():
    groups = channel_groups(_Cumsum(), torch.randn(1, 3, 4, 4))
    g = _group_of(groups, "a")
    assert not g.prunable
    assert "aten.cumsum.default" in g.reason and "node cumsum" in g.reason
    # The conv reading the op's output reads an unprunable group too.
    assert not next(g for g in groups if "b" in g.consumers).prunable


class _FlattenFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.view(x.size(0), -1))


def test_flatten_into_linear_records_spatial_factor():
    groups = channel_groups(_FlattenFc(), torch.randn(1, 3, 8, 8))
    g = _group_of(groups, "conv")
    assert g.prunable and g.consumers == ["fc"] and g.spatial == {"fc": 16}
    assert input_kept(groups, {"conv": [0, 3]}) == {"fc": 32}


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.g(F.relu(self.a(x)))))


def test_grouped_conv_makes_its_groups_unprunable():
    groups = channel_groups(_Grouped(), torch.randn(1, 3, 4, 4))
    assert _group_of(groups, "a").reason == "grouped conv g"
    assert _group_of(groups, "g").reason == "grouped conv g"
    assert _group_of(groups, "g").depthwise == []


class _SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce, self.expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.out(x * gate)


def test_channel_wise_mul_is_unprunable_but_the_squeeze_is_private():
    groups = channel_groups(_SqueezeExcite(), torch.randn(1, 3, 8, 8))
    g = _group_of(groups, "conv")
    assert not g.prunable and "channel-wise mul" in g.reason
    assert g.producers == ["conv", "expand"]
    assert _group_of(groups, "reduce").prunable


class _Misc(nn.Module):
    """Ops that keep channels apart but turn a zeroed channel into a non-zero one."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.d = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.b(torch.sigmoid(self.a(x)))
        y = self.c(y + 1.0)
        return self.d(self.bn(F.relu(y)))


def test_ops_that_do_not_keep_zeros_make_groups_unprunable():
    groups = channel_groups(_Misc(), torch.randn(1, 3, 4, 4))
    assert "maps 0 to a non-zero value" in _group_of(groups, "a").reason
    assert "adds a constant" in _group_of(groups, "b").reason
    assert _group_of(groups, "c").reason == "bn does not directly follow a conv"


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.shared(F.relu(self.a(x)))) * 0.5
                         - F.relu(self.shared(F.relu(self.b(x)))))


def test_module_called_twice_joins_the_groups_it_reads():
    groups = channel_groups(_Shared(), torch.randn(1, 3, 4, 4))
    g = _group_of(groups, "a")
    assert g.producers == ["a", "b"] and g.consumers == ["shared"] and g.prunable
    assert layer_order(_Shared(), torch.randn(1, 3, 4, 4)) == ["a", "shared", "b", "head"]


class _RoundedConv(nn.Conv2d):
    """A conv whose weight is computed in forward, as a fake-quantized layer's is."""

    def forward(self, x):
        return F.conv2d(x, self.weight.round(), self.bias, padding=1)


class _FakeQuant(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _RoundedConv(3, 4, 3), _RoundedConv(4, 2, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_layers_with_computed_weights_are_found_by_module():
    groups = channel_groups(_FakeQuant(), torch.randn(1, 3, 4, 4))
    g = _group_of(groups, "a")
    assert g.prunable and g.consumers == ["b"]


def test_layer_order_of_resnet20(resnet20):
    order = layer_order(resnet20, _x("resnet20"))
    assert order[0] == "conv1" and order[-1] == "fc" and len(order) == 22
    assert order.index("layer2.0.conv2") < order.index("layer2.0.shortcut.0")


def test_following_norm_of_resnet20(resnet20):
    norms = following_norm(resnet20, _x("resnet20"))
    assert norms["conv1"] == "bn1"
    assert norms["layer1.0.conv1"] == "layer1.0.bn1"
    assert norms["layer2.0.shortcut.0"] == "layer2.0.shortcut.1"
    assert norms["fc"] is None
    assert len(norms) == 22


def test_following_norm_needs_the_norm_to_be_the_only_reader():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert following_norm(TwoReaders(), torch.randn(1, 3, 4, 4)) == {"conv": None,
                                                                       "unused": None}


def test_input_kept_counts_consumer_and_depthwise_inputs(resnet20_groups):
    assert input_kept(resnet20_groups, {"layer1.0.conv1": [0, 2, 5]}) == {"layer1.0.conv2": 3}
    assert input_kept(resnet20_groups, {"layer1.0.conv1": list(range(16))}) == {}
    groups = channel_groups(create_model("digits_cnn"), _x("digits_cnn"))
    kept = {"block2.expand": [1, 2, 3], "block2.dw": [3, 2, 1], "head": range(10)}
    assert input_kept(groups, kept) == {"block2.project": 3, "block2.dw": 3, "fc": 10}


@pytest.mark.parametrize("kept, match", [
    ({"layer1.0.conv2": [0]}, "cannot be pruned: feeds a residual add"),
    ({"layer1.0.conv1": [0, 16]}, "distinct indices"),
    ({"layer1.0.conv1": [1, 1]}, "distinct indices"),
    ({"layer1.0.bn1": [1]}, "produce no channel group"),
])
def test_input_kept_rejects_decisions_that_do_not_fit(resnet20_groups, kept, match):
    with pytest.raises(UserError, match=match):
        input_kept(resnet20_groups, kept)


def test_input_kept_rejects_producers_that_disagree():
    groups = channel_groups(create_model("digits_cnn"), _x("digits_cnn"))
    with pytest.raises(UserError, match="keep different channels"):
        input_kept(groups, {"block2.expand": [0, 1], "block2.dw": [0, 2]})


def test_permutation_reads_permute_transpose_and_t():
    from abs_deploy.graph import capture, permutation

    class Shuffle(nn.Module):
        def forward(self, x):
            y = x.permute(0, 2, -1, 1).transpose(1, -1)
            return y.flatten(1)[:, :4].t()

    ep = capture(Shuffle(), torch.zeros(1, 3, 4, 5))
    orders = [permutation(n, n.args[0].meta["val"].ndim) for n in ep.graph.nodes
              if n.op == "call_function" and n.target.overloadpacket in (
                  torch.ops.aten.permute, torch.ops.aten.transpose, torch.ops.aten.t)]
    assert orders == [[0, 2, 3, 1], [0, 3, 2, 1], [1, 0]]


def test_nearest_upsampling_carries_channels_from_the_top_down_map_to_the_add():
    """FPN level: `lateral(fine) + upsample(top(down(fine)))`. The upsample acts on the spatial
    dims only (the op table's "spatial" rule), so `top` and `lateral` produce one group (the
    add joins them), read by the head conv; the 2x upsample does not change which channels."""
    import general_nets

    groups = channel_groups(general_nets.fpn_level(), torch.randn(1, 3, 16, 16))
    g = _group_of(groups, "top")
    assert sorted(g.producers) == ["lateral", "top"]
    assert g.consumers == ["head.0"]
    assert g.reason == "feeds a residual add"


def test_the_op_table_is_what_both_walkers_read():
    """Export's refusal lists the table's writable ops; graph and export know the same ops."""
    from abs_deploy import ops

    names = ops.exportable()
    assert "aten.upsample_nearest2d" in names and "aten.conv2d" in names
    assert "aten.upsample_bilinear2d" not in names      # channels known, not written
    assert all(op.channels in {"conv", "linear", "batch_norm", "harmless", "passthrough",
                               "nonzero_at_zero", "clamp", "spatial", "reshape", "permute",
                               "reduce", "binary", "cat", "pad", "slice"}
               for op in ops.OPS.values())
