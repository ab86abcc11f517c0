"""A latency lookup table of one model on one runtime and machine (`abs profile`), read by the
search to predict the latency of a decision without exporting it. Standard library and numpy
only: the search may read it, and the search never imports the export side.

A decision's predicted latency is

    sum over layers of  T_l(w_bits, a_bits, out_kept, in_kept)
    + c_0 + sum over layers of  k_l * out_kept

`T_l` is the measured time of layer l's piece of the exported QCDQ graph (its input
quantizer, weight DequantizeLinears, the Conv/Gemm and the first node of each reader of its
output, so that the runtime fuses it as in the whole file), on a grid of kept output x kept
input channels, interpolated bilinearly between grid points (and held constant beyond the
grid's ends). `c_0` and `k_l` model what no piece holds: residual adds, pooling, the glue
between layers, minus what two neighbouring pieces both count (the quantizer between them);
they are fitted by least squares on whole-model exports at random decisions. `k_l` is one
fitted slope times layer l's output elements per channel (H*W; 1 for a Linear): the glue
works on activations, whose volume that is; two parameters stay well determined by the few
whole exports a profile can afford.

File format (JSON, written atomically; `FORMAT`, `VERSION`):

    {"format": "abs-deploy-lut", "version": 1, "complete": true,
     "model": {"arch": {...}, "input_shape": [1, C, H, W], "fingerprint": "<16 hex>"},
     "runtime": {"name": "onnxruntime" | "openvino", "version": "1.32.0"},
     "machine": {"cpu": "<model name>", "cores": 2},
     "setting": {"batch": 32, "threads": 1, "clock": "cpu"},  # "cpu": process CPU time
     "candidates": [2, 4, 8], "edge_bits": 8 | null, "max_prune": 0.5, "grid_points": 4,
     "streams": false, "pieces": 2,
     "method": {"warmup": 10, "runs": 50, "statistic": "median", "clock": "cpu",
                "order": "..."},
     "date": "<ISO 8601, UTC>",
     "fp_original_ms": 12.3,
     "layers": [{"name": "layer1.0.conv1", "kind": "conv", "out_channels": 16,
                 "in_channels": 16, "out_grid": [8, 11, 13, 16], "in_grid": [16],
                 "values": {"4/4": [[ms, ...], ...], "32/32": ...}}, ...],  # [out][in]
     "overhead": {"constant_ms": c_0, "per_out_channel_ms": {"<layer>": k_l, ...},
                  "fit": {"decisions": K, "rms_ms": ..., "max_rel": ..., "samples": [...]}},
     "cache": {...}}   # abs profile's own: measurements by layer signature, for reuse

`out_kept` and `in_kept` count channels: `in_kept` those of the layer's input channel group
(a Linear over a flattened C x H x W keeps C channels, not columns). A side that cannot be
pruned (a residual stream; a depthwise conv's input, which follows its output) has a one-point
grid, and any count given for it is ignored. Bits keys are "w/a"; "32/32" is the float layer.
Layers are listed in execution order. A table `abs profile` has not finished yet has
"complete": false and is refused by `load`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from abs_deploy.errors import UserError
from abs_deploy.machine import this_machine

FORMAT = "abs-deploy-lut"
VERSION = 1
# How `abs profile` cuts layers into pieces. 2: a layer reading a residual stream takes the
# stream's quantizer into its piece; before, such a layer was timed as a float conv on
# dequantized weights, so a --streams table of piece version 1 is refused (others are unchanged).
PIECES = 2
FLOAT_KEY = "32/32"


def fingerprint(arch: Mapping, input_shape: list[int]) -> str:
    """What identifies the profiled model: its architecture record and its input shape."""
    text = json.dumps({"arch": arch, "input_shape": [int(s) for s in input_shape]},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bits_key(w_bits: int, a_bits: int) -> str:
    return f"{int(w_bits)}/{int(a_bits)}"


# Anchor scales further apart than this (max / min) get `speed_note`: the table's batches were
# timed at speeds this different (this VM flips between two states 1.3-1.45x apart).
SPEED_SPREAD = 1.15


class LatencyTable:
    """A finished table (module docstring), as `load` reads it."""

    def __init__(self, record: dict, source: str = "latency table") -> None:
        try:
            self.runtime: str = str(record["runtime"]["name"])
            self.runtime_version: str = str(record["runtime"]["version"])
            self.batch: int = int(record["setting"]["batch"])
            self.threads: int = int(record["setting"]["threads"])
            self.clock: str = str(record["setting"].get("clock", "wall"))
            self.machine: dict = dict(record["machine"])
            self.candidates: tuple[int, ...] = tuple(int(b) for b in record["candidates"])
            edge = record["edge_bits"]
            self.edge_bits: int | None = None if edge is None else int(edge)
            self.streams: bool = bool(record["streams"])
            self.fp_original_ms: float = float(record["fp_original_ms"])
            self.model: dict = dict(record["model"])
            self._layers = {entry["name"]: _Layer(entry) for entry in record["layers"]}
            over = record["overhead"]
            self._constant = float(over["constant_ms"])
            self._per_channel = {str(k): float(v)
                                 for k, v in over["per_out_channel_ms"].items()}
            self.fit: dict = dict(over.get("fit", {}))
            # Old tables without it: their grid starts at the fewest they were profiled for.
            self.max_prune: float = float(record.get("max_prune", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{source}: not a complete latency table ({type(e).__name__}: "
                            f"{e})") from None
        self.record, self.source = record, source

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table written by `abs profile`; anything else is one `UserError` line."""
        record = read_record(path)
        if not record.get("complete"):
            raise UserError(f"{path}: latency table not finished (abs profile was "
                            "interrupted); run the same abs profile again to complete it")
        return cls(record, str(path))

    def check_for(self, arch: Mapping, input_shape: list[int]) -> None:
        """Refuse (one `UserError` line) a table measured for another model or on another
        machine than this one."""
        check_model_and_machine(self.record, arch, input_shape)

    def layers(self) -> list[str]:
        """Layer names in execution order."""
        return list(self._layers)

    def grid(self, name: str) -> tuple[list[int], list[int]]:
        """Kept output channels, kept input channels at which `name` was measured (ascending;
        one point on a side that cannot be pruned)."""
        layer = self._layer(name)
        return list(layer.out_grid), list(layer.in_grid)

    def channels(self, name: str) -> tuple[int, int]:
        """The layer's output channels and its input group's channels, unpruned."""
        layer = self._layer(name)
        return layer.out_channels, layer.in_channels

    def values(self, name: str, w_bits: int, a_bits: int) -> list[list[float]]:
        """Milliseconds at the grid points, [out][in]."""
        return self._layer(name).matrix(w_bits, a_bits).tolist()

    def bits(self, name: str) -> list[tuple[int, int]]:
        """The (w_bits, a_bits) pairs measured for `name`."""
        return [tuple(int(b) for b in k.split("/")) for k in self._layer(name).values]

    def overhead(self) -> tuple[float, dict[str, float]]:
        """Constant ms, and per layer ms per kept output channel."""
        return self._constant, dict(self._per_channel)

    def speed_note(self, limit: float = SPEED_SPREAD) -> str | None:
        """A sentence when the machine's speed moved between the table's timed batches by more
        than `limit` (the scales its anchors put them on), else None: the table then sits on
        the median of speeds the machine does not hold for long."""
        scales = (self.record.get("method") or {}).get("batch_scales") or []
        if len(scales) != 2 or min(scales) <= 0 or max(scales) / min(scales) <= limit:
            return None
        lo, hi = scales
        return (f"this machine's speed moved {hi / lo:.2f}x between the table's timed batches "
                f"(anchor scales {lo:g}-{hi:g}); the table sits on their median: relative "
                "targets (0.5x) hold whatever the speed, a target in ms at that median speed")

    def predict_ms(self, choice: Mapping[str, tuple[int, int, int, int]]) -> float:
        """Predicted latency of a decision: layer name -> (w_bits, a_bits, out_kept, in_kept)
        for every layer of the table."""
        missing = [n for n in self._layers if n not in choice]
        if missing:
            raise UserError(f"latency prediction needs every layer; {missing[0]} is missing")
        total = self._constant
        for name, layer in self._layers.items():
            w, a, out_kept, in_kept = choice[name]
            total += layer.interpolate(w, a, out_kept, in_kept)
            total += self._per_channel.get(name, 0.0) * out_kept
        return float(total)

    def _layer(self, name: str) -> _Layer:
        try:
            return self._layers[name]
        except KeyError:
            raise UserError(f"latency table has no layer {name!r}") from None


