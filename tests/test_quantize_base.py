"""Base-model quantization of exports (stages/quantize.py) on tiny real exports, run by ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import ADAPTER_TABLE, make_peft_adapter

from edge_lora.adapter import load_peft
from edge_lora.errors import ModelError, ProfileError
from edge_lora.base import tiny_model
from edge_lora.config import ExportConfig, load_profile
from edge_lora.runtimes.hotswap import HotswapSession
from edge_lora.runtimes.ort_session import full_feeds, load_session
from edge_lora.stages.export_onnx import ADAPTER_FILE, MODEL_FILE, export_hotswap, export_merged
from edge_lora.stages.hotswap_quant import is_quantized_adapter
from edge_lora.stages.merge import merge
from edge_lora.stages.quantize_base import QuantizeConfig, QuantizeConfigError, quantize_base
from edge_lora.stages.quantize_base import _stage as quantize_stage

IDS = np.random.default_rng(0).integers(0, 128, size=(2, 9))


def logits(folder, run_options=None, session=None) -> np.ndarray:
    session = session or load_session(folder)
    return session.run(None, full_feeds(session, IDS), run_options)[0]


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nbits_by_node(folder) -> dict[str, int]:
    graph = onnx.load(str(folder / MODEL_FILE)).graph
    return {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node
            if n.op_type == "MatMulNBits"}


def op_counts(folder) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(folder / MODEL_FILE)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def merged_export(tmp_path_factory):
    """A merged fp32 export of a tiny llama + adapter, unfused so every projection has its own MatMul."""
    root = tmp_path_factory.mktemp("qbase")
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, root / "adapter")
    model, _ = merge(tiny_model(kind), load_peft(root / "adapter"))
    folder = root / "fp32"
    folder.mkdir()
    export_merged(model, None, folder, ExportConfig(fuse_projections=False))
    return folder


def copy_of(folder, tmp_path, name="q"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def test_int8_weight_only_stays_close_and_quantizes_every_weight(merged_export, tmp_path):
    folder = copy_of(merged_export, tmp_path)
    summary, report = quantize_base(folder / MODEL_FILE, QuantizeConfig(base="int8", block_size=16))
    bits = nbits_by_node(folder)
    # 2 layers × 7 projections + the LM head, all at 8 bits; no float MatMul with a weight is left
    assert len(bits) == 15 and set(bits.values()) == {8}
    assert summary["untied"] == ["model.embed_tokens.weight"]
    assert summary["bytes_after"] < summary["bytes_before"]
    assert rel_err(logits(folder), logits(merged_export)) < 0.1


def test_int4_keeps_named_modules_and_head_at_int8(merged_export, tmp_path):
    folder = copy_of(merged_export, tmp_path)
    config = QuantizeConfig(base="int4", block_size=16, int8_modules=["down_proj"], lm_head="int8")
    summary, _ = quantize_base(folder / MODEL_FILE, config)
    bits = nbits_by_node(folder)
    assert {n: b for n, b in bits.items() if "down_proj" in n or "lm_head" in n} == \
        {n: 8 for n in bits if "down_proj" in n or "lm_head" in n}
    assert sum(b == 4 for b in bits.values()) == 12 and summary["int4_matmuls"] == 12
    err4 = rel_err(logits(folder), logits(merged_export))
    assert 0 < err4 < 1.0   # a 2-layer random model has no structure to keep; SmolLM2 is measured in the slow test


def test_int4_error_is_larger_than_int8(merged_export, tmp_path):
    """A check that both quantizers really quantize (an untouched model would pass a bound test)."""
    q8, q4 = copy_of(merged_export, tmp_path, "q8"), copy_of(merged_export, tmp_path, "q4")
    quantize_base(q8 / MODEL_FILE, QuantizeConfig(base="int8", block_size=16))
    quantize_base(q4 / MODEL_FILE, QuantizeConfig(base="int4", block_size=16, lm_head="int4"))
    ref = logits(merged_export)
    assert 0 < rel_err(logits(q8), ref) < rel_err(logits(q4), ref)


def test_lm_head_fp32_keeps_tied_table(merged_export, tmp_path):
    folder = copy_of(merged_export, tmp_path)
    summary, _ = quantize_base(folder / MODEL_FILE, QuantizeConfig(base="int4", block_size=16, lm_head="fp32"))
    assert summary["untied"] == [] and op_counts(folder)["Transpose"] >= 1   # the head still reads the table
    assert not any("lm_head" in n for n in nbits_by_node(folder))


def test_int4_embedding_uses_gather_block_quantized(merged_export, tmp_path):
    folder = copy_of(merged_export, tmp_path)
    quantize_base(folder / MODEL_FILE, QuantizeConfig(base="int4", block_size=16, embedding="int4"))
    ops = op_counts(folder)
    assert ops.get("GatherBlockQuantized") == 1
    assert rel_err(logits(folder), logits(merged_export)) < 1.0


def test_dynamic_int8(merged_export, tmp_path):
    folder = copy_of(merged_export, tmp_path)
    summary, _ = quantize_base(folder / MODEL_FILE, QuantizeConfig(base="int8", method="dynamic"))
    ops = op_counts(folder)
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulInteger", 0) >= 15
    assert rel_err(logits(folder), logits(merged_export)) < 0.1


@pytest.mark.parametrize("method", ["weight_only", "dynamic"])
def test_hotswap_base_quantized_adapter_kept(tmp_path, method):
    """Quantizing a hot-swap export touches the base only: the LoRA inputs stay float graph inputs, the adapter
    file still loads, and the adapter's effect on the quantized base is the effect it has on the fp32 base."""
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    adapter = load_peft(tmp_path / "adapter")
    fp = tmp_path / "hs"
    fp.mkdir()
    export_hotswap(tiny_model(kind), None, adapter, fp, ExportConfig(mode="hotswap"))
    q = copy_of(fp, tmp_path, "hsq")
    base = "int8"
    quantize_base(q / MODEL_FILE, QuantizeConfig(base=base, method=method, block_size=16))

    graph = onnx.load(str(q / MODEL_FILE)).graph
    lora_inputs = [i.name for i in graph.input if i.name.startswith("lora.")]
    assert lora_inputs and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in graph.input
                               if i.name.startswith("lora."))
    effects = []
    for folder in (fp, q):
        hs = HotswapSession(folder)
        hs.load_adapter("x", folder / ADAPTER_FILE)
        effects.append(logits(folder, hs.run_options("x"), hs.session) - logits(folder, None, hs.session))
    assert np.abs(effects[0]).max() > 1e-3
    assert rel_err(effects[1], effects[0]) < 0.15


