"""The export's files, their ONNX structure and the report, on one small digits model exported
once with latency on (the one latency measurement of the suite)."""

import json

import numpy as np
import onnx
import pytest
import torch
from rt_checkpoints import random_checkpoint

from abs_deploy.checkpoint import save_checkpoint
from abs_deploy.export import ExportOptions, export_model, validate_file
from abs_deploy.export.simplify import quantizer_nodes
from abs_deploy.export.validate import session
from abs_deploy.quant import int_range


@pytest.fixture(scope="module")
def exported(datasets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    ckpt = random_checkpoint("digits_cnn", datasets("digits"), seed=5)
    path = save_checkpoint(ckpt, folder / "model.pt")
    result = export_model(path, ExportOptions(max_images=128, latency_batches=(1, 8)))
    return ckpt, result, folder


def test_export_writes_every_file_and_nothing_else(exported):
    _, result, folder = exported
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model.fp32.onnx", "model.onnx", "model.pt", "report.html", "report.json",
                     "report.md", "report.png"]
    assert set(result.files) == {"onnx", "fp32", "json", "md", "png", "html"}


@pytest.mark.parametrize("key", ["onnx", "fp32"])
def test_files_pass_the_full_checker_with_a_dynamic_batch(exported, key):
    _, result, _ = exported
    model = onnx.load(result.files[key])
    onnx.checker.check_model(model, full_check=True)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "N"
    x = np.zeros((3, 1, 8, 8), np.float32)
    assert session(model).run(None, {"input": x})[0].shape == (3, 10)


@pytest.mark.parametrize("key", ["onnx", "fp32"])
def test_conv_weight_shapes_equal_the_kept_counts(exported, key):
    ckpt, result, _ = exported
    model = onnx.load(result.files[key])
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        layer = node.name.rsplit(".w", 1)[0] if ".w" in node.name else node.name
        weight = node.input[1]
        if weight in producer:  # DequantizeLinear of the integer initializer
            weight = producer[weight].input[0]
        assert shapes[weight][0] == len(ckpt["decision"][layer].kept)


def test_every_quantized_layer_has_its_bits_in_names_and_clip_bounds(exported):
    ckpt, result, _ = exported
    model = onnx.load(result.files["onnx"])
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for layer, d in ckpt["decision"].to_record().items():
        tag = f"{layer}.w{d['w_bits']}a{d['a_bits']}"
        assert tag in nodes
        clip = nodes.get(f"{tag}.act_clip")
        lo, hi = int_range(d["a_bits"], d["a_signed"])
        # Signed codes are stored as uint8 offset by 2^(b-1) (qdq.zero_point).
        zp = 2 ** (d["a_bits"] - 1) if d["a_signed"] else 0
        if d["a_bits"] == 8:
            assert clip is None
        else:
            assert (int(inits[clip.input[1]]), int(inits[clip.input[2]])) == (lo + zp, hi + zp)
        q = nodes[f"{tag}.act_q"]
        zero = inits[q.input[2]]
        assert zero.dtype == np.uint8 and zero == zp


def test_no_float_clip_sits_between_a_layer_and_its_quantizer(exported):
    """Where the quantizer is all that reads a layer's output, a float Clip or Relu between
    them would block ORT's fusion into QLinearConv (DESIGN §10). A tensor that a float node
    reads too (a ResNet block's input, read by the residual add) cannot fuse either way; its
    quantizer reads the Relu the add reads and clips in float first (qdq.clip_in_float)."""
    _, result, _ = exported
    model = onnx.load(result.files["onnx"])
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    checked = 0
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        first, tensor = q, q.input[0]
        if tensor in producer and producer[tensor].op_type == "Clip":
            first, tensor = producer[tensor], producer[tensor].input[0]
        clamped = first is not q or (tensor in producer and
                                     producer[tensor].op_type in ("Clip", "Relu"))
        if clamped:
            others = [r for r in readers[tensor] if r is not first]
            assert any(r.op_type != "QuantizeLinear" for r in others), \
                f"{q.name}: a float clamp between a layer and a quantizer that alone reads it"
            checked += 1
    assert checked > 0     # the model has block inputs; the rule's exception was exercised


