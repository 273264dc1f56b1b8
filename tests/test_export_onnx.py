"""ONNX exports on tiny models: merged == PyTorch + PEFT; hot-swap without an adapter == the base export, with
adapter X == the merged export of X, and X → Y → X on one session gives each adapter's outputs."""

from __future__ import annotations

import dataclasses

import gc

import numpy as np
import pytest
import torch
from conftest import ADAPTER_TABLE, make_peft_adapter

from edge_lora.adapter import load_peft
from edge_lora.errors import AdapterError, CompatibilityError
from edge_lora.base import tiny_model
from edge_lora.config import ExportConfig
from edge_lora.runtimes.hotswap import HotswapSession
from edge_lora.runtimes.ort_session import full_feeds, load_session
from edge_lora.stages.export_onnx import (
    ADAPTER_FILE,
    export_hotswap,
    export_merged,
    hotswap_layout,
    lora_group_name,
    lora_input_arrays_for,
    lora_input_names,
    read_meta,
    write_ort_adapter,
)
from edge_lora.stages.merge import merge

IDS = np.random.default_rng(0).integers(0, 128, size=(2, 9))


def torch_out(model) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(IDS))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def ort_out(session, run_options=None) -> np.ndarray:
    return session.run(None, full_feeds(session, IDS), run_options)[0]


def export_into(tmp_path, name, fn, *args, **kwargs):
    folder = tmp_path / name
    folder.mkdir()
    fn(*args, folder, **kwargs)
    return folder


@pytest.mark.parametrize("case", ["llama-all7", "gpt2-fan-in-fan-out", "bert-query-value", "llama-embedding",
                                  "llama-lora-bias"])
