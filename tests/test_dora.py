"""DoRA (PEFT ``use_dora``): merged exactly as PEFT merges it, refused everywhere it cannot be exact."""

from __future__ import annotations

import json

import pytest
import torch

from edge_lora.adapter import load_peft
from edge_lora.base import tiny_model
from edge_lora.errors import AdapterError
from edge_lora.stages.merge import merge


@pytest.fixture
def dora(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                          target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():   # trained-looking magnitudes: not the norms DoRA starts from, so they matter
        for name, p in peft.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))
    peft.eval().save_pretrained(tmp_path / "dora")
    return peft, tmp_path / "dora"


def test_merge_equals_peft_merge_and_unload(dora):
    import copy

    peft, folder = dora
    adapter = load_peft(folder, allow_dora=True)
    assert all(m.magnitude is not None for m in adapter.modules.values())
    ours = merge(tiny_model("llama"), adapter)[0].state_dict()
    theirs = copy.deepcopy(peft).merge_and_unload().state_dict()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
    plain = tiny_model("llama").state_dict()
    assert not torch.allclose(ours["model.layers.0.self_attn.q_proj.weight"],
                              plain["model.layers.0.self_attn.q_proj.weight"])


def test_dora_is_refused_where_it_cannot_be_exact(dora, tmp_path):
    _, folder = dora
    with pytest.raises(AdapterError, match="DoRA.*merged export profiles"):
        load_peft(folder)   # every reader but the merge path: compress, quantize, hot-swap, packages
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = False
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(config))
    (broken / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="DoRA magnitude"):
        load_peft(broken, allow_dora=True)   # magnitudes the config does not announce


def test_merged_export_validates_against_peft_and_hotswap_is_refused(dora, tmp_path):
    from test_cli import assert_clean_error, run_cli

    _, folder = dora
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    out = run_cli("export", "--base", base, "--adapter", folder, "--profile", "cpu-fp32", "--out",
                  tmp_path / "merged", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "merged" / "report.json").read_text())
    v = next(s for s in report["stages"] if s["stage"] == "validate")["metrics"]
    assert report["status"] == "PASSED" and v["top1_agreement"] == 1.0 and v["mean_kl"] < 1e-8
    out = run_cli("export", "--base", base, "--adapter", folder, "--profile", "cpu-hotswap", "--out",
                  tmp_path / "hot", "--quiet")
    assert_clean_error(out, "use_dora", "hot-swapped", "cpu-fp32")
    assert not (tmp_path / "hot").exists()   # compress and the other readers refuse through load_peft (above)
