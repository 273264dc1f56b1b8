"""ONNX exports on tiny models: merged == PyTorch + PEFT; hot-swap without an adapter == the base export, with
adapter X == the merged export of X, and X → Y → X on one session gives each adapter's outputs."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from conftest import ADAPTER_TABLE, make_peft_adapter

from edge_lora.adapter import load_peft
from edge_lora.errors import AdapterError, CompatibilityError
from edge_lora.models import tiny_model
from edge_lora.profiles import ExportConfig
from edge_lora.runtimes.hotswap import HotswapSession
from edge_lora.runtimes.ort_session import full_feeds, load_session
from edge_lora.stages.export_onnx import (
    ADAPTER_FILE,
    export_hotswap,
    export_merged,
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
    assert meta["mode"] == "merged" and "input_ids" in meta["inputs"]
    assert meta["task"] == ("feature-extraction" if kind == "bert" else "text-generation-with-past")
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
    lora_modules = set(read_meta(folders["hotswap"])["lora_inputs"])
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
    graph_inputs = {n for names in meta["lora_inputs"].values() for n in names}
    assert params == graph_inputs
    assert all(list(lora_input_names(m)) == sorted(names) for m, names in meta["lora_inputs"].items())


def test_empty_adapter_is_refused_at_load(hotswap_setup, tmp_path):
    folders, _, _, _ = hotswap_setup
    adapter = load_peft(hotswap_setup[2].parent / "x")
    for m in adapter.modules.values():
        m.B = torch.zeros_like(m.B)
    write_ort_adapter(adapter, tmp_path / "zero.onnx_adapter", set(read_meta(folders["hotswap"])["lora_inputs"]))
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
    assert read_meta(folder)["external_data"] and (folder / "model.onnx_data").is_file()
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