def test_merged_onnx_matches_peft(tmp_path, case):
    kind, kwargs = ADAPTER_TABLE[case]
    peft_model = make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    merged, _ = merge(tiny_model(kind), load_peft(tmp_path / "adapter"))
    folder = export_into(tmp_path, "onnx", export_merged, merged, None)
    meta = read_meta(folder)
    assert meta.mode == "merged" and "input_ids" in meta.inputs
    assert meta.task == ("feature-extraction" if kind == "bert" else "text-generation-with-past")
    np.testing.assert_allclose(ort_out(load_session(folder)), torch_out(peft_model), rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module", params=["llama", "bert"])
def hotswap_setup(request, tmp_path_factory):
    """Base export, hot-swap export (written with adapter X), merged exports of X and Y, Y's adapter file."""
    tmp = tmp_path_factory.mktemp(request.param)
    kind, kwargs = ADAPTER_TABLE["llama-all7" if request.param == "llama" else "bert-query-value"]
    peft_x = make_peft_adapter(kind, kwargs, tmp / "x", seed=0)
    make_peft_adapter(kind, kwargs, tmp / "y", seed=5)
    x, y = load_peft(tmp / "x"), load_peft(tmp / "y")
    folders = {
        "base": export_into(tmp, "base", export_merged, tiny_model(kind), None),
        "hotswap": export_into(tmp, "hotswap", export_hotswap, tiny_model(kind), None, x,
                               config=ExportConfig(mode="hotswap")),
        "merged_x": export_into(tmp, "merged_x", export_merged, merge(tiny_model(kind), x)[0], None),
        "merged_y": export_into(tmp, "merged_y", export_merged, merge(tiny_model(kind), y)[0], None),
    }
    lora_modules = set(read_meta(folders["hotswap"]).lora_inputs)
    write_ort_adapter(y, tmp / "y.onnx_adapter", lora_modules)
    outs = {k: ort_out(load_session(v)) for k, v in folders.items() if k != "hotswap"}
    return folders, outs, tmp / "y.onnx_adapter", torch_out(peft_x)


def test_hotswap_without_adapter_is_the_base(hotswap_setup):
    folders, outs, _, _ = hotswap_setup
    session = HotswapSession(folders["hotswap"])
    np.testing.assert_allclose(ort_out(session.session), outs["base"], rtol=0, atol=1e-6)


def test_hotswap_adapter_matches_merged_and_peft(hotswap_setup):
    folders, outs, _, peft_x = hotswap_setup
    session = HotswapSession(folders["hotswap"])
    session.load_adapter("x", folders["hotswap"] / ADAPTER_FILE)
    out = ort_out(session.session, session.run_options("x"))
    np.testing.assert_allclose(out, outs["merged_x"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(out, peft_x, rtol=1e-4, atol=2e-5)


def test_swap_x_y_x_on_one_session(hotswap_setup):
    folders, outs, y_file, _ = hotswap_setup
    session = HotswapSession(folders["hotswap"])
    session.load_adapter("x", folders["hotswap"] / ADAPTER_FILE)
    session.load_adapter("y", y_file)
    seen = {}
    for name in ["x", "y", "x", None, "y"]:
        gc.collect()   # the session must keep each LoraAdapter alive itself
        out = ort_out(session.session, session.run_options(name))
        expected = outs["base"] if name is None else outs[f"merged_{name}"]
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=2e-5, err_msg=f"adapter {name}")
        if name in seen:
            np.testing.assert_array_equal(out, seen[name])   # swapping back gives bit-identical outputs
        seen[name] = out
    assert not np.allclose(seen["x"], seen["y"])


def test_graph_and_adapter_file_use_the_same_names(hotswap_setup):
    import onnxruntime as ort

    folders, _, _, _ = hotswap_setup
    meta = read_meta(folders["hotswap"])
    params = set(ort.AdapterFormat.read_adapter(str(folders["hotswap"] / ADAPTER_FILE)).get_parameters())
    graph_inputs = {n for names in meta.lora_inputs.values() for n in names}
    assert params == graph_inputs == {n for g in meta.lora_groups for n in g.inputs}
    assert set(HotswapSession(folders["hotswap"]).lora_inputs) == graph_inputs
    for g in meta.lora_groups:
        assert g.name == lora_group_name(g.modules) and g.inputs == tuple(lora_input_names(g.name))
        assert all(meta.lora_inputs[m] == g.inputs for m in g.modules)
    # q/k/v and gate/up are one branch each (llama); BERT's biased query and value are one branch too
    sizes = sorted({len(g.modules) for g in meta.lora_groups})
    assert sizes == ([1, 2, 3] if "q_proj" in str(meta.lora_groups) else [1, 2])


def test_empty_adapter_is_refused_at_load(hotswap_setup, tmp_path):
    folders, _, _, _ = hotswap_setup
    adapter = load_peft(hotswap_setup[2].parent / "x")
    adapter = adapter.replace_modules({n: dataclasses.replace(m, B=torch.zeros_like(m.B))
                                       for n, m in adapter.modules.items()})
    write_ort_adapter(adapter, tmp_path / "zero.onnx_adapter", set(read_meta(folders["hotswap"]).lora_inputs))
    with pytest.raises(AdapterError, match="equals the base"):
        HotswapSession(folders["hotswap"]).load_adapter("zero", tmp_path / "zero.onnx_adapter")


def test_adapter_for_modules_without_a_branch_is_refused(tmp_path):
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "x")
    make_peft_adapter(kind, dict(kwargs, target_modules=["q_proj", "lm_head"]), tmp_path / "other")
    folder = export_into(tmp_path, "hs", export_hotswap, tiny_model(kind), None, load_peft(tmp_path / "x"),
                         config=ExportConfig(mode="hotswap"))
    write_ort_adapter(load_peft(tmp_path / "other"), tmp_path / "other.onnx_adapter")
    with pytest.raises(AdapterError, match="lm_head"):
        HotswapSession(folder).load_adapter("other", tmp_path / "other.onnx_adapter")


def test_hotswap_refuses_lora_bias(tmp_path):
    kind, kwargs = ADAPTER_TABLE["llama-lora-bias"]
    make_peft_adapter(kind, kwargs, tmp_path / "x")
    (tmp_path / "hs").mkdir()
    with pytest.raises(CompatibilityError, match="lora_bias"):
        export_hotswap(tiny_model(kind), None, load_peft(tmp_path / "x"), tmp_path / "hs",
                       ExportConfig(mode="hotswap"))


def test_hotswap_with_external_data(tmp_path):
    """Models over 2 GB are saved with external data; force it on a tiny model to cover the graph pass."""
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    peft_model = make_peft_adapter(kind, kwargs, tmp_path / "x")
    folder = export_into(tmp_path, "hs", export_hotswap, tiny_model(kind), None, load_peft(tmp_path / "x"),
                         config=ExportConfig(mode="hotswap", external_data="always"))
    assert read_meta(folder).external_data and (folder / "model.onnx_data").is_file()
    session = HotswapSession(folder)
    session.load_adapter("x", folder / ADAPTER_FILE)
    np.testing.assert_allclose(ort_out(session.session, session.run_options("x")), torch_out(peft_model),
                               rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("case", ["llama-patterns-rslora", "gpt2-fan-in-fan-out", "llama-embedding"])
def test_hotswap_matches_peft_across_layouts(tmp_path, case):
    """Per-module ranks and scales (one graph, inputs of different ranks), Conv1D, and an embedding lookup."""
    kind, kwargs = ADAPTER_TABLE[case]
    peft_model = make_peft_adapter(kind, kwargs, tmp_path / "x")
    folder = export_into(tmp_path, "hs", export_hotswap, tiny_model(kind), None, load_peft(tmp_path / "x"),
                         config=ExportConfig(mode="hotswap"))
    session = HotswapSession(folder)
    session.load_adapter("x", folder / ADAPTER_FILE)
    np.testing.assert_allclose(ort_out(session.session, session.run_options("x")), torch_out(peft_model),
                               rtol=1e-4, atol=2e-5)


def _ops(folder) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("mode", ["merged", "hotswap"])
def test_fused_projections_change_kernels_not_outputs(tmp_path, mode):
    """fuse_projections on vs off: fewer MatMuls, same outputs (with and without the adapter)."""
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "x")
    x = load_peft(tmp_path / "x")
    outs, ops = {}, {}
    for fuse in (True, False):
        config = ExportConfig(mode=mode, fuse_projections=fuse)
        if mode == "merged":
            folder = export_into(tmp_path, f"f{fuse}", export_merged, merge(tiny_model(kind), x)[0], None,
                                 config=config)
            outs[fuse] = [ort_out(load_session(folder))]
        else:
            folder = export_into(tmp_path, f"f{fuse}", export_hotswap, tiny_model(kind), None, x, config=config)
            session = HotswapSession(folder)
            session.load_adapter("x", folder / ADAPTER_FILE)
            outs[fuse] = [ort_out(session.session), ort_out(session.session, session.run_options("x"))]
        ops[fuse] = _ops(folder)
        assert (read_meta(folder).fused_projections is not None) == fuse
    for fused, plain in zip(outs[True], outs[False]):
        np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)
    layers = 2
    # per layer: the 5 base MatMuls of q,k,v and gate,up become 2; hot-swap: their 5 LoRA branches
    # (MatMul, MatMul, Add each) become 2 as well
    if mode == "merged":
        assert ops[False]["MatMul"] - ops[True]["MatMul"] == 3 * layers
    else:
        assert ops[False]["MatMul"] - ops[True]["MatMul"] == (3 + 2 * 3) * layers
        assert ops[False]["Add"] - ops[True]["Add"] == 3 * layers
    assert ops[True]["Split"] - ops[False].get("Split", 0) == 2 * layers


