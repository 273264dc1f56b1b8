"""Quantized hot-swap adapters, in real ONNX Runtime sessions: the graph computes exactly the dequantized factors,
stays the plain base with no adapter, is close to the float adapter, and the adapter file is smaller."""

from __future__ import annotations

import gc
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ADAPTER_TABLE, make_peft_adapter
from onnx import TensorProto, helper

from edge_lora.adapter import load_peft
from edge_lora.errors import AdapterError
from edge_lora.base import tiny_model
from edge_lora.config import ExportConfig
from edge_lora.runtimes.hotswap import HotswapSession
from edge_lora.runtimes.ort_session import full_feeds
from edge_lora.stages.canonicalize import canonicalize
from edge_lora.stages.export_onnx import ADAPTER_FILE, export_hotswap, read_meta
from edge_lora.stages.hotswap_quant import (
    HotswapQuantConfig,
    HotswapQuantError,
    adapter_float_arrays,
    dequantize_lora_arrays,
    is_quantized_adapter,
    quantize_hotswap_folder,
    quantize_hotswap_graph,
    quantize_lora_arrays,
    quantized_input_names,
    recover_group_size,
    write_quantized_arrays,
    write_quantized_ort_adapter,
)

IDS = np.random.default_rng(0).integers(0, 128, size=(2, 9))
G = 16


def run(session: HotswapSession, adapter: str | None = None) -> np.ndarray:
    return session.session.run(None, full_feeds(session.session, IDS), session.run_options(adapter))[0]


