"""Graph capture (torch.export) and channel-dependency groups (DESIGN §4).

A group is a set of channels that must be removed together: the output channels of its
producers, the matching input channels of its consumers, the entries of its BatchNorms and the
channels a depthwise conv carries through. The walk below follows every tensor that carries a
group's channels through the exported ATen graph; any op it does not understand makes the groups
it touches unprunable (fail closed), so a group reported prunable is one whose removal is exact.

Removal is exact only if a pruned channel reaches its consumers as zeros: the filter gate zeroes
it after its BatchNorm and activation, so every op between there and a consumer must map 0 to 0.
That is why sigmoid, adding a constant or a BatchNorm that does not directly follow a conv make a
group unprunable even though they are channel-wise.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from abs_deploy import ops
from abs_deploy.errors import UserError

aten = torch.ops.aten

RESIDUAL = "feeds a residual add"


@dataclass
class ChannelGroup:
    id: int
    channels: int
    producers: list[str]  # Conv2d/Linear whose output channels these are (depthwise included)
    consumers: list[str]  # Conv2d/Linear (not depthwise) reading them as input channels
    depthwise: list[str]  # depthwise convs carrying them through (a subset of producers)
    norms: list[str]  # BatchNorms normalising them
    prunable: bool
    reason: str  # "" if prunable, else why not ("; "-joined when several)
    # Linear consumer -> elements per channel in its input (H*W of a flattened C x H x W, 1 after
    # global pooling or for a plain Linear): channel c is columns c*HW .. (c+1)*HW-1.
    spatial: dict[str, int] = field(default_factory=dict)


def capture(model: nn.Module, example_input: torch.Tensor) -> ExportedProgram:
    """The model's ATen graph in eval mode (the caller's train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(model, (example_input,), strict=False)
    except Exception as e:  # export raises many types; all mean "this model cannot be traced"
        lines = [s for s in str(e).splitlines() if s.strip()]
        first = lines[0][:300] if lines else ""
        raise UserError(f"cannot capture {type(model).__name__} with torch.export "
                        f"(input shape {list(example_input.shape)}): "
                        f"{type(e).__name__}: {first}") from e
    finally:
        model.train(was_training)


class Analysis:
    """What one capture of a model tells: its channel groups, the BatchNorm after each layer and
    the layers' call order. Capturing is the slow part (about half a second for ResNet-20, more
    the first time), so callers that need several of these ask one `Analysis`."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self._model = model
        self._walk = _Walk(model, capture(model, example_input))

    def groups(self, allow_shared: bool = False) -> list[ChannelGroup]:
        """Every channel group of the model, in order of first appearance.

        With `allow_shared` a group feeding a residual add is prunable (all its producers then
        share one gate); by default only groups private to a block are.
        """
        return self._walk.groups(allow_shared)

    def following_norm(self) -> dict[str, str | None]:
        """Each Conv2d/Linear -> the BatchNorm that is the sole reader of its output, else None.

        Sole, because folding the BN into the conv would change any other reader. Layers the
        forward pass never calls are listed with None, after the called ones.
        """
        result: dict[str, str | None] = dict(self._walk.norm_after)
        for name, module in self._model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in result:
                result[name] = None
        return result

    def layer_order(self) -> list[str]:
        """Conv2d/Linear names in execution order (first call of each)."""
        return list(self._walk.norm_after)


def channel_groups(model: nn.Module, example_input: torch.Tensor,
                   allow_shared: bool = False) -> list[ChannelGroup]:
    """`Analysis.groups` of a fresh capture."""
    return Analysis(model, example_input).groups(allow_shared)


def following_norm(model: nn.Module, example_input: torch.Tensor) -> dict[str, str | None]:
    """`Analysis.following_norm` of a fresh capture."""
    return Analysis(model, example_input).following_norm()


def layer_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """`Analysis.layer_order` of a fresh capture."""
    return Analysis(model, example_input).layer_order()


def aligned_counts(channels: int, fewest: int, multiple: int) -> list[int]:
    """The kept counts of a group of `channels` that are multiples of `multiple`, from the first
    at or above `fewest`, and `channels` itself; empty when that leaves fewer than two (the
    multiple does not fit the group)."""
    first = -(-fewest // multiple) * multiple
    counts = sorted({*range(first, channels, multiple), channels})
    return counts if len(counts) > 1 else []


def input_kept(groups: list[ChannelGroup], kept: dict[str, list[int]]) -> dict[str, int]:
    """Number of input channels each consumer (and depthwise conv) keeps.

    `kept` gives the kept output channel indices per producer; a group none of whose producers
    is named, or that keeps every channel, is unpruned and its consumers are absent. A Linear
    reading a flattened C x H x W keeps H*W columns per kept channel.
    """
    owner = {p: g for g in groups for p in g.producers}
    unknown = sorted(set(kept) - set(owner))
    if unknown:
        raise UserError(f"kept channels given for {', '.join(unknown)}, which produce no "
                        "channel group")
    result: dict[str, int] = {}
    for g in groups:
        chosen = {p: _index_set(p, kept[p], g.channels) for p in g.producers if p in kept}
        if not chosen:
            continue
        first, idx = next(iter(chosen.items()))
        for p, other in chosen.items():
            if other != idx:
                raise UserError(f"{first} and {p} share channel group {g.id} but keep different "
                                "channels")
        if len(idx) == g.channels:
            continue
        if not g.prunable:
            raise UserError(f"channel group {g.id} ({', '.join(g.producers) or 'no producer'}) "
                            f"cannot be pruned: {g.reason}")
        for c in g.consumers:
            result[c] = len(idx) * g.spatial.get(c, 1)
        for d in g.depthwise:
            result[d] = len(idx)
    return result


def _index_set(layer: str, indices: Iterable[int], channels: int) -> frozenset[int]:
    idx = [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < channels]
    if bad or len(set(idx)) != len(idx):
        raise UserError(f"kept channels of {layer} must be distinct indices in [0, {channels}); "
                        f"got {idx}")
    return frozenset(idx)


# --- the walk ------------------------------------------------------------------------------


@dataclass
class _Track:
    """Where a tensor holds a group's channels: along `dim`, `hw` consecutive entries each."""

    gid: int
    dim: int
    hw: int = 1


