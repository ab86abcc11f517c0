"""Editing a model's module tree by dotted name: shared by the search (swapping layers for their
quantized twins), export (for their integer twins) and the tests."""

from __future__ import annotations

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (e.g. "block1.conv2") is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
