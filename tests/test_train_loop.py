"""The one training loop (`train.fit`): what it refuses, mixed precision, and that a method's
hooks run where the loop promises."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from abs_deploy.errors import UserError
from abs_deploy.models.registry import create_model
from abs_deploy.train import Method, TrainConfig, evaluate, fit


@pytest.fixture
def small(digits):
    return dataclasses.replace(digits, train_x=digits.train_x[:256], train_y=digits.train_y[:256])


class _Recorder(Method):
    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []

    def begin_step(self, step: int) -> None:
        self.events.append(("begin", step))

    def loss(self, ce, step: int):
        self.events.append(("loss", step))
        return ce

    def before_update(self, step: int) -> None:
        # Gradients exist here, and the optimizer has not used them yet.
        assert any(p.grad is not None for p in self.model.parameters())
        self.events.append(("update", step))

    def end_step(self, step: int) -> None:
        self.events.append(("end", step))

    def end_epoch(self, epoch: int) -> dict:
        self.events.append(("epoch", epoch))
        return {"marker": epoch}


def test_a_methods_hooks_run_in_order_every_step(small):
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_chans=1)
    method = _Recorder()
    method.model = model
    logs = fit(model, small, TrainConfig(epochs=2, batch_size=64, lr=0.05), method)
    steps = small.num_batches("train", 64)
    per_step = [(kind, s) for s in range(2 * steps) for kind in ("begin", "loss", "update", "end")]
    expected = per_step[:4 * steps] + [("epoch", 0)] + per_step[4 * steps:] + [("epoch", 1)]
    assert method.events == expected
    assert [log.extra["marker"] for log in logs] == [0, 1]


def test_the_cosine_schedule_reaches_zero_on_the_last_step():
    m = Method()
    assert m.lr_factor(0, 100) == 1.0 and m.lr_factor(50, 100) == pytest.approx(0.5)
    assert m.lr_factor(100, 100) == pytest.approx(0.0, abs=1e-12)


def _trained(data, amp: str | None) -> float:
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_chans=1)
    fit(model, data, TrainConfig(epochs=8, batch_size=64, lr=0.1, amp=amp))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return evaluate(model, data, "val")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_the_full_precision_model(small, amp):
    """Autocast computes in half precision; the weights stay float32, and 8 epochs on 256
    images reach what float32 reaches (0.85 on this seed) within 5 points."""
    reached, full = _trained(small, amp), _trained(small, None)
    assert full > 0.7 and abs(reached - full) <= 0.05


def test_mixed_precision_is_refused_for_a_quantizing_method(small):
    method = Method()
    method.name, method.amp_safe = "uniform QAT", False
    model = create_model("digits_cnn", num_classes=10, in_chans=1)
    with pytest.raises(UserError, match="--amp is for full-precision training"):
        fit(model, small, TrainConfig(epochs=1, amp="bf16"), method)


def test_a_diverging_stage_hands_back_its_starting_weights(fp, small):
    """The starting weights compete for the best validation epoch: at a rate that wrecks the
    trained digits model, fit returns it unchanged instead of its least bad epoch."""
    from abs_deploy.checkpoint import build_arch

    model = build_arch(fp["arch"])
    model.load_state_dict(fp["state_dict"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = evaluate(model, small)
    logs = fit(model, small, TrainConfig(epochs=1, lr=50.0, batch_size=64))
    assert logs[0].val_acc < before      # training did wreck it
    assert evaluate(model, small) == before
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


class _FirstStep(Method):
    """Scales the loss up (so the gradient is far above any clip) and records how far the
    first update moved the weights."""

    name = "first step"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.moved = model, None

    def begin_step(self, step: int) -> None:
        self.before = [p.detach().clone() for p in self.model.parameters()]

    def loss(self, ce, step: int):
        return 1e3 * ce

    def end_step(self, step: int) -> None:
        if self.moved is None:
            pairs = zip(self.model.parameters(), self.before, strict=True)
            self.moved = torch.cat([(p.detach() - b).flatten() for p, b in pairs]).norm().item()


def _first_update(data, grad_clip: float | None) -> float:
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_chans=1)
    method = _FirstStep(model)
    fit(model, data, TrainConfig(epochs=1, batch_size=64, lr=0.01, weight_decay=0.0,
                                 grad_clip=grad_clip), method)
    return method.moved


def test_grad_clip_bounds_the_update_by_the_clipped_norm(small):
    """The first Nesterov step moves the weights by lr * (1 + momentum) * |g|: with the
    gradient clipped to norm 2 that is exactly 0.038, far below the unclipped step."""
    clipped, free = _first_update(small, 2.0), _first_update(small, None)
    assert clipped == pytest.approx(0.01 * 1.9 * 2.0, rel=1e-4)
    assert free > 10 * clipped
