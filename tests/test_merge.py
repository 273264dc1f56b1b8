"""merge == PEFT's merge_and_unload on every row of the adapter table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import model_output

from edge_lora.adapter import load_peft
from edge_lora.errors import AdapterError, CompatibilityError
from edge_lora.base import tiny_model
from edge_lora.stages.merge import merge

# PEFT cannot merge these rows: lora_bias on a bias-less layer raises, and LoRA on an embedding tied to lm_head
# is merged into the shared tensor (so lm_head changes too). There the unmerged PEFT forward is the reference.
PEFT_CANNOT_MERGE = {"llama-lora-bias", "llama-embedding"}


def test_merge_equals_peft_merge_and_unload(peft_case):
    name, kind, folder, peft_model = peft_case
    expected_out = model_output(peft_model)
    merged, report = merge(tiny_model(kind), load_peft(folder))
    if name not in PEFT_CANNOT_MERGE:
        ref_state = peft_model.merge_and_unload().state_dict()
        for key, tensor in merged.state_dict().items():
            torch.testing.assert_close(tensor, ref_state[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    torch.testing.assert_close(model_output(merged), expected_out, rtol=1e-5, atol=1e-5)
    assert report.stage == "merge" and report.metrics["modules"] == len(load_peft(folder).modules)


def test_merge_refuses_non_finite_and_leaves_base_unchanged(tmp_path):
    from conftest import ADAPTER_TABLE, make_peft_adapter

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "a")
    adapter = load_peft(tmp_path / "a")
    first = next(iter(adapter.modules.values()))
    adapter = adapter.replace_modules({**adapter.modules,
                                       first.name: dataclasses.replace(first, A=first.A * 1e30, B=first.B * 1e30)})
    model = tiny_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="NaN/Inf"):
        merge(model, adapter)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_merge_refuses_adapter_for_another_base(tmp_path):
    from conftest import ADAPTER_TABLE, make_peft_adapter

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "a")
    with pytest.raises(CompatibilityError, match="not found in the base model"):
        merge(tiny_model("bert"), load_peft(tmp_path / "a"))