@dataclass
class _GroupFacts:
    """What the walk has learnt about one union-find set of channels so far (the root's entry
    holds the set's; `_union` merges them)."""

    channels: int
    seq: int
    producers: list[tuple[int, str]] = field(default_factory=list)
    consumers: list[tuple[int, str]] = field(default_factory=list)
    depthwise: list[tuple[int, str]] = field(default_factory=list)
    norms: list[tuple[int, str]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    spatial: dict[str, int] = field(default_factory=dict)


class _Walk:
    """One pass over an exported graph: groups, layer call order and BN-after-layer."""

    def __init__(self, model: nn.Module, ep: ExportedProgram) -> None:
        self.model = model
        sig = ep.graph_signature
        self.tensor_names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.user_inputs = set(sig.user_inputs)
        self.facts: list[_GroupFacts] = []
        self.parent: list[int] = []
        self.state: dict[Node, object] = {}
        self.slots: dict[tuple[str, str], int] = {}  # (module, "in"/"out"/"ch") -> group
        self.layer_of: dict[Node, str] = {}  # conv/linear call -> module name
        self.norm_of: dict[Node, str] = {}  # batch-norm call -> module name
        self.norm_after: dict[str, str | None] = {}  # filled in call order
        self.seq = 0
        for node in ep.graph.nodes:
            self.seq += 1
            self._visit(node)
        self._find_norms_after()

    # -- results --------------------------------------------------------------------------

    def groups(self, allow_shared: bool) -> list[ChannelGroup]:
        roots = sorted({self._find(i) for i in range(len(self.facts))},
                       key=lambda r: self.facts[r].seq)
        out = []
        for gid, r in enumerate(roots):
            a = self.facts[r]
            reasons = [s for s in a.reasons if not (allow_shared and s == RESIDUAL)]
            if not a.producers and not reasons:
                reasons.append("no producing layer")
            out.append(ChannelGroup(
                id=gid, channels=a.channels, producers=_ordered(a.producers),
                consumers=_ordered(a.consumers), depthwise=_ordered(a.depthwise),
                norms=_ordered(a.norms), prunable=not reasons, reason="; ".join(reasons),
                spatial=dict(a.spatial)))
        return out

    def _find_norms_after(self) -> None:
        for node, layer in self.layer_of.items():
            users = list(node.users)
            bn = self.norm_of.get(users[0]) if len(users) == 1 else None
            if layer in self.norm_after and self.norm_after[layer] != bn:
                bn = None  # called more than once with different norms: no single BN to fold
            self.norm_after[layer] = bn

    # -- union-find -----------------------------------------------------------------------

    def _new(self, channels: int, reason: str | None = None) -> int:
        self.facts.append(_GroupFacts(channels, self.seq))
        self.parent.append(len(self.parent))
        if reason:
            self.facts[-1].reasons.append(reason)
        return len(self.facts) - 1

    def _find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def _union(self, a: int, b: int) -> int:
        a, b = self._find(a), self._find(b)
        if a == b:
            return a
        if self.facts[a].seq > self.facts[b].seq:
            a, b = b, a
        big, small = self.facts[a], self.facts[b]
        if big.channels != small.channels:
            # Shapes were checked before every union; reaching here is a bug, so fail closed.
            self._mark(a, f"channel count mismatch ({big.channels} vs {small.channels})")
            self._mark(b, f"channel count mismatch ({big.channels} vs {small.channels})")
            return a
        self.parent[b] = a
        for name in ("producers", "consumers", "depthwise", "norms"):
            getattr(big, name).extend(getattr(small, name))
        big.reasons.extend(s for s in small.reasons if s not in big.reasons)
        big.spatial.update(small.spatial)
        return a

    def _mark(self, g: int, reason: str) -> None:
        reasons = self.facts[self._find(g)].reasons
        if reason not in reasons:
            reasons.append(reason)

    def _slot(self, module: str, role: str, g: int) -> int:
        # A module called twice has one set of weights: its channels are one group.
        key = (module, role)
        if key in self.slots:
            g = self._union(self.slots[key], g)
        self.slots[key] = g
        return g

    def _add(self, g: int, role: str, name: str) -> None:
        getattr(self.facts[self._find(g)], role).append((self.seq, name))

    # -- dispatch -------------------------------------------------------------------------

    def _visit(self, node: Node) -> None:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if node.name in self.user_inputs and isinstance(val, torch.Tensor) and val.ndim:
                dim = 1 if val.ndim > 1 else 0
                g = self._new(int(val.shape[dim]), "first layer input")
                self.state[node] = _Track(g, dim)
            return
        if node.op == "output":
            for t in self._tracked_args(node):
                self._mark(t.gid, "model output")
            return
        if node.op != "call_function":
            if self._tracked_args(node):
                self._opaque(node, f"unknown {node.op} {node.target} at node {node.name}")
            return
        target = node.target
        if target is operator.getitem:
            src = self.state.get(node.args[0])
            if isinstance(src, tuple):
                self.state[node] = src[node.args[1]]
            elif src is not None:
                self._opaque(node, f"unknown indexing at node {node.name}")
            return
        op = ops.op_of(target)
        if op is not None and op.channels in ("conv", "linear", "batch_norm"):
            getattr(self, f"_{op.channels}")(node)
        elif not self._tracked_args(node):
            return  # constants, shapes, fresh tensors: no channels of any group
        elif op is None:
            self._opaque(node, f"unknown op {_op_name(node)} at node {node.name}")
        else:
            self._rule(op.channels, node)

    def _rule(self, rule: str, node: Node) -> None:
        """Apply the table's channel rule `rule` (see `ops.py`) to `node`."""
        packet = node.target.overloadpacket
        if rule == "harmless":
            return
        if rule == "nonzero_at_zero":
            self._passthrough(node, f"{ops.name_of(packet)} maps 0 to a non-zero value at "
                                    f"node {node.name}")
        elif rule in ("binary", "slice"):
            getattr(self, f"_{rule}")(node, packet)
        else:
            getattr(self, f"_{rule}")(node)

    # -- helpers --------------------------------------------------------------------------

    def _tracked_args(self, node: Node) -> list[_Track]:
        found = []
        for a in pytree.tree_leaves((node.args, node.kwargs)):
            s = self.state.get(a) if isinstance(a, Node) else None
            for t in s if isinstance(s, tuple) else (s,):
                if isinstance(t, _Track):
                    found.append(t)
        return found

    def _track(self, arg: object) -> _Track | None:
        s = self.state.get(arg) if isinstance(arg, Node) else None
        return s if isinstance(s, _Track) else None

    def _opaque(self, node: Node, reason: str) -> None:
        """Fail closed: mark every group the node reads and give its outputs fresh groups."""
        for t in self._tracked_args(node):
            self._mark(t.gid, reason)
        outs = []
        for v in _leaves(node.meta.get("val")):
            if isinstance(v, torch.Tensor) and v.ndim:
                dim = 1 if v.ndim > 1 else 0
                outs.append(_Track(self._new(int(v.shape[dim]), reason), dim))
            else:
                outs.append(None)
        if isinstance(node.meta.get("val"), (tuple, list)):
            self.state[node] = tuple(outs)
        elif outs:
            self.state[node] = outs[0]

    def _set(self, node: Node, t: _Track) -> None:
        # Multi-output ops (max_pool2d_with_indices, native batch norm) carry channels in out 0.
        if isinstance(node.meta.get("val"), (tuple, list)):
            self.state[node] = (t,) + (None,) * (len(node.meta["val"]) - 1)
        else:
            self.state[node] = t

    def _module(self, node: Node, param_args: Sequence[object], kinds: tuple[type, ...],
                ) -> str | None:
        """The module owning a call: by its lifted parameters, else by the module stack."""
        for a in param_args:
            if isinstance(a, Node) and a.name in self.tensor_names:
                path = self.tensor_names[a.name].rpartition(".")[0]
                if isinstance(self._submodule(path), kinds):
                    return path
        # Weights computed inside forward (e.g. fake-quantized) are not placeholders.
        stack = node.meta.get("nn_module_stack") or {}
        for path, _ in reversed(list(stack.values())):
            if isinstance(self._submodule(path), kinds):
                return path
        return None

    def _submodule(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    # -- layers ---------------------------------------------------------------------------

    def _conv(self, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        if node.target.overloadpacket is aten.convolution:
            transposed = _arg(node, 6, "transposed", False)
            groups = _arg(node, 8, "groups", 1)
        else:
            transposed, groups = False, _arg(node, 6, "groups", 1)
        name = self._module(node, (w, _arg(node, 2, "bias", None)), (nn.Conv2d,))
        if name is None or transposed:
            self._opaque(node, f"conv at node {node.name} is not an nn.Conv2d")
            return
        self.layer_of[node] = name
        shape = w.meta["val"].shape
        c_out, c_in = int(shape[0]), int(shape[1]) * groups
        t = self._track(x)
        if t is not None and (t.dim != 1 or t.hw != 1):
            self._mark(t.gid, f"{name} reads channels merged or moved by a reshape")
            t = None
        if groups > 1 and groups == c_in == c_out:
            # Depthwise: output channel c is input channel c, so both are one group.
            g = t.gid if t is not None else self._new(c_in, f"{name} reads untracked channels")
            g = self._slot(name, "in", self._slot(name, "out", g))
            self._add(g, "producers", name)
            self._add(g, "depthwise", name)
            self.state[node] = _Track(g, 1)
            return
        if t is not None:
            g = self._slot(name, "in", t.gid)
            self._add(g, "consumers", name)
            if groups > 1:
                self._mark(g, f"grouped conv {name}")
        out = self._slot(name, "out", self._new(c_out))
        self._add(out, "producers", name)
        if groups > 1:
            self._mark(out, f"grouped conv {name}")
        self.state[node] = _Track(out, 1)

    def _linear(self, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        name = self._module(node, (w, _arg(node, 2, "bias", None)), (nn.Linear,))
        if name is None:
            self._opaque(node, f"linear at node {node.name} is not an nn.Linear")
            return
        self.layer_of[node] = name
        t = self._track(x)
        if t is not None:
            if t.dim == x.meta["val"].ndim - 1:
                g = self._slot(name, "in", t.gid)
                self._add(g, "consumers", name)
                self.facts[self._find(g)].spatial[name] = t.hw
            else:
                self._mark(t.gid, f"{name} does not read the channel dim")
        val = node.meta["val"]
        out = self._slot(name, "out", self._new(int(val.shape[-1])))
        self._add(out, "producers", name)
        self.state[node] = _Track(out, val.ndim - 1)

    def _batch_norm(self, node: Node) -> None:
        name = self._module(node, node.args[1:5], (_BatchNorm,))
        t = self._track(node.args[0])
        if name is None:
            if t is not None:
                self._opaque(node, f"batch norm at node {node.name} is not an nn.BatchNorm")
            return
        self.norm_of[node] = name
        if t is None:
            return
        if t.dim != 1 or t.hw != 1:
            self._opaque(node, f"{name} normalises channels merged or moved by a reshape")
            return
        g = self._slot(name, "ch", t.gid)
        self._add(g, "norms", name)
        if node.args[0] not in self.layer_of:
            # The gate zeroes a channel after its BN; a BN further on would turn that zero
            # into its bias, which removing the channel would lose.
            self._mark(g, f"{name} does not directly follow a conv")
        self._set(node, _Track(g, 1))

    # -- channel-preserving ops -----------------------------------------------------------

    def _passthrough(self, node: Node, reason: str | None = None) -> None:
        t = self._track(node.args[0])
        if t is None:
            self._opaque(node, f"unexpected arguments of {_op_name(node)} at node {node.name}")
            return
        if reason:
            self._mark(t.gid, reason)
        self._set(node, t)

    def _clamp(self, node: Node) -> None:
        if node.target.overloadpacket is aten.clamp:
            lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
        else:
            lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        numbers = all(v is None or isinstance(v, (int, float)) for v in (lo, hi))
        keeps_zero = numbers and (lo is None or lo <= 0) and (hi is None or hi >= 0)
        self._passthrough(node, None if keeps_zero else
                          f"{_op_name(node)} maps 0 to a non-zero value at node {node.name}")

    def _spatial(self, node: Node) -> None:
        t = self._track(node.args[0])
        if t is None or t.dim >= node.args[0].meta["val"].ndim - 2:
            self._opaque(node, f"{_op_name(node)} at node {node.name} acts on the channel dim")
            return
        self._set(node, t)

    def _reshape(self, node: Node) -> None:
        t = self._track(node.args[0])
        new = None
        if t is not None:
            ins = [int(s) for s in node.args[0].meta["val"].shape]
            outs = [int(s) for s in node.meta["val"].shape]
            new = _reshaped(ins, outs, t.dim, t.hw)
        if new is None:
            self._opaque(node, f"{_op_name(node)} at node {node.name} splits or mixes channels")
            return
        self.state[node] = _Track(t.gid, *new)

    def _permute(self, node: Node) -> None:
        t = self._track(node.args[0])
        if t is None:
            self._opaque(node, f"unexpected arguments of {_op_name(node)} at node {node.name}")
            return
        order = permutation(node, node.args[0].meta["val"].ndim)
        self.state[node] = _Track(t.gid, order.index(t.dim), t.hw)

    def _reduce(self, node: Node) -> None:
        t = self._track(node.args[0])
        ndim = node.args[0].meta["val"].ndim
        dims = _arg(node, 1, "dim", None)
        keepdim = _arg(node, 2, "keepdim", False)
        dims = [d % ndim for d in ([dims] if isinstance(dims, int) else dims or range(ndim))]
        if t is None or t.dim in dims:
            self._opaque(node, f"{_op_name(node)} at node {node.name} reduces over channels")
            return
        dim = t.dim if keepdim else t.dim - sum(d < t.dim for d in dims)
        self.state[node] = _Track(t.gid, dim, t.hw)

    def _binary(self, node: Node, packet: object) -> None:
        if len(node.args) != 2 or not isinstance(node.meta.get("val"), torch.Tensor):
            self._opaque(node, f"unexpected arguments of {_op_name(node)} at node {node.name}")
            return
        out_shape = node.meta["val"].shape
        n = len(out_shape)
        flows: list[_Track] = []  # tracked operands whose channels reach the output
        others: list[object] = []  # untracked operands: numbers or constant tensors
        for i, arg in enumerate(node.args):
            t = self._track(arg)
            if t is None:
                others.append(arg)
                continue
            if packet is aten.div and i == 1:
                self._opaque(node, f"divides by channels at node {node.name}")
                return
            shape = arg.meta["val"].shape
            dim = t.dim + n - len(shape)
            if shape[t.dim] != out_shape[dim]:
                self._opaque(node, f"broadcasts channels across channels at node {node.name}")
                return
            flows.append(_Track(t.gid, dim, t.hw))
        additive = packet in (aten.add, aten.sub)
        if len(flows) == 2:
            a, b = flows
            if (a.dim, a.hw) != (b.dim, b.hw):
                self._opaque(node, f"combines misaligned channels at node {node.name}")
                return
            distinct = self._find(a.gid) != self._find(b.gid)
            g = self._union(a.gid, b.gid)
            if distinct:
                self._mark(g, RESIDUAL if additive else "channel-wise mul")
            self.state[node] = _Track(g, a.dim, a.hw)
            return
        t, other = flows[0], others[0]
        val = other.meta.get("val") if isinstance(other, Node) else other
        if additive and not (isinstance(val, (int, float)) and val == 0):
            self._mark(t.gid, f"adds a constant at node {node.name}")
        elif isinstance(val, torch.Tensor):
            lead = t.dim - (n - val.ndim)
            if lead >= 0 and val.shape[lead] != 1:
                self._mark(t.gid, "channel-wise mul")
        self.state[node] = t

    def _cat(self, node: Node) -> None:
        tensors = node.args[0]
        n = node.meta["val"].ndim
        dim = _arg(node, 1, "dim", 0) % n
        tracks = [self._track(a) for a in tensors]
        if any(t is not None and t.dim == dim for t in tracks):
            self._opaque(node, "concat")
            return
        first = tracks[0]
        same = all(t is not None and self._find(t.gid) == self._find(first.gid)
                   and (t.dim, t.hw) == (first.dim, first.hw) for t in tracks)
        if not same:
            self._opaque(node, f"cat along a non-channel dim mixes groups at node {node.name}")
            return
        self.state[node] = first

    def _pad(self, node: Node) -> None:
        t = self._track(node.args[0])
        pads = list(node.args[1])
        ndim = node.args[0].meta["val"].ndim
        padded = {ndim - 1 - i // 2 for i, p in enumerate(pads) if p}
        if node.target.overloadpacket is aten.pad:
            mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
        else:
            mode, value = "constant", _arg(node, 2, "value", 0)
        if t is None or t.dim in padded:
            self._opaque(node, f"pads channels at node {node.name}")
        elif mode == "constant" and value:
            self._opaque(node, f"pads with a non-zero value at node {node.name}")
        else:
            self.state[node] = t

    def _slice(self, node: Node, packet: object) -> None:
        t = self._track(node.args[0])
        ndim = node.args[0].meta["val"].ndim
        dim = _arg(node, 1, "dim", 0) % ndim
        whole = node.args[0].meta["val"].shape[dim] == node.meta["val"].shape[dim]
        if t is None or (t.dim == dim and (packet is aten.select or not whole)):
            self._opaque(node, f"slices channels at node {node.name}")
            return
        shift = packet is aten.select and dim < t.dim
        self.state[node] = _Track(t.gid, t.dim - shift, t.hw)


def permutation(node: Node, ndim: int) -> list[int]:
    """The dimension order an aten permute, transpose or t node produces."""
    packet = node.target.overloadpacket
    if packet is aten.permute:
        return [d % ndim for d in node.args[1]]
    a, b = (0, 1) if packet is aten.t else (node.args[1] % ndim, node.args[2] % ndim)
    order = list(range(ndim))
    order[a], order[b] = order[b], order[a]
    return order


def _reshaped(ins: list[int], outs: list[int], dim: int, hw: int) -> tuple[int, int] | None:
    """Where a reshape puts channels held along `dim` (`hw` entries each): (dim, hw) or None.

    The channels survive whole when the output dims before some dim k hold exactly the elements
    before `dim`, and dim k is a multiple of the channel count: each channel then owns a run of
    size[k] / C consecutive entries of dim k (C x H x W -> C*H*W gives H*W each).
    """
    c = ins[dim] // hw
    before = math.prod(ins[:dim])
    acc = 1
    for k, size in enumerate(outs):
        if acc == before and size % c == 0 and (size > 1 or c == 1):
            return k, size // c
        acc *= size
        if acc > before:
            break
    return None


def _arg(node: Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _op_name(node: Node) -> str:
    return str(node.target) if hasattr(node.target, "overloadpacket") else getattr(
        node.target, "__name__", str(node.target))


def _leaves(val: object) -> list[object]:
    return list(val) if isinstance(val, (tuple, list)) else [val]


def _ordered(items: list[tuple[int, str]]) -> list[str]:
    return list(dict.fromkeys(name for _, name in sorted(items)))
