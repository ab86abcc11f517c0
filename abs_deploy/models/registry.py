"""Name -> builder registry, with an import-path fallback (`pkg.module:factory`).

An import path runs code: importing its module and calling its factory. A caller who names the
path (`create_model`, `--model` of `abs pretrain`) has chosen that code; a record read from a
file (`build_model` on a checkpoint's `arch`) has not, so its import path is resolved only
inside `trusted_imports` naming it. That is the one decision, in `_require_trusted`; zoo names
need none.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from abs_deploy.errors import UserError, first_line

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {}
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
# What a record's kwargs may hold: what JSON holds. Anything else (a tensor, bytes) has no
# business configuring a builder.
_PLAIN = (str, int, float, bool, type(None))


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
    """A zoo model by name, or any factory given as `pkg.module:function`. The caller names
    the model, so an import path needs no `trusted_imports`."""
    return _call(_factory(name), name, kwargs)


def build_model(arch: dict) -> nn.Module:
    """The model an `arch` record of a checkpoint describes. An import path in it is imported
    only inside `trusted_imports` naming it (`UserError` otherwise)."""
    name, kwargs = check_arch(arch)
    return _call(_factory(name), name, kwargs)


def arch_record(name: str, **kwargs: Any) -> dict:
    """The checkpoint's `arch` entry for a model made by `create_model(name, **kwargs)`."""
    if ":" in name:
        return {"import": name, "kwargs": kwargs}
    return {"name": name, "kwargs": kwargs}


# --- trust ---------------------------------------------------------------------------------

_TRUSTED: contextvars.ContextVar[tuple[frozenset[str], bool]] = contextvars.ContextVar(
    "abs_deploy_trusted_imports", default=(frozenset(), False))