def write_float_arrays(arrays: dict, path) -> None:
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, np.float32))
                        for k, v in arrays.items()})
    fmt.export_adapter(str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A float hot-swap export of tiny llama (all 7 module types: fused q/k/v and gate/up branches) with adapter
    X, and int8 / int4 copies of it with X and Y written as quantized adapter files."""
    tmp = tmp_path_factory.mktemp("hq")
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp / "x", seed=0)
    make_peft_adapter(kind, kwargs, tmp / "y", seed=5)
    x, y = load_peft(tmp / "x"), load_peft(tmp / "y")
    # conftest's factors (std 0.3) swamp the tiny model's weights: far from any trained adapter, a regime where
    # the output amplifies a 0.5% factor error chaotically. A tenth of that still changes the logits by ~0.7.
    for adapter in (x, y):
        for m in adapter.modules.values():
            m.B = m.B * 0.1
    (tmp / "float").mkdir()
    export_hotswap(tiny_model(kind), None, x, tmp / "float", config=ExportConfig(mode="hotswap"))
    meta = read_meta(tmp / "float")
    write_float_arrays(adapter_float_arrays(y, meta), tmp / "y.float")
    out = {"tmp": tmp, "x": x, "y": y, "float": tmp / "float", "reports": {}}
    for bits in (8, 4):
        cfg = HotswapQuantConfig(bits=bits, group_size=G)
        folder = tmp / f"int{bits}"
        replaced = quantize_hotswap_folder(tmp / "float", folder, cfg)
        assert sorted(replaced) == sorted(n for n in adapter_float_arrays(x, meta))
        for name, adapter in (("x", x), ("y", y)):
            out["reports"][bits, name] = write_quantized_ort_adapter(adapter, folder / f"{name}.q", cfg,
                                                                     read_meta(folder))
        out[bits] = folder
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_no_adapter_is_still_the_plain_base(setup, bits):
    float_session, q_session = HotswapSession(setup["float"]), HotswapSession(setup[bits])
    np.testing.assert_array_equal(run(q_session), run(float_session))


@pytest.mark.parametrize("bits", [8, 4])
def test_graph_computes_exactly_the_dequantized_factors(setup, bits, tmp_path):
    """Quantized graph + quantized file == float graph + the numpy dequantization of the same codes and scales."""
    cfg = HotswapQuantConfig(bits=bits, group_size=G)
    x, _ = canonicalize(setup["x"])   # the writer quantizes the balanced gauge
    arrays = adapter_float_arrays(x, read_meta(setup["float"]))
    quantized = quantize_lora_arrays(arrays, cfg)
    write_float_arrays(dequantize_lora_arrays(quantized, {k: v.shape for k, v in arrays.items()}, cfg),
                       tmp_path / "deq.float")
    float_session, q_session = HotswapSession(setup["float"]), HotswapSession(setup[bits])
    float_session.load_adapter("deq", tmp_path / "deq.float")
    q_session.load_adapter("x", setup[bits] / "x.q")
    np.testing.assert_allclose(run(q_session, "x"), run(float_session, "deq"), rtol=1e-5, atol=1e-5)


def test_close_to_the_float_adapter_within_quantization_error(setup):
    float_session = HotswapSession(setup["float"])
    float_session.load_adapter("x", setup["float"] / ADAPTER_FILE)
    base, ref = run(float_session), run(float_session, "x")
    rel = {}
    for bits in (8, 4):
        q_session = HotswapSession(setup[bits])
        q_session.load_adapter("x", setup[bits] / "x.q")
        rel[bits] = float(np.linalg.norm(run(q_session, "x") - ref) / np.linalg.norm(ref - base))
        # the factors' own error, measured by the writer, bounds what the output can be expected to keep
        assert setup["reports"][bits, "x"].metrics["factor_rel_error_max"] < (0.01 if bits == 8 else 0.15)
    assert rel[8] < 0.03, rel
    assert rel[8] < rel[4] < 0.5, rel


def test_swap_x_y_none_on_one_quantized_session(setup):
    q_session = HotswapSession(setup[8])
    q_session.load_adapter("x", setup[8] / "x.q")
    q_session.load_adapter("y", setup[8] / "y.q")
    float_session = HotswapSession(setup["float"])
    float_session.load_adapter("x", setup["float"] / ADAPTER_FILE)
    float_session.load_adapter("y", setup["tmp"] / "y.float")
    seen = {}
    for name in ["x", "y", None, "x"]:
        gc.collect()   # the session must keep each LoraAdapter alive itself
        out = run(q_session, name)
        ref = run(float_session, name)
        if name is None:
            np.testing.assert_array_equal(out, ref)
        else:
            assert np.linalg.norm(out - ref) < 0.05 * np.linalg.norm(ref - run(float_session))
        if name in seen:
            np.testing.assert_array_equal(out, seen[name])
        seen[name] = out


def test_files_are_smaller_and_sizes_are_reported(setup):
    float_bytes = (setup["float"] / ADAPTER_FILE).stat().st_size
    r8, r4 = setup["reports"][8, "x"].metrics, setup["reports"][4, "x"].metrics
    for r, bits in ((r8, 8), (r4, 4)):
        assert r["file_bytes"] == (setup[bits] / "x.q").stat().st_size
        # codes plus one fp32 scale per group of G (the tiny model's d are all even multiples of G)
        assert r["bits_per_value"] == pytest.approx(bits + 32 / G)
    assert r8["file_bytes"] < 0.45 * float_bytes
    assert r4["file_bytes"] < 0.8 * r8["file_bytes"]


@pytest.mark.parametrize("bits", [8, 4])
def test_adapter_parameters_are_exactly_the_graph_inputs(setup, bits):
    params = set(ort.AdapterFormat.read_adapter(str(setup[bits] / "x.q")).get_parameters())
    assert params == set(HotswapSession(setup[bits]).lora_inputs)
    meta = read_meta(setup[bits])
    assert meta["lora_quant"]["bits"] == bits
    assert {n for pair in meta["lora_quant"]["inputs"].values() for n in pair} == params


def test_float_adapter_on_quantized_graph_is_refused(setup):
    with pytest.raises(AdapterError, match="not LoRA inputs"):
        HotswapSession(setup[8]).load_adapter("float", setup["float"] / ADAPTER_FILE)


# ---------------------------------------------------------------------------------------------- the seam
def lora_toy_model(path, d_in: int, d_out: int) -> None:
    """y = x + (x·A)·B with A, B graph inputs of rank-0 defaults, the way a hot-swap export has them (opset 18)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, d_in])
    a = helper.make_tensor_value_info("lora.toy.A", TensorProto.FLOAT, [d_in, "rank"])
    b = helper.make_tensor_value_info("lora.toy.B", TensorProto.FLOAT, ["rank", d_out])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, d_out])
    nodes = [helper.make_node("MatMul", ["x", "lora.toy.A"], ["xa"]), helper.make_node("MatMul", ["xa", "lora.toy.B"], ["y"])]
    inits = [helper.make_tensor("lora.toy.A", TensorProto.FLOAT, [d_in, 0], []),
             helper.make_tensor("lora.toy.B", TensorProto.FLOAT, [0, d_out], [])]
    model = helper.make_model(helper.make_graph(nodes, "toy", [x, a, b], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("bits", [8, 4])
def test_odd_sizes_and_short_last_groups_in_a_real_session(tmp_path, bits):
    """d_in = 35 and d_out = 21: odd (an int4 padding nibble to slice off) and not multiples of the group size (the
    last group keeps its own scale)."""
    d_in, d_out, r = 35, 21, 3
    cfg = HotswapQuantConfig(bits=bits, group_size=8)
    lora_toy_model(tmp_path / "toy.onnx", d_in, d_out)
    assert quantize_hotswap_graph(tmp_path / "toy.onnx", cfg) == ["lora.toy.A", "lora.toy.B"]
    rng = np.random.default_rng(bits)
    arrays = {"lora.toy.A": rng.standard_normal((d_in, r)).astype(np.float32),
              "lora.toy.B": rng.standard_normal((r, d_out)).astype(np.float32)}
    quantized = quantize_lora_arrays(arrays, cfg)
    assert quantized["lora.toy.A.scales"].shape == (5, r) and quantized["lora.toy.B.scales"].shape == (r, 3)
    back = dequantize_lora_arrays(quantized, {k: v.shape for k, v in arrays.items()}, cfg)
    session = ort.InferenceSession(str(tmp_path / "toy.onnx"), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, d_in)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.zeros((2, d_out), np.float32))
    out = session.run(None, {"x": x, **quantized})[0]
    np.testing.assert_allclose(out, x @ back["lora.toy.A"] @ back["lora.toy.B"], rtol=1e-5, atol=1e-5)
    # every value within half a step of its block's scale
    for name, axis in (("lora.toy.A", 0), ("lora.toy.B", 1)):
        step = np.take(np.repeat(quantized[f"{name}.scales"], 8, axis=axis), range(arrays[name].shape[axis]), axis=axis)
        assert (np.abs(back[name] - arrays[name]) <= 0.5 * step + 1e-7).all()


def test_seam_is_layout_agnostic():
    """Fused groups and shared chains are just named arrays: A/Vt group along rows, B/U along columns, a core G
    stays float."""
    rng = np.random.default_rng(0)
    arrays = {"lora.g.A": rng.standard_normal((64, 6)), "lora.g.B": rng.standard_normal((6, 96)),
              "lora.grp.Vt": rng.standard_normal((64, 4)), "lora.grp.U": rng.standard_normal((5, 32)),
              "lora.m.G": rng.standard_normal((4, 5))}
    q = quantize_lora_arrays(arrays, HotswapQuantConfig(bits=8, group_size=32))
    assert q["lora.g.A.scales"].shape == (2, 6) and q["lora.g.B.scales"].shape == (6, 3)
    assert q["lora.grp.Vt.scales"].shape == (2, 4) and q["lora.grp.U.scales"].shape == (5, 1)
    assert q["lora.m.G"].dtype == np.float32 and quantized_input_names("lora.m.G")[0] not in q
    assert q["lora.g.A.codes"].dtype == np.int8 and np.abs(q["lora.g.A.codes"]).max() == 127


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cfg,match", [(HotswapQuantConfig(bits=5), "bits in"),
                                       (HotswapQuantConfig(bits=2), "bits in"),
                                       (HotswapQuantConfig(group_size=4), "group_size=4"),
                                       (HotswapQuantConfig(group_size=True), "group_size=True")])
