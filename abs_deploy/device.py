"""Which device a stage runs on (`--device`): resolved once where the command starts, then carried
by the `Dataset` (its batches arrive on it) and taken by each stage's model from there; no stage
branches on it."""

from __future__ import annotations

import re

import torch
from torch import nn

from abs_deploy.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(spec: str) -> str:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`, checked against
    this machine: a device it lacks is a one-line user error, not a crash mid-run."""
    text = spec.strip().lower()
    if text == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps: this machine has no MPS (Apple GPU) backend")
        return "mps"
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise UserError(f"--device must be {DEVICE_CHOICES}, got {spec!r}")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise UserError(f"--device {text}: CUDA is not available on this machine (torch "
                        f"{torch.__version__}, built with {built})")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA "
                        "device(s)")
    return f"cuda:{index}"


def device_of(model: nn.Module) -> torch.device:
    """Where a model's parameters (or, without any, its buffers) live."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
