"""What the runtimes make of the exported file (export/kernels.py, the report's "kernels"), on
ResNet-20 with half of every inner group pruned and 4/4 bits (8/8 first and last layer), as
`benchmarks/export_resnet20.py` exports it."""

import onnx
import pytest
from rt_checkpoints import random_checkpoint

from abs_deploy.checkpoint import save_checkpoint
from abs_deploy.export import ExportOptions, export_model, openvino_runtime
from abs_deploy.export.kernels import onnxruntime_kernels, openvino_kernels

LAYERS, ADDS = 22, 9  # ResNet-20: 21 convs (two 1x1 shortcuts) and the classifier; 9 blocks


@pytest.fixture(scope="module")
def resnet20(datasets, tmp_path_factory):
    ckpt = random_checkpoint("resnet20", datasets("digits32"), fixed=(4, 4), prune_fraction=0.5,
                             edge_bits=8, single_channel=False)
    folder = tmp_path_factory.mktemp("kernels")
    path = save_checkpoint(ckpt, folder / "model.pt")
    runtimes = ("openvino",) if openvino_runtime.available() else ()
    results = {}
    for w in ("int8", "int4"):
        (folder / w).mkdir()
        results[w] = export_model(path, ExportOptions(
            output=folder / w / "model.onnx", weights=w, latency=False, max_images=32,
            check_runtimes=runtimes))
    return ckpt, results


def test_the_report_counts_every_layer_and_residual_add(resnet20):
    _, results = resnet20
    ort = results["int8"].report["kernels"]["onnxruntime"]
    assert ort["integer_layers"] + ort["float_layers"] == LAYERS
    assert ort["adds"] == ADDS and 0 < ort["integer_layers"]
    # Each float layer of ORT's graph dequantizes its integer weights on every run.
    assert ort["weights_dequantized"] == ort["float_layers"]


def test_the_float_file_has_no_integer_kernel(resnet20):
    _, results = resnet20
    k = onnxruntime_kernels(onnx.load(results["int8"].files["fp32"]))
    assert (k.integer_layers, k.float_layers, k.integer_adds, k.weights_dequantized) == \
        (0, LAYERS, 0, 0)


def test_ort_never_fuses_four_bit_weights(resnet20):
    ckpt, results = resnet20
    four_bit = sum(d.w_bits <= 4 for d in ckpt["decision"].values())
    ort = results["int4"].report["kernels"]["onnxruntime"]
    assert ort["integer_layers"] <= LAYERS - four_bit
    assert ort["weights_dequantized"] == ort["float_layers"] >= four_bit
    assert ort["integer_layers"] < results["int8"].report["kernels"]["onnxruntime"][
        "integer_layers"]


@pytest.mark.skipif(not openvino_runtime.available(), reason="OpenVINO not installed")
def test_openvino_runs_every_layer_of_the_int8_file_on_integer_kernels(resnet20):
    _, results = resnet20
    ov = results["int8"].report["kernels"]["openvino"]
    assert (ov["integer_layers"], ov["float_layers"]) == (LAYERS, 0)
    assert openvino_kernels(onnx.load(results["int8"].files["fp32"])).integer_layers == 0


def test_without_stream_quantizers_the_convs_meeting_residual_adds_stay_float(resnet20):
    """Why #15 added stream quantizers: a conv whose output meets a residual add has no
    quantizer on its output, so ORT cannot fuse it, nor the add."""
    _, results = resnet20
    ort = results["int8"].report["kernels"]["onnxruntime"]
    assert ort["integer_layers"] < LAYERS and ort["integer_adds"] == 0


@pytest.fixture(scope="module")
def resnet20_streams(datasets, tmp_path_factory):
    ckpt = random_checkpoint("resnet20", datasets("digits32"), fixed=(4, 4), prune_fraction=0.5,
                             edge_bits=8, single_channel=False, with_streams=True)
    folder = tmp_path_factory.mktemp("streams")
    path = save_checkpoint(ckpt, folder / "model.pt")
    return export_model(path, ExportOptions(output=folder / "model.onnx", latency=False,
                                            max_images=64))


def test_ort_runs_every_layer_and_residual_add_on_integer_kernels(resnet20_streams):
    """#15's goal, with residual-stream quantizers (streams.py): every conv a QLinearConv,
    every residual add a QLinearAdd, no weight dequantized at run time; parity holds in both
    ORT modes (export_model raises otherwise)."""
    ort = resnet20_streams.report["kernels"]["onnxruntime"]
    assert (ort["integer_layers"], ort["integer_adds"], ort["weights_dequantized"]) == \
        (LAYERS, ADDS, 0)
    parity = resnet20_streams.report["parity"]
    assert parity["ort_optimized"]["top1_agreement"] == 1.0


