import pytest
import torch

from abs_deploy.data import load_dataset
from abs_deploy.pretrain import pretrain
from abs_deploy.train import TrainConfig


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def fp_digits(digits):
    """A trained digits CNN (about 15 s on 2 cores), shared by every test that needs one."""
    torch.set_num_threads(2)
    return pretrain("digits_cnn", digits, TrainConfig(epochs=30, lr=0.1, seed=0))


@pytest.fixture(scope="session")
def fp_digits_path(fp_digits, tmp_path_factory):
    from abs_deploy.checkpoint import save_checkpoint
    return save_checkpoint(fp_digits, tmp_path_factory.mktemp("ckpt") / "fp.pt")


@pytest.fixture(scope="session")
def fp(digits):
    """A real FP checkpoint after one epoch: enough for the tests that refuse it, resume from it
    or check what the CLI writes, and one pretrain for all of them."""
    return pretrain("digits_cnn", digits, TrainConfig(epochs=1, batch_size=512, seed=0))


@pytest.fixture(scope="session")
def fp_path(fp, tmp_path_factory):
    from abs_deploy.checkpoint import save_checkpoint
    return save_checkpoint(fp, tmp_path_factory.mktemp("fp") / "fp.pt")
