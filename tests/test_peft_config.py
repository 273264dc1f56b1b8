"""adapter_config.json as PEFT reads it (edge_lora/formats/peft_config.py): each refused case is one that PEFT
itself refuses or loads to another output than the tensors say, checked here by loading it in PEFT; each accepted
case loads in PEFT to the same output. Both readers, the import (load_peft) and the strict OTA reader
(check_adapter), agree on every row."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from package_fixtures import make_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (config change, the key the refusal names)
REFUSED = {
    "unknown-bias": (dict(bias="bogus"), "bias"),
    "dropout-above-1": (dict(lora_dropout=2.0), "lora_dropout"),
    "unknown-init": (dict(init_lora_weights="bogus"), "init_lora_weights"),
    "pissa-init-rewrites-the-base": (dict(init_lora_weights="pissa"), "init_lora_weights"),
    "olora-init-rewrites-the-base": (dict(init_lora_weights="olora"), "init_lora_weights"),
    "no-layer-selected": (dict(layers_to_transform=[99]), "do not select it"),
    "one-layer-of-two-selected": (dict(layers_to_transform=[0]), "do not select it"),
    "targets-fewer-than-the-tensors": (dict(target_modules=["q_proj"]), "do not select it"),
    "target-regex-matches-nothing": (dict(target_modules="nomatch"), "do not select it"),
    "all-excluded": (dict(exclude_modules=ALL), "do not select it"),
    "unknown-task-type": (dict(task_type="BOGUS"), "task_type"),
    "truthy-string-flag": (dict(use_rslora="yes"), "use_rslora"),
    "dora-flag-without-magnitudes": (dict(use_dora=True), "use_dora"),
    "lora-bias-without-bias-tensors": (dict(lora_bias=True), "lora_bias"),
    "alpha-pattern-not-a-number": (dict(alpha_pattern={"q_proj": "x"}), "alpha_pattern"),
    "layer-replication": (dict(layer_replication=[[0, 1]]), "layer_replication"),
    "target-parameters": (dict(target_parameters=["q_proj.weight"]), "target_parameters"),
    "unknown-key-switched-on": (dict(frobnicate=3), "frobnicate"),
    "regex-target-with-layers": (dict(target_modules=r".*_proj", layers_to_transform=[0]), "layers_to_transform"),
    "layers-pattern-alone": (dict(layers_pattern="layers"), "layers_pattern"),
    "lower-case-peft-type": (dict(peft_type="lora"), "peft_type"),
}
ACCEPTED = {
    "bias-all": dict(bias="all"),
    "gaussian-init": dict(init_lora_weights="gaussian"),
    "base-model-path-from-another-machine": dict(base_model_name_or_path="/nonexistent/model"),
    "unknown-key-switched-off": dict(frobnicate=None),
    "both-layers-selected": dict(layers_to_transform=[0, 1]),
    "regex-target": dict(target_modules=r".*\.(q|k|v|o|gate|up|down)_proj"),
    "eva-init": dict(init_lora_weights="eva"),
    "upper-case-all-linear": dict(target_modules="ALL-LINEAR"),
    "empty-exclude": dict(exclude_modules=""),
}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("peft-config") / "a")


def _variant(adapter, tmp_path, change: dict):
    out = tmp_path / "variant"
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(change)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _peft_logits(folder):
    """PEFT's own reading, or the exception it raises."""
    from peft import PeftModel

    from edge_lora.base import tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = PeftModel.from_pretrained(tiny_model("llama", seed=0), str(folder)).eval()
        except Exception as exc:   # noqa: BLE001 -- whatever PEFT raises is the point
            return exc
        with torch.no_grad():
            return model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits


def _readers(folder):
    from edge_lora.adapter import load_peft
    from edge_lora.ota.adapter_check import check_adapter

    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    return (lambda: load_peft(folder)), (lambda: check_adapter(files))


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_configs_peft_refuses_or_reads_differently_are_refused_by_both_readers(adapter, tmp_path, case):
    from edge_lora.errors import AdapterError
    from edge_lora.ota.adapter_check import AdapterPayloadError

    change, names = REFUSED[case]
    reference = _peft_logits(adapter)
    got = _peft_logits(_variant(adapter, tmp_path, change))
    if not isinstance(got, Exception) and case != "unknown-key-switched-on":
        # the case is real: PEFT's output is not what the tensors say (the unknown key is refused on principle)
        assert (got - reference).abs().max() > 1e-3, f"{case}: PEFT reads it the same; it needs no refusal"
    load, check = _readers(tmp_path / "variant")
    with pytest.raises(AdapterError, match=names):
        load()
    with pytest.raises(AdapterPayloadError, match=names):
        check()


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_configs_peft_reads_the_same_are_accepted_and_imported_alike(adapter, tmp_path, case):
    from edge_lora.stages.merge import merge
    from edge_lora.base import tiny_model

    reference = _peft_logits(adapter)
    folder = _variant(adapter, tmp_path, ACCEPTED[case])
    got = _peft_logits(folder)
    assert not isinstance(got, Exception), got
    assert torch.allclose(got, reference, atol=1e-5)
    load, check = _readers(folder)
    check()
    merged = merge(tiny_model("llama", seed=0), load())[0]
    with torch.no_grad():
        ours = merged(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert torch.allclose(ours, reference, atol=1e-4)