def test_adapter_on_part_of_a_fused_group(tmp_path):
    """Export for q,k,v,…; an adapter for q and v only (mixed ranks) gets zero blocks for k: == PEFT."""
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "x")
    peft_y = make_peft_adapter(kind, {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj"],
                                      "rank_pattern": {"v_proj": 5}}, tmp_path / "y")
    folder = export_into(tmp_path, "hs", export_hotswap, tiny_model(kind), None, load_peft(tmp_path / "x"),
                         config=ExportConfig(mode="hotswap"))
    meta = read_meta(folder)
    y = load_peft(tmp_path / "y")
    with pytest.raises(CompatibilityError, match="edge_lora.json"):   # module names alone cannot size k's block
        write_ort_adapter(y, tmp_path / "y.onnx_adapter", set(meta.lora_inputs))
    write_ort_adapter(y, tmp_path / "y.onnx_adapter", meta)
    arrays = lora_input_arrays_for(y, meta)
    qkv = next(g for g in meta.lora_groups if g.modules[0].endswith("layers.0.self_attn.q_proj"))
    a, b = arrays[qkv.inputs[0]], arrays[qkv.inputs[1]]
    assert a.shape == (qkv.d_in, 3 + 5) and b.shape == (8, sum(qkv.d_out))
    q, k, v = np.split(b, np.cumsum(qkv.d_out)[:-1], axis=1)
    assert not k.any() and not q[3:].any() and not v[:3].any() and q[:3].any() and v[3:].any()   # block-diagonal
    assert not any(n.startswith("lora.model.layers.0.mlp") for n in arrays)   # untouched groups: graph defaults
    session = HotswapSession(folder)
    session.load_adapter("y", tmp_path / "y.onnx_adapter")
    np.testing.assert_allclose(ort_out(session.session, session.run_options("y")), torch_out(peft_y),
                               rtol=1e-4, atol=2e-5)


def test_layout_from_module_names_matches_the_export(tmp_path):
    """The OTA packager writes adapter files from the export's module names; that layout equals the export's."""
    kind, kwargs = ADAPTER_TABLE["bert-query-value"]
    make_peft_adapter(kind, kwargs, tmp_path / "x")
    x = load_peft(tmp_path / "x")
    folder = export_into(tmp_path, "hs", export_hotswap, tiny_model(kind), None, x,
                         config=ExportConfig(mode="hotswap"))
    meta = read_meta(folder)
    assert hotswap_layout(x, set(meta.lora_inputs)) == hotswap_layout(x, meta)


