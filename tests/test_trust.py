"""A model file never runs code: a checkpoint whose architecture names an import path is refused
by every command that reads checkpoints (one line, exit 2, nothing executed) unless the user
names that path (`--model pkg.mod:fn`) or passes `--trust-model-code`; zoo names need nothing.
Import-path factories get only the arguments they take."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from abs_deploy.checkpoint import load_checkpoint
from abs_deploy.cli import main
from abs_deploy.cli.export import export_main
from abs_deploy.errors import UserError
from abs_deploy.models.registry import trusted_imports

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FORMS = ["import", "name"]  # {"import": "os:system"} and the older {"name": "os:system"}


def _evil(fp: dict, marker: Path, form: str, stage: str) -> dict:
    """What an attacker writes: plain data (so weights_only=True loads it), naming os:system
    with a command as the factory's keyword argument."""
    return {**fp, "stage": stage, "decision": {},
            "arch": {form: "os:system", "kwargs": {"command": f"touch {marker}"}}}


def _files(fp: dict, folder: Path, form: str) -> tuple[dict[str, Path], Path]:
    marker = folder / "code-ran"
    paths = {}
    for stage in ("fp", "searched"):
        paths[stage] = folder / f"evil-{stage}.pt"
        torch.save(_evil(fp, marker, form, stage), paths[stage])
    return paths, marker


def _commands(evil: dict[str, Path], good_fp: Path, out: Path) -> dict[str, list[str]]:
    """Every command that reads a checkpoint, each given the malicious one. The resumed search
    starts from a good FP checkpoint and finds the malicious file as its .partial state."""
    search = ["abs", "search", evil["fp"], "--epochs", "1", "--batch-size", "512"]
    resumed = out / "resumed.pt"
    resumed.with_name("resumed.pt.partial").write_bytes(evil["searched"].read_bytes())
    return {
        "bops": ["abs", "bops", evil["fp"]],
        "search uniform": [*search, "--method", "uniform", "-o", out / "u.pt"],
        "search abs": [*search, "--method", "abs", "--target-bops", "20x", "-o", out / "a.pt"],
        "search bsq": [*search, "--method", "bsq", "-o", out / "b.pt"],
        "search --resume": ["abs", "search", good_fp, "--method", "abs", "--target-bops", "20x",
                            "--epochs", "1", "--batch-size", "512", "--resume", "-o", resumed],
        "finetune": ["abs", "finetune", evil["searched"], "--epochs", "1", "-o", out / "f.pt"],
        "abs-export": ["abs-export", evil["searched"], "--skip-latency", "-o", out / "m.onnx"],
    }


def _assert_refused(name: str, code: int, stderr: str, marker: Path) -> None:
    assert not marker.exists(), f"{name} ran the file's code"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"{name}: exit {code}: {stderr}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"{name}: {stderr}"
    assert "os:system" in lines[0] and "--trust-model-code" in lines[0], f"{name}: {lines[0]}"


