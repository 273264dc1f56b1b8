"""Packed projections: an onnx_ir pass that fuses MatMuls reading one input into one MatMul and a Split.

A decoder layer runs q/k/v (and gate/up) as separate MatMuls over the same activation. At batch 1 decode each
is a small GEMV whose cost is mostly kernel dispatch, so one MatMul over the concatenated weight ``[W_q|W_k|W_v]``
followed by a Split is cheaper and gives the same numbers (each output column is the same dot product).

In a hot-swap graph the LoRA branches of the modules of one group become ONE branch as well::

    y_group = x·W_cat + (x·A_cat)·B_bd        then Split
    A_cat = [A_q | A_k | A_v]                 (d_in × Σr)
    B_bd  = blockdiag(B_q, B_k, B_v)          (Σr × Σd_out)

which turns 3 × (MatMul, MatMul, Add) + 3 base MatMuls into 4 kernels + a Split. Which modules share a branch is
decided by :func:`lora_groups` (a rule on module names, so that an adapter file can be written for an export
from the module names alone), confirmed on the graph: modules only fuse when their MatMuls really read one value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edge_lora.formats.export_meta import LoraGroup
from edge_lora.passes import GraphPass, PassResult

RANK_DIM = "rank"


def rank_dim(name: str) -> str:
    """The symbolic rank dimension of a branch's inputs. One name per branch (A's columns = B's rows), distinct
    between branches: ORT plans buffers by these names, and one shared name for branches of different ranks
    fails at run time ("Shape mismatch attempting to re-use buffer")."""
    return f"{RANK_DIM}.{name}"

# Sibling projections that read the same activation in the architectures we export. The rule must be known
# without the graph (see module docstring); the graph pass still checks that the inputs really are shared.
FUSABLE_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                    ("w1", "w3"))


def lora_input_names(name: str) -> tuple[str, str]:
    """Graph input names of the factors of a module, or of a fused group (``name`` from :func:`lora_group_name`).
    The ONE place these names are made: the graph pass and the adapter-file writer both call it, so they cannot
    disagree ("Invalid input name" at run time)."""
    return f"lora.{name}.A", f"lora.{name}.B"


def lora_group_name(modules: Iterable[str]) -> str:
    """``model.layers.0.self_attn.q_proj+k_proj+v_proj`` for a group, the module name itself for one module."""
    modules = list(modules)
    if len(modules) == 1:
        return modules[0]
    parent = modules[0].rpartition(".")[0]
    return (parent + "." if parent else "") + "+".join(m.rpartition(".")[2] for m in modules)


def lora_groups(modules: Iterable[str]) -> list[tuple[str, ...]]:
    """Partition module names into LoRA groups (tuples in a fixed order: the order of FUSABLE_SIBLINGS), sorted
    by first member. Modules that fuse with nothing are groups of one."""
    modules = sorted(set(modules))
    out, taken = [], set()
    by_parent: dict[str, dict[str, str]] = {}
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = m
    for m in modules:
        if m in taken:
            continue
        parent, _, leaf = m.rpartition(".")
        group = (m,)
        for siblings in FUSABLE_SIBLINGS:
            if leaf in siblings:
                present = tuple(by_parent[parent][s] for s in siblings if s in by_parent[parent])
                if len(present) >= 2:
                    group = present
                break
        taken.update(group)
        out.append(group)
    return sorted(out)


@dataclass
class _Branch:
    module: str
    base: object        # MatMul(x, W)
    bias: object        # Add(x·W, b) of a biased Linear, or None
    down: object        # MatMul(x, A)
    up: object          # MatMul(x·A, B)
    add: object         # Add(x·W (+ b), x·A·B)


def _const_weight(value) -> bool:
    return (value is not None and value.is_initializer() and not value.is_graph_input()
            and value.const_value is not None and len(value.const_value.shape) == 2)


def _const_array(value):
    """The array of a constant value: an initializer (not overridable), a Constant node's output, or an Identity
    of either (the TorchScript exporter emits biases all three ways); else None."""
    for _ in range(8):
        if value is None or value.is_graph_input():
            return None
        if value.is_initializer():
            return value.const_value.numpy() if value.const_value is not None else None
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == "Constant" and "value" in producer.attributes:
            return producer.attributes["value"].value.numpy()
        if producer.op_type != "Identity":
            return None
        value = producer.inputs[0]
    return None


def _const_vector(value) -> bool:
    array = _const_array(value)
    return array is not None and array.ndim == 1


def _vector(value) -> np.ndarray:
    return _const_array(value)


def _bias_of(node):
    """(MatMul, bias value) when ``node`` is ``Add(MatMul(x, W), b)`` with a constant vector b (either order)."""
    if node is None or node.op_type != "Add":
        return None, None
    for i in (0, 1):
        mm = node.inputs[i].producer() if node.inputs[i] is not None else None
        if mm is not None and mm.op_type == "MatMul" and _const_vector(node.inputs[1 - i]) \
                and _only_consumer(node.inputs[i]) is node:
            return mm, node.inputs[1 - i]
    return None, None


def _only_consumer(value):
    users = list(value.uses())
    return users[0][0] if len(users) == 1 and not value.is_graph_output() else None


def _find_branches(graph, lora_inputs: dict[str, list[str]]) -> dict[str, _Branch]:
    """Module → its branch nodes, for branches of the exact shape ``Add(MatMul(x, W), MatMul(MatMul(x, A), B))``
    (what LoraBranch exports to). Anything else (an embedding's Gather, a biased Linear) is left as it is."""
    found = {}
    for module, (a_name, b_name) in lora_inputs.items():
        a, b = graph.initializers.get(a_name), graph.initializers.get(b_name)
        if a is None or b is None:
            continue
        down = _only_consumer(a)
        if down is None or down.op_type != "MatMul" or down.inputs[1] is not a:
            continue
        up = _only_consumer(down.outputs[0])
        if up is None or up.op_type != "MatMul" or up.inputs[1] is not b or _only_consumer(b) is not up:
            continue
        add = _only_consumer(up.outputs[0])
        if add is None or add.op_type != "Add":
            continue
        other = add.inputs[0] if add.inputs[1] is up.outputs[0] else add.inputs[1]
        base, bias = other.producer(), None
        if base is not None and base.op_type == "Add":
            base, _ = _bias_of(base)
            bias = other.producer()
        if (base is None or base.op_type != "MatMul" or base.inputs[0] is not down.inputs[0]
                or not _const_weight(base.inputs[1]) or _only_consumer(other) is not add):
            continue
        found[module] = _Branch(module, base, bias, down, up, add)
    return found


class _Emitter:
    def __init__(self, model):
        import onnx_ir as ir

        self.ir = ir
        self.graph = model.graph
        self.opset = model.opset_imports.get("", 18)
        self.order = {id(n): i for i, n in enumerate(self.graph)}
        self.count = 0

    def initializer(self, name: str, array: np.ndarray, graph_input: bool = False, dims=None):
        ir = self.ir
        value = ir.Value(name=name, shape=ir.Shape(dims if dims is not None else array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        if graph_input:
            self.graph.inputs.append(value)
        self.graph.register_initializer(value)
        return value

    def node(self, op: str, inputs, name: str, num_outputs: int = 1, **attributes):
        return self.ir.node(op, inputs, attributes or None, name=name, num_outputs=num_outputs)

    def split(self, value, sizes: list[int], name: str):
        if self.opset >= 13:
            sizes_value = self.initializer(f"{name}/split_sizes", np.asarray(sizes, dtype=np.int64))
            return self.node("Split", [value, sizes_value], name, num_outputs=len(sizes), axis=-1)
        return self.node("Split", [value], name, num_outputs=len(sizes), axis=-1, split=list(sizes))

    def weight(self, nodes, name: str):
        arrays = [n.inputs[1].const_value.numpy() for n in nodes]
        if len({a.dtype for a in arrays}) != 1 or len({a.shape[0] for a in arrays}) != 1:
            return None, None
        return self.initializer(name, np.ascontiguousarray(np.concatenate(arrays, axis=1))), \
            [a.shape[1] for a in arrays]

    def place(self, new_nodes, old_nodes, replaced):
        """Insert ``new_nodes`` before the earliest of ``old_nodes``, reroute (old value, new value) pairs,
        then drop the old nodes and the weights nothing reads any more."""
        first = min(old_nodes, key=lambda n: self.order[id(n)])
        self.graph.insert_before(first, new_nodes)
        for old, new in replaced:
            new.name = old.name + "/fused"
            self.ir.convenience.replace_all_uses_with(old, new)
        weights = [v for n in old_nodes for v in n.inputs if v is not None and v.is_initializer()]
        constants = [v.producer() for n in old_nodes for v in n.inputs
                     if v is not None and v.producer() is not None
                     and v.producer().op_type in ("Constant", "Identity")]
        self.graph.remove(old_nodes, safe=True)
        dead = [c for c in {id(c): c for c in constants}.values() if not list(c.outputs[0].uses())]
        if dead:
            self.graph.remove(dead, safe=True)
        for w in weights:
            if w is not None and not list(w.uses()) and w.name in self.graph.initializers:
                if w.is_graph_input():
                    self.graph.inputs.remove(w)
                self.graph.initializers.pop(w.name)


def fused_tag(nodes, number: int) -> str:
    """``/model/layers.0/self_attn/q_proj+k_proj+v_proj`` from the fused nodes' names, so later passes (the
    quantizer's per-module precision, profilers) still see which modules a fused MatMul holds."""
    parts = [n.name.rsplit("/", 1)[0].rsplit("/", 1) for n in nodes if n.name and n.name.count("/") >= 2]
    if len(parts) != len(nodes) or len({p[0] for p in parts}) != 1:
        return f"/fused_{number}"
    return f"{parts[0][0]}/{'+'.join(p[1] for p in parts)}"


@dataclass(frozen=True)
class FuseDetails:
    """``fused``: fused MatMuls made (packed plain projections and LoRA groups); ``groups``: the LoRA groups made,
    each one branch of the graph (its per-module inputs are gone)."""

    nodes_before: int
    nodes_after: int
    fused: int
    groups: tuple[LoraGroup, ...] = ()


@dataclass(frozen=True)
class FuseProjections(GraphPass):
    """Fuse every set of ≥2 MatMuls that read one value with constant 2-D weights; with ``lora_inputs`` (a hot-swap
    graph: module → its [A, B] input names), also fuse the LoRA branches of each :func:`lora_groups` group into one
    branch (new inputs named by :func:`lora_input_names` of :func:`lora_group_name`, rank-0 defaults)."""

    lora_inputs: Mapping[str, Sequence[str]] | None = None
    name: ClassVar[str] = "fuse_projections"

    def call(self, model) -> PassResult[FuseDetails]:
        details = _fuse(model, self.lora_inputs or {})
        return PassResult(self.name, model, details.fused > 0, details)


def fuse_projections(model, lora_inputs: Mapping[str, Sequence[str]] | None = None) -> PassResult[FuseDetails]:
    """:class:`FuseProjections` on ``model``, in place."""
    return FuseProjections(lora_inputs)(model)


def _fuse(model, lora_inputs: Mapping[str, Sequence[str]]) -> FuseDetails:
    em = _Emitter(model)
    graph = em.graph
    branches = _find_branches(graph, lora_inputs)
    by_base = {id(b.base): b for b in branches.values()}
    readers: dict[int, tuple[object, list]] = {}
    for node in graph:
        if (node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and _const_weight(node.inputs[1])
                and not node.outputs[0].is_graph_output()):
            readers.setdefault(id(node.inputs[0]), (node.inputs[0], []))[1].append(node)
    nodes_before, groups = len(graph), []
    for x, nodes in readers.values():
        if len(nodes) < 2:
            continue
        lora_fused = [[branches[m] for m in g] for g in
                      lora_groups(by_base[id(n)].module for n in nodes if id(n) in by_base) if len(g) >= 2]
        taken = {id(b.base) for g in lora_fused for b in g}
        plain = [n for n in nodes if id(n) not in taken]
        if len(plain) >= 2:
            tag = fused_tag(plain, em.count + 1)
            w, sizes = em.weight(plain, tag.strip("/").replace("/", ".") + ".weight")
            if w is not None:
                em.count += 1
                mm = em.node("MatMul", [x, w], tag + "/MatMul")
                split = em.split(mm.outputs[0], sizes, tag + "/Split")
                em.place([mm, split], plain, [(n.outputs[0], o) for n, o in zip(plain, split.outputs)])
        for group in lora_fused:
            modules = [b.module for b in group]
            name = lora_group_name(modules)
            w, sizes = em.weight([b.base for b in group], f"{name}.weight")
            if w is None:
                continue
            dtype = w.const_value.dtype.numpy()
            a_name, b_name = lora_input_names(name)
            d_in, d_total = w.const_value.shape[0], sum(sizes)
            a = em.initializer(a_name, np.zeros((d_in, 0), dtype), graph_input=True, dims=[d_in, rank_dim(name)])
            b = em.initializer(b_name, np.zeros((0, d_total), dtype), graph_input=True,
                               dims=[rank_dim(name), d_total])
            tag = "/" + name
            base = em.node("MatMul", [x, w], tag + "/base/MatMul")
            new = [base]
            if any(br.bias is not None for br in group):
                vectors = [_vector(br.bias.inputs[1 if _const_vector(br.bias.inputs[1]) else 0])
                           if br.bias is not None else np.zeros(s, dtype) for br, s in zip(group, sizes)]
                bias = em.initializer(f"{name}.bias", np.concatenate(vectors).astype(dtype))
                new.append(em.node("Add", [base.outputs[0], bias], tag + "/base/Add"))
            down = em.node("MatMul", [x, a], tag + "/lora/MatMul")
            up = em.node("MatMul", [down.outputs[0], b], tag + "/lora/MatMul_1")
            add = em.node("Add", [new[-1].outputs[0], up.outputs[0]], tag + "/Add")
            split = em.split(add.outputs[0], sizes, tag + "/Split")
            old = [n for br in group for n in (br.base, br.bias, br.down, br.up, br.add) if n is not None]
            em.place([*new, down, up, add, split], old, [(br.add.outputs[0], o) for br, o in zip(group, split.outputs)])
            groups.append(LoraGroup(name, (a_name, b_name), tuple(modules), d_in, tuple(sizes)))
    return FuseDetails(nodes_before, len(graph), em.count + len(groups), tuple(groups))
