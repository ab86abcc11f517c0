"""A checkpoint searched for targets, exported: report.json measures each target on the files
written (the latency at the table's own batch and threads), the weight bytes of the int4 and
int8 files of one checkpoint differ by half the 4-bit weights, --weights left out follows the
size target's storage, and a checkpoint without targets reports none."""

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from rt_checkpoints import random_checkpoint

from abs_deploy.checkpoint import save_checkpoint
from abs_deploy.cli import export_main
from abs_deploy.export import ExportOptions, export_model
from abs_deploy.export.targets import weight_bytes

LUT = {"runtime": "onnxruntime", "runtime_version": "0", "batch": 4, "threads": 1,
       "machine": {"cpu": "unknown"}, "fp_original_ms": 0.2}
TARGETS = [
    {"kind": "bops", "value": 3e6, "unit": "BOPs", "text": "3M", "predicted": 2.9e6},
    {"kind": "latency", "value": 0.1, "unit": "ms", "text": "0.5x", "predicted": 0.09,
     "lut": LUT},
    {"kind": "size", "value": 3000.0, "unit": "bytes", "text": "3KB", "predicted": 2000.0,
     "weights": "int4"},
]


@pytest.fixture(scope="module")
def checkpoints(datasets, tmp_path_factory):
    """The same random checkpoint with and without targets (bits from {2, 4, 8}: some weights
    pack to INT4, some do not)."""
    folder = tmp_path_factory.mktemp("targets")
    ckpt = random_checkpoint("digits_cnn", datasets("digits"), seed=3)
    plain = save_checkpoint(ckpt, folder / "plain.pt")
    with_targets = save_checkpoint({**ckpt, "targets": TARGETS}, folder / "targets.pt")
    return plain, with_targets, folder


@pytest.fixture(scope="module")
def timed(checkpoints):
    """Exported with latency, at batches that miss the table's batch 4."""
    _, path, folder = checkpoints
    return export_model(path, ExportOptions(output=_out(folder, "timed"),
                                            max_images=64, latency_batches=(1,)))


def _out(folder, name):
    (folder / name).mkdir()
    return folder / name / "model.onnx"


def _rows(result) -> dict[str, dict]:
    rows = json.loads(result.files["json"].read_text())["targets"]
    return {r["kind"]: r for r in rows}


def test_every_target_is_measured_on_the_written_files(timed):
    rows = _rows(timed)
    assert list(rows) == ["bops", "latency", "size"]
    assert rows["bops"]["measured"] == timed.report["totals"]["exported"]["bops"]
    assert rows["size"]["measured"] == weight_bytes(onnx.load(timed.files["onnx"]))
    for row in rows.values():
        assert row["error_vs_target"] == pytest.approx(row["measured"] / row["value"] - 1)
        assert row["error_vs_predicted"] == pytest.approx(row["measured"] / row["predicted"] - 1)


def test_latency_target_is_timed_at_the_tables_batch_and_threads(timed):
    lat = _rows(timed)["latency"]
    timings = {(r["model"], r["batch"], r["threads"]): r["median_ms"]
               for r in timed.report["latency"]["rows"]}
    assert lat["measured"] == timings["qcdq", 4, 1]
    assert (lat["how"]["batch"], lat["how"]["threads"], lat["how"]["runtime"]) == \
        (4, 1, "onnxruntime")
    assert lat["relative"]["measured"] == pytest.approx(
        timings["qcdq", 4, 1] / timings["fp_original", 4, 1])
    assert ("qcdq", 1, 1) in timings  # the batches asked for are timed as well


def test_weights_left_out_follow_the_size_targets_storage(timed):
    assert timed.report["options"]["weights"] == "int4"
    model = onnx.load(timed.files["onnx"])
    assert any(i.data_type == onnx.TensorProto.INT4 for i in model.graph.initializer)


def test_int4_file_is_smaller_by_half_its_4_bit_weights(timed, checkpoints):
    _, path, folder = checkpoints
    int8 = export_model(path, ExportOptions(output=_out(folder, "int8"),
                                            weights="int8", latency=False, max_images=64))
    four = [i for i in onnx.load(timed.files["onnx"]).graph.initializer
            if i.data_type == onnx.TensorProto.INT4 and len(i.dims) > 1]
    saved = sum(math.prod(i.dims) - math.ceil(math.prod(i.dims) / 2) for i in four)
    assert four and saved > 0
    assert _rows(int8)["size"]["measured"] - _rows(timed)["size"]["measured"] == saved
    assert "stores int8" in _rows(int8)["size"]["notes"][0]


def test_skip_latency_says_the_latency_target_was_not_measured(checkpoints):
    _, path, folder = checkpoints
    runner = CliRunner()
    res = runner.invoke(export_main, [str(path), "-o", str(_out(folder, "cli")),
                               "--skip-latency", "--max-images", "64"])
    assert res.exit_code == 0, res.output
    lat = _rows_of(folder / "cli" / "report.json")["latency"]
    assert lat["measured"] is None and "--skip-latency" in lat["not_measured"]
    assert "latency not measured: the export ran with --skip-latency" in res.output
    assert "size " in res.output and "measured (int4 weights" in res.output


def _rows_of(path) -> dict[str, dict]:
    return {r["kind"]: r for r in json.loads(path.read_text())["targets"]}


def test_a_checkpoint_without_targets_exports_as_before(checkpoints):
    plain, _, folder = checkpoints
    result = export_model(plain, ExportOptions(output=_out(folder, "plain"),
                                               latency=False, max_images=64))
    assert "targets" not in result.report
    assert result.report["options"]["weights"] == "int8"
    assert "Targets" not in result.files["md"].read_text()
    assert 'id="targets"' not in result.files["html"].read_text()
    assert all(i.data_type != onnx.TensorProto.INT4
               for i in onnx.load(result.files["onnx"]).graph.initializer)
    assert np.isfinite(result.report["totals"]["exported"]["bops"])
