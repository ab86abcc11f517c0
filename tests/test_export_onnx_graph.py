import numpy as np
import pytest
import torch
from torch import nn

from abs_deploy.errors import UserError
from abs_deploy.export.onnx_graph import build_onnx, capture
from abs_deploy.export.validate import session
from abs_deploy.models import create_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _onnx(model: nn.Module, shape: list[int]):
    return build_onnx(capture(model.eval(), shape), shape).model


@pytest.mark.parametrize("name,shape,kwargs", [
    ("digits_cnn", [1, 1, 8, 8], {}),
    ("resnet20", [1, 3, 32, 32], {}),
    ("mobilenetv2_cifar", [1, 3, 32, 32], {"width_mult": 0.35}),
])
def test_float_translation_matches_pytorch_at_any_batch(name, shape, kwargs):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    sess = session(_onnx(model, shape))
    for batch in (1, 5):
        x = torch.randn(batch, *shape[1:])
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return torch.sin(self.conv(x)).flatten(1)


def test_an_op_the_translator_does_not_know_is_named():
    with pytest.raises(UserError, match="sin"):
        _onnx(_Odd(), [1, 1, 5, 5])


def test_opset_outside_the_supported_range_is_a_user_error():
    model = create_model("digits_cnn")
    with pytest.raises(UserError, match="opset"):
        build_onnx(capture(model.eval(), [1, 1, 8, 8]), [1, 1, 8, 8], opset=9)