def test_malicious_checkpoint_runs_no_code_in_any_command(fp, fp_path, tmp_path):
    """Each command as its own process, as a user runs it; they run side by side."""
    evil, marker = _files(fp, tmp_path, "import")
    out = tmp_path / "out"
    out.mkdir()
    entry = {"abs": "from abs_deploy.cli import main as m",
             "abs-export": "from abs_deploy.cli.export import export_main as m"}
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", f"{entry[argv[0]]}; m(prog_name='{argv[0]}')",
         *map(str, argv[1:])], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
        for name, argv in _commands(evil, fp_path, out).items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        _assert_refused(name, proc.returncode, stderr, marker)
    assert sorted(p.name for p in out.iterdir()) == ["resumed.pt.partial"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("command", ["bops", "search uniform", "search abs", "search bsq",
                                     "search --resume", "finetune", "abs-export"])
def test_either_form_of_the_record_is_refused(fp, fp_path, tmp_path, form, command):
    evil, marker = _files(fp, tmp_path, form)
    out = tmp_path / "out"
    out.mkdir()
    argv = _commands(evil, fp_path, out)[command]
    result = CliRunner().invoke(export_main if argv[0] == "abs-export" else main,
                                [str(a) for a in argv[1:]])
    _assert_refused(command, result.exit_code, result.stderr, marker)


def test_the_users_say_so_is_what_stands_between_the_file_and_its_code(fp, tmp_path):
    """The control for the tests above: with --trust-model-code (or --model naming the same
    path) the file's code does run, so a marker that is absent there means refused."""
    evil, marker = _files(fp, tmp_path, "import")
    other = CliRunner().invoke(main, ["bops", str(evil["fp"]), "--model", "os:popen"])
    assert other.exit_code == 2 and "allows only os:popen" in other.stderr
    assert not marker.exists()
    trusted = CliRunner().invoke(main, ["bops", str(evil["fp"]), "--trust-model-code"])
    assert marker.exists() and trusted.exit_code == 2  # os.system returns no model
    marker.unlink()
    named = CliRunner().invoke(main, ["bops", str(evil["fp"]), "--model", "os:system"])
    assert marker.exists() and "not a torch.nn.Module" in named.stderr


@pytest.mark.parametrize("arch, says", [
    ("resnet20", "arch record is not understood"),
    ({"name": "resnet20", "import": "os:system"}, "arch record is not understood"),
    ({"name": "resnet20", "kwargs": {}, "hook": "x"}, "arch record is not understood"),
    ({"name": 20}, "names a int"),
    ({"name": "resnet20", "kwargs": [10]}, "kwargs must be a dict of plain values"),
    ({"name": "resnet20", "kwargs": {"num_classes": torch.tensor(10)}}, "plain values"),
    ({"import": "os.system"}, "is not pkg.module:factory"),
    ({"import": "os:system; rm"}, "is not pkg.module:factory"),
    ({"name": "resnet21"}, "unknown model 'resnet21'"),
])
def test_arch_records_are_checked_strictly_before_anything(fp, tmp_path, arch, says):
    path = tmp_path / "odd.pt"
    torch.save({**fp, "decision": {}, "arch": arch}, path)
    with pytest.raises(UserError, match=says) as refused:
        load_checkpoint(path)
    assert "\n" not in str(refused.value)


def test_zoo_checkpoints_need_no_permission(fp_path):
    assert load_checkpoint(fp_path)["arch"]["name"] == "digits_cnn"


# --- import-path factories -------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_factory_taking_only_num_classes_trains_searches_and_is_allowed_by_name(
        tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    path, fp = "plain_factories:tiny_net", tmp_path / "fp.pt"
    trained = run("pretrain", "--model", path, "--dataset", "digits32", "--epochs", "1",
                  "--batch-size", "512", "-o", fp)
    assert trained.exit_code == 0, trained.output
    with trusted_imports(path):
        assert load_checkpoint(fp)["arch"] == {"import": path, "kwargs": {"num_classes": 10}}
    refused = run("bops", fp)
    assert refused.exit_code == 2 and f"--model {path}" in refused.stderr
    assert run("bops", fp, "--model", path).exit_code == 0
    searched = run("search", fp, "--method", "uniform", "--epochs", "1", "--batch-size", "512",
                   "--model", path, "-o", tmp_path / "s.pt")
    assert searched.exit_code == 0, searched.output


@pytest.mark.parametrize("factory, dataset, says", [
    ("tiny_net", "digits", "takes no in_chans argument, so it is built for 3-channel images; "
                           "the data has 1"),
    ("tv_style", "digits", "does not accept"),
    ("fixed_classes", "digits32", "outputs [1, 1000] for one image; the data has 10 classes"),
])
def test_factory_that_does_not_fit_the_data_is_one_line_before_training(
        tmp_path, monkeypatch, factory, dataset, says):
    monkeypatch.syspath_prepend(str(TESTS))
    result = run("pretrain", "--model", f"plain_factories:{factory}", "--dataset", dataset,
                 "-o", tmp_path / "fp.pt")
    assert result.exit_code == 2 and says in result.stderr, result.output
    assert len(result.stderr.splitlines()) == 1 and "epoch" not in result.stdout


def test_torchvision_style_factory_gets_no_in_chans_for_rgb_data(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    result = run("pretrain", "--model", "plain_factories:tv_style", "--dataset", "digits32",
                 "--epochs", "1", "--batch-size", "512", "-o", tmp_path / "fp.pt")
    assert result.exit_code == 0, result.output

