"""export/report_format.py: the wording and number formats every report view shares."""

from abs_deploy.export import collapse, report_format


def test_float_bits_of_the_report_are_the_exporters():
    """report.json holds the bits collapse decided; the views tell float by the report's own
    sentinel, which must be the same number."""
    assert report_format.FLOAT_BITS == collapse.FLOAT_BITS


def test_bits_at_the_sentinel_read_float_and_below_it_their_number():
    assert report_format.bits(report_format.FLOAT_BITS) == "float"
    assert report_format.bits(4) == "4"


def test_a_model_this_version_does_not_know_is_shown_as_written():
    assert report_format.model_label("qcdq_openvino") == "QCDQ (OpenVINO)"
    assert report_format.model_label("tflite") == "tflite"


def test_kernel_sentences_name_each_runtime_and_count():
    kernels = {"onnxruntime": {"integer_layers": 10, "float_layers": 12, "integer_adds": 0,
                               "adds": 9, "weights_dequantized": 12},
               "openvino": {"integer_layers": 22, "float_layers": 0, "integer_adds": None,
                            "adds": 9, "weights_dequantized": None}}
    assert report_format.kernel_sentences(kernels) == [
        "ONNX Runtime (all optimizations): 10 of 22 layers on integer kernels, 0 of 9 residual "
        "adds; 12 weight tensors dequantized to float on every run",
        "OpenVINO CPU: 22 of 22 layers on integer kernels"]
    assert report_format.kernel_sentences(None) == []  # a report from before the count
