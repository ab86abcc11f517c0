"""Shared by the tests that kill a running search: wait until its `.partial` state holds enough
epochs, then send the signal."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import torch


def kill_after_epochs(proc: subprocess.Popen, state: Path, epochs: int,
                      sig: int = signal.SIGKILL) -> int:
    """Send `sig` to `proc` once `state` records `epochs` finished epochs (or the process ended
    first); returns the epochs the state file held when it was sent."""
    done = 0
    while proc.poll() is None and done < epochs:
        time.sleep(0.05)
        try:
            done = torch.load(state, weights_only=True)["resume"]["epoch"]
        except Exception:  # not written yet, or caught mid-rename
            done = 0
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return done
