"""Drop the LoRA branches of a hot-swap graph whose factors are plain inputs (the fused decoder graph): every
``Add(y, MatMul(MatMul(x, A), B))`` becomes ``y`` and the ``lora.*`` inputs go. What is left is the base graph with
the same initializers (names and bytes), which the merge-on-swap runtime opens with merged weights in place of the
projections' own (edge_lora.runtimes.merge_swap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edge_lora.passes import GraphPass, PassResult


@dataclass(frozen=True)
class DropDetails:
    branches: int = 0      # Add(y, x·A·B) removed
    inputs: int = 0        # lora.* graph inputs removed


@dataclass(frozen=True)
class DropLoraBranches(GraphPass):
    name: ClassVar[str] = "drop_lora_branches"

    def call(self, model) -> PassResult[DropDetails]:
        graph = model.graph
        lora = [v for v in graph.inputs if v.name.startswith("lora.") and v.name.endswith(".A")]
        dropped = 0
        for a in lora:
            uses = list(a.uses())
            if len(uses) != 1:
                raise ValueError(f"LoRA input {a.name} has {len(uses)} readers, not one MatMul")
            down = uses[0][0]
            up = _only_reader(down.outputs[0], "MatMul")
            add = _only_reader(up.outputs[0], "Add")
            base = add.inputs[0] if add.inputs[1] is up.outputs[0] else add.inputs[1]
            add.outputs[0].replace_all_uses_with(base)
            graph.remove([add, up, down], safe=True)
            dropped += 1
        names = [v for v in graph.inputs if v.name.startswith("lora.")]
        for v in names:
            if list(v.uses()):
                raise ValueError(f"LoRA input {v.name} is still read after its branch was dropped")
            graph.inputs.remove(v)
        return PassResult(self.name, model, dropped > 0, DropDetails(dropped, len(names)))


def _only_reader(value, op: str):
    uses = list(value.uses())
    if len(uses) != 1 or uses[0][0].op_type != op:
        raise ValueError(f"{value.name} should feed exactly one {op} in a LoRA branch; the graph is not a "
                         "fused hot-swap graph")
    return uses[0][0]
