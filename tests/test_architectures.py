"""Architectures beyond the llama/gpt2/bert of the other tests (edge_lora.base.TINY_DECODERS: Gemma's scaled
embeddings and an export without position_ids, Gemma-2's soft-capping and sliding window, Phi-3's fused qkv_proj /
gate_up_proj, ...), each with a LoRA on every linear layer, in the style of PEFT's merge tests: merged ==
hot-swap == PyTorch + PEFT, no adapter == the base, greedy decoding of a left-padded batch == PEFT row by row,
and the int4 base builds and decodes; encoders (edge_lora.base.TINY_ENCODERS) merged == hot-swap == PEFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_peft_adapter

from edge_lora.adapter import load_peft
from edge_lora.base import TINY_DECODERS, TINY_ENCODERS, tiny_model
from edge_lora.config import ExportConfig
from edge_lora.runtimes.hotswap import HotswapSession
from edge_lora.runtimes.ort_generate import OrtCausalLM
from edge_lora.runtimes.ort_session import full_feeds, load_session
from edge_lora.stages.export_onnx import ADAPTER_FILE, export_hotswap, export_merged
from edge_lora.stages.merge import merge

IDS = np.random.default_rng(1).integers(0, 128, size=(2, 9))
PROMPTS = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2], [42], [7, 7, 7]]   # different lengths: the batch is left-padded


def _exports(kind: str, tmp):
    """A PEFT LoRA on every linear layer of tiny ``kind``, and its merged and hot-swap exports."""
    peft = make_peft_adapter(kind, dict(r=4, lora_alpha=8, target_modules="all-linear"), tmp / "adapter")
    adapter = load_peft(tmp / "adapter")
    merged_dir, hot_dir = tmp / "merged", tmp / "hotswap"
    for d in (merged_dir, hot_dir):
        d.mkdir()
    export_merged(merge(tiny_model(kind), adapter)[0], None, merged_dir)
    export_hotswap(tiny_model(kind), None, adapter, hot_dir, config=ExportConfig(mode="hotswap"))
    return kind, peft, merged_dir, hot_dir


@pytest.fixture(scope="module", params=TINY_DECODERS)
def arch(request, tmp_path_factory):
    return _exports(request.param, tmp_path_factory.mktemp(request.param))


def _logits(session, run_options=None) -> np.ndarray:
    return session.run(["logits"], full_feeds(session, IDS), run_options)[0]


def test_merged_equals_hotswap_equals_peft_and_no_adapter_is_the_base(arch):
    kind, peft, merged_dir, hot_dir = arch
    with torch.no_grad():
        expected = peft(input_ids=torch.from_numpy(IDS)).logits.numpy()
        with peft.disable_adapter():
            base = peft(input_ids=torch.from_numpy(IDS)).logits.numpy()
    hot = HotswapSession(hot_dir)
    np.testing.assert_allclose(_logits(load_session(merged_dir)), expected, rtol=1e-4, atol=2e-5, err_msg=kind)
    np.testing.assert_allclose(_logits(hot.session), base, rtol=1e-4, atol=2e-5)   # no adapter: the base
    hot.load_adapter("x", hot_dir / ADAPTER_FILE)
    np.testing.assert_allclose(_logits(hot.session, hot.run_options("x")), expected, rtol=1e-4, atol=2e-5)
    assert not np.allclose(expected, base, atol=1e-3)   # the adapter changes the outputs, so this can fail


def _peft_greedy(peft, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(peft(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_left_padded_greedy_decoding_equals_peft_row_by_row(arch):
    kind, peft, _, hot_dir = arch
    hot = HotswapSession(hot_dir)
    hot.load_adapter("x", hot_dir / ADAPTER_FILE)
    got = OrtCausalLM(hot.session, run_options=hot.run_options("x")).greedy_ids(PROMPTS, 6)
    assert got == [_peft_greedy(peft, p, 6) for p in PROMPTS], kind


def test_int4_hotswap_builds_and_decodes(arch, tmp_path):
    """The int4 base (MatMulNBits, the cpu-int4 recipe's head and module choices) builds and runs with the adapter
    active; its quality on random weights is not judged."""
    import shutil

    from edge_lora.config import QuantizeConfig
    from edge_lora.stages.quantize_base import quantize_base

    kind, _, _, hot_dir = arch
    folder = tmp_path / "int4"
    shutil.copytree(hot_dir, folder)
    summary, _ = quantize_base(folder / "model.onnx", QuantizeConfig(base="int4", int8_modules=["down_proj",
                                                                                                 "v_proj"]))
    assert summary["int4_matmuls"] > 0 and summary["ops_after"].get("MatMulNBits", 0) > 0, kind
    hot = HotswapSession(folder)
    hot.load_adapter("x", folder / ADAPTER_FILE)
    got = OrtCausalLM(hot.session, run_options=hot.run_options("x")).greedy_ids(PROMPTS, 4)
    assert [len(g) for g in got] == [4] * len(PROMPTS)


@pytest.fixture(scope="module", params=TINY_ENCODERS)
def encoder(request, tmp_path_factory):
    return _exports(request.param, tmp_path_factory.mktemp(request.param))


def test_encoders_merged_equals_hotswap_equals_peft(encoder):
    kind, peft, merged_dir, hot_dir = encoder
    with torch.no_grad():
        expected = peft(input_ids=torch.from_numpy(IDS)).last_hidden_state.numpy()
        with peft.disable_adapter():
            base = peft(input_ids=torch.from_numpy(IDS)).last_hidden_state.numpy()
    merged = load_session(merged_dir)
    hot = HotswapSession(hot_dir)

    def hidden(session, options=None):
        return session.run(["last_hidden_state"], full_feeds(session, IDS), options)[0]

    np.testing.assert_allclose(hidden(merged), expected, rtol=1e-4, atol=2e-5, err_msg=kind)
    np.testing.assert_allclose(hidden(hot.session), base, rtol=1e-4, atol=2e-5, err_msg=kind)
    hot.load_adapter("x", hot_dir / ADAPTER_FILE)
    np.testing.assert_allclose(hidden(hot.session, hot.run_options("x")), expected, rtol=1e-4, atol=2e-5)
    assert not np.allclose(expected, base, atol=1e-3)


def test_an_architecture_without_an_onnx_export_is_refused_before_any_work(tmp_path):
    """Mamba has no ONNX config in optimum-onnx: the load stage says so and names what is supported."""
    from transformers import MambaConfig, MambaForCausalLM

    from conftest import ADAPTER_TABLE

    from edge_lora.errors import ModelError
    from edge_lora.pipeline import run_export

    MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)).save_pretrained(
        tmp_path / "mamba")
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    with pytest.raises(ModelError) as err:
        run_export(tmp_path / "mamba", tmp_path / "adapter", "cpu-fp32", tmp_path / "out", show_progress=False)
    for word in ("stage 'load'", "model type 'mamba'", "no ONNX export", "gemma", "llama", "qwen2"):
        assert word in str(err.value), (word, str(err.value))
    assert not (tmp_path / "out").exists()


def test_save_load_round_trip(arch, tmp_path):
    """PEFT's file → edge_lora → save_peft → edge_lora again: the same factors and scales, module by module."""
    from edge_lora.adapter import save_peft

    kind, peft, _, _ = arch
    folder = tmp_path / "adapter"
    peft.save_pretrained(folder)
    first = load_peft(folder)
    second = load_peft(save_peft(first, tmp_path / "again"))
    assert first.modules.keys() == second.modules.keys(), kind
    for name, m in first.modules.items():
        torch.testing.assert_close(second.modules[name].delta(), m.delta(), rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind, profile", [("gemma", "cpu-hotswap"),
                                           pytest.param("gemma2", "cpu-fp32", marks=pytest.mark.slow)])
