"""Exact PEFT import: our loader → our saver → PEFT loads it → the same outputs, over a table of tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from edge_lora.adapter import check_compatible, compatibility_problems, load_peft, save_peft
from edge_lora.errors import AdapterError, CompatibilityError
from edge_lora.base import tiny_model
from edge_lora.stages.canonicalize import canonicalize

from conftest import ADAPTER_TABLE, make_peft_adapter, model_output


def peft_delta(peft_model, name: str) -> torch.Tensor:
    """PEFT's own ΔW for a module, brought to our y = W x convention (d_out × d_in)."""
    layer = peft_model.base_model.model.get_submodule(name)
    delta = layer.get_delta_weight("default")
    if isinstance(layer.base_layer, torch.nn.Embedding) or getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return delta.double()


def test_import_matches_peft_delta_per_module(peft_case):
    case, kind, folder, peft_model = peft_case
    adapter = load_peft(folder)
    assert adapter.modules, case
    for name, module in adapter.modules.items():
        torch.testing.assert_close(module.delta(), peft_delta(peft_model, name), rtol=1e-5, atol=1e-6)
    check_compatible(adapter, tiny_model(kind))


@pytest.mark.parametrize("canonical", [False, True], ids=["as-imported", "canonical"])
def test_save_roundtrip_peft_reproduces_outputs(peft_case, tmp_path, canonical):
    case, kind, folder, peft_model = peft_case
    adapter = load_peft(folder)
    if canonical:
        adapter, _ = canonicalize(adapter)
    out = save_peft(adapter, tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(tiny_model(kind), str(out)).eval()
    expected = model_output(peft_model)
    torch.testing.assert_close(model_output(reloaded), expected, rtol=1e-5, atol=1e-5)
    # the adapter must matter, or this test proves nothing
    assert not torch.allclose(model_output(tiny_model(kind)), expected, atol=1e-3)


def test_patterns_and_rslora_give_per_module_rank_and_scale(tmp_path):
    kind, kwargs = ADAPTER_TABLE["llama-patterns-rslora"]
    make_peft_adapter(kind, kwargs, tmp_path / "a")
    adapter = load_peft(tmp_path / "a")
    m = adapter.modules
    assert m["model.layers.0.self_attn.q_proj"].rank == 6
    assert m["model.layers.1.self_attn.q_proj"].rank == 4
    assert m["model.layers.1.mlp.down_proj"].rank == 2
    assert m["model.layers.1.self_attn.v_proj"].scale == pytest.approx(3.0 / 4 ** 0.5)
    assert m["model.layers.1.mlp.down_proj"].scale == pytest.approx(16 / 2 ** 0.5)


def test_rank_zero_modules_are_dropped_on_save(tmp_path):
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "a")
    adapter = load_peft(tmp_path / "a")
    name = "model.layers.0.mlp.up_proj"
    m = adapter.modules[name]
    adapter = adapter.replace_modules({**adapter.modules, name: type(m)(name=name, kind=m.kind, A=m.A[:0], B=m.B[:, :0],
                                                                      scale=m.scale, alpha=m.alpha)})
    out = save_peft(adapter, tmp_path / "b")
    saved = load_peft(out)
    assert name not in saved.modules and len(saved.modules) == len(adapter.modules) - 1
    # PEFT must not recreate the dropped module (the source config has init_lora_weights=False: random B)
    reloaded = PeftModel.from_pretrained(tiny_model(kind), str(out)).eval()
    original = PeftModel.from_pretrained(tiny_model(kind), str(tmp_path / "a")).eval()
    with torch.no_grad():
        original.base_model.model.get_submodule(name).lora_B["default"].weight.zero_()
    torch.testing.assert_close(model_output(reloaded), model_output(original), rtol=1e-5, atol=1e-5)


def test_save_refuses_existing_folder(tmp_path):
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "a")
    with pytest.raises(AdapterError, match="already exists"):
        save_peft(load_peft(tmp_path / "a"), tmp_path / "a")


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def good(tmp_path):
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "good")
    return tmp_path / "good"


def test_missing_config(good):
    (good / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load_peft(good)


def test_missing_weights(good):
    (good / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        load_peft(good)


def test_truncated_weights(good):
    path = good / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_peft(good)


def test_nan_tensor_is_named(good):
    from safetensors.torch import load_file, save_file

    path = good / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(AdapterError, match=f"{key[len('base_model.model.'):]}.*NaN"):
        load_peft(good)


def test_unknown_peft_type(good):
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (good / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="peft_type is 'IA3'"):
        load_peft(good)


def test_dora_is_refused(good):
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (good / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="use_dora"):
        load_peft(good)


def test_pickled_bin_is_refused_not_unpickled(good):
    (good / "adapter_model.safetensors").rename(good / "adapter_model.bin")
    with pytest.raises(AdapterError, match="never unpickles"):
        load_peft(good)


def test_config_rank_disagrees_with_tensors(good):
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 8}
    (good / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="rank 4 in the tensors but rank 8"):
        load_peft(good)


def test_target_module_absent_from_base(good):
    adapter = load_peft(good)
    with pytest.raises(CompatibilityError, match="not found in the base model"):
        check_compatible(adapter, tiny_model("bert"))


def test_shape_mismatch_is_named(good):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    problems = compatibility_problems(load_peft(good), wider)
    assert any("model.layers.0.self_attn.q_proj" in p and "48×48" in p for p in problems)
    with pytest.raises(CompatibilityError, match="model of another size"):
        check_compatible(load_peft(good), wider)