class _Layer:
    def __init__(self, entry: dict) -> None:
        self.name = str(entry["name"])
        self.out_grid = [int(v) for v in entry["out_grid"]]
        self.in_grid = [int(v) for v in entry["in_grid"]]
        self.out_channels = int(entry["out_channels"])
        self.in_channels = int(entry["in_channels"])
        self.values = {str(k): np.asarray(v, dtype=float) for k, v in entry["values"].items()}
        for k, m in self.values.items():
            if m.shape != (len(self.out_grid), len(self.in_grid)):
                raise ValueError(f"{self.name} {k}: {m.shape} values for a "
                                 f"{len(self.out_grid)}x{len(self.in_grid)} grid")

    def matrix(self, w_bits: int, a_bits: int) -> np.ndarray:
        key = bits_key(w_bits, a_bits)
        if key not in self.values:
            raise UserError(f"latency table has no {key} bits for {self.name} (measured: "
                            f"{', '.join(self.values)})")
        return self.values[key]

    def interpolate(self, w_bits: int, a_bits: int, out_kept: float, in_kept: float) -> float:
        m = self.matrix(w_bits, a_bits)
        i0, i1, ti = _bracket(self.out_grid, out_kept)
        j0, j1, tj = _bracket(self.in_grid, in_kept)
        top = (1 - tj) * m[i0, j0] + tj * m[i0, j1]
        bottom = (1 - tj) * m[i1, j0] + tj * m[i1, j1]
        return float((1 - ti) * top + ti * bottom)