def test_failed_write_leaves_the_export_untouched(merged_export, tmp_path, monkeypatch):
    folder = copy_of(merged_export, tmp_path)
    before = (folder / MODEL_FILE).read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OSError):
        quantize_base(folder / MODEL_FILE, QuantizeConfig(base="int8", block_size=16))
    assert (folder / MODEL_FILE).read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in merged_export.iterdir())


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, words", [
    (dict(base="int3"), "quantize.base"),
    (dict(base="int4", block_size=48), "power of 2"),
    (dict(base="int4", block_size=8), "power of 2"),
    (dict(base="int4", accuracy_level=7), "accuracy_level"),
    (dict(base="int4", method="dynamic"), "dynamic"),
    (dict(base="int8", method="dynamic", lm_head="int4"), "dynamic"),
    (dict(base="int4", lm_head="int2"), "lm_head"),
    (dict(base="int4", embedding="int8"), "embedding"),
    (dict(base="int4", int8_modules=[""]), "int8_modules"),
])
def test_bad_settings_are_profile_errors(kwargs, words):
    with pytest.raises(ProfileError, match=words):
        QuantizeConfig(**kwargs)


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / MODEL_FILE
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="cannot read"):
        quantize_base(bad, QuantizeConfig(base="int8"))
    with pytest.raises(ModelError, match="does not exist"):
        quantize_base(tmp_path / "missing.onnx", QuantizeConfig(base="int8"))


