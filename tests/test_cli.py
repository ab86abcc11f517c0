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
    assert_one_line_error(run("bops", bad), "not a readable checkpoint")


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