@pytest.mark.parametrize("structure", ["shared-out", "tucker2"])
def test_compressed_shared_factors_are_single_inputs(tmp_path, structure):
    """A compressed adapter with cross-layer shared U (and Vt): one graph input and one adapter-file tensor per
    shared factor, used by every layer's branch; outputs == the PEFT expansion of the compressed adapter."""
    import onnxruntime as ort

    from edge_lora.adapter.compressed import CompressedAdapter
    from edge_lora.stages.compress import CompressConfig, compress

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "x")
    compressed, _ = compress(load_peft(tmp_path / "x"), CompressConfig(budget=0.6, structure=structure))
    compressed.save(tmp_path / "c")
    compressed = CompressedAdapter.load(tmp_path / "c")
    shared = [g for g in compressed.groups if g.structure == structure]
    assert shared, [g.structure for g in compressed.groups]
    expected = torch_out(merge(tiny_model(kind), compressed.to_adapter())[0])
    folder = export_into(tmp_path, "hs", export_hotswap, tiny_model(kind), None, compressed,
                         config=ExportConfig(mode="hotswap"))
    meta = read_meta(folder)
    session = HotswapSession(folder)
    session.load_adapter("c", folder / ADAPTER_FILE)
    np.testing.assert_allclose(ort_out(session.session, session.run_options("c")), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ort_out(session.session), ort_out(load_session(
        export_into(tmp_path, "base", export_merged, tiny_model(kind), None))), rtol=0, atol=1e-6)
    params = ort.AdapterFormat.read_adapter(str(folder / ADAPTER_FILE)).get_parameters()
    chains = [c for c in meta.lora_chains if c.structure == structure]
    for g in shared:
        users = [c for c in chains if c.group == g.name]
        assert len(users) == len(g.modules) >= 2
        u_names = {c.inputs[2] for c in users}
        assert len(u_names) == 1 and u_names <= set(params)                      # U: one input, stored once
        assert params[u_names.pop()].numpy().shape == tuple(g.shared["U"].T.shape)
        v_names = {c.inputs[0] for c in users}
        assert len(v_names) == (1 if structure == "tucker2" else len(users))      # Vt shared for tucker2 only
    assert len(params) == len({n for c in meta.lora_chains for n in c.inputs} & set(params)) + sum(
        2 for g in meta.lora_groups if g.inputs[0] in params)


def test_per_module_adapter_file_on_a_packed_export_is_refused(tmp_path):
    """An adapter file in the unfused layout (one A/B per module) cannot drive a packed export: clear error."""
    import onnxruntime as ort

    from edge_lora.stages.export_onnx import lora_input_arrays

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "x")
    x = load_peft(tmp_path / "x")
    folder = export_into(tmp_path, "hs", export_hotswap, tiny_model(kind), None, x, config=ExportConfig(mode="hotswap"))
    arrays = {}
    for name, module in x.modules.items():
        arrays[lora_input_names(name)[0]], arrays[lora_input_names(name)[1]] = lora_input_arrays(module)
    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(tmp_path / "old.onnx_adapter"))
    with pytest.raises(AdapterError, match="one LoRA branch"):
        HotswapSession(folder).load_adapter("old", tmp_path / "old.onnx_adapter")


@pytest.mark.parametrize("opset", [11, 18])
def test_fuse_pass_on_a_handmade_graph(tmp_path, opset):
    """The pass alone, on both Split forms (attribute before opset 13, input after): 3 MatMuls reading x with
    constant weights (one biased) → 1 MatMul + Split; a MatMul reading another value is left alone."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge_lora.passes.fuse import fuse_projections

    rng = np.random.default_rng(0)
    w = {f"w{i}": rng.standard_normal((8, d)).astype(np.float32) for i, d in enumerate((4, 6, 2))}
    w["w3"] = rng.standard_normal((4, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]) for i in range(3)]
    nodes += [helper.make_node("Add", ["m1", "b1"], ["a1"]), helper.make_node("MatMul", ["m0", "w3"], ["m3"])]
    nodes += [helper.make_node("Relu", [v], [f"y{i}"]) for i, v in enumerate(["m0", "a1", "m2", "m3"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(4)],
        [numpy_helper.from_array(v, k) for k, v in w.items()] + [numpy_helper.from_array(bias, "b1")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.save(proto, tmp_path / "plain.onnx")
    model = ir.load(tmp_path / "plain.onnx")
    result = fuse_projections(model)
    ir.save(model, tmp_path / "fused.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node]
    assert result.details.fused == 1 and ops.count("MatMul") == 2 and ops.count("Split") == 1
    assert result.name == "fuse_projections" and result.modified and result.model is model
    assert result.details.groups == () and result.details.nodes_after < result.details.nodes_before
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    outs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"x": x})
            for f in ("plain.onnx", "fused.onnx")]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