@contextlib.contextmanager
def trusted_imports(*paths: str, any_path: bool = False) -> Iterator[None]:
    """Within this block, `build_model` and `check_arch(..., trust=True)` accept an `arch`
    record whose import path is one of `paths` (every path with `any_path`): the user's
    say-so (`--model pkg.mod:fn`, `--trust-model-code`) for code a file names."""
    allowed, everything = _TRUSTED.get()
    token = _TRUSTED.set((allowed | frozenset(paths), everything or any_path))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def check_arch(arch: object, where: str = "the checkpoint", trust: bool = True
               ) -> tuple[str, dict]:
    """(name or import path, kwargs) of an `arch` record, checked strictly: exactly one of
    `name`/`import` (a string), `kwargs` a dict of plain values, a zoo name that exists, and
    (with `trust`) an import path the user allowed. Any problem is one `UserError` line."""
    if not isinstance(arch, dict) or len(set(arch) & {"name", "import"}) != 1 or \
            set(arch) - {"name", "import", "kwargs"}:
        raise UserError(f"{where}: arch record is not understood (want {{'name' or 'import', "
                        f"'kwargs'}}): {_short(arch)}")
    name = arch.get("name", arch.get("import"))
    kwargs = arch.get("kwargs", {})
    if not isinstance(name, str):
        raise UserError(f"{where}: arch names a {type(name).__name__}, not a model name: "
                        f"{_short(name)}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs) or \
            not all(_plain(v) for v in kwargs.values()):
        raise UserError(f"{where}: arch kwargs must be a dict of plain values (numbers, "
                        f"strings, lists): {_short(kwargs)}")
    # An older loader took a colon in `name` for an import path too: it gets the same gate.
    if ":" in name:
        if not _IMPORT_PATH.fullmatch(name):
            raise UserError(f"{where}: arch import path {_short(name)} is not pkg.module:factory")
        if trust:
            _require_trusted(name, where)
    elif "import" in arch:
        raise UserError(f"{where}: arch import path {_short(name)} is not pkg.module:factory")
    elif name not in _MODELS:
        raise UserError(f"{where}: unknown model {_short(name)}; known: "
                        f"{', '.join(list_models())}")
    return name, dict(kwargs)


def _require_trusted(path: str, where: str) -> None:
    allowed, everything = _TRUSTED.get()
    if everything or path in allowed:
        return
    other = f" (--model allows only {', '.join(sorted(allowed))})" if allowed else ""
    raise UserError(f"{where}: refused to run code the file names: its architecture is built "
                    f"by importing and calling '{path}'{other}; if you trust the file, allow "
                    f"it with --model {path} or --trust-model-code")


# --- builder arguments from the data ---------------------------------------------------------


def data_kwargs(name: str, num_classes: int | None, in_chans: int | None,
                given: Mapping[str, Any] | None = None) -> dict:
    """The builder's keyword arguments for data of `num_classes` classes and `in_chans`
    channels (None: not known), merged with `given` (the user's `--model-kwargs`). A given
    value that contradicts the data is an error naming both. Each is passed only to a builder
    that can take it: torchvision's factories take `num_classes` but no `in_chans`, and such a
    builder is made for 3-channel images."""
    given = dict(given or {})
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if value is not None and key in given and given[key] != value:
            noun = {"num_classes": ("class", "classes"), "in_chans": ("channel", "channels")}
            raise UserError(f"--model-kwargs sets {key}={given[key]!r}, but the data has "
                            f"{value} {noun[key][value != 1]}")
    params = _parameters(_factory(name))
    named = params is None or "num_classes" in params
    open_kwargs = params is None or "**" in params
    kwargs: dict[str, Any] = {}
    if num_classes is not None and (named or open_kwargs):
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        if params is None or "in_chans" in params:
            kwargs["in_chans"] = in_chans
        elif in_chans != 3:
            if not open_kwargs:
                raise UserError(f"model '{name}' takes no in_chans argument, so it is built "
                                f"for 3-channel images; the data has {in_chans}")
            kwargs["in_chans"] = in_chans  # **kwargs may forward it (timm's factories do)
    return {**kwargs, **given}


def check_fits(model: nn.Module, label: str, input_shape: Sequence[int],
               num_classes: int) -> None:
    """Refuse, before any training, a model that cannot take the data's images or does not
    output one logit per class (a factory that ignores `num_classes`, a wrong `in_chans`)."""
    was_training = model.training
    param = next(model.parameters(), None)
    model.eval()  # no batch statistics touched, no dropout drawn: the run stays as seeded
    try:
        with torch.no_grad():
            out = model(torch.zeros(list(input_shape),
                                    device=param.device if param is not None else None))
    except (RuntimeError, ValueError) as e:
        reason = first_line(e)
        raise UserError(f"model '{label}' cannot take the data's {list(input_shape[1:])} "
                        f"images: {reason}") from None
    finally:
        model.train(was_training)
    shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != [input_shape[0], num_classes]:
        raise UserError(f"model '{label}' outputs {shape} for one image; the data has "
                        f"{num_classes} classes, so [1, {num_classes}] is needed")


def _parameters(factory: Callable) -> set[str] | None:
    """The keyword names `factory` takes ("**" when it takes any); None when Python cannot
    tell (some builtins)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            names.add("**")
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names


# --- resolution ------------------------------------------------------------------------------


def _factory(name: str) -> Callable[..., nn.Module]:
    if ":" in name:
        return _import(name)
    if name not in _MODELS:
        raise UserError(f"unknown model '{name}'; known: {', '.join(list_models())} "
                        "(or give an import path pkg.module:factory)")
    return _MODELS[name]


def _import(path: str) -> Callable[..., nn.Module]:
    """The one place an import path becomes code. Callers decide whether it may: the user
    named it, or `check_arch` found it trusted."""
    if not _IMPORT_PATH.fullmatch(path):
        raise UserError(f"model import path '{path}' is not pkg.module:factory")
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import model factory '{path}': {e}") from None
    if not callable(factory):
        raise UserError(f"'{path}' is a {type(factory).__name__}, not a model factory")
    return factory


def _call(factory: Callable[..., nn.Module], label: str, kwargs: dict) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise UserError(f"model '{label}' does not accept {kwargs}: {e}") from None
    except (ValueError, RuntimeError, AssertionError) as e:  # a builder refusing its arguments
        raise UserError(f"model '{label}' cannot be built with {kwargs}: "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"'{label}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _plain(value: object, depth: int = 0) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if depth < 4 and isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
