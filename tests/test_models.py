import pytest
import torch
from torch import nn

from abs_deploy import bops
from abs_deploy.errors import UserError
from abs_deploy.models import create_model, list_models
from abs_deploy.models.registry import (
    arch_record,
    build_model,
    default_input_shape,
    trusted_imports,
)


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_runs_on_its_input(name):
    model = create_model(name, num_classes=7).eval()
    shape = default_input_shape(name)
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("classes,macs", [(10, 40.81e6), (100, 40.82e6)])
def test_resnet20_macs_match_published(classes, macs):
    costs = bops.layer_costs(create_model("resnet20", num_classes=classes), (1, 3, 32, 32))
    assert abs(sum(c.macs for c in costs) - macs) < 0.005e6


def test_mobilenetv2_matches_published_size():
    model = create_model("mobilenetv2")
    params = sum(p.numel() for p in model.parameters())
    macs = sum(c.macs for c in bops.layer_costs(model, (1, 3, 224, 224)))
    assert abs(params - 3.50e6) < 0.01e6 and abs(macs - 300e6) < 2e6


def test_digits_cnn_has_a_residual_add_and_a_depthwise_conv():
    model = create_model("digits_cnn")
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1
          and m.groups == m.in_channels]
    assert dw and hasattr(model, "block1")


def test_model_by_import_path_builds_and_records_path():
    arch = arch_record("torch.nn:Identity")
    assert arch == {"import": "torch.nn:Identity", "kwargs": {}}
    assert isinstance(create_model("torch.nn:Identity"), nn.Identity)
    with trusted_imports("torch.nn:Identity"):
        assert isinstance(build_model(arch), nn.Identity)


def test_import_path_in_a_record_is_refused_unless_trusted():
    with pytest.raises(UserError, match="--model torch.nn:Identity or --trust-model-code"):
        build_model(arch_record("torch.nn:Identity"))
    with trusted_imports("torch.nn:Flatten"), pytest.raises(UserError, match="allows only"):
        build_model(arch_record("torch.nn:Identity"))
    with trusted_imports(any_path=True):
        assert isinstance(build_model(arch_record("torch.nn:Identity")), nn.Identity)


def test_unknown_model_is_a_user_error_listing_the_zoo():
    with pytest.raises(UserError, match="unknown model 'resnet21'.*resnet20"):
        create_model("resnet21")


def test_import_path_returning_a_non_module_is_refused():
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        create_model("collections:OrderedDict")


def test_wrong_builder_arguments_are_a_user_error():
    with pytest.raises(UserError, match="does not accept"):
        create_model("resnet20", depth=3)


@pytest.mark.parametrize("name, kwargs", [("fashion_cnn", {}), ("resnet20", {}),
                                          ("mobilenetv2_cifar", {"width_mult": 0.25})])
def test_models_train_on_fashion_mnist_shaped_images(name, kwargs):
    """Fashion-MNIST is 1x28x28: the CIFAR architectures take it as well as the 28x28 model
    (one channel in, a 28x28 grid that the stride-2 stages and the pooled head absorb)."""
    from abs_deploy.data import load_dataset
    from abs_deploy.pretrain import pretrain
    from abs_deploy.train import TrainConfig

    data = load_dataset("synthetic", synthetic_shape=(1, 28, 28))
    ckpt = pretrain(name, data, TrainConfig(epochs=1, batch_size=128), kwargs)
    assert ckpt["input"]["shape"] == [1, 1, 28, 28] and ckpt["arch"]["kwargs"]["in_chans"] == 1
    assert ckpt["metrics"]["macs"] > 0 and 0 <= ckpt["metrics"]["top1"] <= 1
