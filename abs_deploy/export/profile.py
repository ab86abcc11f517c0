"""`abs profile`: measure a model's latency lookup table (abs_deploy/latency_table.py) on this
machine and runtime.

Every number comes from a file the exporter itself wrote: a synthetic checkpoint (random
weights; latency does not depend on their values) at chosen bits and kept channels goes
through collapse, prune, the ONNX translation and simplify as `abs-export` runs them, and each
layer's *piece* is cut from that whole file:

- from the float tensor its activation quantizer reads (Q, DQ: its own quantizer or the
  residual stream's it reads), its weight and bias DequantizeLinears and the Conv/Gemm itself,
- to the first node of each reader of its output: a QuantizeLinear (the next layer's or a
  residual stream's), through any float activation in between, so that ONNX Runtime fuses the
  layer into QLinearConv exactly when the whole file lets it (a Q that is the conv's only
  reader); a residual Add, a pool or a flatten is left out, and the layer then stays a float
  Conv in the piece as it does in the file.

A piece therefore counts its own input quantizer, which in the whole file is fused into the
previous layer's kernel, and the requantization of its output: the overhead fit absorbs that
double count along with what no piece holds (adds, pooling, flatten).

The exports: for every candidate (w, a) pair and the float layer (32/32), and for every point
of the kept-channel grid, one whole export with every non-edge layer at those bits and every
prunable channel group at that point (first and last layer at `edge_bits`). A layer both of
whose sides can be pruned (a plain chain) needs its in and out groups at different points:
groups are 2-coloured along such layers and the exports then run over grid point pairs.
Pieces are identified by their structure (op types, attributes, tensor shapes and types,
names and values left out), so identical layers (ResNet-20 has many) are measured once, and
bit widths that give the same graph share a measurement: on ONNX Runtime's CPU kernels 2-, 4-
and 8-bit weights are all int8 tensors, and an activation's Clip (below 8 bits) is left out of
the piece (`_without_input_clip`: about 0.02 ms a layer at batch 32, below the noise between
pieces), so only a signed activation changes the graph.

The pieces new in one export are timed together, taking turns run by run
(`latency.measure`), beside three fixed anchor pieces whose first time sets the scale of every
batch (`_Run._anchor`), and the table is written after each export (atomically), so a killed run
resumes where it stopped; a finished table given again is reused and extended, not
re-measured. The overhead is fitted on `fit_decisions` decisions with random bits per layer
(seeded): the fewest kept channels everywhere, the most, and random grid counts between (the
counts a search with the table keeps); exported and timed whole, taking turns with the FP
original.

The kept-channel grid holds multiples of `channel_multiple` (by default 8 for ONNX Runtime, 1
for OpenVINO; and the layer's own count): ONNX Runtime's int8 convolutions here run a count
that is not one much slower than the multiple above it, a cliff no interpolation between grid
points can see, so the search keeps only counts the table measured
(`abs_search.SuperBitNet.snap_to`). OpenVINO showed no such cliff
(`benchmarks/results/channel_alignment*.md`).

On one thread, runs are timed by the process's CPU time (`latency.measure`, clock="cpu"): it
is the latency of the same run on an idle machine, and other work on a shared machine then
does not move the table (the wall clock moved 1.75x between two runs at load 5 here).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import product
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.utils import Extractor
from torch import nn

from abs_deploy import graph, latency_table, streams
from abs_deploy.checkpoint import build_arch, make_checkpoint
from abs_deploy.decision import FLOAT_BITS, Decision, LayerDecision
from abs_deploy.errors import UserError
from abs_deploy.export.collapse import collapse
from abs_deploy.export.latency import CLOCKS, MIN_RUNS, WARMUP, measure
from abs_deploy.export.pipeline import ExportOptions, one_torch_thread, qcdq_files
from abs_deploy.export.qdq import quantizer_of
from abs_deploy.files import write_bytes
from abs_deploy.latency_table import LatencyTable, bits_key, fingerprint
from abs_deploy.machine import runtime_version, this_machine
from abs_deploy.progress import Progress, no_progress

RUNTIMES = ("onnxruntime", "openvino")
# Float ops that may sit between a layer and its reader's quantizer (single input, elementwise):
# the piece follows them to the quantizer that decides the fusion.
_ELEMENTWISE = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid"}
ORDER = ("the pieces new in one export take turns run by run, as do the whole models of the "
         "overhead fit with the FP original (export/latency.measure); every such batch also "
         "times three anchor pieces, and is scaled by the median anchor total over all "
         "batches divided by its own")


# The kept-channel multiple a runtime's kernels want. ORT's int8 convs on this CPU run a count
# off a multiple of 8 much slower than the multiple above it (a ResNet-20 layer1 conv: 13
# outputs 2.45 ms, 16 outputs 1.44; the whole model with 60% of each inner group kept, 10/19/38
# channels, 1.18x the unpruned model's time, with those counts rounded up to 16/24/40 0.86x:
# results/channel_alignment.md); OpenVINO showed no such step (channel_alignment_openvino.md:
# 0.87x and 0.89x), so its grid stays the plain spread.
CHANNEL_MULTIPLE = {"onnxruntime": 8, "openvino": 1}


@dataclass
class ProfileOptions:
    runtime: str = "onnxruntime"
    batch: int = 32
    threads: int = 1
    clock: str = "auto"  # "cpu" (this process's CPU time) on one thread, else "wall"
    candidates: tuple[int, ...] = (2, 4, 8)
    edge_bits: int | None = 8  # first and last layer; None: like the others
    max_prune: float = 0.5
    grid_points: int = 4  # kept counts per prunable side, from (1 - max_prune) * C to C
    # Grid counts are multiples of this (C itself always in); None: the runtime's
    # (`CHANNEL_MULTIPLE`). 1: any count.
    channel_multiple: int | None = None
    streams: bool = False  # residual-stream quantizers (streams.py) in every export
    runs: int = MIN_RUNS
    warmup: int = WARMUP
    fit_decisions: int = 6
    seed: int = 0


@dataclass
class ProfileResult:
    path: Path
    table: LatencyTable
    measured: int  # layer pieces this run timed
    reused: int  # grid cells the file already held
    whole_models: int  # whole models this run timed (overhead fit, FP original)
    exports: int  # whole exports this run made
    seconds: float


def profile(arch: dict, input_shape: list[int], output: str | os.PathLike,
            options: ProfileOptions | None = None, progress: Progress = no_progress,
            ) -> ProfileResult:
    """Measure (or complete, or reuse) the latency table of `arch` at `input_shape` into
    `output`. Raises `UserError` for bad options or an `output` that holds another table."""
    opts = options or ProfileOptions()
    _check_options(opts)
    t0 = time.perf_counter()
    with one_torch_thread():
        model = _Model(arch, [1, *input_shape[1:]], opts)
        header = _header(model, opts)
        state = _State.open(Path(output), header)
        run = _Run(model, opts, state, progress)
        run.measure_layers()
        run.fit_overhead()
    table = LatencyTable(state.record, str(output))
    return ProfileResult(Path(output), table, run.measured, run.reused, run.whole_models,
                         run.exports, time.perf_counter() - t0)


def _check_options(opts: ProfileOptions) -> None:
    if opts.runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {opts.runtime!r}; known: {', '.join(RUNTIMES)}")
    if opts.runtime == "openvino":
        from abs_deploy.export import openvino_runtime

        openvino_runtime.require()
    if not opts.candidates or any(not 2 <= b <= 8 for b in opts.candidates):
        raise UserError(f"candidates must be bit widths from 2 to 8, got {opts.candidates}")
    if opts.edge_bits is not None and not 2 <= opts.edge_bits <= 8:
        raise UserError(f"edge bits must be from 2 to 8, got {opts.edge_bits}")
    if not 0 <= opts.max_prune < 1:
        raise UserError(f"max prune must be in [0, 1), got {opts.max_prune}")
    if opts.clock not in ("auto", *CLOCKS):
        raise UserError(f"clock must be auto, {' or '.join(CLOCKS)}, got {opts.clock!r}")
    if (opts.grid_points < 1 or opts.batch < 1 or opts.threads < 1 or opts.fit_decisions < 2
            or (opts.channel_multiple is not None and opts.channel_multiple < 1)):
        raise UserError("grid points, channel multiple, batch and threads must be positive, "
                        "fit decisions >= 2")


def channel_multiple(opts: ProfileOptions) -> int:
    """The multiple the grid's kept counts take: the option, else the runtime's own."""
    if opts.channel_multiple is not None:
        return opts.channel_multiple
    return CHANNEL_MULTIPLE.get(opts.runtime, 1)


def clock_for(opts: ProfileOptions) -> str:
    """The clock runs are timed by: CPU time on one thread, where it is the latency of an idle
    machine whatever else runs (latency.measure); the wall clock on several, where CPU time
    would add the threads up."""
    if opts.clock != "auto":
        return opts.clock
    return "cpu" if opts.threads == 1 else "wall"


# --- the model and its synthetic checkpoints ----------------------------------------------


@dataclass
class _LayerInfo:
    name: str
    kind: str  # "conv" | "linear"
    out_channels: int
    in_channels: int  # the input group's channels (a Linear over a flattened C x H x W: C)
    out_group: int | None  # the prunable group whose producer it is
    in_group: int | None  # the prunable group it consumes (None for depthwise: in == out)
    out_hw: int  # output elements per channel and image (1 for a Linear)
    a_signed: bool
    a_max: float
    edge: bool


class _Model:
    """The architecture once: its layers, channel groups and the clips a synthetic
    checkpoint needs (from one random batch: only their existence matters to latency)."""

    def __init__(self, arch: dict, input_shape: list[int], opts: ProfileOptions) -> None:
        self.arch, self.input_shape, self.opts = arch, input_shape, opts
        torch.manual_seed(opts.seed)
        self.module = build_arch(arch).eval()
        example = torch.zeros(input_shape)
        analysis = graph.Analysis(self.module, example)
        self.order = analysis.layer_order()
        if not self.order:
            raise UserError("the model has no Conv2d or Linear layer to profile")
        self.norms = analysis.following_norm()
        all_groups = analysis.groups()
        self.groups = {g.id: g for g in all_groups if g.prunable and g.producers}
        batch = torch.randn([2, *input_shape[1:]])
        hw, a_min, a_max, self.num_classes = self._observe(batch)
        out_of = {p: g.id for g in self.groups.values() for p in g.producers}
        in_of = {c: g.id for g in self.groups.values() for c in g.consumers}
        in_channels = {c: g.channels for g in all_groups for c in g.consumers}
        self.layers: dict[str, _LayerInfo] = {}
        for i, name in enumerate(self.order):
            m = self.module.get_submodule(name)
            kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
            default_in = m.in_channels if kind == "conv" else m.in_features
            self.layers[name] = _LayerInfo(
                name, kind, m.weight.shape[0], in_channels.get(name, default_in),
                out_of.get(name), in_of.get(name), hw[name], a_min[name] < 0,
                max(a_max[name], 1e-3),
                opts.edge_bits is not None and i in (0, len(self.order) - 1))
        self.stream_clips = streams.calibrate(self.module, example, [batch]) \
            if opts.streams else {}
        self.colour = self._colour()
        self.grids = {gid: grid_counts(g.channels, opts.max_prune, opts.grid_points,
                                       channel_multiple(opts))
                      for gid, g in self.groups.items()}

    @torch.no_grad()
    def _observe(self, batch: torch.Tensor):
        hw, a_min, a_max = {}, {}, {}

        def hook_for(name):
            def hook(module, inputs, output):
                x = inputs[0]
                a_min[name] = min(a_min.get(name, 0.0), x.min().item())
                a_max[name] = max(a_max.get(name, 0.0), x.abs().max().item())
                hw[name] = math.prod(output.shape[2:]) if output.dim() > 2 else 1
            return hook

        handles = [self.module.get_submodule(n).register_forward_hook(hook_for(n))
                   for n in self.order]
        try:
            out = self.module(batch)
        finally:
            for h in handles:
                h.remove()
        return hw, a_min, a_max, int(out.shape[-1])

    def _colour(self) -> dict[int, int]:
        """0/1 per prunable group, different across every layer that prunes both sides, so
        the exports can put a layer's in and out group at different grid points."""
        edges: dict[int, set[int]] = {g: set() for g in self.groups}
        for info in self.layers.values():
            if info.out_group is not None and info.in_group is not None \
                    and info.out_group != info.in_group:
                edges[info.out_group].add(info.in_group)
                edges[info.in_group].add(info.out_group)
        colour: dict[int, int] = {}
        for start in self.groups:
            if start in colour:
                continue
            colour[start], todo = 0, [start]
            while todo:
                g = todo.pop()
                for h in edges[g]:
                    if h not in colour:
                        colour[h] = 1 - colour[g]
                        todo.append(h)
                    elif colour[h] == colour[g]:
                        raise UserError("cannot profile this model: its prunable channel "
                                        "groups form an odd cycle of layers (a layer's in and "
                                        "out group cannot be set apart)")
        return colour

    @property
    def two_sided(self) -> bool:
        return any(i.out_group is not None and i.in_group is not None
                   and i.out_group != i.in_group for i in self.layers.values())

    def bits_of(self, name: str, pair: tuple[int, int]) -> tuple[int, int]:
        edge = self.opts.edge_bits
        if self.layers[name].edge and pair != (FLOAT_BITS, FLOAT_BITS) and edge is not None:
            return edge, edge
        return pair

    def cell(self, name: str, kept: dict[int, int]) -> tuple[int, int]:
        """(out_kept, in_kept) of a layer when each prunable group keeps `kept[group]`."""
        info = self.layers[name]
        out = kept[info.out_group] if info.out_group is not None else info.out_channels
        inp = kept[info.in_group] if info.in_group is not None else info.in_channels
        return out, inp

    def out_grid(self, name: str) -> list[int]:
        info = self.layers[name]
        return self.grids[info.out_group] if info.out_group is not None else [info.out_channels]

    def in_grid(self, name: str) -> list[int]:
        info = self.layers[name]
        return self.grids[info.in_group] if info.in_group is not None else [info.in_channels]

    def checkpoint(self, bits: dict[str, tuple[int, int]], kept: dict[int, int]) -> dict:
        """A `searched` checkpoint at these bits per layer and kept counts per group (the
        first channels of each group kept: which ones does not change the file's shapes)."""
        kept_idx = {p: tuple(range(kept[gid])) for gid, g in self.groups.items()
                    for p in g.producers}
        decision, clips = {}, {}
        for name, info in self.layers.items():
            w, a = bits[name]
            decision[name] = LayerDecision(w, a, info.a_signed,
                                           kept_idx.get(name, tuple(range(info.out_channels))),
                                           self.norms.get(name))
            weight = self.module.get_submodule(name).weight.detach()
            clips[f"{name}.w_clip"] = weight.abs().flatten(1).amax(1).clamp_min(1e-8)
            clips[f"{name}.a_clip"] = torch.tensor(info.a_max)
        clips.update({f"{n}.clip": torch.tensor(v) for n, v in self.stream_clips.items()})
        extra = {}
        if self.opts.streams:
            # As `abs finetune --streams` writes them: shared codes, clips tied.
            extra = {streams.CHECKPOINT_KEY: streams.SHARED}
            streams.tie_values(self.module, torch.zeros(self.input_shape),
                               {n: (d.a_bits, d.a_signed) for n, d in decision.items()}, clips)
        channels = self.input_shape[1]
        spec = {"shape": self.input_shape, "mean": [0.0] * channels, "std": [1.0] * channels}
        return make_checkpoint("searched", self.arch, spec, self.num_classes,
                               {**self.module.state_dict(), **clips}, Decision(decision),
                               method="profile", **extra)

    def random_decision(self, rng: random.Random, extreme: str | None = None
                        ) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
        """Random bits per layer; per group a random count of its grid (the counts a search
        with this table keeps), or with `extreme` "fewest" or "most" the grid's end."""
        cands = self.opts.candidates
        bits = {n: self.bits_of(n, (rng.choice(cands), rng.choice(cands))) for n in self.order}
        kept = {gid: {"fewest": grid[0], "most": grid[-1]}.get(extreme or "", rng.choice(grid))
                for gid, grid in self.grids.items()}
        return bits, kept


