"""Base-model quantization of exports (stages/quantize.py) on tiny real exports, run by ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
from edge_lora.stages.merge import merge
from edge_lora.stages.quantize_base import QuantizeConfig, QuantizeConfigError, quantize_base

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
    passes = report.metrics["graph_passes"]
    assert passes["untie_head"] == {"untied": ("model.embed_tokens.weight",),
                                    "weights": ("model.embed_tokens.weight.untied_T",)}
    assert set(passes) == {"untie_head", "name_matmuls"} and passes["name_matmuls"]["named"] >= 0
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


def test_lm_head_block_size_applies_to_the_head_only(merged_export, tmp_path):
    folder = copy_of(merged_export, tmp_path)
    summary, _ = quantize_base(folder / MODEL_FILE, QuantizeConfig(base="int8", block_size=16, lm_head_block_size=32))
    blocks = {n.name: next(a.i for a in n.attribute if a.name == "block_size")
              for n in onnx.load(str(folder / MODEL_FILE)).graph.node if n.op_type == "MatMulNBits"}
    assert {b for n, b in blocks.items() if "lm_head" in n} == {32}
    assert {b for n, b in blocks.items() if "lm_head" not in n} == {16} and len(blocks) == 15
    assert summary["lm_head_block_size"] == 32 and summary["block_size"] == 16
    assert rel_err(logits(folder), logits(merged_export)) < 0.1


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
    (dict(base="int8", lm_head_block_size=100), "lm_head_block_size"),
    (dict(base="int8", lm_head_block_size=True), "lm_head_block_size"),
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


# ------------------------------------------------------------------------------------------ the adapter
# The adapter's factors are quantized by the one factor quantizer before the export (pipeline._quantize_adapter),
# so these run whole exports: what ships is what the device runs.
@pytest.fixture(scope="module")
def pipeline_inputs(tmp_path_factory):
    """A tiny llama folder and an adapter whose factors do not swamp its weights (conftest's are std 0.3)."""
    from edge_lora.adapter import LoraModule, save_peft

    root = tmp_path_factory.mktemp("qadapter")
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, root / "raw")
    raw = load_peft(root / "raw")
    small = raw.replace_modules({n: LoraModule(name=m.name, kind=m.kind, A=m.A, B=m.B * 0.1, scale=m.scale,
                                               alpha=m.alpha) for n, m in raw.modules.items()}, form="peft")
    save_peft(small, root / "adapter")
    tiny_model(kind).save_pretrained(root / "llama")
    return root


def export_with(root, out, mode: str, adapter: str, extra: str = "", adapter_dir=None):
    from edge_lora.pipeline import run_export

    stages = '["export", "quantize"]' if mode == "hotswap" else '["merge", "export", "quantize"]'
    profile = out.parent / f"{out.name}.toml"
    profile.write_text(f'[profile]\nstages = {stages}\n[export]\nmode = "{mode}"\n'
                       f'[quantize]\nadapter = "{adapter}"\nadapter_block_size = 16\n{extra}')
    return run_export(root / "llama", adapter_dir or root / "adapter", profile, out, show_progress=False)


def adapter_effect(folder) -> np.ndarray:
    hs = HotswapSession(folder)
    hs.load_adapter("x", folder / ADAPTER_FILE)
    return logits(folder, hs.run_options("x"), hs.session) - logits(folder, None, hs.session)


@pytest.mark.parametrize("setting, tolerance", [("int8", 0.03), ("int4", 0.3), ("mixed:4", 0.5)])
def test_hotswap_export_ships_the_codes_of_the_one_quantizer(pipeline_inputs, tmp_path, setting, tolerance):
    """The adapter file holds the codes (smaller than the float file), the graph stays float, the runtime expands
    the codes at load, and the adapter does what the float adapter does, within the quantization error."""
    from edge_lora.formats import ort_adapter

    fp = tmp_path / "fp"
    export_with(pipeline_inputs, fp, "hotswap", "fp32")
    q = tmp_path / "q"
    report = export_with(pipeline_inputs, q, "hotswap", setting)
    assert ort_adapter.read(q / ADAPTER_FILE).is_quantized and not ort_adapter.read(fp / ADAPTER_FILE).is_quantized
    assert (q / ADAPTER_FILE).stat().st_size < 0.6 * (fp / ADAPTER_FILE).stat().st_size
    graph = onnx.load(str(q / MODEL_FILE)).graph
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in graph.input if i.name.startswith("lora."))
    stage = next(s for s in report["stages"] if s["stage"] == "quantize_adapter")
    assert stage["metrics"]["size_ratio_vs_fp16_peft"] > 1 and stage["metrics"]["rel_error_vs_original_worst"] < 1
    meta = json.loads((q / "edge_lora.json").read_text())
    expected = ({"bits": int(setting[3:]), "mixed_avg_bits": None} if setting.startswith("int")
                else {"bits": None, "mixed_avg_bits": float(setting[6:])})
    assert {k: meta["adapter_quantization"][k] for k in ("bits", "mixed_avg_bits")} == expected
    assert meta["adapter_quantization"]["group_size"] == 16
    assert rel_err(adapter_effect(q), adapter_effect(fp)) < tolerance


