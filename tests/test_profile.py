"""Latency and memory profiling on tiny exports: the report's fields and raw samples, A B A B interleaving,
ORT format == ONNX, and bad inputs (not an export, missing provider, missed budget) failing cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ADAPTER_TABLE, make_peft_adapter

from edge_lora.adapter import load_peft
from edge_lora.cli import main
from edge_lora.errors import BudgetError, ProfileError
from edge_lora.base import tiny_model
from edge_lora.config import ExportConfig
from edge_lora.runtimes import Runner, SwapRunner, open_runner
from edge_lora.runtimes.mobile import MobileRunner
from edge_lora.runtimes.ort_cpu import OrtCpuRunner
from edge_lora.runtimes.ort_session import full_feeds, probe_ids
from edge_lora.stages.export_onnx import (
    ADAPTER_FILE,
    export_hotswap,
    export_merged,
    read_meta,
    write_ort_adapter,
)
from edge_lora.stages.merge import merge
from edge_lora.stages.profile import ProfileConfig, folder_variants, run_profile
from edge_lora.stages.profile_report import write_report

FAST = ProfileConfig(runs=3, warmup=1, decode_tokens=4, prompt_lengths=[8, 24], encoder_batch_sizes=[1, 2])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny llama: merged export of X, hot-swap export (written with X), Y's adapter file; a tiny bert export."""
    tmp = tmp_path_factory.mktemp("profile")
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp / "x", seed=0)
    make_peft_adapter(kind, kwargs, tmp / "y", seed=5)
    x, y = load_peft(tmp / "x"), load_peft(tmp / "y")
    folders = {name: tmp / name for name in ("merged", "hotswap", "bert")}
    for folder in folders.values():
        folder.mkdir()
    export_merged(merge(tiny_model(kind), x)[0], None, folders["merged"])
    export_hotswap(tiny_model(kind), None, x, folders["hotswap"], ExportConfig(mode="hotswap"))
    export_merged(tiny_model("bert"), None, folders["bert"])
    write_ort_adapter(y, tmp / "y.onnx_adapter", set(read_meta(folders["hotswap"]).lora_inputs))
    folders["y"] = tmp / "y.onnx_adapter"
    return folders


def test_report_has_every_field_and_the_raw_samples(exports, tmp_path):
    variants = folder_variants(exports["hotswap"], "ort_cpu", 1, [str(exports["hotswap"] / ADAPTER_FILE),
                                                                  str(exports["y"])])
    assert [v.adapter is None for v in variants] == [True, False, False]
    result = run_profile(variants, FAST)
    write_report(tmp_path / "report", result)
    on_disk = json.loads((tmp_path / "report" / "profile.json").read_text())
    assert {"profile.json", "profile.md", "decode_ms.png", "prefill_ms.png"} <= {
        p.name for p in (tmp_path / "report").iterdir()}
    assert {"cpu", "logical_cores", "onnxruntime", "threads", "load_average_start"} <= set(on_disk["machine"])
    assert on_disk["prompt_lengths"] == [8, 24] and on_disk["budget_failures"] == []
    for v in on_disk["variants"]:
        assert v["runner"] == "ort_cpu 1t fp32" and v["info"]["provider"] == "CPUExecutionProvider"
        assert v["load_s"]["fresh_process"] > 0 and v["load_s"]["in_process"] > 0
        mem = v["memory"]
        assert mem["measured"] == "fresh process" and 0 < mem["baseline_rss_mb"] < mem["peak_rss_mb"] < 1000
        assert mem["torch_loaded"] is False   # the measured process holds the runtime and the model, not torch
        for n in ("8", "24"):
            assert len(v["prefill_ms"][n]["samples"]) == FAST.runs and v["ttft_ms"][n] == v["prefill_ms"][n]["p50"]
        decode = v["decode_ms"]
        assert [len(r) for r in decode["samples"]] == [FAST.decode_tokens] * FAST.runs
        assert decode["n"] == FAST.runs * FAST.decode_tokens and decode["p50"] <= decode["p90"] <= decode["p99"]
        assert v["tokens_per_s"] > 0 and len(v["swap_ms"]["samples"]) == FAST.runs
        assert v["first_prefill_ms"]["prompt_length"] == 8 and len(v["first_prefill_ms"]["samples"]) == FAST.runs
    assert on_disk["variants"][0]["adapter_file_mb"] is None and on_disk["variants"][2]["adapter_file_mb"] > 0
    assert [c["variant"] for c in on_disk["comparisons"]] == [v.label for v in variants[1:]]
    ratio = on_disk["comparisons"][0]["decode_ratio"]
    assert len(ratio["per_round"]) == FAST.runs and ratio["p25"] <= ratio["median"] <= ratio["p75"]
    markdown = (tmp_path / "report" / "profile.md").read_text()
    assert "PASSED" in markdown.splitlines()[0] and "ort_cpu 1t fp32" in markdown and "×" in markdown


