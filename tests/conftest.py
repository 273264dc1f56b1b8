"""Shared fixtures: tiny real PEFT adapters on tiny random models of real architectures."""

from __future__ import annotations

import os

# Before torch loads: spinning OpenMP workers starve each other when cores are shared (see edge_lora/__main__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# name -> (tiny model kind, LoraConfig kwargs). Each row exercises one PEFT feature the importer must get right.
ADAPTER_TABLE = {
    "llama-all7": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"])),
    "llama-patterns-rslora": ("llama", dict(r=4, lora_alpha=16, use_rslora=True,
                                            target_modules=["q_proj", "v_proj", "down_proj"],
                                            rank_pattern={"down_proj": 2, "model.layers.0.self_attn.q_proj": 6},
                                            alpha_pattern={"v_proj": 3.0})),
    "llama-lora-bias": ("llama", dict(r=3, lora_alpha=6, target_modules=["o_proj", "up_proj"], lora_bias=True)),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-fan-in-fan-out": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                         fan_in_fan_out=True)),
    "bert-query-value": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])),
}


def make_peft_adapter(kind: str, lora_kwargs: dict, folder, seed: int = 0):
    """Build a PEFT model with non-zero random factors (so the adapter changes outputs), save it, and return
    (base model, peft model). Random factors are right here: these tests check exact import, not compression."""
    from peft import LoraConfig, get_peft_model

    from edge_lora.base import tiny_model

    base = tiny_model(kind, seed=seed)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.eval()
    peft_model.save_pretrained(str(folder))
    return peft_model


def model_output(model, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=sorted(ADAPTER_TABLE))
def peft_case(request, tmp_path):
    kind, kwargs = ADAPTER_TABLE[request.param]
    folder = tmp_path / request.param
    peft_model = make_peft_adapter(kind, kwargs, folder)
    return request.param, kind, folder, peft_model
