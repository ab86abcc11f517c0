import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abs_deploy import graph, ops, streams
from abs_deploy.errors import UserError
from abs_deploy.models.registry import create_model


class TinyResidual(nn.Module):
    """stem -> block with an identity shortcut (add, then ReLU) -> block whose add has no ReLU
    and a 1x1 projection shortcut -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 3, padding=1)
        self.a2 = nn.Conv2d(8, 16, 3, padding=1)
        self.short = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.b1(F.relu(self.a1(x))) + x)
        x = self.a2(x) + self.short(x)
        return self.fc(x.mean((2, 3)))


def _placed(gm) -> list[tuple[str, bool]]:
    """(what each quantizer reads, signed) in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith(streams.CONTAINER):
            out.append((node.args[0].name, gm.get_submodule(node.target).signed))
    return out


def test_a_quantizer_on_each_add_operand_and_after_the_adds_relu():
    gm = streams.insert(TinyResidual(), torch.randn(2, 3, 8, 8))
    # stem's ReLU output (an operand, unsigned), b1's output (signed), the first add's ReLU
    # (unsigned, shared by both readers), a2 and the shortcut (signed), the second add
    # (no ReLU: on the add, signed).
    assert _placed(gm) == [("relu", False), ("b1", True), ("relu_2", False), ("a2", True),
                           ("short", True), ("add_1", True)]
    assert streams.names(gm) == [f"stream_quant.{k}" for k in range(6)]


def test_every_reader_of_a_quantized_tensor_reads_the_quantizer():
    gm = streams.insert(TinyResidual(), torch.randn(2, 3, 8, 8))
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith(streams.CONTAINER):
            assert list(node.args[0].users) == [node]


def test_names_and_parameters_reload_from_a_state_dict():
    model = TinyResidual()
    a = streams.insert(model, torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        a.stream_quant[3].clip.fill_(0.25)
    b = streams.insert(TinyResidual(), torch.randn(2, 3, 8, 8))
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == set(model.state_dict()) | {
        f"stream_quant.{k}.clip" for k in range(6)}
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(a(x), b(x))


def test_the_quantizers_are_8_bit_fake_quant_and_the_markers_identity():
    model = TinyResidual().eval()
    x = torch.randn(2, 3, 8, 8)
    marked = streams.insert(model, x, streams.StreamMarker)
    assert torch.equal(marked(x), model(x))
    fake = streams.insert(model, x)
    assert all(q.bits == 8 for q in fake.stream_quant)
    assert not torch.equal(fake(x), model(x))


def test_a_model_without_residual_adds_gets_none():
    gm = streams.insert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))
    assert streams.names(gm) == []


class PoolHead(nn.Module):
    """conv -> BN -> ReLU -> pool -> flatten -> dropout -> fc, and a conv -> BN -> conv stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(self.bn0(self.stem(x)))))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def test_a_layer_read_through_a_pool_gets_one_after_its_relu_and_the_logits_none():
    gm = streams.insert(PoolHead(), torch.randn(2, 3, 8, 8))
    # conv's BN and ReLU are counted in (unsigned, the clamp folds); stem's output meets conv's
    # own input quantizer; fc's output is the graph's.
    assert _placed(gm) == [("relu", False)]


def test_a_layer_read_through_a_pool_without_relu_gets_a_signed_one_on_its_norm():
    class NoRelu(PoolHead):
        def forward(self, x):
            return self.fc(self.bn(self.conv(self.stem(x))).mean((2, 3)))

    assert _placed(streams.insert(NoRelu(), torch.randn(2, 3, 8, 8))) == [("bn", True)]


def test_a_layer_read_directly_or_through_dropout_gets_none():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(), nn.Conv2d(4, 4, 3),
                          nn.Flatten(), nn.Linear(64, 2))
    gm = streams.insert(model, torch.randn(1, 3, 8, 8))
    # the first conv reaches the second through dropout; the second goes through a flatten.
    assert _placed(gm) == [("_3", True)]


def test_adds_of_a_constant_or_a_broadcast_are_not_residual():
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.b = nn.Parameter(torch.zeros(1, 4, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            return y + 1.0 + self.b + y.mean((2, 3), keepdim=True)

    assert streams.names(streams.insert(Biased(), torch.randn(1, 3, 4, 4))) == []


def test_a_model_torch_fx_cannot_trace_is_refused_in_one_line():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            return y + x if y.sum() > 0 else y

    with pytest.raises(UserError, match="torch.fx cannot trace") as e:
        streams.insert(DataDependent(), torch.randn(1, 3, 4, 4))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,count", [("resnet20", 21), ("mobilenetv2_cifar", 26)])
def test_zoo_residual_models_get_their_streams(name, count):
    """ResNet-20's every conv already meets an add or a conv; MobileNetV2's 25 add tensors and
    the last 1x1 conv's ReLU6, read by the global pool."""
    model = create_model(name, num_classes=10)
    gm = streams.insert(model, torch.randn(1, 3, 32, 32))
    assert len(streams.names(gm)) == count


