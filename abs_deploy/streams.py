"""Quantized residual streams (#15): one 8-bit tensor quantizer on every tensor that meets a
residual add, and on every layer output that reaches the next quantizer only through another
op, shared by search (fine-tune trains them) and export (the ONNX file and the integer
reference carry them).

Why: ONNX Runtime fuses a Conv into QLinearConv only when the Conv's one consumer is a
QuantizeLinear, and an Add into QLinearAdd only with DequantizeLinear on both inputs and
QuantizeLinear on its output (DESIGN §10). A conv whose output meets a residual add, goes
through a pooling/mean/flatten/reshape before the next layer's input quantizer, or is read by
two layers (two QuantizeLinears) has no single quantizer of its own, so it stays float and
dequantizes its weights on every run. Here each such tensor gets ONE quantizer that all its
readers read (a layer with its own input quantizer then requantizes from it, which the runtime
still fuses).

Where (`insert`), found in the model's torch.fx graph, for any model:
- for every residual add (an add of two computed tensors of equal shape): a quantizer on each
  operand that is not already a stream quantizer's output, and one on the result;
- for every conv/linear layer (its BatchNorm, folded at export, counted in): one on its output
  when some path from it reaches a quantizer through an op other than dropout/identity, or
  when it reaches more than one (each reading layer has its own). Paths that end at the
  graph's output need none: the classifier's logits stay float.
Each is placed after the tensor's ReLU/ReLU6/clamp when that is its only reader (unsigned
then: the clamp is folded into the integer range), else on the tensor itself (signed). Names
are `stream_quant.<k>` in graph order, so the same architecture always gets the same names
and a checkpoint's state_dict reloads.

Shared codes (`insert(..., inputs=...)`, checkpoints with `"streams": "shared"`): a stream
tensor whose quantized readers all read it directly (through nothing but dropout/identity)
and all quantize their input with the same bits and signedness is quantized by THEIR quantizer
instead of an 8-bit one of its own: the stream quantizer takes their bits, and `tie` makes its
clip and every reader's input clip one parameter. The add and any other reader then read the
very codes the layers read, and a layer quantizing its already quantized input again is the
identity (round(q * s / s) = q), so the model computes what it did, and export writes one
Q/[Clip]/DQ for the tensor (onnx_graph merges the layer's into the stream's). Why: an 8-bit
stream that a 4-bit layer reads is requantized (DQ -> Q -> Clip) on every run; measured on
ResNet-20 at batch 32, 1 thread in ORT, QCDQ vs the pruned float model: 1.17x with 8-bit
streams, 1.34x with the block input quantized once at 4 bits. Readers of other bits, a float
reader, or a reader behind a pool/reshape keep the 8-bit stream (a pooled tensor is requantized
by its reader anyway, so sharing would buy nothing there but coarser codes).

The same module position holds one of three forms: `StreamQuant` (fake-quant with a learnable
clip, trained), `StreamMarker` (identity in the float models, one `abs_deploy::stream_quant`
node under torch.export that the op table passes channels through and export turns into
Q/[Clip]/DQ) and export's frozen integer twin (export/collapse.py).

BOPs are unchanged: they count MACs x b_w x b_a of the layers; a stream quantizer computes
nothing but a rounding.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from abs_deploy.decision import FLOAT_BITS
from abs_deploy.distributed import current
from abs_deploy.errors import UserError
from abs_deploy.quant import CLIP_EPS, fake_quant

STREAM_BITS = 8  # wide enough that a residual sum loses little; fuses in every runtime
CONTAINER = "stream_quant"  # the ModuleList holding them: keys `stream_quant.<k>.clip`
CHECKPOINT_KEY = "streams"  # `"streams": True`: 8-bit streams; `"shared"`: shared codes
SHARED = "shared"


@torch.library.custom_op("abs_deploy::stream_quant", mutates_args=())
def stream_quant_marker(x: Tensor, name: str) -> Tensor:
    """Identity: where stream quantizer `name` sits in a float model's exported graph."""
    return x.clone()


@stream_quant_marker.register_fake
def _(x: Tensor, name: str) -> Tensor:
    return torch.empty_like(x)


MARKER = torch.ops.abs_deploy.stream_quant  # the op packet, as graph nodes' targets name it


