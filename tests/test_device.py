"""`--device`: resolved once, carried by the data, refused in one line when the machine lacks it.
This machine has no GPU: the CUDA path is the same code with another device string."""

import pytest
import torch
from click.testing import CliRunner

from abs_deploy.cli import main
from abs_deploy.data import load_dataset
from abs_deploy.device import device_of, resolve_device
from abs_deploy.errors import UserError

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    assert resolve_device("auto") == ("cpu" if NO_CUDA else "cuda:0")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_one_line_naming_it(spec):
    with pytest.raises(UserError) as e:
        resolve_device(spec)
    assert "CUDA is not available" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", ""])
def test_unknown_device_lists_the_choices(spec):
    with pytest.raises(UserError, match="auto, cpu, cuda, cuda:N or mps"):
        resolve_device(spec)


def test_batches_arrive_on_the_data_device_and_the_data_stays_put():
    data = load_dataset("digits")
    on = data.on("cpu")
    x, y = next(on.batches("train", 8))
    assert x.device.type == "cpu" and y.device.type == "cpu"
    assert on.train_x is data.train_x and data.device == "cpu"


def test_device_of_reads_parameters_then_buffers():
    assert device_of(torch.nn.Linear(2, 2)).type == "cpu"
    assert device_of(torch.nn.BatchNorm1d(2, affine=False)).type == "cpu"
    assert device_of(torch.nn.ReLU()).type == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["pretrain", "--model", "digits_cnn"],
                                     ["search", "{fp}", "--target-bops", "64x"],
                                     ["finetune", "{fp}"]])
def test_cli_refuses_a_missing_device_before_any_work(command, fp_path, tmp_path):
    out = tmp_path / "out.pt"
    args = [a.replace("{fp}", str(fp_path)) for a in command]
    result = CliRunner().invoke(main, [*args, "--device", "cuda", "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], result.output
    assert not out.exists()