def test_variants_run_interleaved_a_b_a_b(exports):
    variants = (folder_variants(exports["merged"], "ort_cpu", 1, name="A")
                + folder_variants(exports["hotswap"], "ort_cpu", 1, [], name="B"))
    result = run_profile(variants, ProfileConfig(**{**FAST.__dict__, "isolate": False}))
    assert [(s["round"], s["variant"]) for s in result["schedule"]] == [
        (r, label) for r in range(FAST.runs) for label in ("A", "B no adapter")]
    assert "shared process" in result["variants"][0]["memory"]["measured"]
    assert any("isolate = false" in n for n in result["notes"])


def test_encoder_export_reports_latency_per_batch(exports):
    result = run_profile(folder_variants(exports["bert"], "ort_cpu", 1), FAST)
    v = result["variants"][0]
    assert result["kind"] == "encoder" and "decode_ms" not in v
    assert set(v["encode_ms"]) == {"1x8", "1x24", "2x8", "2x24"}
    assert all(len(s["samples"]) == FAST.runs for s in v["encode_ms"].values())


@pytest.mark.parametrize("name", ["merged", "hotswap"])
def test_ort_format_model_gives_the_onnx_outputs(exports, name):
    folder = exports[name]
    onnx_runner, ort_runner = OrtCpuRunner(folder, threads=1), MobileRunner(folder, threads=1)
    assert ort_runner.model_path.suffix == ".ort" and "not a phone" in ort_runner.name
    assert isinstance(ort_runner, Runner) and isinstance(ort_runner, SwapRunner)
    for adapter in ([None, folder / ADAPTER_FILE, exports["y"]] if name == "hotswap" else [None]):
        if adapter is not None or name == "hotswap":
            onnx_runner.swap(adapter)
            ort_runner.swap(adapter)
        ids = probe_ids(128, 12, seed=4)
        outs = [r.session.run(None, full_feeds(r.session, ids), r.active_run_options())[0]
                for r in (onnx_runner, ort_runner)]
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5, err_msg=f"adapter {adapter}")
        tokens = []
        for r in (onnx_runner, ort_runner):
            seq = [r.prefill(ids[0].tolist())]
            for _ in range(5):
                seq.append(r.decode(seq[-1]))
            tokens.append(seq)
        assert tokens[0] == tokens[1]
    cached = Path(ort_runner.model_path).stat().st_mtime_ns
    assert MobileRunner(folder, threads=2).model_path.stat().st_mtime_ns == cached   # converted once, reused


def test_precision_label_follows_the_weights(exports, tmp_path):
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in ("config.json", "edge_lora.json"):
        shutil.copy(exports["merged"] / name, tmp_path / name)
    quantize_dynamic(exports["merged"] / "model.onnx", tmp_path / "model.onnx", weight_type=QuantType.QInt8)
    assert OrtCpuRunner(tmp_path, threads=1).name == "ort_cpu 1t int8"
    assert OrtCpuRunner(exports["hotswap"], threads=1).name == "ort_cpu 1t fp32"


def test_mobile_refuses_phone_unlike_settings(exports):
    with pytest.raises(ProfileError, match="1 or 2 threads"):
        MobileRunner(exports["merged"], threads=4)


def test_meta_file_name_matches_the_exporter():
    from edge_lora.runtimes import ort_cpu
    from edge_lora.stages import export_onnx

    assert ort_cpu.META_FILE == export_onnx.META_FILE


