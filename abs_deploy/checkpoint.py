"""The `model.pt` format (DESIGN §8): a plain dict of tensors, numbers, strings, lists and dicts,
written atomically and read with `torch.load(weights_only=True)` so a model file never runs code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from abs_deploy.errors import UserError

FORMAT = "abs-deploy/1"
STAGES = ("fp", "searched", "finetuned")
_REQUIRED = ("format", "stage", "arch", "input", "num_classes", "state_dict")


def make_checkpoint(stage: str, arch: dict, input_spec: dict, num_classes: int,
                    state_dict: dict, decision: dict | None = None,
                    metrics: dict | None = None, history: list | None = None,
                    **extra: Any) -> dict:
    """A checkpoint dict. `extra` carries method-specific fields (e.g. `bn_folded`, `method`)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    ckpt = {"format": FORMAT, "stage": stage, "arch": arch, "input": input_spec,
            "num_classes": int(num_classes),
            "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
            "decision": decision or {}, "metrics": metrics or {}, "history": history or []}
    ckpt.update(extra)
    return ckpt


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    """Write to a temporary file in the target folder, then rename: never a half-written file."""
    path = Path(path)
    _check_fields(ckpt, str(path))
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"cannot write {path}: folder {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, stages: tuple[str, ...] = STAGES) -> dict:
    """Read and check a checkpoint; any problem is one `UserError` line naming what was found."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unpickling failed"
        raise UserError(f"{path}: refused, the file holds pickled objects, not plain data "
                        f"({first[:160]})") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes fail in arbitrary ways inside torch
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path}: not a readable checkpoint (truncated or not a torch file: "
                        f"{detail})") from None
    _check_fields(ckpt, str(path))
    if ckpt["stage"] not in stages:
        raise UserError(f"{path}: stage '{ckpt['stage']}' checkpoint, this command needs "
                        f"{' or '.join(stages)}")
    return ckpt


def _check_fields(ckpt: Any, where: str) -> None:
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UserError(f"{where}: not an abs-deploy checkpoint (no 'format' field)")
    fmt = ckpt["format"]
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("abs-deploy/"):
            raise UserError(f"{where}: format '{fmt}' is not readable by this version, "
                            f"which reads '{FORMAT}'")
        raise UserError(f"{where}: not an abs-deploy checkpoint (format {fmt!r})")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise UserError(f"{where}: checkpoint lacks {', '.join(missing)}")
    if ckpt["stage"] not in STAGES:
        raise UserError(f"{where}: unknown stage {ckpt['stage']!r}")