def test_hotswap_export_with_a_quantized_base_and_adapter(pipeline_inputs, tmp_path):
    fp, q = tmp_path / "fp", tmp_path / "q"
    export_with(pipeline_inputs, fp, "hotswap", "fp32")
    report = export_with(pipeline_inputs, q, "hotswap", "int4", 'base = "int8"\nblock_size = 16\n')
    meta = json.loads((q / "edge_lora.json").read_text())
    assert meta["base_quantization"]["base"] == "int8" and meta["adapter_quantization"]["bits"] == 4
    assert next(s for s in report["stages"] if s["stage"] == "quantize")["metrics"]["int8_matmuls"] > 0
    assert rel_err(adapter_effect(q), adapter_effect(fp)) < 0.35


def test_merged_export_folds_in_the_dequantized_expansion(pipeline_inputs, tmp_path):
    """A merged profile with quantize.adapter merges what the codes stand for: the same model as the hot-swap
    export running the same codes."""
    merged, hot = tmp_path / "merged", tmp_path / "hot"
    export_with(pipeline_inputs, merged, "merged", "int4")
    export_with(pipeline_inputs, hot, "hotswap", "int4")
    hs = HotswapSession(hot)
    hs.load_adapter("x", hot / ADAPTER_FILE)
    np.testing.assert_allclose(logits(merged), logits(hot, hs.run_options("x"), hs.session), rtol=1e-4, atol=1e-4)


def test_compress_bits_folder_ships_as_it_is(pipeline_inputs, tmp_path):
    """`compress --bits` output → export: the adapter file carries exactly the compress codes, and a profile's own
    quantize.adapter is not applied on top (the report says so)."""
    from edge_lora.cli import main
    from edge_lora.formats import ort_adapter
    from edge_lora.formats.quantized_factors import read_file

    assert main(["compress", str(pipeline_inputs / "adapter"), "--out", str(tmp_path / "c"), "--budget", "0.3",
                 "--bits", "mixed:3.0", "--group-size", "16"]) == 0
    report = export_with(pipeline_inputs, tmp_path / "q", "hotswap", "int8", adapter_dir=tmp_path / "c")
    shipped = ort_adapter.read(tmp_path / "q" / ADAPTER_FILE).quantized()
    on_disk = read_file(tmp_path / "c" / "quantized.safetensors")
    assert shipped.header() == on_disk.header()
    # the source is stored relative to each file's folder (c/ and q/ are siblings, so the two agree)
    assert shipped.source == on_disk.source and not Path(on_disk.source).is_absolute()
    assert (tmp_path / "c" / on_disk.source).resolve() == (pipeline_inputs / "adapter").resolve()
    for k, v in on_disk.arrays().items():
        np.testing.assert_array_equal(shipped.arrays()[k], v)
    stage = next(s for s in report["stages"] if s["stage"] == "quantize_adapter")
    assert "already quantized by compress --bits" in stage["skipped"][0]


@pytest.mark.parametrize("kwargs, words", [
    (dict(adapter="int5"), "quantize.adapter"),
    (dict(adapter="fp16"), "quantize.adapter"),
    (dict(adapter="mixed:x"), "quantize.adapter"),
    (dict(adapter="int4", adapter_block_size=4), "adapter_block_size"),
    (dict(adapter="int4", adapter_block_size=True), "adapter_block_size"),
    (dict(adapter="int4", adapter_block_size=32.0), "adapter_block_size"),
])
def test_bad_adapter_settings_are_profile_errors(kwargs, words):
    with pytest.raises(ProfileError, match=words):
        QuantizeConfig(**kwargs)


def test_retired_adapter_layout_key_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[profile]\nstages = ["export", "quantize"]\n[export]\nmode = "hotswap"\n'
                    '[quantize]\nadapter = "int4"\nadapter_layout = "in-graph"\n')
    with pytest.raises(ProfileError, match="unknown key.*adapter_layout"):
        load_profile(path)


def test_hotswap_int4_profile_quantizes_the_adapter():
    assert load_profile("cpu-int4-hotswap").config("quantize").adapter == "int4"
