"""The commands as a user runs them: numbers, outputs, and one-line errors for bad input."""

import json

import pytest
import torch
from click.testing import CliRunner

from abs_deploy.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert pattern in lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_bops_prints_published_resnet20_numbers():
    fp = run("bops", "resnet20", "--num-classes", "100")
    q = run("bops", "resnet20", "--num-classes", "100", "--w-bits", "4", "--a-bits", "4")
    assert "BOPs 41,798.6 M" in fp.output and "BOPs 674.6 M" in q.output


def test_bops_json_gives_the_same_numbers():
    out = json.loads(run("bops", "resnet20", "--num-classes", "100", "--w-bits", "4",
                         "--a-bits", "4", "--json").output)
    assert round(out["bops"] / 1e6, 1) == 674.6 and round(out["fp_bops"] / 1e6, 1) == 41798.6
    assert len(out["layers"]) == 22   # 19 convs + 2 projection shortcuts + fc


def test_unknown_model_is_one_line():
    assert_one_line_error(run("bops", "resnet21"), "unknown model 'resnet21'")


def test_missing_checkpoint_is_one_line(tmp_path):
    r = run("search", tmp_path / "nope.pt", "-o", tmp_path / "s.pt")
    assert_one_line_error(r, "no such file")


def test_foreign_file_is_one_line(tmp_path):
    bad = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    assert_one_line_error(run("search", bad, "-o", tmp_path / "s.pt"),
                          "not an abs-deploy checkpoint")


def test_text_file_as_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    assert_one_line_error(run("bops", bad), "not a torch checkpoint")


def test_wrong_dataset_path_is_one_line(tmp_path):
    r = run("pretrain", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", tmp_path,
            "-o", tmp_path / "fp.pt")
    assert_one_line_error(r, "lacks data_batch_1")
    assert not (tmp_path / "fp.pt").exists()


def test_nonexistent_dataset_path_is_rejected(tmp_path):
    r = run("pretrain", "--model", "resnet20", "--dataset", "cifar10", "--data-dir",
            tmp_path / "missing", "-o", tmp_path / "fp.pt")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_searching_an_already_searched_checkpoint_is_refused(tmp_path, fp_digits_path):
    ck = torch.load(fp_digits_path, weights_only=True)
    ck["stage"] = "searched"
    torch.save(ck, tmp_path / "s.pt")
    assert_one_line_error(run("search", tmp_path / "s.pt", "-o", tmp_path / "x.pt"),
                          "stage 'searched'")


@pytest.mark.parametrize("kwargs", ["{", "[1]"])
def test_bad_model_kwargs_are_one_line(tmp_path, kwargs):
    r = run("pretrain", "--model", "digits_cnn", "--model-kwargs", kwargs, "-o", tmp_path / "f")
    assert_one_line_error(r, "--model-kwargs")


def test_killed_search_resumes_from_its_state_file(fp_digits_path, tmp_path):
    """The user's path: `abs search` killed (SIGKILL, no clean-up) mid-run; rerunning without
    --resume refuses in one line, with --resume runs only the epochs that were missing and
    ends where an uninterrupted search ends."""
    import os
    import subprocess
    import sys

    from search_processes import kill_after_epochs

    exe = [sys.executable, "-c", "from abs_deploy.cli import main; main()"]
    args = ["search", str(fp_digits_path), "--method", "abs", "--target-bops", "64x",
            "--epochs", "6", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([*exe, *args, "-o", str(tmp_path / "whole.pt")], env=env,
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    out, state = tmp_path / "cut.pt", tmp_path / "cut.pt.partial"
    proc = subprocess.Popen([*exe, *args, "-o", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = kill_after_epochs(proc, state, 2)
    assert 2 <= done < 6 and not out.exists(), "the search ended before it could be killed"
    refused = subprocess.run([*exe, *args, "-o", str(out)], env=env, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    resumed = subprocess.run([*exe, *args, "--resume", "-o", str(out)], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _epochs(resumed.stdout) == _epochs(whole.stdout)[done:]
    assert not state.exists()
    a, b = torch.load(tmp_path / "whole.pt", weights_only=True), torch.load(out, weights_only=True)
    assert a["decision"] == b["decision"]
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-6), k


def _epochs(stdout: str) -> list[int]:
    return [int(line.split()[2]) for line in stdout.splitlines() if line.startswith("abs epoch")]


def test_finetune_streams_flag_writes_a_checkpoint_with_stream_quantizers(tmp_path,
                                                                          fp_digits_path):
    """`abs finetune --streams`: the checkpoint says so and carries each quantizer's clip."""
    from abs_deploy.checkpoint import load_checkpoint

    searched, tuned = tmp_path / "searched.pt", tmp_path / "model.pt"
    result = run("search", fp_digits_path, "--method", "uniform", "--epochs", "1",
                 "--batch-size", "512", "-o", searched)
    assert result.exit_code == 0, result.output
    result = run("finetune", searched, "--streams", "--epochs", "1", "--batch-size", "512",
                 "-o", tuned)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tuned, stages=("finetuned",))
    assert ckpt["streams"] == "shared"
    assert any(k.startswith("stream_quant.") and k.endswith(".clip") for k in ckpt["state_dict"])
    eight = tmp_path / "model8.pt"
    result = run("finetune", searched, "--streams", "--stream-codes", "8bit", "--epochs", "1",
                 "--batch-size", "512", "-o", eight)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(eight, stages=("finetuned",))["streams"] is True
