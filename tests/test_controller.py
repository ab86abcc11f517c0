"""The lam controller against a model of what it steers: the BOPs move by `-gain * lam` in log
space every step (gates integrate lam), minus a steady pull upward (the training loss reopening
gates), so holding the target needs a standing lam > 0."""

import math

import pytest

from abs_deploy.search.controller import RELAY, ControllerGains, LambdaController

TARGET = 1e6


def _run(ctl: LambdaController, start: float = 4.0, steps: int = 1500, gain: float = 0.02,
         pull: float = 0.004) -> list[float]:
    log_b, errs = math.log(start * TARGET), []
    for _ in range(steps):
        lam = ctl.update(math.exp(log_b))
        log_b += pull - gain * lam
        errs.append(log_b - math.log(TARGET))
    return errs


@pytest.mark.parametrize("start", [4.0, 0.25])
def test_relay_law_settles_within_the_band_from_above_and_below(start):
    ctl = LambdaController(TARGET, 0.05, RELAY)
    errs = _run(ctl, start)
    assert max(abs(e) for e in errs[-300:]) <= 0.05
    assert ctl.integral > 0          # the standing lam that holds the pull


def test_a_controller_pushing_the_wrong_way_is_caught():
    # The test above must be able to fail: flip the sign of the error and the BOPs run away.
    class Flipped(LambdaController):
        def error(self, bops: float) -> float:
            return -super().error(bops)

    errs = _run(Flipped(TARGET, 0.05, RELAY))
    assert max(abs(e) for e in errs[-300:]) > 0.05


def test_lam_stays_within_its_bound_and_the_error_is_clipped():
    gains = ControllerGains(lam_max=1.0)
    ctl = LambdaController(TARGET, 0.05, gains)
    for _ in range(1000):
        lam = ctl.update(100 * TARGET)
        assert -1.0 <= lam <= 1.0
    assert ctl.error(100 * TARGET) == gains.clip
    assert ctl.error(TARGET / 100) == -gains.clip


def test_the_integral_restarts_at_a_crossing_only_under_the_relay_law():
    for reset in (True, False):
        ctl = LambdaController(TARGET, 0.05, ControllerGains(reset_at_crossing=reset))
        for _ in range(50):
            ctl.update(2 * TARGET)
        ctl.update(TARGET / 2)
        assert (ctl.integral < 0) == reset


def test_state_round_trips():
    a = LambdaController(TARGET, 0.05, RELAY)
    for b in (3, 2, 1.5, 0.9):
        a.update(b * TARGET)
    b = LambdaController(TARGET, 0.05, RELAY)
    b.load_state_dict(a.state_dict())
    assert b.update(1.2 * TARGET) == a.update(1.2 * TARGET)


def test_bad_target_is_refused():
    with pytest.raises(ValueError):
        LambdaController(0.0)
