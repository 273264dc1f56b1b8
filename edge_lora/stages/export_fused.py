"""The fast decoder graph: a llama-family causal LM written directly with ONNX Runtime's fused contrib ops.

optimum's TorchScript export spells every decoder layer out in ~100 small ops (rotary by Slice/Concat/Mul,
attention by MatMul/Softmax/Where over a 4-D mask, RMSNorm by Pow/ReduceMean/Sqrt/Div, the KV cache by Concat):
about 3,100 kernels per decode step on SmolLM2. This module writes the same model from the torch weights with
the ops ONNX Runtime ships for exactly this (the same graph family onnxruntime-genai's model builder emits):

- ``SkipSimplifiedLayerNormalization``: RMSNorm fused with the residual add (and ``SimplifiedLayerNormalization``
  for the first layer);
- ``GroupQueryAttention`` with ``do_rotary``: rotary embedding from precomputed cos/sin caches, grouped KV heads,
  causal attention and the KV-cache append in one kernel that reads a packed q|k|v input;
- one packed ``MatMul`` for q|k|v and one for gate|up (MatMulNBits after the quantize stage, which treats this
  graph like any other).

About 11 kernels per layer. Why not onnxruntime-genai's builder itself: it targets transformers 5 (it fails on
import and on the rope config with the transformers<4.58 that optimum-onnx needs), it bakes a LoRA adapter in
instead of exposing its factors as inputs, and it carries its own quantization; written here from the torch
model, the graph goes through this project's own passes: LoRA factors as inputs, the mixed-precision int4 recipe,
the one adapter-file format, validation against PyTorch+PEFT.

Graph contract (the same names as optimum's export, so every runner and the validation loop work unchanged):
inputs ``input_ids`` [batch, sequence] int64, ``attention_mask`` [batch, total] int64, ``past_key_values.N.key``
/ ``.value`` [batch, kv_heads, past, head_dim]; outputs ``logits`` and ``present.N.key`` / ``.value``. There is no
``position_ids`` input: GroupQueryAttention counts positions from ``attention_mask`` (sum − 1), which assumes no
left padding, so the ORT loop decodes prompts of one length together (as it does for optimum's Gemma graphs).
The past may also be a preallocated buffer of the maximum length that the present shares
(:mod:`edge_lora.runtimes.kv_loop`): the kernel then writes the new keys in place and nothing is copied per
step. A hot-swap graph's LoRA branches follow :mod:`edge_lora.passes.fuse`'s naming: one branch per packed
group, ``lora.<layer>.self_attn.q_proj+k_proj+v_proj.A`` / ``.B``. They are plain graph inputs, without the
rank-0 defaults of optimum-path graphs: IO binding cannot bind an initializer-backed input, and ORT's Python API
requires every plain input in the feeds, so the runtime feeds the adapter's tensors (rank 0 for the base,
``ort_session.lora_feeds``) and never an ``ort.LoraAdapter`` through RunOptions.

Architectures: llama (SmolLM2), mistral, qwen2 (q/k/v biases). :func:`fused_support` says why another model is
refused; the export stage then falls back to optimum's graph and records which one ran (``graph`` in
edge_lora.json and the stage report).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge_lora.formats.export_meta import LoraGroup
from edge_lora.runtimes.kv_loop import GRAPH_KEY
from edge_lora.passes.fuse import FUSABLE_SIBLINGS, lora_group_name, lora_input_names, rank_dim

ARCHITECTURES = ("llama", "mistral", "qwen2")
MERGE_DIR = "merge_on_swap"               # beside model.onnx: weights.safetensors (fp16 packed projections)
MERGE_WEIGHTS = "weights.safetensors"
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
LORA_LEAVES = (*ATTENTION, "o_proj", *MLP_IN, "down_proj")


def fused_support(model, lora_targets=()) -> str | None:
    """None when :func:`build` can write ``model`` (with LoRA branches on ``lora_targets``); else why not."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"model type {kind!r} (the fused graph covers {', '.join(ARCHITECTURES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the fused graph has SiLU)"
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE:
        return f"rope scaling {rope_type!r} depends on the sequence length (the cos/sin caches are fixed)"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:
        return f"head size {head_dim} (GroupQueryAttention needs a multiple of 16)"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    if kind == "llama" and getattr(config, "attention_bias", False):
        return "attention biases on a llama model"
    if kind in ("mistral", "qwen2") and getattr(config, "sliding_window", None) and \
            getattr(config, "use_sliding_window", kind == "mistral"):
        window = config.sliding_window
        if window < config.max_position_embeddings:
            return f"a sliding attention window of {window} tokens"
    layers = len(model.model.layers)
    for name in lora_targets:
        parts = name.split(".")
        ok = (len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
              and int(parts[2]) < layers and parts[3] in ("self_attn", "mlp") and parts[4] in LORA_LEAVES)
        if not ok:
            return f"a LoRA branch on {name!r} (the fused graph takes branches on {', '.join(LORA_LEAVES)})"
    return None


def _full_groups(targets) -> list[tuple[str, ...]]:
    """LoRA groups of the fused graph: a packed projection takes one branch over all its members, so a target
    among q/k/v (gate/up) brings its siblings (their rank is 0 in an adapter that does not adapt them)."""
    groups = set()
    for name in targets:
        parent, _, leaf = name.rpartition(".")
        siblings = next((s for s in FUSABLE_SIBLINGS if leaf in s), (leaf,))
        groups.add(tuple(f"{parent}.{s}" for s in siblings))
    return sorted(groups)


@dataclass(frozen=True)
class FusedGraph:
    """What :func:`build` made: the onnx_ir model, its LoRA branches, and the kernels a decode step runs."""

    model: object
    lora_groups: tuple[LoraGroup, ...]
    nodes: int


class _Writer:
    """Initializers and nodes of one graph, with names the quantizer's per-module rules can read."""

    def __init__(self, ir):
        self.ir = ir
        self.initializers: list = []
        self.nodes: list = []
        self.inputs: list = []

    def const(self, name: str, array: np.ndarray):
        ir = self.ir
        array = np.ascontiguousarray(array)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.initializers.append(value)
        return value

    def input(self, name: str, dtype, dims, default: np.ndarray | None = None):
        ir = self.ir
        value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))
        if default is not None:
            value.const_value = ir.tensor(default, name=name)
            self.initializers.append(value)
        self.inputs.append(value)
        return value

    def op(self, op: str, inputs, name: str, outputs: int = 1, domain: str = "", **attributes):
        node = self.ir.node(op, inputs, attributes or None, domain=domain, name=name, num_outputs=outputs)
        for i, out in enumerate(node.outputs):
            out.name = f"{name}/output_{i}"
        self.nodes.append(node)
        return node.outputs if outputs > 1 else node.outputs[0]


