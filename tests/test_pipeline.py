"""The export pipeline on tiny models: reports, atomic output, and every bad input failing cleanly."""

from __future__ import annotations

import dataclasses

import json

import pytest
from conftest import ADAPTER_TABLE, make_peft_adapter

from edge_lora.errors import CompatibilityError, EdgeLoraError, ProfileError
from edge_lora.base import tiny_model
from edge_lora.formats.export_meta import ExportMeta
from edge_lora.pipeline import run_export, run_validate


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp / "adapter")
    tiny_model("llama").save_pretrained(tmp / "llama")
    tiny_model("bert").save_pretrained(tmp / "bert")
    return tmp


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("profile", ["cpu-fp32", "cpu-hotswap"])
def test_export_writes_model_and_reports(inputs, tmp_path, profile):
    out = tmp_path / "out"
    report = run_export(inputs / "llama", inputs / "adapter", profile, out, show_progress=False)
    assert report["status"] == "PASSED"
    assert [s["stage"] for s in report["stages"]][0] == "load"
    assert {"model.onnx", "edge_lora.json", "report.json", "report.md", "config.json"} <= {p.name for p in out.iterdir()}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["status"] == "PASSED" and on_disk["profile"]["name"] == profile
    validate = next(s for s in on_disk["stages"] if s["stage"] == "validate")
    assert validate["metrics"]["top1_agreement"] == 1.0 and validate["input_hash"]
    assert "PASSED" in (out / "report.md").read_text().splitlines()[0]
    meta = json.loads((out / "edge_lora.json").read_text())
    assert meta["adapter_sha256"] == report["adapter_sha256"] and meta["base_sha256"]
    assert leftovers(tmp_path) == []
    # validate DIR re-runs the validation from what edge_lora.json recorded
    again = run_validate(out, show_progress=False)
    assert again["status"] == "PASSED" and [s["stage"] for s in again["stages"]][-1] == "validate"