@pytest.mark.parametrize("name", ["cpu-int8", "cpu-int4", "cpu-int4-hotswap"])
def test_quantized_profiles_parse(name):
    profile = load_profile(name)
    assert "quantize" in profile.stages and profile.config("quantize").base in ("int8", "int4")
    assert profile.stages.index("quantize") == profile.stages.index("export") + 1


def test_unknown_quantize_key_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[profile]\nstages = ["merge", "export", "quantize"]\n[quantize]\nbase = "int4"\nbits = 4\n')
    with pytest.raises(ProfileError, match="unknown key.*bits"):
        load_profile(path)


# ------------------------------------------------------------------------------------------ the adapter file
@pytest.fixture(scope="module")
def hotswap_export(tmp_path_factory):
    """A float hot-swap export of tiny llama with its adapter file, and the adapter it was written from."""
    root = tmp_path_factory.mktemp("qadapter")
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, root / "adapter")
    adapter = load_peft(root / "adapter")
    for m in adapter.modules.values():   # conftest's factors swamp the tiny weights (see test_hotswap_quant)
        m.B = m.B * 0.1
    folder = root / "hs"
    folder.mkdir()
    export_hotswap(tiny_model(kind), None, adapter, folder, ExportConfig(mode="hotswap"))
    return folder, adapter


def run_stage(folder, config, adapter=None):
    ctx = SimpleNamespace(work_dir=folder, adapter=adapter, reports=[])
    return quantize_stage(ctx, config)


def adapter_effect(folder) -> np.ndarray:
    hs = HotswapSession(folder)
    hs.load_adapter("x", folder / ADAPTER_FILE)
    return logits(folder, hs.run_options("x"), hs.session) - logits(folder, None, hs.session)


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("from_adapter", [True, False])
def test_stage_quantizes_the_adapter_file_load_time(hotswap_export, tmp_path, bits, from_adapter):
    """Load-time layout: the graph is untouched, the file is quantized and smaller, HotswapSession expands it."""
    fp, adapter = hotswap_export
    folder = copy_of(fp, tmp_path)
    graph_before = (folder / MODEL_FILE).read_bytes()
    before = (folder / ADAPTER_FILE).stat().st_size
    report = run_stage(folder, QuantizeConfig(adapter=bits, adapter_block_size=16),
                       adapter if from_adapter else None)
    assert is_quantized_adapter(folder / ADAPTER_FILE)
    after = (folder / ADAPTER_FILE).stat().st_size
    assert after < (0.45 if bits == "int8" else 0.35) * before   # 8 or 4 bits + an fp32 scale per 16 values
    assert report.metrics["adapter_bytes_before"] == before and report.metrics["adapter_bytes_after"] == after
    assert (folder / MODEL_FILE).read_bytes() == graph_before
    meta = json.loads((folder / "edge_lora.json").read_text())
    assert meta["adapter_quantization"] == {"adapter": bits, "block_size": 16, "layout": "load-time",
                                            "bytes_before": before, "bytes_after": after}
    assert "base_quantization" not in meta   # base = "none"
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert rel_err(adapter_effect(folder), adapter_effect(fp)) < (0.03 if bits == "int8" else 0.3)


def test_stage_in_graph_layout_quantizes_the_graph_too(hotswap_export, tmp_path):
    fp, adapter = hotswap_export
    folder = copy_of(fp, tmp_path)
    run_stage(folder, QuantizeConfig(adapter="int8", adapter_block_size=16, adapter_layout="in-graph"), adapter)
    inputs = {i.name for i in onnx.load(str(folder / MODEL_FILE)).graph.input}
    assert any(n.endswith(".codes") for n in inputs) and not any(n.endswith(".A") for n in inputs)
    assert rel_err(adapter_effect(folder), adapter_effect(fp)) < 0.03


