"""Name -> builder registry, with an import-path fallback (`pkg.module:factory`)."""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from abs_deploy.errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *,
                   input_shape: tuple[int, int, int] = (3, 32, 32)):
    """Decorator: make `fn` creatable by its own name; `input_shape` (C, H, W) is what it is
    built for, used where no dataset says otherwise (`abs bops resnet20`)."""
    def register(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[f.__name__] = f
        _INPUT_SHAPES[f.__name__] = input_shape
        return f
    return register(fn) if fn is not None else register


def default_input_shape(name: str) -> tuple[int, int, int]:
    return _INPUT_SHAPES.get(name, (3, 32, 32))


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A zoo model by name, or any factory given as `pkg.module:function`."""
    if ":" in name:
        return _from_import_path(name, kwargs)
    if name not in _MODELS:
        raise UserError(f"unknown model '{name}'; known: {', '.join(list_models())} "
                        "(or give an import path pkg.module:factory)")
    return _call(_MODELS[name], name, kwargs)


def build_model(arch: dict) -> nn.Module:
    """The model an `arch` record of a checkpoint describes."""
    kwargs = dict(arch.get("kwargs", {}))
    if "import" in arch:
        return _from_import_path(arch["import"], kwargs)
    return create_model(arch["name"], **kwargs)


def arch_record(name: str, **kwargs: Any) -> dict:
    """The checkpoint's `arch` entry for a model made by `create_model(name, **kwargs)`."""
    if ":" in name:
        return {"import": name, "kwargs": kwargs}
    return {"name": name, "kwargs": kwargs}


def _from_import_path(path: str, kwargs: dict) -> nn.Module:
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import model factory '{path}': {e}") from None
    model = _call(factory, path, kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"'{path}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _call(factory: Callable[..., nn.Module], label: str, kwargs: dict) -> nn.Module:
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise UserError(f"model '{label}' does not accept {kwargs}: {e}") from None
