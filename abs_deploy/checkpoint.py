"""The `model.pt` format (DESIGN §8): a plain dict of tensors, numbers, strings, lists and dicts,
written atomically and read with `torch.load(weights_only=True)`. A model file never runs code:
unpickling refuses objects, and an architecture the file names by import path is built only when
the user allowed that path (`models.registry.trusted_imports`).

In memory a checkpoint's `decision` is a `Decision`; the file holds its plain record. Reading a
file checks that record against the architecture, once, for every command that reads it.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abs_deploy import files
from abs_deploy.decision import Decision
from abs_deploy.errors import UserError
from abs_deploy.models.registry import build_model, check_arch

FORMAT = "abs-deploy/1"
STAGES = ("fp", "searched", "finetuned")
_REQUIRED = ("format", "stage", "arch", "input", "num_classes", "state_dict")
# One image of at most this many values (3 x 2364 x 2364): above it a single forward pass on
# CPU, which every stage starts with, needs gigabytes, and no CNN classifier takes such input.
MAX_INPUT_VALUES = 1 << 24


def make_checkpoint(stage: str, arch: dict, input_spec: dict, num_classes: int,
                    state_dict: dict, decision: Decision | None = None,
                    metrics: dict | None = None, history: list | None = None,
                    **extra: Any) -> dict:
    """A checkpoint dict. `extra` carries method-specific fields (e.g. `bn_folded`, `method`)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    ckpt = {"format": FORMAT, "stage": stage, "arch": arch, "input": input_spec,
            "num_classes": int(num_classes),
            "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
            "decision": decision or Decision(), "metrics": metrics or {}, "history": history or []}
    ckpt.update(extra)
    return ckpt


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    """Write `ckpt` in full or not at all (temporary file beside it, then rename): a failure,
    a full disk included, is one `UserError` line and leaves the previous file as it was."""
    path = Path(path)
    decision = ckpt.get("decision", Decision())
    if not isinstance(decision, Decision):
        raise TypeError(f"a checkpoint's decision is a Decision, not a {type(decision).__name__}")
    ckpt = {**ckpt, "decision": decision.to_record()}
    _check_fields(ckpt, str(path), trust=False)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"cannot write {path}: folder {directory} does not exist")
    # Serialised in memory first, so that a disk error is an OSError from our own write and
    # not one torch wraps in a RuntimeError.
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return files.write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, stages: tuple[str, ...] = STAGES) -> dict:
    """Read and check a checkpoint; any problem is one `UserError` line naming what was found.
    An architecture given by import path must be allowed by the caller
    (`models.registry.trusted_imports`): the file alone never decides to run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    ckpt = _read(path)
    _check_fields(ckpt, str(path), trust=True)
    if ckpt["stage"] not in stages:
        raise UserError(f"{path}: stage '{ckpt['stage']}' checkpoint, this command needs "
                        f"{' or '.join(stages)}")
    ckpt["decision"] = _read_decision(ckpt, path)
    return ckpt


def build_arch(arch: dict) -> nn.Module:
    """A fresh model of a checkpoint's architecture; a builder that refuses the record's
    arguments is one `UserError` line, not its traceback."""
    try:
        return build_model(arch)
    except UserError:
        raise
    except Exception as e:  # a builder rejecting its kwargs, for instance
        raise UserError(f"cannot build the checkpoint's architecture {arch}: "
                        f"{type(e).__name__}: {e}") from None


def _read_decision(ckpt: dict, path: Path) -> Decision:
    record = ckpt.get("decision", {})
    if not record:
        return Decision()
    # Built only for its module tree: the names, output channels and BatchNorms to check against.
    try:
        return Decision.from_record(record, build_arch(ckpt["arch"]))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


# torch.save writes a zip archive; the legacy format opens with a pickled magic number.
_ZIP = b"PK\x03\x04"
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _read(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({files.reason(e)})") from None
    if not head.startswith(_ZIP) and _LEGACY_MAGIC not in head:
        raise UserError(f"{path}: not a torch checkpoint (the file does not start as one)")
    try:
        # torch warns about some files before it refuses them; the refusal is what we report.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise UserError(f"{path}: refused, the file holds pickled objects "
                            f"({found.group(1)}), not plain data") from None
        # Damaged data, or a pickle protocol the safe loader does not read (torch.save's
        # pickle_protocol=4 in the legacy format): either way nothing was run.
        found = re.search(r"Unsupported operand \d+", str(e))
        detail = found.group(0) if found else "damaged pickle data"
        raise UserError(f"{path}: not a readable checkpoint (the safe loader refuses its "
                        f"pickle: {detail})") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes fail in arbitrary ways inside torch
        raise UserError(f"{path}: not a readable checkpoint (truncated or damaged: "
                        f"{_first_sentence(e)})") from None


def _first_sentence(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].split(". ")[0][:120]


def _check_fields(ckpt: Any, where: str, trust: bool) -> None:
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
    # The arch first: it is what could name code, and nothing else is looked at before it.
    check_arch(ckpt["arch"], where, trust=trust)
    spec = ckpt["input"]
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if not (isinstance(shape, list) and len(shape) == 4 and
            all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise UserError(f"{where}: input shape must be [1, C, H, W] of positive integers, "
                        f"got {str(shape)[:60]}")
    if shape[1] * shape[2] * shape[3] > MAX_INPUT_VALUES:
        raise UserError(f"{where}: input shape {shape} is too large to build the model on")
    n = ckpt["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"{where}: num_classes must be a positive integer, got {str(n)[:40]}")
    for key in ("state_dict", "decision"):
        if not isinstance(ckpt.get(key, {}), dict):
            raise UserError(f"{where}: '{key}' is a {type(ckpt[key]).__name__}, not a dict")