def test_the_pruned_float_file_clips_where_the_qcdq_file_quantizes(exported):
    """model.fp32.onnx is the QCDQ model without its rounding: every quantized layer reads its
    input through a float Clip to the range its quantizer's codes cover, `[lo * s, hi * s]`
    with the QCDQ file's own scale."""
    ckpt, result, _ = exported
    fp32, qcdq = onnx.load(result.files["fp32"]), onnx.load(result.files["onnx"])
    q_inits = {i.name: onnx.numpy_helper.to_array(i) for i in qcdq.graph.initializer}
    q_nodes = {n.name: n for n in qcdq.graph.node}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in fp32.graph.initializer}
    producer = {o: n for n in fp32.graph.node for o in n.output}
    layers = {n.name: n for n in fp32.graph.node if n.op_type in ("Conv", "Gemm")}
    for layer, d in ckpt["decision"].to_record().items():
        clip = producer.get(layers[layer].input[0])
        if d["a_bits"] >= 32:
            continue
        assert clip is not None and clip.op_type == "Clip", layer
        s = q_inits[q_nodes[f"{layer}.w{d['w_bits']}a{d['a_bits']}.act_q"].input[1]]
        lo, hi = int_range(d["a_bits"], d["a_signed"])
        assert float(inits[clip.input[1]]) == pytest.approx(lo * float(s), rel=1e-6), layer
        assert float(inits[clip.input[2]]) == pytest.approx(hi * float(s), rel=1e-6), layer


def test_the_pruned_float_file_computes_the_qcdq_model_without_rounding(datasets, tmp_path):
    """With 8-bit codes rounding is small and clipping is what shapes the model. Clips a
    quarter of what calibration chose bite hard: unclipped, the float ResNet-20 with residual
    streams is another model (logits off by about their own size); clipped, model.fp32.onnx
    follows model.onnx in ORT."""
    data = datasets("digits32")
    ckpt = random_checkpoint("resnet20", data, seed=5, fixed=(8, 8), with_streams=True,
                             shared_codes=True)
    for key in [k for k in ckpt["state_dict"] if k.endswith((".a_clip", ".clip"))]:
        ckpt["state_dict"][key] = ckpt["state_dict"][key] / 4
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    result = export_model(path, ExportOptions(max_images=128, latency=False))
    # A layer that shares a stream's codes reads the stream's Clip, not a second one.
    fp32 = onnx.load(result.files["fp32"])
    inits = {i.name: float(onnx.numpy_helper.to_array(i)) for i in fp32.graph.initializer
             if not i.dims}
    clips = {n.output[0]: n for n in fp32.graph.node if n.op_type == "Clip"}
    bounds = {o: (inits[n.input[1]], inits[n.input[2]]) for o, n in clips.items()}
    assert clips and not [n.name for n in clips.values()
                          if bounds.get(n.input[0]) == bounds[n.output[0]]]
    x = next(iter(data.batches("test", 128)))[0].numpy()
    logits = {k: session(onnx.load(result.files[k])).run(None, {"input": x})[0]
              for k in ("onnx", "fp32")}
    scale = np.abs(logits["onnx"]).max()
    assert np.abs(logits["fp32"] - logits["onnx"]).max() / scale < 0.05
    assert (logits["fp32"].argmax(1) == logits["onnx"].argmax(1)).mean() >= 0.95
    from abs_deploy.export.collapse import collapse

    with torch.no_grad():
        unclipped = collapse(ckpt).masked_float(torch.from_numpy(x)).numpy()
    assert np.abs(unclipped - logits["onnx"]).max() / scale > 0.5  # the clips do bite