def _t(weight: torch.Tensor) -> np.ndarray:
    """A Linear's weight (out × in) in MatMul layout (in × out), float32."""
    return weight.detach().to(torch.float32).numpy().T


def _rotary_caches(model, head_dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, head_dim/2] from the model's own rotary module (so every static rope
    scaling, and its attention factor, is the one transformers uses)."""
    rotary = model.model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.int64)[None]
    probe = torch.zeros(1, 1, head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = head_dim // 2
    # HF's rotate_half layout: the two halves of a head pair up, and cos[..., :half] == cos[..., half:]
    return (cos[0, :, :half].to(torch.float32).numpy(), sin[0, :, :half].to(torch.float32).numpy())


def build(model, lora_targets=(), max_positions: int | None = None) -> FusedGraph:
    """The fused decoder graph of ``model`` (a llama-family ``*ForCausalLM``; see :func:`fused_support`), with a
    LoRA branch (factors as graph inputs, rank-0 defaults) for the groups of ``lora_targets``."""
    import onnx_ir as ir

    reason = fused_support(model, lora_targets)
    if reason is not None:
        raise ValueError(f"the fused graph cannot take this model: {reason}")
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    eps = float(config.rms_norm_eps)
    max_positions = max_positions or int(config.max_position_embeddings)
    groups = _full_groups(lora_targets)
    group_of = {m: g for g in groups for m in g}
    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    w = _Writer(ir)
    inner = model.model

    input_ids = w.input("input_ids", i64, ["batch_size", "sequence_length"])
    mask = w.input("attention_mask", i64, ["batch_size", "total_sequence_length"])
    pasts = []
    for i in range(len(inner.layers)):
        dims = ["batch_size", kv_heads, "past_sequence_length", head_dim]
        pasts.append((w.input(f"past_key_values.{i}.key", f32, dims), w.input(f"past_key_values.{i}.value", f32, dims)))

    # GroupQueryAttention's per-row lengths: seqlens_k = tokens seen − 1, and the total length as a scalar
    one = w.const("/const/one", np.array([1], np.int64))
    seen = w.op("ReduceSum", [mask, one], "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens = w.op("Cast", [w.op("Sub", [seen, one], "/model/attn_mask/Sub")], "/model/attn_mask/Cast", to=ir.DataType.INT32)
    total = w.op("Cast", [w.op("Gather", [w.op("Shape", [mask], "/model/attn_mask/Shape"),
                                           w.const("/const/axis1", np.array(1, np.int64))], "/model/attn_mask/Gather")],
                 "/model/attn_mask/Cast_1", to=ir.DataType.INT32)
    cos, sin = _rotary_caches(model, head_dim, max_positions)
    cos_cache, sin_cache = w.const("cos_cache", cos), w.const("sin_cache", sin)

    table = w.const("model.embed_tokens.weight", inner.embed_tokens.weight.detach().to(torch.float32).numpy())
    x = w.op("Gather", [table, input_ids], "/model/embed_tokens/Gather")
    lora_records: list[LoraGroup] = []

    def projection(x, module_names: tuple[str, ...], tag: str):
        mods = [model.get_submodule(m) for m in module_names]
        weight = w.const(f"{tag.strip('/').replace('/', '.')}.weight",
                         np.concatenate([_t(m.weight) for m in mods], axis=1))
        y = w.op("MatMul", [x, weight], f"{tag}/MatMul")
        if any(m.bias is not None for m in mods):
            bias = np.concatenate([m.bias.detach().to(torch.float32).numpy() if m.bias is not None
                                   else np.zeros(m.out_features, np.float32) for m in mods])
            y = w.op("Add", [y, w.const(f"{tag.strip('/').replace('/', '.')}.bias", bias)], f"{tag}/Add")
        group = group_of.get(module_names[0])
        if group is None:
            return y
        if tuple(group) != tuple(module_names):
            raise ValueError(f"LoRA group {group} does not match the packed projection {module_names}")
        name = lora_group_name(group)
        a_name, b_name = lora_input_names(name)
        d_in, d_out = mods[0].in_features, tuple(m.out_features for m in mods)
        a = w.input(a_name, f32, [d_in, rank_dim(name)])
        b = w.input(b_name, f32, [rank_dim(name), sum(d_out)])
        lora_records.append(LoraGroup(name, (a_name, b_name), tuple(group), d_in, d_out))
        down = w.op("MatMul", [x, a], f"/{name}/lora/MatMul")
        up = w.op("MatMul", [down, b], f"/{name}/lora/MatMul_1")
        return w.op("Add", [y, up], f"/{name}/Add")

    residual = None
    presents = []
    for i, layer in enumerate(inner.layers):
        p = f"/model/layers.{i}"
        m = f"model.layers.{i}"
        gamma = w.const(f"{m}.input_layernorm.weight", layer.input_layernorm.weight.detach().float().numpy())
        if residual is None:
            normed = w.op("SimplifiedLayerNormalization", [x, gamma], f"{p}/input_layernorm/LayerNorm",
                          axis=-1, epsilon=eps)
            residual = x
        else:
            normed, _, _, residual = w.op("SkipSimplifiedLayerNormalization", [x, residual, gamma],
                                          f"{p}/input_layernorm/SkipLayerNorm", outputs=4, domain="com.microsoft",
                                          epsilon=eps)
        qkv = projection(normed, tuple(f"{m}.self_attn.{s}" for s in ATTENTION), f"{p}/self_attn/q_proj+k_proj+v_proj")
        attn, key, value = w.op(
            "GroupQueryAttention", [qkv, None, None, pasts[i][0], pasts[i][1], seqlens, total, cos_cache, sin_cache],
            f"{p}/self_attn/GroupQueryAttention", outputs=3, domain="com.microsoft", num_heads=heads,
            kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, scale=float(head_dim) ** -0.5)
        key.name, value.name = f"present.{i}.key", f"present.{i}.value"
        presents += [key, value]
        o = projection(attn, (f"{m}.self_attn.o_proj",), f"{p}/self_attn/o_proj")
        gamma = w.const(f"{m}.post_attention_layernorm.weight",
                        layer.post_attention_layernorm.weight.detach().float().numpy())
        normed, _, _, residual = w.op("SkipSimplifiedLayerNormalization", [o, residual, gamma],
                                      f"{p}/post_attention_layernorm/SkipLayerNorm", outputs=4,
                                      domain="com.microsoft", epsilon=eps)
        gate_up = projection(normed, tuple(f"{m}.mlp.{s}" for s in MLP_IN), f"{p}/mlp/gate_proj+up_proj")
        inter = layer.mlp.gate_proj.out_features
        split = w.const(f"{m}.mlp.split", np.array([inter, inter], np.int64))
        gate, up = w.op("Split", [gate_up, split], f"{p}/mlp/Split", outputs=2, axis=-1)
        act = w.op("Mul", [gate, w.op("Sigmoid", [gate], f"{p}/mlp/act/Sigmoid")], f"{p}/mlp/act/Mul")
        x = projection(w.op("Mul", [act, up], f"{p}/mlp/Mul"), (f"{m}.mlp.down_proj",), f"{p}/mlp/down_proj")

    gamma = w.const("model.norm.weight", inner.norm.weight.detach().float().numpy())
    final, _, _, _ = w.op("SkipSimplifiedLayerNormalization", [x, residual, gamma], "/model/norm/SkipLayerNorm",
                          outputs=4, domain="com.microsoft", epsilon=eps)
    head = model.lm_head.weight
    if head.data_ptr() == inner.embed_tokens.weight.data_ptr():
        # tied: the head reads the table through a Transpose, which the quantize stage unties (passes.untie_head)
        head_w = w.op("Transpose", [table], "/lm_head/Transpose", perm=[1, 0])
    else:
        head_w = w.const("lm_head.weight", _t(head))
    logits = w.op("MatMul", [final, head_w], "/lm_head/MatMul")
    logits.name = "logits"

    graph = ir.Graph(w.inputs, [logits, *presents], nodes=w.nodes, initializers=w.initializers,
                     opset_imports={"": 17, "com.microsoft": 1}, name="edge_lora_fused")
    vocab = int(model.lm_head.weight.shape[0])
    logits.shape = ir.Shape(["batch_size", "sequence_length", vocab])
    for value in presents:
        value.shape = ir.Shape(["batch_size", kv_heads, "total_sequence_length", head_dim])
    for value in graph.outputs:
        value.type = ir.TensorType(f32)
    model_ir = ir.Model(graph, ir_version=8, producer_name="edge_lora")
    model_ir.metadata_props[GRAPH_KEY] = "fused"   # runners read it: past and present may share buffers
    return FusedGraph(model_ir, tuple(sorted(lora_records, key=lambda g: g.name)), len(w.nodes))


def packed_weights(model, groups) -> dict[str, np.ndarray]:
    """fp16 MatMul-layout weights of each LoRA group's packed projection, named ``<group>.weight`` as in the
    graph (the merge-on-swap runtime adds ``A_cat·B_bd`` to them and quantizes them like the export did)."""
    out = {}
    for g in groups:
        mods = [model.get_submodule(m) for m in g.modules]
        out[f"{g.name}.weight"] = np.ascontiguousarray(np.concatenate([_t(m.weight) for m in mods], axis=1),
                                                       dtype=np.float16)
    return out


def write_merge_files(model, groups, out_dir) -> None:
    """``out_dir/merge_on_swap/weights.safetensors``: the fp16 packed weights of every LoRA group (see
    packed_weights). The branch-free graph is not shipped: the runtime derives it from model.onnx
    (edge_lora.passes.drop_lora), so the device holds the base once."""
    from safetensors.numpy import save_file

    folder = out_dir / MERGE_DIR
    folder.mkdir()
    save_file(packed_weights(model, groups), str(folder / MERGE_WEIGHTS))