class StreamQuant(nn.Module):
    """Trainable per-tensor quantizer (DESIGN §3 activations: learnable clip, LSQ gradients,
    unsigned after a ReLU-like producer): 8 bits, or its `readers`' bits when it shares their
    codes (module docstring; `tie` then makes its clip theirs)."""

    def __init__(self, name: str, signed: bool, bits: int = STREAM_BITS,
                 readers: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.name, self.signed, self.bits, self.readers = name, signed, bits, readers
        self.clip = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        return fake_quant(x, self.clip.abs() + CLIP_EPS, self.bits, self.signed, current().world)

    def extra_repr(self) -> str:
        shared = f", shared with {', '.join(self.readers)}" if self.readers else ""
        return f"{self.name}, a{self.bits}{'s' if self.signed else 'u'}{shared}"


class StreamMarker(nn.Module):
    """The float models' form of a stream quantizer: identity, one node under torch.export."""

    def __init__(self, name: str, signed: bool, bits: int = STREAM_BITS,
                 readers: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.name, self.signed, self.bits, self.readers = name, signed, bits, readers

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.abs_deploy.stream_quant(x, self.name)


# What a layer's input quantizer is, for shared codes: (bits, signed); bits >= 32 is float.
InputBits = Mapping[str, tuple[int, bool]]


def insert(model: nn.Module, example: Tensor,
           factory: Callable[[str, bool, int, tuple[str, ...]], nn.Module] = StreamQuant,
           inputs: InputBits | None = None) -> fx.GraphModule:
    """`model` as a GraphModule with a stream quantizer (made by `factory(name, signed, bits,
    readers)`) on every tensor that meets a residual add (module docstring). With `inputs`
    (each layer's input bits and signedness), a stream whose readers all quantize it alike
    shares their codes: their bits and signedness, `readers` their names; else 8 bits and no
    readers. Parameters and buffers keep their names. A model torch.fx cannot trace is a
    one-line `UserError`."""
    gm = _trace(model)
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    gm.train(was_training)
    places = _places(gm)
    chosen = {node for node, _ in places}
    # All decided on the graph as traced, before any quantizer changes it.
    kinds = [_shared_input(gm, node, chosen, inputs) if inputs is not None else None
             for node, _ in places]
    container = nn.ModuleList()
    gm.add_module(CONTAINER, container)
    for k, ((node, signed), shared) in enumerate(zip(places, kinds, strict=True)):
        name = f"{CONTAINER}.{k}"
        bits, readers = STREAM_BITS, ()
        if shared is not None:
            (bits, signed), readers = shared
        container.append(factory(name, signed, bits, readers))
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    gm.graph.lint()
    gm.recompile()
    return gm


@torch.no_grad()
def calibrate(model: nn.Module, example: Tensor, batches: Iterable[Tensor],
              widen: float = 1.03) -> dict[str, float]:
    """Each stream quantizer's clip for `model` (without them): the largest magnitude the
    quantizer's tensor takes on `batches`, `widen` times. The max, not a percentile: 8 bits
    have resolution to spare, and a residual sum clipped loses its identity path. Widened, so a
    reader with its own input clip over the same tensor does not get a grid exactly 2^k times
    the stream's: one code in 2^k would requantize to an exact tie, which OpenVINO rounds
    otherwise than half to even (measured: 2.4% of such a layer's codes one apart)."""
    marked = insert(model, example, StreamMarker)
    was_training = marked.training
    marked.eval()
    top = dict.fromkeys(names(marked), 0.0)

    def hook_for(name):
        def hook(module, inputs):
            top[name] = max(top[name], inputs[0].abs().max().item())
        return hook

    handles = [marked.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in top]
    try:
        for x in batches:
            marked(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: max(widen * v, 1e-3) for n, v in top.items()}


def inputs_of(ckpt: dict) -> InputBits | None:
    """`insert`'s `inputs` for a checkpoint: its decided input bits when its streams share
    codes (`"streams": "shared"`), else None (`True`, written before shared codes: 8 bits)."""
    if ckpt.get(CHECKPOINT_KEY) != SHARED:
        return None
    return {name: (d.a_bits, d.a_signed) for name, d in ckpt["decision"].items()}


def tie(model: nn.Module) -> None:
    """Make each shared-code stream quantizer's clip and its readers' input clips (`a_clip`)
    one parameter (in place), the largest in magnitude of the readers': one quantizer per
    tensor, so the file has one Q/[Clip]/DQ there, and a block's conv and its 1x1 shortcut
    learn one clip. The largest, so neither reader starts clipping what it did not."""
    for q in (model.get_submodule(n) for n in names(model)):
        if not q.readers:
            continue
        layers = [model.get_submodule(r) for r in q.readers]
        clip = max((m.a_clip for m in layers), key=lambda p: float(p.detach().abs()))
        for m in layers:
            m.a_clip = clip
        q.clip = clip


def tie_values(model: nn.Module, example: Tensor, inputs: InputBits,
               clips: dict[str, Tensor]) -> None:
    """What `tie` does to a trained model, on a state dict's clip values (in place): each
    shared stream's `<name>.clip` and its readers' `<reader>.a_clip` become the largest of the
    readers' clips. For checkpoints made without training (`abs profile`, tests)."""
    marked = insert(model, example, StreamMarker, inputs)
    for name in names(marked):
        readers = marked.get_submodule(name).readers
        if readers:
            clip = max((clips[f"{r}.a_clip"] for r in readers), key=lambda t: float(t.abs()))
            for key in (f"{name}.clip", *(f"{r}.a_clip" for r in readers)):
                clips[key] = clip.clone()


def names(model: nn.Module) -> list[str]:
    """The stream quantizers' module names, in graph order (empty for a model without)."""
    container = getattr(model, CONTAINER, None)
    return [f"{CONTAINER}.{i}" for i in range(len(container))] if container is not None else []


def replace(model: nn.Module, make: Callable[[str, nn.Module], nn.Module]) -> None:
    """Swap every stream quantizer for `make(name, old)` (in place)."""
    container = getattr(model, CONTAINER, None)
    for i, old in enumerate(container or []):
        container[i] = make(f"{CONTAINER}.{i}", old)


class _Tracer(fx.Tracer):
    """Layers stay single nodes even when they are quantized twins (subclasses of Conv2d and
    Linear that fx would otherwise trace into, fake-quant arithmetic and all)."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, StreamQuant, StreamMarker)) or \
            super().is_leaf_module(m, qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
        return fx.GraphModule(model, graph, type(model).__name__)
    except Exception as e:  # fx raises many types; all mean "this forward is not traceable"
        first = next((s for s in str(e).splitlines() if s.strip()), "")[:200]
        raise UserError(f"cannot place residual-stream quantizers in {type(model).__name__}: "
                        f"torch.fx cannot trace its forward ({type(e).__name__}: {first}); "
                        "fine-tune without --streams"
                        ) from None


def _places(gm: fx.GraphModule) -> list[tuple[fx.Node, bool]]:
    """(tensor, signed) of every quantizer to insert, in graph order, each tensor once: the
    residual adds' tensors first, so a layer output's walk to the next quantizer
    (`_needs_own_quantizer`) already ends at them."""
    chosen: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if not _is_residual_add(node):
            continue
        for operand in node.args[:2]:
            chosen.setdefault(operand, not _nonnegative(gm, operand))
        chosen.setdefault(*_after_activation(gm, node))
    for node in gm.graph.nodes:
        if _is_layer(gm, node):
            tensor, signed = _after_activation(gm, _after_norms(gm, node))
            if tensor not in chosen and _needs_own_quantizer(gm, tensor, chosen):
                chosen[tensor] = signed
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(chosen.items(), key=lambda item: order[item[0]])


def _after_activation(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, bool]:
    """Where a quantizer of `node` goes: after its ReLU/ReLU6/clamp when that is its only
    reader (unsigned: export folds the clamp into the integer range), else on `node` (signed)."""
    users = list(node.users)
    if len(users) == 1 and _nonnegative(gm, users[0]):
        return users[0], False
    return node, True


def _after_norms(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """`node` followed through BatchNorms and Identities that are each its only reader: export
    folds them into the layer, so the layer's output is what comes out of them."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or not isinstance(gm.get_submodule(user.target),
                                                      (_BatchNorm, nn.Identity)):
            break
        node = user
    return node


def _needs_own_quantizer(gm: fx.GraphModule, tensor: fx.Node,
                         chosen: dict[fx.Node, bool]) -> bool:
    """Does the layer producing `tensor` lack one quantizer as its only reader, so that ONNX
    Runtime keeps it float? Either some path from `tensor` reaches a quantizer (a layer's input
    quantizer, or a stream quantizer already `chosen`) through an op other than a dropout or
    identity (pooling, mean, flatten, reshape ...), or it reaches more than one: each reading
    layer has its own QuantizeLinear. Paths that end at the graph's output (the classifier's
    logits) need none."""
    stack = [(user, False) for user in tensor.users]
    seen: set[tuple[fx.Node, bool]] = set()
    quantizers = 0
    while stack:
        node, through_op = stack.pop()
        if (node, through_op) in seen or node.op == "output":
            continue
        seen.add((node, through_op))
        if not _is_layer(gm, node):
            through_op = through_op or not _is_passthrough(gm, node)
        if _is_layer(gm, node) or node in chosen:  # a quantizer: the path ends here
            quantizers += 1
            if through_op or quantizers > 1:
                return True
            continue
        stack.extend((user, through_op) for user in node.users)
    return False


def _shared_input(gm: fx.GraphModule, tensor: fx.Node, chosen: set[fx.Node],
                  inputs: InputBits) -> tuple[tuple[int, bool], tuple[str, ...]] | None:
    """((bits, signed), reader names) when every layer reading `tensor` reads it directly
    (through dropout/identity only), at least one does, and all quantize their input with the
    same bits and signedness; else None. Paths through another op that end at another stream
    quantizer (a residual add's) do not count: that quantizer reads the codes as they are."""
    readers: list[str] = []
    stack = [(user, False) for user in tensor.users]
    seen: set[tuple[fx.Node, bool]] = set()
    while stack:
        node, through_op = stack.pop()
        if (node, through_op) in seen or node.op == "output":
            continue
        seen.add((node, through_op))
        if _is_layer(gm, node):  # before `chosen`: a layer reads its input before its output
            if through_op:      # is quantized
                return None
            if node.target not in readers:
                readers.append(node.target)
            continue
        if node in chosen:
            continue
        through_op = through_op or not _is_passthrough(gm, node)
        stack.extend((user, through_op) for user in node.users)
    kinds = {tuple(inputs.get(r, (FLOAT_BITS, True))) for r in readers}
    if len(kinds) != 1:
        return None
    (bits, signed), = kinds
    if bits >= FLOAT_BITS:
        return None
    order = {n.target: i for i, n in enumerate(gm.graph.nodes)}
    return (bits, signed), tuple(sorted(readers, key=order.get))


def _is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A conv or linear layer: the decided layers, each with its own input quantizer."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   (nn.Conv2d, nn.Linear))


def _is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Dropout and Identity: nothing in the exported (eval) graph."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   (nn.Dropout, nn.Identity))


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_residual_add(node: fx.Node) -> bool:
    """An add of two computed tensors (not a constant, bias or parameter) of equal shape."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = node.args[:2]
    if not all(isinstance(v, fx.Node) and v.op != "get_attr" for v in (a, b)):
        return False
    shapes = [getattr(v.meta.get("tensor_meta"), "shape", None) for v in (a, b)]
    return shapes[0] is not None and shapes[0] == shapes[1]


_NONNEG_MODULES = (nn.ReLU, nn.ReLU6)
_NONNEG_FUNCTIONS = {F.relu, torch.relu, F.relu6}


def _nonnegative(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does `node` clamp its input to >= 0 (ReLU, ReLU6, hardtanh/clamp with min >= 0)? A
    quantizer after it is unsigned, and export folds the clamp into its integer range."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, _NONNEG_MODULES) or (
            isinstance(m, nn.Hardtanh) and m.min_val >= 0)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return True
    if node.op == "call_method" and node.target in ("clamp", "clamp_", "clip"):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        return isinstance(lo, (int, float)) and lo >= 0
    if node.op != "call_function":
        return False
    if node.target in _NONNEG_FUNCTIONS:
        return True
    if node.target in (torch.clamp, torch.clip, F.hardtanh):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get(
            "min", node.kwargs.get("min_val"))
        return isinstance(lo, (int, float)) and lo >= 0
    return False
