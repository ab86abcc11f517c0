"""The latency table as the search reads it: loading, the checks before trusting it, and the
prediction (bilinear between grid points, the grid's own values at them, plus the overhead)."""

import json

import pytest

from abs_deploy import latency_table
from abs_deploy.errors import UserError
from abs_deploy.latency_table import LatencyTable, fingerprint
from abs_deploy.machine import this_machine

ARCH = {"name": "digits_cnn", "kwargs": {"num_classes": 10}}
SHAPE = [1, 1, 8, 8]


def record(**changes) -> dict:
    """Two layers: `a` prunable on its output (grid 4, 8), `b` on its input (grid 4, 8)."""
    rec = {"format": latency_table.FORMAT, "version": latency_table.VERSION, "complete": True,
           "model": {"arch": ARCH, "input_shape": SHAPE, "fingerprint": fingerprint(ARCH, SHAPE)},
           "runtime": {"name": "onnxruntime", "version": "1.0"}, "machine": this_machine(),
           "setting": {"batch": 32, "threads": 1}, "candidates": [4, 8], "edge_bits": None,
           "max_prune": 0.5, "grid_points": 2, "streams": False, "method": {}, "date": "",
           "fp_original_ms": 9.0,
           "layers": [
               {"name": "a", "kind": "conv", "out_channels": 8, "in_channels": 1,
                "out_grid": [4, 8], "in_grid": [1],
                "values": {"4/4": [[1.0], [3.0]], "8/8": [[2.0], [4.0]]}},
               {"name": "b", "kind": "conv", "out_channels": 2, "in_channels": 8,
                "out_grid": [2, 6], "in_grid": [4, 8],
                "values": {"4/4": [[1.0, 2.0], [3.0, 6.0]]}}],
           "overhead": {"constant_ms": 0.5, "per_out_channel_ms": {"a": 0.25, "b": 0.0},
                        "fit": {"decisions": 3, "rms_ms": 0.1, "max_rel": 0.01}}}
    rec.update(changes)
    return rec


@pytest.fixture
def table(tmp_path) -> LatencyTable:
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(record()))
    return LatencyTable.load(path)


def test_round_trip_keeps_every_field(table):
    assert table.layers() == ["a", "b"]
    assert table.grid("b") == ([2, 6], [4, 8])
    assert table.channels("b") == (2, 8)
    assert table.values("b", 4, 4) == [[1.0, 2.0], [3.0, 6.0]]
    assert (table.runtime, table.runtime_version, table.batch, table.threads) == \
        ("onnxruntime", "1.0", 32, 1)
    assert table.candidates == (4, 8) and table.edge_bits is None and not table.streams
    assert table.fp_original_ms == 9.0
    assert table.overhead() == (0.5, {"a": 0.25, "b": 0.0})
    assert table.machine == this_machine()


def test_prediction_at_grid_points_is_the_grid_value_plus_overhead(table):
    for (ai, a_out), (bo, b_out), (bi, b_in) in [((0, 4), (0, 2), (0, 4)),
                                                 ((1, 8), (1, 6), (1, 8)),
                                                 ((1, 8), (0, 2), (1, 8))]:
        choice = {"a": (4, 4, a_out, 1), "b": (4, 4, b_out, b_in)}
        expected = (table.values("a", 4, 4)[ai][0] + table.values("b", 4, 4)[bo][bi]
                    + 0.5 + 0.25 * a_out)
        assert table.predict_ms(choice) == pytest.approx(expected)


def test_prediction_between_grid_points_is_bilinear(table):
    # Half way on both axes of b: the mean of its four corners; a quarter way on a's.
    choice = {"a": (8, 8, 5, 1), "b": (4, 4, 4, 6)}
    a_term = 2.0 + 0.25 * (4.0 - 2.0)
    b_term = (1.0 + 2.0 + 3.0 + 6.0) / 4
    assert table.predict_ms(choice) == pytest.approx(a_term + b_term + 0.5 + 0.25 * 5)


def test_prediction_holds_the_ends_beyond_the_grid(table):
    inside = table.predict_ms({"a": (4, 4, 4, 1), "b": (4, 4, 6, 8)})
    beyond = table.predict_ms({"a": (4, 4, 4, 1), "b": (4, 4, 9, 20)})
    assert beyond == inside


def test_prediction_needs_every_layer_and_measured_bits(table):
    with pytest.raises(UserError, match="b is missing"):
        table.predict_ms({"a": (4, 4, 4, 1)})
    with pytest.raises(UserError, match="no 8/8 bits for b"):
        table.predict_ms({"a": (4, 4, 4, 1), "b": (8, 8, 2, 4)})


def test_check_for_refuses_another_model(table):
    table.check_for(ARCH, SHAPE)
    with pytest.raises(UserError, match="another model"):
        table.check_for(ARCH, [1, 1, 16, 16])
    with pytest.raises(UserError, match="another model"):
        table.check_for({"name": "resnet20", "kwargs": {}}, SHAPE)


def test_check_for_refuses_another_machine(tmp_path):
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(record(machine={"cpu": "Some Other CPU", "cores": 64})))
    with pytest.raises(UserError, match="another machine"):
        LatencyTable.load(path).check_for(ARCH, SHAPE)


@pytest.mark.parametrize("content, words", [
    ("{not json", "not JSON"),
    ('{"format": "abs-deploy/1"}', "not a latency table"),
    ("[1, 2]", "not a latency table"),
    (json.dumps(record(version=99)), "version 99"),
    (json.dumps(record(complete=False)), "not finished"),
    (json.dumps(record(layers=[{"name": "a"}])), "not a complete latency table"),
])
def test_load_refuses_what_is_not_a_finished_table(tmp_path, content, words):
    path = tmp_path / "lut.json"
    path.write_text(content)
    with pytest.raises(UserError, match=words) as e:
        LatencyTable.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("changes, refused", [({"streams": True}, True),
                                              ({"streams": True, "pieces": 2}, False),
                                              ({"streams": False}, False)])
def test_a_streams_table_of_the_old_pieces_is_refused(tmp_path, changes, refused):
    """Piece version 1 timed the layers reading a residual stream as float convs: such a
    --streams table is refused in one message; tables without streams were cut as now."""
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(record(**changes)))
    if refused:
        with pytest.raises(UserError, match="run abs profile again") as e:
            LatencyTable.load(path)
        assert "\n" not in str(e.value)
    else:
        assert LatencyTable.load(path).streams == changes["streams"]


@pytest.mark.parametrize("scales, says", [([0.98, 1.46], "moved 1.49x"), ([0.95, 1.05], None),
                                          ([], None)])
def test_a_table_timed_at_different_speeds_says_so(scales, says):
    table = LatencyTable(record(method={"batch_scales": scales}))
    note = table.speed_note()
    if says is None:
        assert note is None
    else:
        assert says in note and "0.98-1.46" in note and "relative targets" in note
