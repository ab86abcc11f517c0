"""A second runtime (OpenVINO's CPU plugin) and the ONNX Runtime Mobile file (`.ort`): both
validated against the same PyTorch reference as ORT, with the same criteria. The OpenVINO
tests skip when the optional extra is not installed."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from rt_checkpoints import random_checkpoint

from abs_deploy.checkpoint import save_checkpoint
from abs_deploy.cli.export import export_main, validate
from abs_deploy.errors import UserError
from abs_deploy.export import ExportOptions, export_model, openvino_runtime, qdq
from abs_deploy.export.collapse import LayerQuant, collapse
from abs_deploy.export.onnx_builder import GraphBuilder
from abs_deploy.export.pipeline import _batches, _Files, _prune
from abs_deploy.export.validate import check_qcdq, session

needs_openvino = pytest.mark.skipif(not openvino_runtime.available(),
                                    reason="OpenVINO not installed (pip install .[openvino])")


@pytest.fixture(scope="module")
def checkpoint(datasets, tmp_path_factory):
    ckpt = random_checkpoint("resnet20", datasets("digits32"), seed=11, edge_bits=8)
    path = save_checkpoint(ckpt, tmp_path_factory.mktemp("rt2") / "model.pt")
    return ckpt, path


@pytest.fixture(scope="module")
def ort_export(checkpoint):
    _, path = checkpoint
    return export_model(path, ExportOptions(max_images=96, latency=False, ort_format=True))


def test_ort_file_is_written_validated_and_loads_on_its_own(ort_export):
    assert ort_export.files["ort"].name == "model.ort"
    par = ort_export.report["parity"]["ort_format"]
    assert par["passed"] and par["images"] == 96
    assert par["top1_agreement"] >= 0.995 and par["onnx_top1_agreement"] >= 0.995
    data = ort_export.files["ort"].read_bytes()
    assert data[4:8] == b"ORTM"  # the flatbuffer identifier of ORT format models
    # Fixed-style conversion: the int8 fusions are already in the file, and no x86-only
    # NCHWc layout op, so ORT Mobile on ARM can run it.
    assert b"QLinearConv" in data and b"NchwcConv" not in data and b"ReorderInput" not in data
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = session(data).run(None, {"input": x})[0]
    want = session(onnx.load(ort_export.files["onnx"])).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@needs_openvino
def test_openvino_check_passes_and_times_all_three_models(checkpoint, tmp_path):
    _, path = checkpoint
    result = export_model(path, ExportOptions(output=tmp_path / "m.onnx", max_images=96,
                                              check_runtimes=("openvino",), latency_runs=50,
                                              latency_batches=(1,), threads=1))
    ov = result.report["parity"]["openvino"]
    assert ov["passed"] and ov["top1_agreement"] >= 0.995
    assert ov["codes_equal"] >= 0.999 and ov["codes_max_diff"] <= 1
    assert len(ov["layers"]) == sum(1 for lq in result.report["layers"] if lq["a_bits"] < 32)
    timed = {r["model"] for r in result.report["latency"]["rows"]}
    assert timed == {"fp_original", "fp_pruned", "qcdq", "fp_original_openvino",
                     "fp_pruned_openvino", "qcdq_openvino"}
    assert json.loads((tmp_path / "report.json").read_text())["parity"]["openvino"]["passed"]


@needs_openvino
def test_openvino_check_catches_a_changed_weight(checkpoint, datasets):
    """The same harness fails a file whose integers are not the reference's: every weight code
    of layer1.0.conv1 changes sign."""
    ckpt, _ = checkpoint
    col = collapse(ckpt)
    pruned = _prune(col)
    files = _Files.build(col, pruned, {}, ExportOptions(latency=False))
    model = files.qcdq
    init = next(t for t in model.graph.initializer if t.name.endswith(".weight_q")
                and t.name.startswith("layer1.0.conv1"))
    w = -onnx.numpy_helper.to_array(init).astype(np.int16)
    init.CopyFrom(onnx.numpy_helper.from_array(w.clip(-128, 127).astype(np.int8), init.name))
    batches = _batches(datasets("digits32"), 64, 64)
    others = check_qcdq(model, files.quant, pruned.reference, batches,
                        runtimes=("openvino",)).others
    assert not others["openvino"].passed
    assert "OpenVINO" in others["openvino"].failure
    assert "layer1.0.conv2" in others["openvino"].failure  # reads layer1.0.conv1's output


@needs_openvino
@pytest.mark.parametrize("bits", [2, 4])
def test_openvino_runs_a_conv_on_signed_codes_exactly(bits):
    """A 3x3 conv reading signed b-bit codes, odd weights included, as the export writes it:
    OpenVINO gives unoptimized ORT's result. Written as int8 behind a Clip, its CPU plugin ran
    it with every weight halved and rounded on CPUs without VNNI (see qdq.zero_point)."""
    torch.manual_seed(0)
    lq = LayerQuant("conv", "conv", 4, bits, True, tuple(range(8)), 8, None, 4)
    b = GraphBuilder()
    act = qdq.activation(b, "input", lq, torch.tensor(0.5))
    w = qdq.weight(b, lq, torch.randint(-8, 8, (8, 4, 3, 3)).float(), torch.full((8,), 0.1))
    b.node("Conv", [act.output, w], "conv", pads=[1, 1, 1, 1])
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(b.nodes, "g", [vi("input", onnx.TensorProto.FLOAT,
                                                     [2, 4, 8, 8])],
                                   [vi("conv", onnx.TensorProto.FLOAT, None)], b.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    x = np.random.default_rng(0).uniform(-3, 3, (2, 4, 8, 8)).astype(np.float32)
    want = session(model, optimize=False).run(None, {"input": x})[0]
    got = openvino_runtime.OVSession(model).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_openvino
def test_validate_command_runs_openvino(ort_export):
    result = CliRunner().invoke(validate, [str(ort_export.files["onnx"]), "--max-images", "64",
                                           "--runtime", "openvino"])
    assert result.exit_code == 0, result.output
    assert "OpenVINO" in result.stdout and "agree on 100.00%" in result.stdout


def test_missing_openvino_is_one_clear_line(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setattr(openvino_runtime, "available", lambda: False)
    with pytest.raises(UserError, match="pip install 'abs-deploy\\[openvino\\]'"):
        export_model(checkpoint[1], ExportOptions(output=tmp_path / "m.onnx",
                                                  check_runtimes=("openvino",)))
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(export_main, [str(checkpoint[1]), "-o", str(tmp_path / "m.onnx"),
                                              "--check-runtime", "openvino"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().startswith("Error: OpenVINO is not installed")


@needs_openvino
def test_openvino_computes_residual_stream_adds_exactly(datasets, tmp_path):
    """ResNet-20 with residual-stream quantizers (streams.py): each conv meeting a residual
    add writes Q/DQ on its output, then the add, then the stream's Q/DQ. OpenVINO's CPU plugin
    fuses that chain into one int8 conv and drops the rounding of the first quantizer
    (top-1 agreement 70%); OVSession keeps the conv-made operands' codes as outputs (see
    openvino_runtime.residual_add_operands), and every layer still runs on integer kernels."""
    ckpt = random_checkpoint("resnet20", datasets("digits32"), fixed=(4, 4), prune_fraction=0.5,
                             edge_bits=8, single_channel=False, with_streams=True)
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    result = export_model(path, ExportOptions(output=tmp_path / "m.onnx", latency=False,
                                              max_images=64, check_runtimes=("openvino",)))
    ov = result.report["parity"]["openvino"]
    assert ov["passed"] and ov["top1_agreement"] >= 0.995
    assert ov["codes_max_diff"] <= 1
    model = onnx.load(result.files["onnx"])
    # the conv2 of each of the 9 blocks, the 2 shortcut convs and the stem conv, whose own
    # 8-bit stream the first block's add reads
    assert len(openvino_runtime.residual_add_operands(model)) == 9 + 2 + 1
    kernels = result.report["kernels"]
    assert (kernels["openvino"]["integer_layers"], kernels["openvino"]["float_layers"]) == (22, 0)
    assert (kernels["onnxruntime"]["integer_layers"], kernels["onnxruntime"]["integer_adds"],
            kernels["onnxruntime"]["weights_dequantized"]) == (22, 9, 0)
    # Whoever deploys the file on OpenVINO is told to do the same.
    assert any("residual_add_operands" in n for n in result.report["notes"])


@needs_openvino
def test_block_inputs_clip_in_float_and_openvino_runs_no_standalone_eltwise(datasets,
                                                                             tmp_path):
    """A block input has a float reader (the residual add) and a quantized one (the next
    conv): its quantizer reads the ReLU's output and clips in float in front of its
    QuantizeLinear (qdq.clip_in_float), so OpenVINO fuses the ReLU into the conv and the Clip
    into the FakeQuantize (before: 7 ReLU and 7 integer Clamp nodes of their own), with the
    same codes in both runtimes and ORT's fusions unchanged."""
    ckpt = random_checkpoint("resnet20", datasets("digits32"), fixed=(4, 4), prune_fraction=0.5,
                             edge_bits=8, single_channel=False)
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    result = export_model(path, ExportOptions(output=tmp_path / "m.onnx", latency=False,
                                              max_images=64, check_runtimes=("openvino",)))
    parity = result.report["parity"]
    assert parity["openvino"]["passed"] and parity["ort_optimized"]["passed"]
    model = onnx.load(result.files["onnx"])
    made_by = {o: n for n in model.graph.node for o in n.output}
    float_clips = [n for n in model.graph.node if n.op_type == "Clip"
                   and made_by[n.input[0]].op_type == "Relu"]
    assert len(float_clips) == 7
    assert all(made_by[c.output[0]] is c and any(q.op_type == "QuantizeLinear" and
               q.input[0] == c.output[0] for q in model.graph.node) for c in float_clips)
    ov = result.report["kernels"]["openvino"]["node_types"]
    assert not any(kind.startswith("Eltwise") for kind in ov), ov
    ort_kernels = result.report["kernels"]["onnxruntime"]
    assert ort_kernels["integer_layers"] == 10 and ort_kernels["node_types"].get("Relu") is None


