"""The decision record (DESIGN §8) as a type: for each Conv2d/Linear its weight and input bits,
the sign of its input quantizer, the output channels it keeps and the BatchNorm after it.

A search makes a `Decision` from its model; a checkpoint file holds its plain record
(`to_record`), and reading a file checks that record against the architecture once
(`from_record`), so refine, fine-tune, BOPs and export all read a decision that fits its model.
Checks that need more than the module tree (the call order, the BatchNorm that really follows a
layer in the graph) stay with the stage that computes those facts (export's collapse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from abs_deploy.errors import UserError

FLOAT_BITS = 32
QUANT_BITS = range(2, 9)
_REQUIRED = ("w_bits", "a_bits", "a_signed", "kept")


@dataclass(frozen=True)
class LayerDecision:
    """One layer's share of the decision. `kept` lists output channel indices, ascending."""

    w_bits: int
    a_bits: int
    a_signed: bool
    kept: tuple[int, ...]
    bn: str | None = None

    def to_record(self) -> dict:
        # Key order and types as the searches have always written them: the saved record is
        # byte-for-byte what it was before the type existed.
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "a_signed": self.a_signed,
                "kept": list(self.kept), "bn": self.bn}


class Decision(Mapping[str, LayerDecision]):
    """Layer name -> `LayerDecision`, in the order the search listed the layers. Immutable;
    an fp checkpoint's decision is the empty one."""

    def __init__(self, layers: Mapping[str, LayerDecision] |
                 Iterable[tuple[str, LayerDecision]] = ()) -> None:
        self._layers = dict(layers)

    def __getitem__(self, name: str) -> LayerDecision:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"Decision({self._layers!r})"

    def bits(self) -> dict[str, tuple[int, int]]:
        """(w_bits, a_bits) per layer."""
        return {n: (d.w_bits, d.a_bits) for n, d in self.items()}

    def kept(self) -> dict[str, list[int]]:
        """Kept output channel indices per layer."""
        return {n: list(d.kept) for n, d in self.items()}

    def replace(self, name: str, **changes: object) -> Decision:
        """A copy with some fields of one layer changed (e.g. `kept=(0, 2)`)."""
        return Decision({**self._layers, name: dataclasses.replace(self[name], **changes)})

    def to_record(self) -> dict[str, dict]:
        """The plain record a checkpoint file holds (DESIGN §8)."""
        return {n: d.to_record() for n, d in self.items()}

    @classmethod
    def from_record(cls, record: object, model: nn.Module) -> Decision:
        """Read a checkpoint's record, checked against `model` (its architecture, BatchNorms
        not folded): exactly its Conv2d/Linear layers, bits in 2..8 or 32, a non-empty sorted
        set of kept channels that exist, and a `bn` that is a BatchNorm of the model. The empty
        record (an fp checkpoint's) is the empty decision. Any problem is one `UserError`."""
        if not isinstance(record, Mapping):
            raise UserError(f"decision record is a {type(record).__name__}, not a dict")
        if not record:
            return cls()
        modules = dict(model.named_modules())
        layers = {n: m for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
        unknown = [n for n in record if n not in layers]
        if unknown:
            raise UserError(f"decision does not fit the architecture: it names {unknown[0]!r}, "
                            "which is not a Conv2d/Linear of the model")
        missing = [n for n in layers if n not in record]
        if missing:
            raise UserError(f"decision does not fit the architecture: no entry for layer "
                            f"{missing[0]!r}")
        return cls((name, _layer(name, d, layers[name].weight.shape[0], modules))
                   for name, d in record.items())


def _layer(name: str, d: object, total: int, modules: Mapping[str, nn.Module]
           ) -> LayerDecision:
    where = f"decision for {name}"
    if not isinstance(d, Mapping):
        raise UserError(f"{where} is not a record")
    for key in _REQUIRED:
        if key not in d:
            raise UserError(f"{where} lacks '{key}'")
    w_bits, a_bits = d["w_bits"], d["a_bits"]
    for key, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if isinstance(bits, bool) or not isinstance(bits, int) or \
                (bits not in QUANT_BITS and bits != FLOAT_BITS):
            raise UserError(f"{where}: {key} must be 2..8 or 32, got {bits!r}")
    kept = d["kept"]
    if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                             for i in kept):
        raise UserError(f"{where}: kept must be a list of channel indices")
    if not kept:
        raise UserError(f"{where}: kept is empty; at least one output channel must remain")
    if kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= total:
        raise UserError(f"{where}: kept must be sorted distinct indices in [0, {total}), "
                        f"got {_short(kept)}")
    # Records written before the field existed have no `bn`. Whether it is the BatchNorm that
    # follows the layer takes a graph capture: export checks that; here only that folding it
    # would touch a BatchNorm and nothing else.
    bn = d.get("bn")
    if bn is not None and not (isinstance(bn, str) and isinstance(modules.get(bn), _BatchNorm)):
        raise UserError(f"{where}: bn is {bn!r}, which is not a BatchNorm of the model")
    return LayerDecision(w_bits, a_bits, bool(d["a_signed"]), tuple(kept), bn)


def _short(items: list) -> str:
    return str(items) if len(items) <= 8 else f"[{', '.join(map(str, items[:8]))}, ...]"
