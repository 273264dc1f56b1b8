"""Real-model export tests (slow): SmolLM2 with the trained demo adapter in both modes, hot-swapping on
SmolLM2, and the MiniLM encoder in both modes. Run with ``pytest -m slow``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_lora.base import cache_dir

pytestmark = pytest.mark.slow

DEMO = cache_dir() / "adapters" / "date-iso-r16"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(base: str, folder, seed: int, targets, scale: float = 0.002):
    """A PEFT adapter with small random factors: right for equality checks, not for accuracy claims."""
    from peft import LoraConfig, get_peft_model

    from edge_lora.base import load_base

    model, _ = load_base(base)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                  init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.save_pretrained(str(folder))
    return peft_model.eval()


@pytest.mark.skipif(not (DEMO / "adapter_model.safetensors").is_file(),
                    reason="demo adapter not trained yet: python tools/train_demo_adapter.py")
@pytest.mark.parametrize("profile", ["cpu-fp32", "cpu-hotswap"])
def test_smollm2_demo_adapter_meets_budgets(tmp_path, profile):
    from edge_lora.pipeline import run_export

    report = run_export("smollm2", DEMO, profile, tmp_path / "out", show_progress=False)
    metrics = next(s for s in report["stages"] if s["stage"] == "validate")["metrics"]
    assert report["status"] == "PASSED"
    assert metrics["top1_agreement"] >= 0.999
    assert metrics["exact_match_reference"] - metrics["exact_match_candidate"] <= 0.01
    assert metrics["exact_match_reference"] > 0.5   # the adapter learned the task, so the check means something


@pytest.mark.skipif(not (DEMO / "adapter_model.safetensors").is_file(),
                    reason="demo adapter not trained yet: python tools/train_demo_adapter.py")
@pytest.mark.parametrize("profile", ["cpu-fast", "cpu-fast-hotswap"])
def test_smollm2_fast_profiles_run_the_fused_graph_and_meet_the_bar(tmp_path, profile):
    from edge_lora.formats.export_meta import ExportMeta
    from edge_lora.pipeline import run_export

    report = run_export("smollm2", DEMO, profile, tmp_path / "out", show_progress=False)
    metrics = next(s for s in report["stages"] if s["stage"] == "validate")["metrics"]
    assert report["status"] == "PASSED"
    assert ExportMeta.read(tmp_path / "out").graph == "fused"
    assert metrics["top1_agreement"] >= 0.97 and metrics["top1_agreement_general"] >= 0.93
    assert metrics["exact_match_reference"] - metrics["exact_match_candidate"] <= 0.02


def test_smollm2_hotswap_base_x_y_x(tmp_path):
    """One hot-swap session on SmolLM2: no adapter == PyTorch base, X == PEFT X, Y == PEFT Y, back to X."""
    from edge_lora.adapter import load_peft
    from edge_lora.base import load_base
    from edge_lora.config import ExportConfig
    from edge_lora.runtimes.hotswap import HotswapSession
    from edge_lora.runtimes.ort_session import full_feeds
    from edge_lora.stages.export_onnx import ADAPTER_FILE, export_hotswap, write_ort_adapter

    peft_x = random_adapter("smollm2", tmp_path / "x", 1, PROJECTIONS)
    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 24))
    with torch.no_grad():
        expected = {"x": peft_x(input_ids=torch.from_numpy(ids)).logits.numpy()}
        with peft_x.disable_adapter():
            expected[None] = peft_x(input_ids=torch.from_numpy(ids)).logits.numpy()
    del peft_x
    peft_y = random_adapter("smollm2", tmp_path / "y", 2, PROJECTIONS)
    with torch.no_grad():
        expected["y"] = peft_y(input_ids=torch.from_numpy(ids)).logits.numpy()
    del peft_y

    out = tmp_path / "hs"
    out.mkdir()
    model, tok = load_base("smollm2")
    export_hotswap(model, tok, load_peft(tmp_path / "x"), out, ExportConfig(mode="hotswap"))
    write_ort_adapter(load_peft(tmp_path / "y"), tmp_path / "y.onnx_adapter")
    session = HotswapSession(out)
    session.load_adapter("x", out / ADAPTER_FILE)
    session.load_adapter("y", tmp_path / "y.onnx_adapter")
    feeds = full_feeds(session.session, ids)
    for name in [None, "x", "y", "x", None]:
        got = session.run(feeds, adapter=name)[0]
        np.testing.assert_allclose(got, expected[name], atol=2e-3, rtol=1e-3, err_msg=f"adapter {name}")
        assert (got.argmax(-1) == expected[name].argmax(-1)).mean() >= 0.99


@pytest.mark.parametrize("profile", ["cpu-fp32", "cpu-hotswap"])
def test_minilm_encoder_both_modes(tmp_path, profile):
    from edge_lora.pipeline import run_export

    random_adapter("minilm", tmp_path / "adapter", 3, ["query", "value"], scale=0.02)
    report = run_export("minilm", tmp_path / "adapter", profile, tmp_path / "out", show_progress=False)
    metrics = next(s for s in report["stages"] if s["stage"] == "validate")["metrics"]
    assert report["status"] == "PASSED" and metrics["hidden_rel_error"] < 1e-4
    assert metrics["reference_vs_base_rel_diff"] > 1e-3   # the adapter changes the output


def test_smollm2_packed_projections_keep_outputs(tmp_path):
    """SmolLM2 exported with and without packed q/k/v and gate/up: same logits, 2 of 5 MatMuls per layer."""
    import onnx

    from edge_lora.base import load_base
    from edge_lora.config import ExportConfig
    from edge_lora.runtimes.ort_session import full_feeds, load_session
    from edge_lora.stages.export_onnx import export_merged

    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 24))
    logits, matmuls = {}, {}
    for fuse in (True, False):
        out = tmp_path / f"fuse-{fuse}"
        out.mkdir()
        model, tok = load_base("smollm2")
        export_merged(model, tok, out, ExportConfig(fuse_projections=fuse))
        del model
        session = load_session(out)
        logits[fuse] = session.run(None, full_feeds(session, ids))[0]
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        matmuls[fuse] = sum(n.op_type == "MatMul" for n in graph.node)
    np.testing.assert_allclose(logits[True], logits[False], rtol=1e-5, atol=1e-4)
    assert matmuls[False] - matmuls[True] == 3 * 30   # 30 layers: q,k,v → 1 and gate,up → 1
