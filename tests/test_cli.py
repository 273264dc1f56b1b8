"""The CLI as a user runs it: real subprocesses, real exit codes, real files."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ADAPTER_TABLE, make_peft_adapter
from edge_lora.base import tiny_model


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_lora", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for verb in ("inspect", "models"):
        assert verb in out.stdout


def test_inspect_json_against_compatible_and_incompatible_base(tmp_path):
    kind, kwargs = ADAPTER_TABLE["llama-patterns-rslora"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    tiny_model("bert").save_pretrained(tmp_path / "bert")

    ok = run_cli("inspect", tmp_path / "adapter", "--base", tmp_path / "llama", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["compatible"] is True
    ranks = {m["name"]: m["rank"] for m in report["modules"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 6 and ranks["model.layers.0.mlp.down_proj"] == 2
    assert report["totals"]["params"] == sum(m["params"] for m in report["modules"])
    assert all(len(m["singular_values"]) == m["rank"] for m in report["modules"])

    bad = run_cli("inspect", tmp_path / "adapter", "--base", tmp_path / "bert", "--json")
    assert bad.returncode == 2
    assert any("not found in the base model" in p for p in json.loads(bad.stdout)["problems"])

    table = run_cli("inspect", tmp_path / "adapter", "--base", tmp_path / "bert")
    assert table.returncode == 2 and "NOT compatible" in table.stdout


def test_bad_adapter_path_is_a_clean_error(tmp_path):
    out = run_cli("inspect", tmp_path / "missing")
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