def test_gemma_exports_and_validates_through_the_cli(kind, profile, tmp_path):
    """What failed for users: Gemma's export declares no position_ids, and validation's decode loop fed them."""
    import json

    from test_cli import run_cli

    tiny_model(kind).save_pretrained(tmp_path / "base")
    make_peft_adapter(kind, dict(r=4, lora_alpha=8, target_modules="all-linear"), tmp_path / "adapter")
    out = run_cli("export", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--profile", profile,
                  "--out", tmp_path / "out", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    v = next(s for s in report["stages"] if s["stage"] == "validate")["metrics"]
    assert report["status"] == "PASSED" and v["generation_agreement"] == 1.0 and v["top1_agreement"] == 1.0


def test_modules_to_save_is_refused_for_hotswap_with_the_merged_alternative(tmp_path):
    """A trained full copy of a module (modules_to_save) is not a low-rank update: hot-swap says so and names the
    merged profile, which carries it."""
    from peft import LoraConfig, get_peft_model

    from edge_lora.errors import CompatibilityError
    from edge_lora.pipeline import run_export

    tiny_model("llama").save_pretrained(tmp_path / "base")
    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                          modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)   # trained: no longer the base's copy
    peft.save_pretrained(tmp_path / "adapter")
    with pytest.raises(CompatibilityError, match="modules_to_save.*merged profile \\(cpu-fp32\\)"):
        run_export(tmp_path / "base", tmp_path / "adapter", "cpu-hotswap", tmp_path / "hot", show_progress=False)
    assert not (tmp_path / "hot").exists()