def test_existing_output_is_refused_unless_force(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgeLoraError, match="already exists.*--force"):
        run_export(inputs / "llama", inputs / "adapter", "cpu-fp32", out, show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    run_export(inputs / "llama", inputs / "adapter", "cpu-fp32", out, force=True, show_progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert leftovers(tmp_path) == []


def test_adapter_for_another_base_fails_before_export(inputs, tmp_path, monkeypatch):
    from edge_lora.stages import export_onnx

    def no_export(*a, **k):
        raise AssertionError("export ran")

    monkeypatch.setattr(export_onnx, "optimum_export", no_export)
    out = tmp_path / "out"
    with pytest.raises(CompatibilityError, match=r"(?s)stage 'load' failed \(first stage\).*not found in the base"):
        run_export(inputs / "bert", inputs / "adapter", "cpu-fp32", out, show_progress=False)
    assert not out.exists() and leftovers(tmp_path) == []


def test_unknown_profile_key_fails_before_any_work(inputs, tmp_path):
    with pytest.raises(ProfileError, match="Valid keys"):
        run_export(inputs / "llama", inputs / "adapter", "cpu-fp32", tmp_path / "out",
                   overrides=["validate.min_top1=0.5"], show_progress=False)
    assert not (tmp_path / "out").exists()


def test_budget_miss_exits_3_and_writes_a_failed_report(inputs, tmp_path, capsys):
    from edge_lora.cli import main

    out = tmp_path / "out"
    # KL is ~1e-14 here; a negative budget cannot be met
    code = main(["export", "--base", str(inputs / "llama"), "--adapter", str(inputs / "adapter"), "--profile",
                 "cpu-fp32", "--out", str(out), "--quiet", "--set", "validate.max_mean_kl=-1"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "budget" in captured.err and "PASSED" not in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "FAILED" and any("mean KL" in f for f in report["budget_failures"])
    assert (out / "report.md").read_text().startswith("# edge_lora export: FAILED")
    # re-validating with the budget fixed passes and rewrites the report
    run_validate(out, overrides=["validate.max_mean_kl=1e-4"], show_progress=False)
    assert json.loads((out / "report.json").read_text())["status"] == "PASSED"


def test_validate_budget_miss_in_process_raises_budget_error(inputs, tmp_path):
    from edge_lora.errors import BudgetError

    out = tmp_path / "out"
    with pytest.raises(BudgetError, match="top-1 agreement"):
        run_export(inputs / "llama", inputs / "adapter", "cpu-hotswap", out, show_progress=False,
                   overrides=["validate.min_top1_agreement=1.5"])
    assert json.loads((out / "report.json").read_text())["status"] == "FAILED"


def test_cli_help_describes_export_and_validate(capsys):
    from edge_lora.cli import build_parser

    for verb in ("export", "validate"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([verb, "--help"])
    assert "--profile" in capsys.readouterr().out


def test_compressed_adapter_exports_hotswap_with_shared_factors(inputs, tmp_path):
    """`export --adapter DIR` takes a folder written by `compress`: the hot-swap export keeps its shared factor
    as one graph input, the adapter file holds it once, and validation compares with the original adapter."""
    import onnxruntime as ort

    from edge_lora.adapter import load_peft
    from edge_lora.stages.compress import CompressConfig, compress

    compressed, _ = compress(load_peft(inputs / "adapter"), CompressConfig(budget=0.3, structure="shared-out"))
    compressed = dataclasses.replace(compressed, source=str(inputs / "adapter"))
    compressed.save(tmp_path / "compressed")
    out = tmp_path / "out"
    report = run_export(inputs / "llama", tmp_path / "compressed", "cpu-hotswap", out, show_progress=False,
                        overrides=["validate.min_top1_agreement=0", "validate.max_mean_kl=10",
                                   "validate.min_generation_agreement=0", "validate.max_hidden_rel_error=10"])
    meta = ExportMeta.read(out)   # paths are stored relative to the export folder
    assert meta.path("reference_adapter").resolve() == (inputs / "adapter").resolve()
    params = ort.AdapterFormat.read_adapter(str(out / "adapter.onnx_adapter")).get_parameters()
    shared = [n for n in params if n.endswith(".U")]
    assert shared and len(shared) == len(set(shared)) <= 7          # one U per module type, not per layer
    validate = next(s for s in report["stages"] if s["stage"] == "validate")
    assert 0 < validate["metrics"]["mean_kl"] < 10                   # lossy against the original, and measured
    again = run_validate(out, show_progress=False, overrides=["validate.min_top1_agreement=0",
                                                              "validate.max_mean_kl=10",
                                                              "validate.min_generation_agreement=0"])
    assert again["status"] == "PASSED"


def test_compressed_adapter_without_its_original_is_refused(inputs, tmp_path):
    from edge_lora.adapter import load_peft
    from edge_lora.stages.compress import CompressConfig, compress

    compressed, _ = compress(load_peft(inputs / "adapter"), CompressConfig(budget=0.3, structure="shared-out"))
    compressed = dataclasses.replace(compressed, source=str(tmp_path / "gone"))
    compressed.save(tmp_path / "compressed")
    with pytest.raises(CompatibilityError, match="original adapter"):
        run_export(inputs / "llama", tmp_path / "compressed", "cpu-hotswap", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_output_folders_replace_files_and_collect_what_killed_runs_left(tmp_path):
    """--force over a file leaves no .NAME.old-PID behind; a temporary folder of a killed run (its process gone)
    is removed by the next run for the same output, one of a live process is left alone."""
    import os
    import subprocess
    import sys

    from edge_lora.files import atomic_folder

    out = tmp_path / "out"
    out.write_text("a file where the folder goes")
    with atomic_folder(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()
    (tmp_path / f".out.old-{dead}").write_text("x")
    live = tmp_path / f".out.tmp-{os.getppid()}-def"
    live.mkdir()
    with atomic_folder(out) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])
