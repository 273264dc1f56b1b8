"""Lift LoRA factors to graph inputs: the hot-swap export's tag initializers become inputs with rank-0 defaults.

The exporter does not keep parameter names (the TorchScript exporter names weights ``onnx::MatMul_123``), so each
branch's factors are exported as *tags* (seeded random arrays, unique bytes) and found again here by their bytes.
Each is renamed to its input name, made a graph input of shape [d_in, "rank.<m>"] / ["rank.<m>", d_out], and left
an empty rank-0 initializer as its default: without an adapter the branch adds exact zeros.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from edge_lora.errors import ModelError
from edge_lora.passes import GraphPass, PassResult

# (graph input name, tag array, dims with a symbolic name (edge_lora.passes.fuse.rank_dim) on the rank axes)
Tag = tuple[str, np.ndarray, list]


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class LiftDetails:
    """``inputs``: module → its graph input names ([A, B], or [R, C, L] for a chain branch), sorted by module;
    ``not_found``: modules whose factors are not in the graph (they do not reach the exported outputs, e.g. BERT's
    pooler in a feature-extraction export, pruned by the exporter); ``duplicates``: copies of a shared tag the
    exporter made, routed to the one input."""

    inputs: Mapping[str, tuple[str, ...]]
    not_found: tuple[str, ...] = ()
    duplicates: int = 0

    def __post_init__(self):
        object.__setattr__(self, "inputs", MappingProxyType({m: tuple(v) for m, v in sorted(self.inputs.items())}))
        object.__setattr__(self, "not_found", tuple(sorted(self.not_found)))

    @property
    def found(self) -> tuple[str, ...]:
        return tuple(self.inputs)


def _lift(model, tags: dict[str, Tag]) -> tuple[set[str], int]:
    """Tag initializers → graph inputs with rank-0 defaults. ``tags``: digest → tag. Returns (the input names
    made, the duplicate copies routed).

    A tag used by several modules (a shared factor) should be one initializer; if the exporter duplicated it,
    every copy is routed to the first, so the graph still has ONE input for it."""
    import onnx_ir as ir

    graph = model.graph
    shapes = {tuple(arr.shape) for _, arr, _ in tags.values()}
    found: dict[str, object] = {}
    duplicates = 0
    for value in list(graph.initializers.values()):
        if value.const_value is None or tuple(value.shape or ()) not in shapes:
            continue
        hit = tags.get(_digest(value.const_value.numpy()))
        if hit is None:
            continue
        new_name, _, dims = hit
        if new_name in found:
            ir.convenience.replace_all_uses_with(value, found[new_name])
            graph.initializers.pop(value.name)
            duplicates += 1
            continue
        value.name = new_name
        empty = np.zeros([0 if isinstance(d, str) else d for d in dims], dtype=np.float32)
        value.const_value = ir.tensor(empty, name=new_name)
        value.shape = ir.Shape(dims)
        value.type = ir.TensorType(ir.DataType.FLOAT)
        graph.inputs.append(value)
        found[new_name] = value
    return set(found), duplicates


@dataclass(frozen=True)
class LiftLoraInputs(GraphPass):
    """``branches``: module → its tags (a LoRA branch has A and B, a chain branch R, C and L)."""

    branches: Mapping[str, Sequence[Tag]]
    name: ClassVar[str] = "lift_lora_inputs"

    def call(self, model) -> PassResult[LiftDetails]:
        tags = {_digest(array): (n, array, dims) for tagged in self.branches.values() for n, array, dims in tagged}
        made, duplicates = _lift(model, tags)
        inputs, not_found, half = {}, [], []
        for module, tagged in self.branches.items():
            names = [n for n, _, _ in tagged]
            hits = [n for n in names if n in made]
            if len(hits) == len(names):
                inputs[module] = names
            elif hits:
                half.append(module)
            else:
                not_found.append(module)
        if half:
            raise ModelError(f"hotswap export: only some LoRA factors of {half[:3]} were found in the exported graph "
                             "(the exporter folded or duplicated the others); this is a bug in edge_lora.")
        return PassResult(self.name, model, bool(made), LiftDetails(inputs, tuple(not_found), duplicates))


def lift_lora_inputs(model, branches: Mapping[str, Sequence[Tag]]) -> PassResult[LiftDetails]:
    """:class:`LiftLoraInputs` on ``model``."""
    return LiftLoraInputs(branches)(model)
