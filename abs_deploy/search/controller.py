"""The BOP controller of the ABS search: the `lam` of `CE + lam * log(BOPs / fp_bops)`, moved
after every step so that the BOPs settle on a target (DESIGN §5).

The plant is an integrator: `lam` sets how fast the gates' thresholds move, and the BOPs follow
the thresholds. The training loss is a disturbance that keeps pulling gates open, so holding the
target needs a standing `lam > 0` -- an integral term. A proportional term on top damps the
loop. The error is `log(B / T)` in units of the tolerance band, clipped, so one step far from the
target cannot throw `lam` across the range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class ControllerGains:
    """`kp`: lam per unit of (smoothed) error; `ki`: integral growth per step at unit error;
    `clip`: the error's bound, in tolerance units; `smooth`: weight of the newest error in its
    exponential average (1: no smoothing); `reset_at_crossing`: zero the integral whenever the
    error changes sign (the session-3 law); `lam_max`: |lam| bound."""

    kp: float = 0.5
    ki: float = 0.01
    clip: float = 1.0
    smooth: float = 1.0
    reset_at_crossing: bool = True
    lam_max: float = 5.0


# The law the Fashion-MNIST ablations measured (session 3): with the error clipped at one
# tolerance and the integral reset at every crossing it acts as a relay, lam alternating near
# +-kp and the BOPs swinging more than the band around the target.
RELAY = ControllerGains()


class LambdaController:
    """`update(bops)` after every step returns the `lam` for the next one."""

    def __init__(self, target: float, tolerance: float = 0.05,
                 gains: ControllerGains = RELAY, lam: float = 0.0) -> None:
        if target <= 0 or tolerance <= 0:
            raise ValueError(f"target and tolerance must be > 0, got {target}, {tolerance}")
        self.target, self.tolerance, self.gains = float(target), float(tolerance), gains
        self.lam = float(lam)
        self.integral = float(lam)
        self.err = 0.0            # the smoothed error the last update acted on

    def error(self, bops: float) -> float:
        """log(B / T) in tolerance units, clipped."""
        e = math.log(bops / self.target) / self.tolerance
        return max(-self.gains.clip, min(self.gains.clip, e))

    def update(self, bops: float) -> float:
        g = self.gains
        e = self.error(bops)
        self.err = g.smooth * e + (1 - g.smooth) * self.err
        if g.reset_at_crossing and self.err * self.integral < 0:
            self.integral = 0.0
        self.integral = max(-g.lam_max, min(g.lam_max, self.integral + g.ki * self.err))
        self.lam = max(-g.lam_max, min(g.lam_max, self.integral + g.kp * self.err))
        return self.lam

    def state_dict(self) -> dict:
        return {"lam": self.lam, "integral": self.integral, "err": self.err,
                "gains": asdict(self.gains)}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.integral = float(state["lam"]), float(state["integral"])
        self.err = float(state.get("err", 0.0))