def _bracket(grid: list[int], x: float) -> tuple[int, int, float]:
    """Indices of the grid points around `x` and its fraction of the way between them; held at
    the ends (a kept count outside the profiled range takes the nearest end's value)."""
    if len(grid) == 1 or x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    hi = bisect.bisect_right(grid, x)
    lo = hi - 1
    return lo, hi, (x - grid[lo]) / (grid[hi] - grid[lo])


def read_record(path: str | os.PathLike) -> dict:
    """The JSON of a table file, finished or not, checked for format and version; anything
    else is one `UserError` line naming what was found."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a latency table (not text)") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not a latency table (not JSON: {e.msg}, line "
                        f"{e.lineno})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path}: not a latency table (format {found!r}, expected "
                        f"{FORMAT!r})")
    if record.get("version") != VERSION:
        raise UserError(f"{path}: latency table version {record.get('version')!r}, this "
                        f"abs-deploy reads version {VERSION}")
    if record.get("streams") and record.get("pieces", 1) < PIECES:
        raise UserError(f"{path}: a --streams latency table that timed the layers reading a "
                        "residual stream as float convs (made before abs-deploy cut them with "
                        "the stream's quantizer); run abs profile again")
    return record


def check_model_and_machine(record: Mapping, arch: Mapping, input_shape: list[int]) -> None:
    """`LatencyTable.check_for` on a table's record (also one `abs profile` has not
    finished)."""
    model = record.get("model") if isinstance(record.get("model"), Mapping) else {}
    if model.get("fingerprint") != fingerprint(arch, input_shape):
        raise UserError(f"latency table measured for another model "
                        f"({_arch_name(model.get('arch'))} {model.get('input_shape')}, not "
                        f"{_arch_name(arch)} {list(input_shape)}); run abs profile for this "
                        "one")
    machine = record.get("machine") if isinstance(record.get("machine"), Mapping) else {}
    here = this_machine()
    for key in ("cpu", "cores"):
        if machine.get(key) != here[key]:
            raise UserError(f"latency table measured on another machine ({key} "
                            f"{machine.get(key)!r}, this one {here[key]!r}); run abs "
                            "profile here")


def _arch_name(arch: object) -> str:
    if isinstance(arch, Mapping):
        return str(arch.get("name") or arch.get("import") or arch)
    return str(arch)
