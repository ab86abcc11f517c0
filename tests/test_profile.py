"""`abs profile` on the tiny digits CNN: a table the search can load, measured on pieces that
run the same kernels as the whole export, reused instead of measured again, and every bad
output file refused in one line before any work."""

import collections
import json
import random

import pytest
from click.testing import CliRunner

from abs_deploy.cli import main
from abs_deploy.export.collapse import collapse
from abs_deploy.export.kernels import onnxruntime_kernels
from abs_deploy.export.pipeline import ExportOptions, qcdq_files
from abs_deploy.export.profile import (
    ProfileOptions,
    _Model,
    _tag,
    grid_counts,
    layer_pieces,
    table_anchors,
)
from abs_deploy.latency_table import LatencyTable
from abs_deploy.models.registry import arch_record

# The least that still covers a quantized and a float layer, two grid points per prunable
# side and an overhead fit: about 20 s on 2 cores.
QUICK = ["--candidates", "8", "--grid-points", "2", "--fit-decisions", "2"]


def run(*args):
    return CliRunner().invoke(main, ["profile", *map(str, args)])


def one_line(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert words in lines[0], lines[0]


@pytest.fixture(scope="module")
def lut(tmp_path_factory):
    path = tmp_path_factory.mktemp("lut") / "lut.json"
    result = run("digits_cnn", *QUICK, "-o", path)
    assert result.exit_code == 0, result.output
    return path


def test_profile_writes_a_table_the_search_can_load(lut):
    table = LatencyTable.load(lut)
    model = table.model
    table.check_for(model["arch"], model["input_shape"])
    assert table.layers()[0] == "stem" and table.layers()[-1] == "fc"
    assert (table.batch, table.threads, table.candidates) == (32, 1, (8,))
    for name in table.layers():
        out_grid, in_grid = table.grid(name)
        assert set(table.bits(name)) == {(8, 8), (32, 32)}
        values = table.values(name, 8, 8)
        assert len(values) == len(out_grid) and all(len(r) == len(in_grid) for r in values)
        assert all(v > 0 for r in values for v in r)
    assert table.fp_original_ms > 0 and table.fit["decisions"] == 2
    full = {n: (8, 8, table.grid(n)[0][-1], table.grid(n)[1][-1]) for n in table.layers()}
    assert table.predict_ms(full) > 0


def test_second_profile_to_the_same_file_measures_nothing(lut):
    before = json.loads(lut.read_text())["cache"]["measurements"]
    result = run("digits_cnn", *QUICK, "-o", lut)
    assert result.exit_code == 0, result.output
    assert "measured 0 layer piece(s) and 0 whole model(s) in 0 export(s)" in result.output
    assert json.loads(lut.read_text())["cache"]["measurements"] == before


def test_an_interrupted_profile_resumes_without_measuring_again(lut, tmp_path):
    record = json.loads(lut.read_text())
    record["complete"] = False
    del record["cache"]["cells"]["block1.conv1"]  # as if killed before that layer's exports
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(record))
    result = run("digits_cnn", *QUICK, "-o", partial)
    assert result.exit_code == 0, result.output
    # Its pieces are exported again to find their signatures, all of them already timed.
    assert "measured 0 layer piece(s) and 0 whole model(s)" in result.output
    assert "in 0 export(s)" not in result.output
    assert LatencyTable.load(partial).values("block1.conv1", 8, 8) == \
        LatencyTable.load(lut).values("block1.conv1", 8, 8)


def test_a_table_of_another_model_is_refused_in_one_line(lut):
    one_line(run("digits_cnn", "--input-shape", "1,16,16", *QUICK, "-o", lut), "another model")


def test_a_table_of_another_machine_is_refused_in_one_line(lut, tmp_path):
    record = json.loads(lut.read_text())
    record["machine"] = {"cpu": "Some Other CPU", "cores": 64}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(record))
    one_line(run("digits_cnn", *QUICK, "-o", other), "another machine")


def test_a_table_of_another_setting_is_refused_in_one_line(lut):
    one_line(run("digits_cnn", *QUICK, "--batch", "4", "-o", lut), "another setting")


@pytest.mark.parametrize("content, words", [("{not json", "not JSON"),
                                            ('{"format": "abs-deploy/1"}', "not a latency")])
def test_an_output_that_is_no_table_is_refused_in_one_line(tmp_path, content, words):
    path = tmp_path / "lut.json"
    path.write_text(content)
    one_line(run("digits_cnn", *QUICK, "-o", path), words)
    assert path.read_text() == content


@pytest.mark.parametrize("channels, max_prune, points, multiple, grid", [
    (16, 0.75, 4, 8, [8, 16]),            # the fewest (4) rounds up to the multiple
    (32, 0.75, 4, 8, [8, 16, 24, 32]),
    (64, 0.75, 4, 8, [16, 32, 48, 64]),   # seven multiples, four points spread over them
    (64, 0.5, 4, 8, [32, 40, 56, 64]),
    (10, 0.5, 4, 8, [8, 10]),             # the layer's own count is always there
    (8, 0.5, 4, 8, [4, 5, 7, 8]),         # one multiple only: the plain spread
    (16, 0.75, 4, 1, [4, 8, 12, 16]),
    (16, 0.5, 4, 1, [8, 11, 13, 16]),     # the grid before multiples (still reachable)
])
def test_grid_counts_are_multiples_spread_over_the_prunable_range(channels, max_prune, points,
                                                                  multiple, grid):
    assert grid_counts(channels, max_prune, points, multiple) == grid


