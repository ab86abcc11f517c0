"""Latency in ONNX Runtime (CPU EP, all graph optimizations): each model at each batch size and
thread count, after warm-up, over at least `runs` timed runs; median and 90th percentile."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from abs_deploy.export.validate import runtime_session

MIN_RUNS = 50
WARMUP = 10  # untimed runs per model and setting before the timed ones
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Timing:
    model: str  # "fp_original" | "fp_pruned" | "qcdq"
    batch: int
    threads: int
    median_ms: float
    p90_ms: float
    runs: int

    def as_dict(self) -> dict:
        return asdict(self)


def all_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def measure(models: dict[str, onnx.ModelProto], input_shape: list[int] | dict[str, list[int]],
            batches: tuple[int, ...] = (1, 32), threads: tuple[int, ...] | None = None,
            runs: int = MIN_RUNS, warmup: int = WARMUP,
            progress: Callable[[Iterable, int, str], Iterable] | None = None,
            runtimes: dict[str, str] | None = None, clock: str = "wall") -> list[Timing]:
    """Every (model, batch, threads) combination; `runtimes` names the models to run in
    OpenVINO instead of ONNX Runtime. Within one (batch, threads) setting the models take
    turns run by run, so a burst of other work on the machine slows all of them alike instead
    of whichever happened to be timed then (measured here: this machine has phases in which
    everything runs up to 1.7x slower, long enough to cover a whole block of one model's
    runs).

    `clock="cpu"` times each run by this process's CPU time instead of the wall clock: on one
    thread that is the run's latency on an idle machine, and the slices other processes take
    of the core do not count (measured on this 2-core machine at load 4-5: the wall-clock
    median of one model moved 1.75x between two runs minutes apart). Only meaningful when the
    run computes on one thread of this process."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    runtimes = runtimes or {}
    # One shape for all, or each model its own (the layer pieces `abs profile` times).
    shapes = input_shape if isinstance(input_shape, dict) else dict.fromkeys(models, input_shape)
    threads = threads or tuple(sorted({1, all_threads()}))
    runs = max(runs, MIN_RUNS)
    rng = np.random.default_rng(0)
    plan = [(b, t) for t in threads for b in batches]
    steps = progress(plan, len(plan), "latency") if progress else plan
    out, sessions = [], {}
    for b, t in steps:
        xs = {name: rng.standard_normal([b, *shapes[name][1:]]).astype(np.float32)
              for name in models}
        for name, model in models.items():
            if (name, t) not in sessions:
                # Pool threads sleep instead of spinning between operators: on a machine that
                # runs other work too, spinning threads time the contention, not the model
                # (measured here: 3x slower at two threads on a busy 2-core machine).
                sessions[name, t] = runtime_session(model, runtimes.get(name, "onnxruntime"),
                                                    threads=t)
        feeds = {name: {sessions[name, t].get_inputs()[0].name: xs[name]} for name in models}
        times = {name: np.empty(runs) for name in models}
        for i in range(-warmup, runs):
            for name in models:
                t0 = now()
                sessions[name, t].run(None, feeds[name])
                if i >= 0:
                    times[name][i] = now() - t0
        out += [Timing(name, b, t, float(np.median(v) * 1e3),
                       float(np.percentile(v, 90) * 1e3), runs) for name, v in times.items()]
    return out


def speedups(timings: list[Timing], baseline: str = "fp_original"
             ) -> dict[str, dict[str, float]]:
    """For each `bs<batch>_t<threads>` setting, every model's speed relative to `baseline`
    (baseline median / model median: above 1 is faster)."""
    out: dict[str, dict[str, float]] = {}
    for b, t in sorted({(r.batch, r.threads) for r in timings}):
        rows = {r.model: r.median_ms for r in timings if (r.batch, r.threads) == (b, t)}
        if rows.get(baseline):
            out[f"bs{b}_t{t}"] = {m: rows[baseline] / v for m, v in rows.items()}
    return out


def headline_setting(timings: list[Timing]) -> str:
    """The setting the summary quotes: the largest batch on one thread. On a machine that
    runs other work too, one thread is the setting least disturbed by it."""
    b = max(r.batch for r in timings)
    return f"bs{b}_t{min(r.threads for r in timings if r.batch == b)}"