def _anchor_pieces(m: _Model) -> dict[str, onnx.ModelProto]:
    """The anchors (`_Run._anchor`): first, middle and last layer of the export at the top
    bits with every channel kept."""
    top = max(m.opts.candidates)
    bits = {n: m.bits_of(n, (top, top)) for n in m.order}
    kept = {gid: grid[-1] for gid, grid in m.grids.items()}
    qcdq, _, _ = qcdq_files(collapse(m.checkpoint(bits, kept)), ExportOptions(latency=False))
    names = dict.fromkeys([m.order[0], m.order[len(m.order) // 2], m.order[-1]])
    pieces = layer_pieces(qcdq, {n: _tag(bits[n]) for n in names})
    return {f"anchor {n}": p for n, p in pieces.items()}


def table_anchors(table: LatencyTable) -> tuple[dict[str, onnx.ModelProto], float]:
    """The anchor pieces `table` timed beside every batch, and its level: the median of those
    batches' anchor totals. Anything timed beside the anchors and scaled by level / their
    total is on the table's level -- how a check of the table's predictions takes out what
    the machine's speed did between the table's timing and its own (here it moved by 1.45x
    within one minute, between two states)."""
    rec = table.record
    batches = (rec.get("cache") or {}).get("batches") or []
    if not batches:
        raise UserError(f"{table.source}: the table records no anchor batches")
    opts = ProfileOptions(runtime=table.runtime, batch=table.batch, threads=table.threads,
                          candidates=table.candidates, edge_bits=table.edge_bits,
                          max_prune=table.max_prune,
                          grid_points=int(rec.get("grid_points", 4)),
                          channel_multiple=int(rec.get("channel_multiple", 1)),
                          streams=table.streams)
    with one_torch_thread():
        model = _Model(table.model["arch"], [1, *table.model["input_shape"][1:]], opts)
        return _anchor_pieces(model), float(np.median(batches))


def grid_counts(channels: int, max_prune: float, points: int, multiple: int = 1) -> list[int]:
    """The kept counts profiled for a group of `channels`: at most `points` of them, spread from
    the fewest `max_prune` allows to all, each a multiple of `multiple` (rounded up from the
    fewest) or `channels` itself. A group too small to hold two such counts gets the plain
    spread: the multiple does not fit it, and pruning it at all is the user's call."""
    low = max(1, math.ceil((1 - max_prune) * channels - 1e-9))
    plain = sorted({round(v) for v in np.linspace(low, channels, points)})
    aligned = graph.aligned_counts(channels, low, multiple) if multiple > 1 else []
    if not aligned:
        return plain
    picks = {min(aligned, key=lambda k: (abs(k - v), k))
             for v in np.linspace(aligned[0], channels, points)}
    return sorted(picks)


# --- pieces --------------------------------------------------------------------------------


def layer_pieces(model: onnx.ModelProto, tags: dict[str, str]) -> dict[str, onnx.ModelProto]:
    """Each layer's piece of an exported file (module docstring); `tags` maps layer names to
    their bits tag (`w4a4`), which names the layer's nodes."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    extractor = Extractor(model)
    pieces = {}
    for name, tag in tags.items():
        node = by_name.get(f"{name}.{tag}")
        if node is None:
            raise UserError(f"the export has no node {name}.{tag}")
        source = _piece_start(node.input[0], producer)
        ends = _piece_ends(node.output[0], readers, graph_outputs)
        pieces[name] = _without_input_clip(extractor.extract_model([source], ends))
    return pieces


def _without_input_clip(piece: onnx.ModelProto) -> onnx.ModelProto:
    """The piece without the integer Clip of its input quantizer (an activation below 8 bits).
    That Clip works on the producer's output codes: ORT runs it as a node of its own after
    the producer's QLinearConv or QLinearAdd (ResNet-20 with streams: 18 Clips, 0.33 of 16.3
    ms at batch 32, `benchmarks/results/ort_profile.md`), a cost on the producer's side like
    the input QuantizeLinear the overhead fit absorbs. Timed in the piece, it made every bit
    width its own measurement, and the noise between them (8/8 0.317 ms, 8/4 0.313 ms on one
    ResNet-20 layer: the wrong sign for a Clip's 0.02 ms) was what the search read as latency;
    a latency-only search chose 2-bit activations there (1.4 points of top-1)."""
    g = piece.graph
    inputs = {i.name for i in g.input}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for q in [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] in inputs]:
        users = readers.get(q.output[0], [])
        if len(users) != 1 or users[0].op_type != "Clip":
            continue
        clip = users[0]
        for n in readers.get(clip.output[0], []):
            n.input[:] = [q.output[0] if i == clip.output[0] else i for i in n.input]
        g.node.remove(clip)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return piece


def _piece_start(tensor: str, producer: dict[str, onnx.NodeProto]) -> str:
    """The float tensor a layer's input is quantized from: back through DequantizeLinear and
    an integer Clip to the QuantizeLinear, whether the layer's own or a residual stream's that
    several layers read. Cut after a stream's DQ, the piece would feed the conv a float
    input, and ORT would run it as a float conv on dequantized weights, unlike the file."""
    dq = producer.get(tensor)
    q = quantizer_of(producer, dq.input[0]) \
        if dq is not None and dq.op_type == "DequantizeLinear" else None
    return tensor if q is None else q.input[0]


def _piece_ends(tensor: str, readers: dict[str, list[onnx.NodeProto]],
                graph_outputs: set[str]) -> list[str]:
    ends: list[str] = []
    users = readers.get(tensor, [])
    if tensor in graph_outputs or any(
            n.op_type not in _ELEMENTWISE and n.op_type != "QuantizeLinear" for n in users):
        ends.append(tensor)
    for n in users:
        if n.op_type == "QuantizeLinear":
            ends.append(n.output[0])
        elif n.op_type in _ELEMENTWISE:
            ends += [e for e in _piece_ends(n.output[0], readers, graph_outputs)
                     if e not in ends]
    return ends or [tensor]


def signature(piece: onnx.ModelProto) -> str:
    """The piece's structure without names or values: op types, attributes, and the type and
    shape of every input, initializer and output. Equal signatures run the same kernels on the
    same shapes."""
    g = piece.graph
    inits = {i.name: f"init{i.data_type}{list(i.dims)}" for i in g.initializer}
    ids: dict[str, str] = {}

    def ref(t: str) -> str:
        if t in inits:
            return inits[t]
        return ids.setdefault(t, f"t{len(ids)}")

    def shape(v: onnx.ValueInfoProto) -> str:
        tt = v.type.tensor_type
        return f"{tt.elem_type}{[d.dim_param or d.dim_value for d in tt.shape.dim]}"

    parts = [f"in {ref(v.name)} {shape(v)}" for v in g.input if v.name not in inits]
    for n in g.node:
        attrs = sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in n.attribute)
        parts.append(f"{n.op_type}({','.join(ref(i) for i in n.input)})"
                     f"->{','.join(ref(o) for o in n.output)} {attrs}")
    parts += [f"out {ref(v.name)} {shape(v)}" for v in g.output]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- the file: header, cache, atomic writes -----------------------------------------------


def _header(model: _Model, opts: ProfileOptions) -> dict:
    return {"format": latency_table.FORMAT, "version": latency_table.VERSION,
            "model": {"arch": model.arch, "input_shape": model.input_shape,
                      "fingerprint": fingerprint(model.arch, model.input_shape)},
            "runtime": {"name": opts.runtime, "version": runtime_version(opts.runtime)},
            "machine": this_machine(),
            "setting": {"batch": opts.batch, "threads": opts.threads,
                        "clock": clock_for(opts)},
            "candidates": list(opts.candidates), "edge_bits": opts.edge_bits,
            "streams": opts.streams, "pieces": latency_table.PIECES}


# What must match for a file's measurements to be reused (the grid and the method may differ:
# a finer grid extends the table).
_MATCH = ("model", "runtime", "machine", "setting", "candidates", "edge_bits", "streams")


class _State:
    """The table being written and its cache (measurements by piece signature; per layer and
    bits, the signature at each grid cell; the whole-model samples of the overhead fit)."""

    def __init__(self, path: Path, record: dict) -> None:
        self.path, self.record = path, record
        self.cache = record.setdefault("cache", {})
        # Medians as timed; batch_of says in which batch, batches hold each batch's anchor
        # total (`_Run._anchor`).
        self.measurements: dict[str, float] = self.cache.setdefault("measurements", {})
        self.batch_of: dict[str, int] = self.cache.setdefault("batch_of", {})
        self.batches: list[float] = self.cache.setdefault("batches", [])
        self.cells: dict[str, dict[str, dict[str, str]]] = self.cache.setdefault("cells", {})

    @classmethod
    def open(cls, path: Path, header: dict) -> _State:
        record = {**header, "complete": False}
        if path.exists():
            old = latency_table.read_record(path)
            # The checks the search makes before it trusts a table, with its messages.
            latency_table.check_model_and_machine(old, header["model"]["arch"],
                                                  header["model"]["input_shape"])
            for key in _MATCH:
                if old.get(key) != header[key]:
                    raise UserError(f"{path} holds a latency table of another {key} "
                                    f"({_short(old.get(key))}, now {_short(header[key])}); "
                                    "give another -o or remove it")
            record["cache"] = old.get("cache", {})
        return cls(path, record)

    def cell(self, name: str, key: str, out: int, inp: int) -> str | None:
        return self.cells.get(name, {}).get(key, {}).get(f"{out}x{inp}")

    def scale(self, batch: int | None) -> float:
        """What puts a batch on the table's level: the median anchor total over all batches
        divided by this batch's."""
        if batch is None or not self.batches:
            return 1.0
        return float(np.median(self.batches)) / self.batches[batch]

    def scaled(self, sig: str) -> float:
        return self.measurements[sig] * self.scale(self.batch_of.get(sig))

    def set_cell(self, name: str, key: str, out: int, inp: int, sig: str) -> None:
        self.cells.setdefault(name, {}).setdefault(key, {})[f"{out}x{inp}"] = sig

    def write(self) -> None:
        write_bytes(self.path, (json.dumps(self.record, indent=1) + "\n").encode())


def _short(v: object) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the run -------------------------------------------------------------------------------


class _Run:
    """One `abs profile`: the grid exports and their pieces, then the overhead fit."""

    def __init__(self, model: _Model, opts: ProfileOptions, state: _State,
                 progress: Progress) -> None:
        self.model, self.opts, self.state, self.progress = model, opts, state, progress
        self.measured = self.reused = self.whole_models = self.exports = 0
        self.runs = max(opts.runs, MIN_RUNS)
        self._anchors: dict[str, onnx.ModelProto] | None = None

    def measure_layers(self) -> None:
        m = self.model
        pairs = [(w, a) for w in self.opts.candidates for a in self.opts.candidates]
        pairs.append((FLOAT_BITS, FLOAT_BITS))
        n = max((len(g) for g in m.grids.values()), default=1)
        points = list(product(range(n), range(n))) if m.two_sided else [(i, i) for i in range(n)]
        plan, seen = [], set()
        for pair, (i, j) in product(pairs, points):
            kept = {gid: grid[min(j if m.colour[gid] else i, len(grid) - 1)]
                    for gid, grid in m.grids.items()}
            bits = {name: m.bits_of(name, pair) for name in m.order}
            key = (tuple(sorted(bits.items())), tuple(sorted(kept.items())))
            if key not in seen:
                seen.add(key)
                plan.append((bits, kept))
        for bits, kept in self.progress(plan, len(plan), "profile layers"):
            self._export_pieces(bits, kept)
        self._assemble()
        self.state.write()

    def _export_pieces(self, bits: dict[str, tuple[int, int]], kept: dict[int, int]) -> None:
        m, st = self.model, self.state
        cells = {name: (bits_key(*bits[name]), *m.cell(name, kept)) for name in m.order}
        missing = [n for n, c in cells.items() if st.cell(n, *c) is None]
        self.reused += len(cells) - len(missing)
        if not missing:
            return
        qcdq, _, _ = self._export(bits, kept, with_original=False)
        pieces = layer_pieces(qcdq, {n: _tag(bits[n]) for n in missing})
        sigs = {n: signature(p) for n, p in pieces.items()}
        new = {sigs[n]: pieces[n] for n in missing if sigs[n] not in st.measurements}
        if new:
            times, batch = self._time(new)
            st.measurements.update(times)
            st.batch_of.update(dict.fromkeys(times, batch))
            self.measured += len(new)
        for n in missing:
            st.set_cell(n, *cells[n], sigs[n])
        st.write()  # after every export: a killed run resumes from here

    def _export(self, bits: dict[str, tuple[int, int]], kept: dict[int, int],
                with_original: bool):
        ckpt = self.model.checkpoint(bits, kept)
        col = collapse(ckpt)
        self.exports += 1
        return qcdq_files(col, ExportOptions(latency=with_original))

    def _time(self, models: dict[str, onnx.ModelProto]) -> tuple[dict[str, float], int]:
        """Medians of `models` timed together with the anchor pieces, as timed, and the index
        of this batch (its anchor total recorded under it)."""
        anchors = self._anchor()
        both = {**models, **anchors}
        shapes = {k: [1, *(d.dim_value for d in p.graph.input[0].type.tensor_type.shape.dim[1:])]
                  for k, p in both.items()}
        runtimes = dict.fromkeys(both, self.opts.runtime)
        timings = measure(both, shapes, (self.opts.batch,), (self.opts.threads,), self.runs,
                          self.opts.warmup, runtimes=runtimes, clock=clock_for(self.opts))
        ms = {t.model: t.median_ms for t in timings}
        self.state.batches.append(sum(ms[a] for a in anchors))
        return {k: ms[k] for k in models}, len(self.state.batches) - 1

    def _anchor(self) -> dict[str, onnx.ModelProto]:
        """Three pieces (first, middle and last layer) of one fixed export, timed beside every
        batch. Batches are timed minutes apart, and on a shared machine even CPU time moves
        between them (cache and core sharing: 15% between two runs at load 5 here); scaling
        each batch by the anchors puts the whole table on the level of the median batch, so
        layers and bit widths compare as if timed together."""
        if self._anchors is None:
            self._anchors = _anchor_pieces(self.model)
            self.exports += 1
        return self._anchors

    def _spread(self) -> list[float]:
        """[min, max] of the scales applied to the batches (empty before any)."""
        scales = [self.state.scale(b) for b in range(len(self.state.batches))]
        return [round(min(scales), 4), round(max(scales), 4)] if scales else []

    def _assemble(self) -> None:
        """The `layers` entries from the cache: every bits pair measured at every grid cell."""
        m, st = self.model, self.state
        entries = []
        for name in m.order:
            info = m.layers[name]
            out_grid, in_grid = m.out_grid(name), m.in_grid(name)
            values = {}
            for key in st.cells.get(name, {}):
                sigs = [[st.cell(name, key, o, i) for i in in_grid] for o in out_grid]
                if all(s is not None and s in st.measurements for row in sigs for s in row):
                    values[key] = [[round(st.scaled(s), 5) for s in row] for row in sigs]
            entries.append({"name": name, "kind": info.kind, "out_channels": info.out_channels,
                            "in_channels": info.in_channels, "out_grid": out_grid,
                            "in_grid": in_grid, "values": values})
        st.record.update({
            "max_prune": self.opts.max_prune, "grid_points": self.opts.grid_points,
            "channel_multiple": channel_multiple(self.opts),
            "method": {"warmup": self.opts.warmup, "runs": self.runs, "statistic": "median",
                       "clock": clock_for(self.opts), "order": ORDER,
                       "batch_scales": self._spread()},
            "layers": entries})

    def fit_overhead(self) -> None:
        """Fit c_0 and the per-channel slope on whole exports at random decisions."""
        m, st, opts = self.model, self.state, self.opts
        fit_key = {"decisions": opts.fit_decisions, "seed": opts.seed,
                   "max_prune": opts.max_prune, "design": "extremes+grid",
                   "grids": {str(g): grid for g, grid in m.grids.items()}}
        cached = st.cache.get("fit")
        if not cached or cached.get("key") != fit_key:
            cached = self._measure_fit(fit_key)
            st.cache["fit"] = cached
            st.write()
        # The fit's batch moved the median batch the layers are scaled to: assemble again.
        self._assemble()
        scale = st.scale(cached.get("batch"))
        samples = [{**s, "ms": s["ms"] * scale} for s in cached["samples"]]
        fp_original = cached["fp_original_ms"] * scale
        # The layer terms alone (no overhead yet).
        bare = LatencyTable({**st.record, "fp_original_ms": fp_original,
                             "overhead": {"constant_ms": 0.0, "per_out_channel_ms": {}}})
        hw = {n: m.layers[n].out_hw for n in m.order}
        rows, resid = [], []
        for s in samples:
            choice = {n: tuple(v) for n, v in s["choice"].items()}
            rows.append([1.0, sum(hw[n] * choice[n][2] for n in m.order)])
            resid.append(s["ms"] - bare.predict_ms(choice))
        x, r = np.asarray(rows), np.asarray(resid)
        if np.ptp(x[:, 1]) > 0:
            (c0, slope), *_ = np.linalg.lstsq(x, r, rcond=None)
        else:  # nothing prunable: the overhead is a constant
            c0, slope = float(r.mean()), 0.0
        fitted = x @ np.array([c0, slope])
        ms = np.array([s["ms"] for s in samples])
        errors = r - fitted
        for s, p in zip(samples, ms - errors, strict=True):
            s["predicted_ms"] = round(float(p), 4)
        st.record.update({
            "fp_original_ms": fp_original,
            "overhead": {"constant_ms": float(c0),
                         "per_out_channel_ms": {n: float(slope * hw[n]) for n in m.order},
                         "fit": {"decisions": len(samples),
                                 "rms_ms": float(np.sqrt(np.mean(errors ** 2))),
                                 "max_rel": float(np.max(np.abs(errors) / ms)),
                                 "samples": samples}},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": True})
        st.write()

    def _measure_fit(self, key: dict) -> dict:
        m = self.model
        rng = random.Random(f"overhead-{self.opts.seed}")
        models, choices = {}, []
        # The fewest and the most kept channels first, so the per-channel slope is fitted over
        # the whole range (random counts alone cluster around the middle, and noise then
        # trades the slope against the constant).
        decisions = [m.random_decision(rng, extreme) for extreme in ("fewest", "most")]
        decisions += [m.random_decision(rng) for _ in range(self.opts.fit_decisions - 2)]
        original = None
        for k, (bits, kept) in enumerate(self.progress(decisions, len(decisions),
                                                       "profile overhead")):
            qcdq, _, orig = self._export(bits, kept, with_original=original is None)
            original = original or orig
            models[f"decision{k}"] = qcdq
            choices.append({n: [*bits[n], *m.cell(n, kept)] for n in m.order})
        models["fp_original"] = original
        times, batch = self._time(models)
        self.whole_models += len(models)
        return {"key": key, "batch": batch, "fp_original_ms": times["fp_original"],
                "samples": [{"choice": c, "ms": times[f"decision{k}"]}
                            for k, c in enumerate(choices)]}


def _tag(bits: tuple[int, int]) -> str:
    return f"w{bits[0]}a{bits[1]}"