def test_bad_config(cfg, match):
    with pytest.raises(HotswapQuantError, match=match):
        quantize_lora_arrays({"lora.g.A": np.ones((16, 2))}, cfg)


def test_graph_without_float_lora_inputs(tmp_path):
    lora_toy_model(tmp_path / "toy.onnx", 16, 16)
    quantize_hotswap_graph(tmp_path / "toy.onnx")
    with pytest.raises(HotswapQuantError, match="already quantized"):
        quantize_hotswap_graph(tmp_path / "toy.onnx")


def test_folder_target_must_be_empty(setup):
    with pytest.raises(HotswapQuantError, match="not empty"):
        quantize_hotswap_folder(setup["float"], setup[8])


# ---------------------------------------------------------------------------------------------- load-time expansion
@pytest.fixture()
def private_tmp(tmp_path, monkeypatch):
    """Where tempfile puts the expansion's private folders during the test (to check they are gone)."""
    folder = tmp_path / "tempdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def float_file_of_dequantized(adapter, folder, cfg, path) -> None:
    """The float adapter file a float graph gets fed: the numpy dequantization of the writer's own codes."""
    canonical, _ = canonicalize(adapter)   # the writer quantizes the balanced gauge
    arrays = adapter_float_arrays(canonical, read_meta(folder))
    quantized = quantize_lora_arrays(arrays, cfg)
    write_float_arrays(dequantize_lora_arrays(quantized, {k: v.shape for k, v in arrays.items()}, cfg), path)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_file_on_float_graph_is_expanded_at_load(setup, bits, tmp_path, private_tmp):
    """Float graph + quantized file == float graph + the float file of the numpy-dequantized factors; the private
    temporary file is gone after load, and the adapter still runs (ORT memory-maps it; the mapping outlives the
    unlink)."""
    cfg = HotswapQuantConfig(bits=bits, group_size=G)
    write_quantized_ort_adapter(setup["x"], tmp_path / "x.q", cfg, read_meta(setup["float"]))
    assert is_quantized_adapter(tmp_path / "x.q") and not is_quantized_adapter(setup["float"] / ADAPTER_FILE)
    float_file_of_dequantized(setup["x"], setup["float"], cfg, tmp_path / "deq.float")
    session = HotswapSession(setup["float"])
    session.load_adapter("q", tmp_path / "x.q")
    session.load_adapter("deq", tmp_path / "deq.float")
    assert list(private_tmp.iterdir()) == []
    gc.collect()
    np.testing.assert_allclose(run(session, "q"), run(session, "deq"), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(run(session, "q"), run(session))


def test_swap_quantized_float_quantized_on_a_float_graph(setup, tmp_path, private_tmp):
    cfg = HotswapQuantConfig(bits=4, group_size=G)
    write_quantized_ort_adapter(setup["x"], tmp_path / "x.q", cfg, read_meta(setup["float"]))
    session = HotswapSession(setup["float"])
    session.load_adapter("x", tmp_path / "x.q")
    session.load_adapter("y", setup["tmp"] / "y.float")
    reference = HotswapSession(setup["float"])
    reference.load_adapter("y", setup["tmp"] / "y.float")
    seen = {}
    for name in ["x", "y", None, "x"]:
        gc.collect()
        out = run(session, name)
        if name == "y":
            np.testing.assert_array_equal(out, run(reference, "y"))
        if name is None:
            np.testing.assert_array_equal(out, run(reference))
        if name in seen:
            np.testing.assert_array_equal(out, seen[name])
        seen[name] = out
    assert not np.allclose(seen["x"], seen["y"])
    session.unload_adapter("x")
    gc.collect()
    np.testing.assert_array_equal(run(session, "y"), run(reference, "y"))
    assert list(private_tmp.iterdir()) == []


def test_group_size_is_recovered_from_the_file(setup, tmp_path):
    """The adapter format has no metadata field: the group size must come back from the scales' shapes."""
    meta = read_meta(setup["float"])
    for g in (16, 32, 64):
        cfg = HotswapQuantConfig(bits=8, group_size=g)
        arrays = adapter_float_arrays(setup["x"], meta)
        q = quantize_lora_arrays(arrays, cfg)
        d = {k: v.shape[0 if k.endswith(".A") else 1] for k, v in arrays.items()}
        assert recover_group_size(q, d) == g


def test_unrecoverable_group_size_is_refused(tmp_path):
    arrays = {"lora.toy.A": np.ones((64, 2), np.float32), "lora.toy.B": np.ones((2, 80), np.float32)}
    with pytest.raises(HotswapQuantError, match="group_size=24 divides none"):
        write_quantized_arrays(arrays, tmp_path / "x.q", HotswapQuantConfig(bits=8, group_size=24))
    assert not (tmp_path / "x.q").exists()


def test_quantized_file_for_other_modules_is_refused_on_a_float_graph(setup, tmp_path, private_tmp):
    arrays = {"lora.not.a.module.A": np.ones((64, 2), np.float32), "lora.not.a.module.B": np.ones((2, 64), np.float32)}
    write_quantized_arrays(arrays, tmp_path / "x.q", HotswapQuantConfig(bits=4, group_size=G))
    with pytest.raises(AdapterError, match="not LoRA inputs"):
        HotswapSession(setup["float"]).load_adapter("x", tmp_path / "x.q")
    assert list(private_tmp.iterdir()) == []


def test_damaged_quantized_file_is_refused(setup, tmp_path):
    name = "lora.model.layers.0.self_attn.o_proj.A"
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    codes = np.zeros((32, 2), np.int8)   # codes without their scales
    fmt.set_parameters({f"{name}.codes": ort.OrtValue.ortvalue_from_numpy(codes)})
    fmt.export_adapter(str(tmp_path / "bad.q"))
    with pytest.raises(HotswapQuantError, match="no matching"):
        HotswapSession(setup["float"]).load_adapter("bad", tmp_path / "bad.q")
