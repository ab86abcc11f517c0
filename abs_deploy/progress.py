"""How long work shows its progress: injected as a function, so the library never prints (the
CLI passes a tqdm bar; tests and benchmarks pass nothing)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

Progress = Callable[[Iterable, int, str], Iterable]
"""`progress(iterable, total, description)` wraps the items of one pass (e.g. with tqdm)."""


def no_progress(it: Iterable, total: int, desc: str) -> Iterable:
    return it
