"""Graph preparation for the base quantizer: untie a tied LM head, name unnamed MatMuls.

A tied LM head reads the embedding table through a ``Transpose``; the quantizers take constant MatMul weights, so
the head gets its own transposed copy: it can then be quantized while the ``Gather`` keeps its table. The
quantizers select nodes by name, so every MatMul needs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edge_lora.passes import GraphPass, PassResult


@dataclass(frozen=True)
class UntieDetails:
    """``untied``: the embedding tables the head read through a Transpose; ``weights``: the copies made (same
    order)."""

    untied: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class UntieHead(GraphPass):
    name: ClassVar[str] = "untie_head"

    def call(self, model) -> PassResult[UntieDetails]:
        import onnx_ir as ir

        graph = model.graph
        untied, weights = [], []
        for node in list(graph):
            if node.op_type != "Transpose" or node.inputs[0] is None or node.inputs[0].const_value is None:
                continue
            perm = node.attributes.get_ints("perm", None)
            table = node.inputs[0]
            if len(table.shape or ()) != 2 or (perm is not None and list(perm) != [1, 0]):
                continue
            users = [u for u, _ in node.outputs[0].uses()]
            if not users or any(u.op_type != "MatMul" for u in users):
                continue
            weight = ir.Value(name=f"{table.name}.untied_T", shape=ir.Shape(list(table.shape)[::-1]),
                              type=ir.TensorType(table.dtype),
                              const_value=ir.tensor(np.ascontiguousarray(table.const_value.numpy().T)))
            graph.register_initializer(weight)
            node.outputs[0].replace_all_uses_with(weight)
            graph.remove(node, safe=True)
            untied.append(table.name)
            weights.append(weight.name)
        return PassResult(self.name, model, bool(untied), UntieDetails(tuple(untied), tuple(weights)))


@dataclass(frozen=True)
class NamingDetails:
    """``named``: how many MatMuls had no name and got ``/edge_lora/MatMul_<index>``."""

    named: int = 0


@dataclass(frozen=True)
class NameMatMuls(GraphPass):
    name: ClassVar[str] = "name_matmuls"

    def call(self, model) -> PassResult[NamingDetails]:
        named = 0
        for i, node in enumerate(model.graph):
            if node.op_type == "MatMul" and not node.name:
                node.name = f"/edge_lora/MatMul_{i}"
                named += 1
        return PassResult(self.name, model, named > 0, NamingDetails(named))
