"""The chain a user runs, end to end on SmolLM2 with the trained demo adapter (slow): compress --bits → export
--profile cpu-int4-hotswap → package → install --export (ort probe) → profile of the installed file. The same code
writes BENCHMARKS.md's "Chain" section (tools/bench_chain.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def test_compressed_mixed_adapter_ships_installs_and_runs(tmp_path):
    from bench_chain import run_chain

    from edge_lora.formats import ort_adapter

    result = run_chain(tmp_path / "chain", bits="mixed:3.0", budget=0.2, runs=2, task_examples=64,
                       rows=("compressed",))
    row = result["rows"][0]
    shipped = ort_adapter.read(row.installed)
    assert shipped.is_quantized   # the compress codes themselves, not a float expansion
    assert result["fp16_peft_bytes"] / row.adapter_bytes > 10
    assert row.package_bytes < 1.2 * row.adapter_bytes
    assert row.probe.startswith("probe ort: passed")
    m = row.validate
    assert row.status == "PASSED", m
    assert m["exact_match_reference"] > 0.5 and m["exact_match_base"] < 0.2   # a task the base cannot do
    assert m["retention"] >= 0.9
    variant = next(v for v in result["profile"]["variants"] if v.get("adapter"))
    assert variant["swap_ms"]["p50"] > 0
    comparison = next(c for c in result["profile"]["comparisons"] if c["variant"] == variant["label"])
    assert comparison["decode_ratio"]["median"] < 1.5