@needs_openvino
def test_openvino_session_profiles_the_nodes_it_ran(ort_export):
    from abs_deploy.export.openvino_runtime import OVSession

    session = OVSession(onnx.load(ort_export.files["onnx"]), threads=1, profile=True)
    session.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})
    profile = session.last_run_profile()
    assert any(kind.startswith("Convolution") and us >= 0 for kind, us in profile), profile


@needs_openvino
def test_openvino_computes_shared_code_streams_exactly(datasets, tmp_path):
    """Shared codes (streams.py): a block's input is quantized once, by its conv's 4-bit
    quantizer, and the residual add reads those codes. The conv -> 8-bit Q/DQ -> Add chain on
    the other operand is still there, so OpenVINO still needs their codes as outputs
    (without them: top-1 agreement 69% measured)."""
    ckpt = random_checkpoint("resnet20", datasets("digits32"), fixed=(4, 4), prune_fraction=0.5,
                             edge_bits=8, single_channel=False, with_streams=True,
                             shared_codes=True)
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    result = export_model(path, ExportOptions(output=tmp_path / "m.onnx", latency=False,
                                              max_images=64, check_runtimes=("openvino",)))
    ov = result.report["parity"]["openvino"]
    assert ov["passed"] and ov["top1_agreement"] >= 0.995 and ov["codes_max_diff"] <= 1
    model = onnx.load(result.files["onnx"])
    # as with 8-bit streams: 9 conv2s, 2 shortcut convs, the stem conv
    assert len(openvino_runtime.residual_add_operands(model)) == 9 + 2 + 1
    kernels = result.report["kernels"]
    assert (kernels["openvino"]["integer_layers"], kernels["openvino"]["float_layers"]) == (22, 0)