def test_weights_are_integers_inside_their_range(exported):
    ckpt, result, _ = exported
    model = onnx.load(result.files["onnx"])
    for init in model.graph.initializer:
        if init.name.endswith(".weight_q"):
            w = onnx.numpy_helper.to_array(init)
            d = ckpt["decision"][init.name[:-len(".weight_q")]]
            bits = 7 if d.w_bits == 8 and (d.a_bits == 8 or d.a_signed) else d.w_bits
            lo, hi = int_range(bits, True)
            assert w.dtype == np.int8 and w.min() >= lo and w.max() <= hi


def test_metadata_holds_the_decision(exported):
    ckpt, result, _ = exported
    meta = {p.key: p.value for p in onnx.load(result.files["onnx"]).metadata_props}
    decision = json.loads(meta["abs_deploy.decision"])
    for layer, d in ckpt["decision"].to_record().items():
        assert decision[layer]["w_bits"] == d["w_bits"]
        assert decision[layer]["a_bits"] == d["a_bits"]
        assert decision[layer]["kept"] == d["kept"]


def test_report_has_totals_parity_accuracy_and_latency(exported):
    _, result, _ = exported
    report = json.loads(result.files["json"].read_text())
    assert report["totals"]["ratios"]["bops"] > 1
    assert {"fp_original", "reference", "ort", "ort_unoptimized"} <= set(report["accuracy"])
    assert all(p["passed"] for p in report["parity"].values())
    lat = report["latency"]
    assert lat["cpu"]
    models = {(r["model"], r["batch"], r["threads"]) for r in lat["rows"]}
    assert {m for m, _, _ in models} == {"fp_original", "fp_pruned", "qcdq"}
    assert {b for _, b, _ in models} == {1, 8}
    assert 1 in {t for _, _, t in models}
    assert all(r["runs"] >= 50 and r["p90_ms"] >= r["median_ms"] > 0 for r in lat["rows"])
    md = result.files["md"].read_text()
    assert "BOPs" in md and "Latency" in md and "Parity" in md


def test_pruned_float_accuracy_is_the_fp32_files_accuracy(exported):
    """The report's pruned float row is the model the user gets as model.fp32.onnx: its
    accuracy in ORT on the same images (the first 128, as the export validated)."""
    _, result, _ = exported
    report = json.loads(result.files["json"].read_text())
    assert any(r["kept"] < r["total"] for r in report["layers"])
    acc = report["accuracy"]
    check = validate_file(result.files["fp32"], max_images=128)
    assert check.images == 128
    assert acc["pruned_float"] == pytest.approx(check.accuracy_off, abs=1 / 128)


def test_unsimplified_export_keeps_every_quantizer(exported, tmp_path):
    ckpt, result, folder = exported
    out = tmp_path / "raw.onnx"
    raw = export_model(folder / "model.pt", ExportOptions(output=out, simplify=False,
                                                          latency=False, max_images=32))
    assert quantizer_nodes(onnx.load(raw.files["onnx"])) == \
        quantizer_nodes(onnx.load(result.files["onnx"]))


def test_validate_file_reads_normalisation_and_dataset_from_metadata(exported):
    _, result, _ = exported
    check = validate_file(result.files["onnx"], max_images=64)
    assert check.passed and check.images == 64
    assert check.accuracy_all == pytest.approx(check.accuracy_off, abs=0.02)


@pytest.mark.parametrize("bn_folded", [False, True])
def test_collapse_groups_are_the_exported_models_groups(datasets, bn_folded):
    """Export captures the architecture once, before a bn_folded checkpoint's BNs are dropped;
    the channel structure it reads must be the one of the models it prunes."""
    from abs_deploy import graph
    from abs_deploy.export.collapse import collapse

    ckpt = random_checkpoint("resnet20", datasets("digits32"), seed=3, bn_folded=bn_folded)
    col = collapse(ckpt)
    for model in (col.original, col.masked_float):
        fresh = graph.channel_groups(model, torch.zeros(col.input_shape))
        assert [(g.producers, g.consumers, g.depthwise, g.prunable, g.spatial)
                for g in fresh] == [(g.producers, g.consumers, g.depthwise, g.prunable,
                                     g.spatial) for g in col.groups]