def test_stage_with_base_and_adapter(hotswap_export, tmp_path):
    fp, adapter = hotswap_export
    folder = copy_of(fp, tmp_path)
    report = run_stage(folder, QuantizeConfig(base="int8", block_size=16, adapter="int4", adapter_block_size=16),
                       adapter)
    meta = json.loads((folder / "edge_lora.json").read_text())
    assert meta["base_quantization"]["base"] == "int8" and meta["adapter_quantization"]["adapter"] == "int4"
    assert report.metrics["int8_matmuls"] > 0 and report.metrics["adapter_bytes_after"] > 0
    assert rel_err(adapter_effect(folder), adapter_effect(fp)) < 0.35


def test_fp32_adapter_leaves_the_file_alone(hotswap_export, tmp_path):
    fp, adapter = hotswap_export
    folder = copy_of(fp, tmp_path)
    before = (folder / ADAPTER_FILE).read_bytes()
    run_stage(folder, QuantizeConfig(), adapter)
    assert (folder / ADAPTER_FILE).read_bytes() == before
    assert "adapter_quantization" not in json.loads((folder / "edge_lora.json").read_text())


def test_merged_export_with_quantized_adapter_is_refused(merged_export, tmp_path):
    folder = copy_of(merged_export, tmp_path)
    before = (folder / MODEL_FILE).read_bytes()
    with pytest.raises(QuantizeConfigError, match="merged export has no separate adapter; use a hot-swap profile"):
        run_stage(folder, QuantizeConfig(base="int8", adapter="int4"))
    assert (folder / MODEL_FILE).read_bytes() == before   # refused before the base was touched


def test_already_quantized_adapter_file_is_refused(hotswap_export, tmp_path):
    fp, adapter = hotswap_export
    folder = copy_of(fp, tmp_path)
    run_stage(folder, QuantizeConfig(adapter="int8", adapter_block_size=16), adapter)
    with pytest.raises(QuantizeConfigError, match="already quantized"):
        run_stage(folder, QuantizeConfig(adapter="int8", adapter_block_size=16), adapter)


@pytest.mark.parametrize("kwargs, words", [
    (dict(adapter="int3"), "quantize.adapter"),
    (dict(adapter="fp16"), "quantize.adapter"),
    (dict(adapter="int4", adapter_layout="fast"), "quantize.adapter_layout"),
    (dict(adapter="int4", adapter_block_size=4), "adapter_block_size"),
    (dict(adapter="int4", adapter_block_size=True), "adapter_block_size"),
    (dict(adapter="int4", adapter_block_size=32.0), "adapter_block_size"),
])
def test_bad_adapter_settings_are_profile_errors(kwargs, words):
    with pytest.raises(ProfileError, match=words):
        QuantizeConfig(**kwargs)


def test_hotswap_int4_profile_quantizes_the_adapter_at_load_time():
    config = load_profile("cpu-int4-hotswap").config("quantize")
    assert config.adapter in ("int4", "int8") and config.adapter_layout == "load-time"


def test_base_only_hotswap_export(tmp_path):
    """No adapter file: load-time has nothing to do (and says so); in-graph still makes the graph take quantized
    adapter files."""
    kind, _ = ADAPTER_TABLE["llama-all7"]
    targets = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "o_proj")]
    fp = tmp_path / "base-only"
    fp.mkdir()
    export_hotswap(tiny_model(kind), None, None, fp, ExportConfig(mode="hotswap", hotswap_targets=targets))
    folder = copy_of(fp, tmp_path)
    report = run_stage(folder, QuantizeConfig(adapter="int4", adapter_block_size=16))
    assert any("no adapter.onnx_adapter" in s for s in report.skipped)
    assert (folder / MODEL_FILE).read_bytes() == (fp / MODEL_FILE).read_bytes()
    run_stage(folder, QuantizeConfig(adapter="int4", adapter_block_size=16, adapter_layout="in-graph"))
    inputs = {i.name for i in onnx.load(str(folder / MODEL_FILE)).graph.input}
    assert any(n.endswith(".codes") for n in inputs)