MOBILENET_LAYERS, MOBILENET_ADDS = 53, 11  # width 0.35 on digits32: 52 convs + classifier


@pytest.fixture(scope="module")
def mobilenet_streams(datasets, tmp_path_factory):
    ckpt = random_checkpoint("mobilenetv2_cifar", datasets("digits32"), fixed=(4, 4),
                             prune_fraction=0.5, edge_bits=8, single_channel=False,
                             with_streams=True, width_mult=0.35)
    folder = tmp_path_factory.mktemp("mobilenet_streams")
    path = save_checkpoint(ckpt, folder / "model.pt")
    return export_model(path, ExportOptions(output=folder / "model.onnx", latency=False,
                                            max_images=64))


def test_ort_runs_every_mobilenet_layer_on_integer_kernels(mobilenet_streams):
    """The last 1x1 conv reaches the classifier's quantizer only through ReLU6, the global
    pool and flatten: its stream quantizer after the ReLU6 lets it fuse too."""
    ort = mobilenet_streams.report["kernels"]["onnxruntime"]
    assert (ort["integer_layers"], ort["float_layers"], ort["integer_adds"], ort["adds"],
            ort["weights_dequantized"]) == (MOBILENET_LAYERS, 0, MOBILENET_ADDS,
                                            MOBILENET_ADDS, 0)
    assert mobilenet_streams.report["parity"]["ort_optimized"]["top1_agreement"] == 1.0


@pytest.fixture(scope="module")
def resnet20_shared(datasets, tmp_path_factory):
    ckpt = random_checkpoint("resnet20", datasets("digits32"), fixed=(4, 4), prune_fraction=0.5,
                             edge_bits=8, single_channel=False, with_streams=True,
                             shared_codes=True)
    folder = tmp_path_factory.mktemp("shared")
    path = save_checkpoint(ckpt, folder / "model.pt")
    return export_model(path, ExportOptions(output=folder / "model.onnx", latency=False,
                                            max_images=64))


def _requantized(model: onnx.ModelProto) -> list[str]:
    """QuantizeLinear nodes reading a DequantizeLinear's output: codes turned into other codes
    on every run."""
    made_by = {o: n for n in model.graph.node for o in n.output}

    def source(t: str) -> str | None:    # through a float Clip in front (qdq.clip_in_float)
        node = made_by.get(t)
        if node is not None and node.op_type == "Clip":
            node = made_by.get(node.input[0])
        return None if node is None else node.op_type

    return [n.name for n in model.graph.node
            if n.op_type == "QuantizeLinear" and source(n.input[0]) == "DequantizeLinear"]


def test_8_bit_streams_are_requantized_for_the_4_bit_layers_reading_them(resnet20_streams):
    """What shared codes remove: each block's input, an 8-bit stream, is requantized to the
    4-bit input of the conv(s) reading it (11 layers: 9 conv1 and 2 shortcuts)."""
    assert len(_requantized(onnx.load(resnet20_streams.files["onnx"]))) == 11


def test_shared_codes_quantize_each_tensor_once(resnet20_shared):
    """A block's input is quantized by its conv's own 4-bit quantizer, which the conv, the
    shortcut conv and the residual add all read: no QuantizeLinear reads dequantized codes,
    and no tensor has two QuantizeLinears."""
    model = onnx.load(resnet20_shared.files["onnx"])
    assert _requantized(model) == []
    quantized = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantized) == len(set(quantized))


def test_with_shared_codes_ort_requantizes_nothing(resnet20_shared):
    """#15 (d): every layer, residual add and the global pool on integer kernels, and the only
    QuantizeLinear left in ORT's optimized graph is the network input's; parity exact."""
    ort = resnet20_shared.report["kernels"]["onnxruntime"]
    assert (ort["integer_layers"], ort["integer_adds"], ort["weights_dequantized"]) == \
        (LAYERS, ADDS, 0)
    types = ort["node_types"]
    assert types.get("QuantizeLinear") == 1 and "DequantizeLinear" not in types
    assert types.get("QLinearGlobalAveragePool") == 1
    parity = resnet20_shared.report["parity"]
    for mode in ("ort_unoptimized", "ort_optimized"):
        assert parity[mode]["top1_agreement"] == 1.0 and parity[mode]["codes_max_diff"] == 0