def test_the_marker_is_one_passthrough_node_under_torch_export():
    x = torch.randn(2, 3, 8, 8)
    gm = streams.insert(TinyResidual(), x, streams.StreamMarker)
    ep = graph.capture(gm, x)
    marks = [n for n in ep.graph.nodes if n.op == "call_function"
             and ops.op_of(n.target) is ops.OPS[streams.MARKER]]
    assert [n.args[1] for n in marks] == streams.names(gm)
    groups = graph.channel_groups(gm, x)
    # b1's channels stay a prunable private group: the quantizers pass channels through.
    assert any(g.prunable and g.producers == ["a1"] for g in groups)


def test_a_layer_read_by_two_layers_gets_one_quantizer_they_share():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = (nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1),
                                         nn.Conv2d(4, 4, 1))

        def forward(self, x):
            x = F.relu(self.stem(x))
            return torch.cat([self.a(x), self.b(x)], 1)

    gm = streams.insert(Fork(), torch.randn(1, 3, 4, 4))
    # two readers would mean two QuantizeLinears on stem's output: ORT fuses neither.
    assert _placed(gm) == [("relu", False)]


# --- shared codes: a stream quantized by the quantizer of the layers reading it ------------

def _inputs(model: nn.Module, **bits: tuple[int, bool]) -> dict[str, tuple[int, bool]]:
    """Every layer's input at 4 bits unsigned, but those named."""
    return {n: bits.get(n, (4, False)) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _kinds(gm) -> list[tuple[str, int, bool, tuple[str, ...]]]:
    return [(node.args[0].name, q.bits, q.signed, q.readers)
            for node in gm.graph.nodes
            if node.op == "call_module" and node.target.startswith(streams.CONTAINER)
            for q in [gm.get_submodule(node.target)]]


def test_a_stream_read_by_layers_of_equal_bits_takes_their_quantizer():
    model = TinyResidual()
    gm = streams.insert(model, torch.randn(2, 3, 8, 8), inputs=_inputs(model, a2=(4, True),
                                                                       short=(4, True)))
    # The same places as 8-bit streams; the stem's ReLU (read by a1 and an add) takes a1's
    # quantizer, the first add's ReLU that of a2 and the shortcut (both signed: a signed one
    # after a ReLU is theirs all the same); the conv outputs only an add reads, and the last
    # add (read by fc through a mean), stay 8-bit.
    assert _kinds(gm) == [("relu", 4, False, ("a1",)), ("b1", 8, True, ()),
                          ("relu_2", 4, True, ("a2", "short")), ("a2", 8, True, ()),
                          ("short", 8, True, ()), ("add_1", 8, True, ())]


@pytest.mark.parametrize("bits", [{"short": (2, False)}, {"short": (4, True)},
                                  {"short": (32, False)}])
def test_readers_quantizing_unlike_keep_an_8_bit_stream(bits):
    """Bits or signedness differ, or one reader is float: no quantizer serves them all."""
    model = TinyResidual()
    gm = streams.insert(model, torch.randn(2, 3, 8, 8), inputs=_inputs(model, **bits))
    assert _kinds(gm)[2] == ("relu_2", 8, False, ())


def test_a_reader_behind_a_pool_keeps_an_8_bit_stream():
    model = PoolHead()
    gm = streams.insert(model, torch.randn(2, 3, 8, 8), inputs=_inputs(model))
    assert _kinds(gm) == [("relu", 8, False, ())]


def _trainable(model: nn.Module, inputs: dict[str, tuple[int, bool]]) -> nn.Module:
    from abs_deploy.search.qmodel import quantize_model

    quantize_model(model, {n: (4, b) for n, (b, _) in inputs.items()},
                   {n: s for n, (_, s) in inputs.items()})
    return model


def test_tie_makes_one_clip_of_the_stream_and_its_readers_the_largest():
    model = TinyResidual()
    inputs = _inputs(model)
    _trainable(model, inputs)
    with torch.no_grad():
        model.a2.a_clip.fill_(0.5)
        model.short.a_clip.fill_(-2.0)  # a clip's magnitude is what counts
    gm = streams.insert(model, torch.randn(2, 3, 8, 8), inputs=inputs)
    streams.tie(gm)
    q = gm.get_submodule("stream_quant.2")
    assert gm.a2.a_clip is gm.short.a_clip is q.clip and float(q.clip.detach()) == -2.0
    assert gm.stream_quant[0].clip is gm.a1.a_clip
    # One parameter: the optimizer steps it once, and every key of it reloads.
    names = {n for n, _ in gm.named_parameters()}
    assert "short.a_clip" not in names and "stream_quant.2.clip" not in names
    assert {"a2.a_clip", "short.a_clip", "stream_quant.2.clip"} <= set(gm.state_dict())


def test_a_layer_requantizing_shared_codes_changes_nothing():
    """The layer keeps quantizing its input in training; on the stream's codes that is the
    identity, so the model is the one the file runs with one quantizer per tensor."""
    model = TinyResidual()
    inputs = _inputs(model)
    _trainable(model, inputs)
    gm = streams.insert(model, torch.randn(2, 3, 8, 8), inputs=inputs)
    streams.tie(gm)
    with torch.no_grad():
        gm.a1.a_clip.fill_(0.37)
    x = torch.randn(64, 8, 8, 8).relu() * 0.5
    y = gm.stream_quant[0](x)
    assert len(torch.unique(y)) > 8  # a real 4-bit grid, not all clipped
    assert torch.equal(gm.a1.quant_input(y), y)
