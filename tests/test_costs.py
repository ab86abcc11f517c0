"""Costs in users' units (#16): latency from a table and stored weight bytes, differentiable in
the gates, exact at hard gates, and a search that lands on a size or latency target."""

import dataclasses

import pytest
import torch
from test_abs_search import _scramble  # random hard gate states

from abs_deploy.errors import UserError
from abs_deploy.models import create_model
from abs_deploy.search.abs_search import abs_search, to_superbit
from abs_deploy.search.costs import (
    LatencyCost,
    SizeCost,
    Target,
    level_weights,
    parse_latency,
    parse_size,
    table_value,
)
from abs_deploy.search.superbit import bits_from_gates, step_ste
from abs_deploy.train import TrainConfig


@pytest.fixture(scope="module")
def small_digits(digits):
    return dataclasses.replace(digits, train_x=digits.train_x[:256],
                               train_y=digits.train_y[:256])


class FakeTable:
    """A latency table whose every entry follows a known formula, so the cost of any decision
    can be computed by hand: ms = base[w, a] * out * in (bilinear in out and in, so the
    interpolation is exact between grid points)."""

    def __init__(self, net, points: int = 3) -> None:
        self.net = net
        self.constant, self.per_out = 0.25, {n: 0.001 for n in net.order}

    def layers(self):
        return list(self.net.order)

    def grid(self, name):
        c = self.net.costs[name]
        lo = max(1, c.c_out // 2)
        return (sorted({lo, (lo + c.c_out) // 2, c.c_out}),
                sorted({max(1, c.c_in // 2), c.c_in}))

    def channels(self, name):
        c = self.net.costs[name]
        return c.c_out, c.c_in

    def values(self, name, w, a):
        og, ig = self.grid(name)
        return [[self.base(w, a) * o * i for i in ig] for o in og]

    @staticmethod
    def base(w, a):
        return 1e-4 * (1 + 0.1 * (w == 8) + 0.05 * (a == 8))

    def overhead(self):
        return self.constant, self.per_out

    def by_hand(self, net) -> float:
        total = self.constant
        kept = net.kept_counts()
        for n, m in net.layers.items():
            out, inp = (v.item() for v in kept[n])
            total += self.base(m.w_bits, m.a_bits) * out * inp + self.per_out[n] * out
        return total


def test_level_weights_are_the_telescoping_bits_in_value_and_gradient():
    bits = (2, 4, 8)
    for pattern in ([0.3, -0.2], [0.3, 0.1], [-0.1, 0.4]):
        z1 = torch.tensor(pattern, requires_grad=True)
        z2 = torch.tensor(pattern, requires_grad=True)
        p = level_weights(step_ste(z1))
        assert sorted(p.tolist()) == [0.0, 0.0, 1.0]
        expected = (p * torch.tensor(bits, dtype=p.dtype)).sum()
        telescoped = bits_from_gates(step_ste(z2), bits)
        assert expected.item() == telescoped.item()
        expected.backward()
        telescoped.backward()
        assert torch.allclose(z1.grad, z2.grad)


def test_table_value_hits_grid_points_and_interpolates_between():
    values = [[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]]
    og, ig = [4, 6, 8], [2, 4]
    for o, ov in enumerate(og):
        for i, iv in enumerate(ig):
            got = table_value(values, og, ig, torch.tensor(float(ov)), torch.tensor(float(iv)))
            assert got.item() == values[o][i]
    mid = table_value(values, og, ig, torch.tensor(5.0), torch.tensor(3.0))
    assert mid.item() == pytest.approx((1 + 2 + 3 + 5) / 4)
    single = table_value([[7.0]], [3], [5], torch.tensor(3.0), torch.tensor(5.0))
    assert single.item() == 7.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_latency_cost_is_the_table_sum_of_the_decision_at_hard_gates(seed):
    net = to_superbit(create_model("digits_cnn"), torch.zeros(1, 1, 8, 8))
    _scramble(net, seed)
    table = FakeTable(net)
    net.use_cost(LatencyCost(table, net.order, net.candidates()))
    assert any(len(k) < net.layers[n].weight.shape[0] for n, k in net.kept().items())
    assert net.cost("latency").item() == pytest.approx(table.by_hand(net), rel=1e-12)


def test_latency_gradient_reaches_the_bit_and_filter_thresholds():
    net = to_superbit(create_model("digits_cnn"), torch.zeros(1, 1, 8, 8))
    table = FakeTable(net)
    net.use_cost(LatencyCost(table, net.order, net.candidates()))
    net.cost("latency").backward()
    filters = [net.layers[g.owner].f_thr for g in net.groups]
    assert filters and all(p.grad is not None and p.grad.abs() > 0 for p in filters)
    weights = [m.w_thr for m in net.layers.values() if m.searchable]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


def test_latency_table_for_other_layers_is_refused():
    net = to_superbit(create_model("digits_cnn"), torch.zeros(1, 1, 8, 8))
    table = FakeTable(net)
    table.layers = lambda: ["features.0"]
    with pytest.raises(UserError, match="another model"):
        LatencyCost(table, net.order, net.candidates())


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_size_is_the_stored_bytes_of_the_decision(weights):
    net = to_superbit(create_model("digits_cnn"), torch.zeros(1, 1, 8, 8))
    _scramble(net, 3)
    net.use_cost(SizeCost(weights))
    kept = net.kept_counts()
    expected = 0.0
    for n, m in net.layers.items():
        c = net.costs[n]
        out, inp = (v.item() for v in kept[n])
        per = 0.5 if weights == "int4" and m.w_bits <= 4 else 1.0
        # A filter holds one weight per kept input channel and tap; a depthwise one, per tap.
        inputs = 1 if c.groups == c.c_in > 1 else inp
        expected += out * inputs * c.kernel * per
    assert net.cost("size").item() == pytest.approx(expected, rel=1e-12)


def test_targets_read_the_units_users_write():
    assert parse_size("150KB") == 150e3
    assert parse_size("200KiB") == 200 * 1024
    assert parse_size("1.5MB") == 1.5e6
    assert parse_size("4096") == 4096
    assert parse_latency("0.5x", 8.0) == 4.0
    assert parse_latency("3.2ms", 8.0) == 3.2
    for bad in ("150 parsecs", "-3KB", "KB", "nan"):
        with pytest.raises(UserError):
            parse_size(bad)
    for bad in ("fast", "0x", "-1ms", "3.2"):
        with pytest.raises(UserError):
            parse_latency(bad, 8.0)


def _fp_size(fp_digits, small_digits, weights: str) -> tuple[float, float]:
    """The smallest and largest stored weight bytes of the digits search space."""
    net = to_superbit(create_model("digits_cnn"), torch.zeros(1, 1, 8, 8))
    net.use_cost(SizeCost(weights))
    hi = net.cost("size").item()
    with net.smallest():
        return net.cost("size").item(), hi


def test_search_lands_on_a_size_target(fp_digits, small_digits):
    lo, hi = _fp_size(fp_digits, small_digits, "int4")
    target = lo + 0.4 * (hi - lo)
    ckpt = abs_search(fp_digits, small_digits, None, TrainConfig(epochs=2, lr=0.01),
                      refine_epochs=0, targets=[Target("size", target, f"{target:.0f}")],
                      weights="int4")
    (rec,) = ckpt["targets"]
    assert rec["kind"] == "size" and rec["weights"] == "int4"
    assert abs(rec["predicted"] / target - 1) <= 0.05


def test_with_two_targets_the_binding_one_lands_in_band_and_the_other_is_met(
        fp_digits, small_digits):
    lo, hi = _fp_size(fp_digits, small_digits, "int8")
    size = lo + 0.3 * (hi - lo)
    bops = fp_digits["metrics"]["fp_bops"] / 20      # loose: the size target binds
    ckpt = abs_search(fp_digits, small_digits, bops, TrainConfig(epochs=2, lr=0.01),
                      refine_epochs=0, targets=[Target("size", size, f"{size:.0f}")])
    got = {r["kind"]: r for r in ckpt["targets"]}
    ratios = {k: r["predicted"] / r["value"] for k, r in got.items()}
    assert max(ratios.values()) <= 1.05
    assert abs(max(ratios.values()) - 1) <= 0.05
    assert got["bops"]["predicted"] == ckpt["metrics"]["bops"]


def test_a_size_target_out_of_reach_is_one_line(fp_digits, small_digits):
    lo, _ = _fp_size(fp_digits, small_digits, "int8")
    with pytest.raises(UserError, match="size target .* outside") as e:
        abs_search(fp_digits, small_digits, None, TrainConfig(epochs=1),
                   targets=[Target("size", lo / 2, "tiny")])
    assert "\n" not in str(e.value)


def test_a_latency_target_without_a_table_is_refused(fp_digits, small_digits):
    with pytest.raises(UserError, match="latency table"):
        abs_search(fp_digits, small_digits, None, TrainConfig(epochs=1),
                   targets=[Target("latency", 1.0, "1ms")])


# --- the command line ----------------------------------------------------------------------

def _run(*args):
    from click.testing import CliRunner

    from abs_deploy.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], lines
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, words", [
    (["--target-latency", "0.5x"], "needs --lut"),
    (["--target-size", "1KB"], "outside what this search space reaches"),
    (["--target-size", "lots"], "cannot read size target"),
    (["--target-size", "150KB", "--method", "bsq"], "for --method abs"),
])
def test_search_target_errors_are_one_line(fp_digits_path, tmp_path, args, words):
    out = tmp_path / "s.pt"
    _one_line(_run("search", fp_digits_path, *args, "--epochs", "1", "-o", out), words)
    assert not out.exists()


class _OneLayer:
    """A table of one conv whose time is not monotone in its kept outputs (measured on
    ResNet-20's layer1 conv in ORT: 16 outputs faster than 12)."""

    candidates = (8,)

    def __init__(self, column: list[float]) -> None:
        self.column = column

    def layers(self):
        return ["c"]

    def grid(self, name):
        return [4, 8, 12, 16], [16]

    def channels(self, name):
        return 16, 16

    def values(self, name, w, a):
        return [[v] for v in self.column]

    def overhead(self):
        return 0.0, {"c": 0.0}


@pytest.mark.parametrize("column", [[1.783, 1.619, 2.211, 1.407], [0.245, 0.44, 0.526, 0.53]])
@pytest.mark.parametrize("kept", [16.0, 12.0, 10.0])
def test_latency_is_the_tables_value_with_the_trends_gradient(kept, column):
    """Forward: the table (bilinear between grid points). Backward: the least-squares slope
    per kept channel, never negative (the first column: its local slope at the top end is
    -0.2 ms a channel, which told the search that pruning costs time; its trend is 0)."""
    from abs_deploy.search.costs import table_value, trend_slopes

    cost = LatencyCost(_OneLayer(column), ["c"], {"c": (8,)})
    out = torch.tensor(kept, requires_grad=True)
    one = torch.ones(1)
    value = cost({"c": (out, torch.tensor(16.0))}, {"c": (one, one)}, {"c": (8,)})
    value.backward()
    table = [[v] for v in column]
    assert value.item() == pytest.approx(
        table_value(table, [4, 8, 12, 16], [16], torch.tensor(kept), torch.tensor(16.0)).item())
    slope, _ = trend_slopes(table, [4, 8, 12, 16], [16])
    assert out.grad.item() == pytest.approx(slope)
    assert trend_slopes([[v] for v in [1.0, 2.0, 3.0, 4.0]], [4, 8, 12, 16], [16]) == \
        pytest.approx((0.25, 0.0))
    assert trend_slopes([[v] for v in [4.0, 3.0, 2.0, 1.0]], [4, 8, 12, 16], [16]) == (0.0, 0.0)