# ------------------------------------------------------------------------------------------ bad inputs
def test_a_folder_that_is_not_an_export_exits_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["profile", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not an edge_lora export folder" in err and "Traceback" not in err
    assert main(["profile", str(tmp_path / "missing"), "--quiet"]) == 2


def test_unavailable_provider_is_a_clear_message(exports, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider; the missing-provider path cannot be exercised here")
    assert main(["profile", str(exports["merged"]), "--runtime", "ort_cuda", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "CUDAExecutionProvider is not available: install edge_lora[cuda]" in err and "Traceback" not in err


def test_bad_options_are_profile_errors(exports, capsys):
    assert main(["profile", str(exports["merged"]), "--runtime", "tpu", "--quiet"]) == 2
    assert main(["profile", str(exports["merged"]), "--set", "profiling.prompt_lengths=a,b", "--quiet"]) == 2
    assert main(["profile", str(exports["merged"]), "--adapters", "x.onnx_adapter", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "runtime = 'tpu'" in err and "list of positive integers" in err and "needs a hot-swap export" in err


def test_budget_miss_writes_the_report_and_exits_3(exports, tmp_path, capsys):
    out = tmp_path / "prof"
    code = main(["profile", str(exports["hotswap"]), "--out", str(out), "--quiet", "--runs", "2",
                 "--decode-tokens", "2", "--prompt-lengths", "8", "--set", "profiling.max_decode_ms_per_token=1e-6",
                 "--set", "profiling.max_adapter_file_mb=1e-6"])
    assert code == 3
    result = json.loads((out / "profile.json").read_text())
    fails = result["budget_failures"]
    assert any("ms/token (p50) above the budget" in f for f in fails) and any("adapter file" in f for f in fails)
    assert "FAILED" in (out / "profile.md").read_text().splitlines()[0]
    assert "profile budget missed" in capsys.readouterr().err
    # an existing --out is not replaced without --force
    assert main(["profile", str(exports["hotswap"]), "--out", str(out), "--quiet"]) == 2


def test_pipeline_stage_reports_and_fails_on_a_budget(exports, tmp_path):
    from edge_lora.pipeline import run_export

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    tiny_model(kind).save_pretrained(tmp_path / "base")
    profile = tmp_path / "p.toml"
    profile.write_text('[profile]\nstages = ["export", "profiling"]\n[export]\nmode = "hotswap"\n'
                       '[profiling]\nruntime = "mobile"\nthreads = 1\nruns = 2\ndecode_tokens = 2\n'
                       'prompt_lengths = [8]\nmax_peak_rss_mb = 1.0\n')
    out = tmp_path / "out"
    with pytest.raises(BudgetError, match="profiling budget missed: .*peak RSS"):
        run_export(tmp_path / "base", tmp_path / "adapter", profile, out, show_progress=False)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "FAILED"
    assert [s["stage"] for s in report["stages"]] == ["load", "export", "profiling"]
    metrics = report["stages"][-1]["metrics"]
    assert metrics["budget_failures"] and "export + adapter: decode_ms_p50" in metrics
    assert (out / "profile" / "profile.json").is_file() and (out / "model.ort").is_file()


def test_open_runner_names_the_runtime(exports):
    runner = open_runner("ort_cpu", exports["merged"], threads=1)
    assert runner.name == "ort_cpu 1t fp32" and runner.info["vocab_size"] == 128
    first = runner.prefill([1, 2, 3])
    assert isinstance(first, int) and isinstance(runner.decode(first), int)
    runner.close()


def test_mobile_int4_profile_parses():
    from edge_lora.config import load_profile   # every stage's table is known without importing the pipeline

    profile = load_profile("mobile-int4")
    assert profile.stages[-1] == "profiling" and profile.config("profiling").runtime == "mobile"
    assert profile.config("quantize").embedding == "fp32"   # ORT format cannot load int4 tensors
    assert all(getattr(profile.config("profiling"), b) > 0 for b in (
        "max_decode_ms_per_token", "max_peak_rss_mb", "max_adapter_file_mb"))


@pytest.mark.slow
def test_smollm2_hotswap_profile(tmp_path):
    """SmolLM2 hot-swap export (no validation), profiled on the mobile emulation (ORT format)."""
    from edge_lora.base import cache_dir
    from edge_lora.pipeline import run_export

    adapter = cache_dir() / "adapters" / "date-iso-r16"
    if not adapter.is_dir():
        pytest.skip(f"trained demo adapter {adapter} missing; tools/train_demo_adapter.py makes it")
    profile = tmp_path / "p.toml"
    profile.write_text('[profile]\nstages = ["export", "profiling"]\n[export]\nmode = "hotswap"\n'
                       '[profiling]\nruntime = "mobile"\nruns = 2\ndecode_tokens = 8\nprompt_lengths = [16, 128]\n')
    report = run_export("smollm2", adapter, profile, tmp_path / "out", show_progress=False)
    metrics = report["stages"][-1]["metrics"]
    assert metrics["export + adapter: runner"].startswith("mobile ort-format 2t fp32")
    assert 300 < metrics["export + adapter: peak_rss_mb"] < 4000
    assert metrics["export + adapter: swap_ms_p50"] > 0
