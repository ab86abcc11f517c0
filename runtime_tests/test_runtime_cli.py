"""`abs-export` and `abs validate` from the command line: the summary on success; one line,
exit code 2 and no file left behind for every input error."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from rt_checkpoints import random_checkpoint

from abs_deploy.checkpoint import load_checkpoint, save_checkpoint
from abs_deploy.cli.export import export_main, validate


@pytest.fixture(scope="module")
def good(datasets, tmp_path_factory):
    ckpt = random_checkpoint("digits_cnn", datasets("digits"), seed=6)
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("good") / "model.pt")


def _run(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


def _one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output


def test_export_prints_the_summary_and_validate_accepts_the_file(good, tmp_path):
    out = tmp_path / "m.onnx"
    result = _run(export_main, [good, "--onnx", "-o", out, "--skip-latency",
                                "--max-images", 64])
    assert result.exit_code == 0, result.output
    for word in ("BOPs", "top-1", "parity", "ORT", "latency skipped"):
        assert word in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.fp32.onnx", "m.onnx", "report.html", "report.json", "report.md", "report.png"]
    checked = _run(validate, [out, "--max-images", 64])
    assert checked.exit_code == 0, checked.output
    assert "agree" in checked.stdout


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(2048))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    return {"corrupt": corrupt, "foreign": foreign, "pickled": pickled}


@pytest.mark.parametrize("kind", ["corrupt", "foreign", "pickled"])
def test_unreadable_checkpoints_give_one_line_and_exit_2(kind, tmp_path):
    path = _bad_files(tmp_path)[kind]
    before = set(tmp_path.iterdir())
    _one_line_error(_run(export_main, [path, "--onnx", "--skip-latency"]))
    assert set(tmp_path.iterdir()) == before


def test_fp_checkpoint_is_refused(good, tmp_path):
    ckpt = load_checkpoint(good)
    ckpt["stage"] = "fp"
    path = save_checkpoint(ckpt, tmp_path / "fp.pt")
    _one_line_error(_run(export_main, [path, "--skip-latency"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.pt"]


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permissions; sysfs refuses even root
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a read-only folder")
def test_unwritable_output_folder_gives_one_line_and_exit_2(good, tmp_path):
    folder = _unwritable(tmp_path)
    before = set(folder.iterdir())
    _one_line_error(_run(export_main, [good, "-o", folder / "m.onnx", "--skip-latency"]))
    assert set(folder.iterdir()) == before


def _broken(good: Path, how: str) -> dict:
    """A checkpoint as a file would hold it, with its plain decision record broken `how`."""
    ckpt = load_checkpoint(good)
    decision = ckpt["decision"] = ckpt["decision"].to_record()
    if how == "kept_out_of_range":
        decision["block1.conv1"]["kept"] = [0, 1, 99]
    elif how == "unknown_layer":
        decision["block9.conv"] = dict(decision["stem"])
    elif how == "missing_layer":
        del decision["head"]
    elif how == "bad_bits":
        decision["head"]["w_bits"] = 16
    elif how == "unprunable_group":  # the residual stream of block1
        decision["stem"]["kept"] = decision["block1.conv2"]["kept"] = [0, 1, 2]
    elif how == "producers_disagree":  # expand and depthwise conv share one group
        decision["block2.expand"]["kept"] = [0, 1, 2]
        decision["block2.dw"]["kept"] = [0, 1, 3]
    elif how == "missing_clip":
        del ckpt["state_dict"]["head.a_clip"]
        decision["head"]["a_bits"] = 4
    elif how == "shape_mismatch":
        ckpt["state_dict"]["head.weight"] = torch.zeros(5, 5, 1, 1)
    return ckpt


@pytest.mark.parametrize("how", ["kept_out_of_range", "unknown_layer", "missing_layer",
                                 "bad_bits", "unprunable_group", "producers_disagree",
                                 "missing_clip", "shape_mismatch"])
def test_decision_that_does_not_fit_gives_one_line_and_exit_2(good, how, tmp_path):
    path = tmp_path / "bad.pt"
    torch.save(_broken(good, how), path)
    _one_line_error(_run(export_main, [path, "--skip-latency"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_output_must_be_an_onnx_file(good, tmp_path):
    _one_line_error(_run(export_main, [good, "-o", tmp_path / "model.txt", "--skip-latency"]))
    assert list(tmp_path.iterdir()) == []


def test_validate_refuses_a_file_that_is_not_onnx(good, tmp_path):
    _one_line_error(_run(validate, [good, "--dataset", "digits"]))


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_full_disk_during_export_is_one_line_and_keeps_the_previous_files(good, tmp_path,
                                                                          monkeypatch):
    for name in ("m.onnx", "m.fp32.onnx", "report.json", "report.md"):
        (tmp_path / name).write_bytes(b"the previous export's " + name.encode())
    before = _listing(tmp_path)

    def full_disk(model, path, *args, **kwargs):
        Path(path).write_bytes(model.SerializeToString()[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("abs_deploy.export.pipeline.onnx.save", full_disk)
    result = _run(export_main, [good, "-o", tmp_path / "m.onnx", "--skip-latency",
                                "--max-images", 64])
    _one_line_error(result)
    assert "No space left on device" in result.stderr
    assert _listing(tmp_path) == before  # no half file, no temporary folder


def test_a_killed_export_leaves_a_temporary_folder_the_next_export_removes(good, tmp_path):
    out = tmp_path / "m.onnx"
    cmd = [sys.executable, "-c", "from abs_deploy.cli.export import export_main as m; "
           "m(prog_name='abs-export')", str(good), "-o", str(out), "--skip-latency",
           "--max-images", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path.parent / f"{tmp_path.name}.stderr"   # beside the folder, not in it
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not any(tmp_path.iterdir()) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        ended = proc.poll()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".m.onnx.abs-tmp-"), (
        left, f"exit code before the kill: {ended}", log.read_text()[-2000:])
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.fp32.onnx", "m.onnx", "report.html", "report.json", "report.md", "report.png"]


def test_validate_refuses_a_file_with_another_class_count(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]),
         helper.make_node("Gemm", ["f", "w"], ["y"])], "five",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor("w", TensorProto.FLOAT, [64, 5], [0.0] * 320)])
    path = tmp_path / "five.onnx"
    onnx.save(helper.make_model(graph), path)
    result = _run(validate, [path, "--dataset", "digits"])
    _one_line_error(result)
    assert "outputs 5 class scores, dataset digits has 10 classes" in result.stderr