def test_the_channel_multiple_is_the_runtimes_unless_given():
    from abs_deploy.export.profile import channel_multiple

    assert channel_multiple(ProfileOptions(runtime="onnxruntime")) == 8
    assert channel_multiple(ProfileOptions(runtime="openvino")) == 1
    assert channel_multiple(ProfileOptions(runtime="openvino", channel_multiple=16)) == 16


def test_the_table_records_its_channel_multiple_and_every_count_is_one(lut):
    record = json.loads(lut.read_text())
    assert record["channel_multiple"] == 8
    table = LatencyTable.load(lut)
    pruned = [n for n in table.layers() if len(table.grid(n)[0]) > 1]
    assert pruned
    for name in pruned:
        out_channels = table.channels(name)[0]
        assert all(k % 8 == 0 or k == out_channels for k in table.grid(name)[0])
    for sample in table.fit["samples"]:   # the overhead fit's decisions: grid counts only
        for name, (_, _, out_kept, in_kept) in sample["choice"].items():
            assert out_kept in table.grid(name)[0] and in_kept in table.grid(name)[1]


def test_a_tables_anchors_are_rebuilt_from_the_table_alone(lut):
    """What a check of the table times beside its decisions to put them on the table's level:
    the same pieces the table timed beside every batch (by signature), and the median of
    those batches' anchor totals."""
    import statistics

    from abs_deploy.errors import UserError
    from abs_deploy.export.profile import signature

    table = LatencyTable.load(lut)
    anchors, level = table_anchors(table)
    assert sorted(anchors) == sorted({f"anchor {n}" for n in ("stem", "fc", table.layers()[
        len(table.layers()) // 2])})
    assert level == statistics.median(table.record["cache"]["batches"])
    # Pieces the table measured carry these signatures (the anchors are whole-model layers
    # at the top bits with every channel kept, which the grid holds too).
    measured = set(table.record["cache"]["measurements"])
    assert {signature(p) for p in anchors.values()} <= measured
    bare = LatencyTable({**table.record, "cache": {}}, "bare.json")
    with pytest.raises(UserError, match="bare.json: the table records no anchor batches"):
        table_anchors(bare)


def test_bad_options_are_one_line():
    one_line(run("digits_cnn", "--candidates", "4,16", "-o", "x.json"), "candidates")
    one_line(run("no_such_model", "-o", "x.json"), "no_such_model")


@pytest.mark.parametrize("arch, with_streams", [("digits_cnn", False), ("resnet20", True)])
@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (4, 8)])
def test_pieces_run_the_kernels_of_the_whole_export(bits, arch, with_streams):
    """Summed over the pieces, ONNX Runtime runs the same integer and float layer kernels as
    on the whole file: each conv fuses to QLinearConv exactly when it does in the file. With
    residual-stream quantizers a layer reading a stream takes the stream's Q/DQ into its piece
    (cut after it, ORT ran that conv in float on dequantized weights, at 1.5x its time)."""
    model = _Model(arch_record(arch, num_classes=10, in_chans=1), [1, 1, 8, 8],
                   ProfileOptions(candidates=(4, 8), streams=with_streams))
    layer_bits = {n: model.bits_of(n, bits) for n in model.order}
    kept = model.random_decision(random.Random(0))[1]
    qcdq, _, _ = qcdq_files(collapse(model.checkpoint(layer_bits, kept)),
                            ExportOptions(latency=False))
    whole = onnxruntime_kernels(qcdq)
    pieces = layer_pieces(qcdq, {n: _tag(b) for n, b in layer_bits.items()})
    summed = collections.Counter()
    for piece in pieces.values():
        summed.update(onnxruntime_kernels(piece).node_types)
    for kernel in ("QLinearConv", "QGemm", "QLinearMatMul"):
        assert summed[kernel] == whole.node_types.get(kernel, 0), kernel
    float_layers = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul")
    assert sum(summed[k] for k in float_layers) == \
        sum(whole.node_types.get(k, 0) for k in float_layers)


def test_a_checkpoint_names_the_model_it_was_trained_as(fp_path, fp):
    from abs_deploy.cli.profile import _model

    assert _model(str(fp_path), None, None) == (fp["arch"], list(fp["input"]["shape"]))


def test_activation_bits_below_8_share_the_8_bit_measurement():
    """A layer's piece is the same graph at 8/8, 8/4 and 4/2 (the input quantizer's Clip is
    fused into the producer in the whole file and left out of the piece), so one measurement
    serves all and the search sees no latency between them; the whole file keeps the Clips."""
    from abs_deploy.export.profile import signature

    model = _Model(arch_record("resnet20", num_classes=10, in_chans=1), [1, 1, 8, 8],
                   ProfileOptions(candidates=(2, 4, 8), streams=True))
    kept = {gid: grid[-1] for gid, grid in model.grids.items()}
    sigs, clips = collections.defaultdict(set), 0
    for pair in [(8, 8), (8, 4), (4, 2)]:
        layer_bits = {n: model.bits_of(n, pair) for n in model.order}
        qcdq, _, _ = qcdq_files(collapse(model.checkpoint(layer_bits, kept)),
                                ExportOptions(latency=False))
        clips += sum(n.op_type == "Clip" for n in qcdq.graph.node)
        for name, piece in layer_pieces(qcdq, {n: _tag(b) for n, b in
                                               layer_bits.items()}).items():
            sigs[name].add(signature(piece))
    assert clips > 0
    inner = [n for n in model.order if not model.layers[n].edge]
    assert inner and all(len(sigs[n]) == 1 for n in inner), {n: len(sigs[n]) for n in inner}
