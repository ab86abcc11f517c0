"""export/targets.py and the Targets views: the stored weight bytes of a hand-built file, one
report row per target with its measurement (or the reason there is none), and a report
without targets that shows none."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_html_report import _report

from abs_deploy.errors import UserError
from abs_deploy.export import md_report, report_format, targets
from abs_deploy.export.html_report import render
from abs_deploy.export.latency import Timing

LUT = {"runtime": "onnxruntime", "runtime_version": "1.32.0", "batch": 32, "threads": 1,
       "machine": {"cpu": "Test CPU", "cores": 2}, "fp_original_ms": 8.0}
TARGETS = [
    {"kind": "bops", "value": 2e6, "unit": "BOPs", "text": "2M", "predicted": 2e6},
    {"kind": "latency", "value": 4.0, "unit": "ms", "text": "0.5x", "predicted": 3.95,
     "lut": LUT},
    {"kind": "size", "value": 1500.0, "unit": "bytes", "text": "1.5KB", "predicted": 1480.0,
     "weights": "int4"},
]
TIMINGS = [Timing("fp_original", 32, 1, 8.24, 9.0, 50), Timing("qcdq", 32, 1, 4.12, 4.5, 50),
           Timing("qcdq", 1, 1, 0.5, 0.6, 50)]


def _section(timings=TIMINGS, missing=None, weights="int4", targets_=TARGETS):
    return targets.section(targets_, bops=2e6, size=1400, weights=weights, file="model.onnx",
                           timings=timings, latency_missing=missing, warmup=10,
                           versions={"onnxruntime": "1.32.0"}, cpu="Test CPU")


# --- counting the stored weight bytes ----------------------------------------------------------


def _init(name, array, dtype=None):
    return numpy_helper.from_array(array.astype(dtype or array.dtype), name)


def _hand_built() -> onnx.ModelProto:
    """Conv with int8 weights (3*2*3*3 = 54) through DQ, a Conv with packed INT4 weights
    (6*3*1*1 = 18, an even count, and 3*1*1*1 = 3, odd) through DQ, a float Gemm weight
    (3*4 = 12 floats) fed directly, a float MatMul weight behind a Transpose (2*4 = 8), and
    biases, scales and zero points that do not count."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    inits = [
        _init("w8", rng.integers(-8, 8, (3, 2, 3, 3)), np.int8),
        _init("w8_s", np.ones(3), np.float32), _init("w8_z", np.zeros(3), np.int8),
        _init("b8", np.zeros(3), np.float32),
        _init("w4", rng.integers(-8, 8, (6, 3, 1, 1)), ml_dtypes.int4),
        _init("w4_s", np.ones(6), np.float32), _init("w4_z", np.zeros(6), ml_dtypes.int4),
        _init("w4odd", rng.integers(-8, 8, (3, 1, 1, 1)), ml_dtypes.int4),
        _init("w4odd_s", np.ones(3), np.float32), _init("w4odd_z", np.zeros(3), ml_dtypes.int4),
        _init("wg", rng.standard_normal((3, 4)), np.float32),
        _init("bg", np.zeros(4), np.float32),
        _init("wm", rng.standard_normal((2, 4)), np.float32),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w8", "w8_s", "w8_z"], ["w8_f"], axis=0),
        helper.make_node("Conv", ["x", "w8_f", "b8"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["w4", "w4_s", "w4_z"], ["w4_f"], axis=0),
        helper.make_node("Conv", ["c1", "w4_f"], ["c2"]),
        helper.make_node("DequantizeLinear", ["w4odd", "w4odd_s", "w4odd_z"], ["w4odd_f"],
                         axis=0),
        helper.make_node("Conv", ["c2", "w4odd_f"], ["c3"], group=3),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"]),
        helper.make_node("Gemm", ["f", "wg"], ["g2"]),  # the same weight again: stored once
        helper.make_node("Add", ["g", "g2"], ["g3"]),
        helper.make_node("Transpose", ["wm"], ["wm_t"]),
        helper.make_node("MatMul", ["g3", "wm_t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_weight_bytes_count_int8_a_byte_int4_packed_and_float_four_bytes():
    assert targets.weight_bytes(_hand_built()) == 54 + 9 + 2 + 4 * 12 + 4 * 8


def test_weight_bytes_survive_a_round_trip_through_the_file(tmp_path):
    path = tmp_path / "hand.onnx"
    onnx.save(_hand_built(), path)
    assert targets.weight_bytes(onnx.load(path)) == 145


# --- the report section ------------------------------------------------------------------------


def test_each_target_gets_its_measurement_and_both_errors():
    bops, lat, size = _section()
    assert bops["measured"] == 2e6 and bops["error_vs_target"] == 0
    assert lat["measured"] == 4.12
    assert lat["error_vs_target"] == pytest.approx(0.03)
    assert lat["error_vs_predicted"] == pytest.approx(4.12 / 3.95 - 1)
    assert lat["how"] | {"order": None} == {
        "artifact": "model.onnx", "model": "qcdq", "runtime": "onnxruntime",
        "runtime_version": "1.32.0", "batch": 32, "threads": 1, "runs": 50, "warmup": 10,
        "statistic": "median", "clock": "wall", "order": None}
    assert size["measured"] == 1400 and size["how"]["weights"] == "int4"
    assert [r["notes"] for r in (bops, lat, size)] == [[], [], []]


def test_a_prediction_from_a_cpu_time_table_is_named_beside_the_wall_clock():
    targets = [dict(t, lut=dict(t["lut"], clock="cpu")) if t["kind"] == "latency" else t
               for t in TARGETS]
    lat = _section(targets_=targets)[1]
    assert any("cpu time" in n and "wall-clock" in n for n in lat["notes"])


def test_a_fraction_of_the_fp_original_is_also_measured_as_one():
    rel = _section()[1]["relative"]
    assert rel["target"] == 0.5
    assert rel["measured"] == pytest.approx(0.5)  # 4.12 / 8.24, timed in the same run
    assert rel["fp_original_ms"] == 8.24


def test_skipped_latency_leaves_the_target_unmeasured_with_the_reason():
    lat = _section(timings=[], missing="not measured: the export ran with --skip-latency")[1]
    assert lat["measured"] is None and lat["error_vs_target"] is None
    assert "--skip-latency" in lat["not_measured"]
    assert "--skip-latency" in report_format.target_line(lat)


def test_a_setting_the_table_lacks_is_a_reason_too():
    lat = _section(timings=TIMINGS[2:])[1]
    assert lat["not_measured"] == "no onnxruntime timing at batch 32, 1 thread(s)"


def test_a_latency_target_without_its_tables_setting_is_not_measured_and_says_so():
    bare = {**TARGETS[1], "lut": {"runtime": "onnxruntime", "batch": "32"}}
    row = targets.section([bare], bops=0, size=0, weights="int8", file="m.onnx",
                          timings=TIMINGS, latency_missing=None, warmup=10, versions={},
                          cpu="Test CPU")[0]
    assert row["measured"] is None and "does not record" in row["not_measured"]


def test_size_counted_for_other_storage_says_so():
    size = _section(weights="int8")[2]
    assert "counted int4" in size["notes"][0] and "stores int8" in size["notes"][0]


def test_a_table_from_another_runtime_version_or_cpu_is_noted():
    other = {**TARGETS[1], "lut": {**LUT, "runtime_version": "1.20.0",
                                   "machine": {"cpu": "Other CPU"}}}
    row = targets.section([other], bops=0, size=0, weights="int8", file="m.onnx",
                          timings=TIMINGS, latency_missing=None, warmup=10,
                          versions={"onnxruntime": "1.32.0"}, cpu="Test CPU")[0]
    assert len(row["notes"]) == 2 and "1.20.0" in row["notes"][0]


@pytest.mark.parametrize("bad", [{"targets": {"kind": "bops"}},
                                 {"targets": [{"kind": "speed", "value": 1.0}]},
                                 {"targets": [{"kind": "bops", "value": "1M"}]},
                                 {"targets": [{"kind": "bops", "value": 1.0,
                                               "predicted": float("nan")}]}])
def test_malformed_targets_are_one_user_error(bad):
    with pytest.raises(UserError, match="targets"):
        targets.read(bad)


def test_a_checkpoint_without_targets_has_none():
    assert targets.read({}) == []


# --- the views ---------------------------------------------------------------------------------


def test_summary_line_reads_measured_against_target_and_prediction():
    assert report_format.target_line(_section()[1]) == (
        "latency 4.12 ms measured (ORT, batch 32, 1 thread, median of 50 runs) vs target "
        "4.00 ms (0.5x), predicted 3.95 ms: +3.0% vs target, +4.3% vs predicted; 0.50x the "
        "FP original's 8.24 ms in the same run (target 0.50x)")


def test_targets_table_in_markdown_and_html():
    rep = {**_report(), "targets": _section(weights="int8")}
    md, page = md_report.markdown(rep), render(rep)
    assert "## Targets" in md and "| size 1.50 KB (1.5KB) | 1.48 KB | 1.40 KB" in md
    assert "size target: the target counted int4" in md
    assert '<section id="targets">' in page and page.count("<tr>", page.index(
        'id="targets"'), page.index('id="totals"')) == 4  # the head and one row a target


def test_a_report_without_targets_shows_no_targets():
    rep = _report()
    assert "Targets" not in md_report.markdown(rep)
    assert 'id="targets"' not in render(rep)
