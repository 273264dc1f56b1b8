"""Factor quantization: error bounds per scheme, bit-exact packing, mixed allocation within budget, file round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_lora.adapter import Adapter, LoraModule
from edge_lora.errors import AdapterError, BudgetError
from edge_lora.stages.canonicalize import canonicalize, relative_error
from edge_lora.formats.quantized_factors import unpack_rows
from edge_lora.stages.quantize_factors import (
    BitBudgetError,
    FactorQuantConfig,
    QuantizeError,
    load_quantized,
    pack_codes,
    parse_bits,
    quantize_factors,
    quantize_rows,
    save_quantized,
    unpack_codes,
)


def steep_adapter(layers=3, d_out=96, d_in=80, r=8, seed=0) -> Adapter:
    """A canonical adapter with a steep spectrum, like trained ones (random factors have flat spectra)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(layers):
        U, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))
        S = 2.0 ** -torch.arange(r, dtype=torch.float64)
        name = f"model.layers.{layer}.mlp.up_proj"
        modules[name] = LoraModule(name=name, kind="linear", A=(S.sqrt()[:, None] * V.T).float(),
                                   B=(U * S.sqrt()).float(), scale=1.0, alpha=r, singular_values=S.float())
    return Adapter(modules=modules, config={"peft_type": "LORA", "r": r, "lora_alpha": r}, form="canonical")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("d,g", [(64, 16), (70, 32), (10, 64)])  # 70 % 32 != 0: a short last group
def test_elementwise_error_within_half_a_step(bits, symmetric, d, g):
    x = np.random.default_rng(bits * 100 + d).standard_normal((3, d))
    q = quantize_rows(x, [bits] * 3, g, symmetric)
    err = np.abs(q.dequantize() - x)
    for i in range(3):
        for k, start in enumerate(range(0, d, g)):
            step = float(q.scales[i, k])
            # half a step from rounding, plus fp16 rounding of the scale itself
            assert err[i, start:start + g].max() <= step * (0.5 + 1e-3 * 2 ** bits) + 1e-6


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 200), seed=st.integers(0, 1000))
def test_packing_roundtrip_is_bit_exact(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert len(packed) == math.ceil(n * bits / 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, n), codes)


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 6), n=st.integers(1, 100), seed=st.integers(0, 1000))
def test_unpacking_rows_at_once_equals_row_by_row(bits, rows, n, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, n)).astype(np.uint8)
    packed = np.concatenate([pack_codes(c, bits) for c in codes])
    np.testing.assert_array_equal(unpack_rows(packed, bits, rows, n), codes)


@pytest.mark.parametrize("avg_bits", [2.5, 3.0, 4.5])
def test_mixed_allocation_meets_budget_and_beats_uniform(avg_bits):
    adapter = steep_adapter()
    q, report = quantize_factors(adapter, FactorQuantConfig(bits=None, mixed_avg_bits=avg_bits, group_size=16))
    assert q.bits_per_param() <= avg_bits
    assert q.bits_per_param() > avg_bits - 0.5  # the budget is used, not wasted
    uniform, ureport = quantize_factors(adapter, FactorQuantConfig(bits=2, group_size=16))
    if uniform.bits_per_param() <= avg_bits:
        assert report.metrics["rel_error_weighted"] < ureport.metrics["rel_error_weighted"]


def test_more_bits_less_error_and_reported_error_is_real():
    adapter = steep_adapter()
    errs = []
    for bits in (2, 3, 4, 8):
        q, report = quantize_factors(adapter, FactorQuantConfig(bits=bits, group_size=16))
        deq = q.dequantize(adapter)
        worst = max(relative_error(adapter.modules[n], deq.modules[n]) for n in adapter.modules)
        assert worst == pytest.approx(report.metrics["rel_error_worst"], rel=1e-6)
        errs.append(report.metrics["rel_error_weighted"])
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01


def test_file_roundtrip_gives_identical_dequantized_factors(tmp_path):
    adapter = steep_adapter()
    for cfg in (FactorQuantConfig(bits=3, group_size=32, symmetric=False),
                FactorQuantConfig(bits=None, mixed_avg_bits=3.0, group_size=16)):
        q, _ = quantize_factors(adapter, cfg)
        path = save_quantized(q, tmp_path / "q.safetensors")
        back = load_quantized(path)
        a, b = q.dequantize(adapter), back.dequantize(adapter)
        for n in adapter.modules:
            torch.testing.assert_close(a.modules[n].A, b.modules[n].A, rtol=0, atol=0)
            torch.testing.assert_close(a.modules[n].B, b.modules[n].B, rtol=0, atol=0)
        # honest size: the file is no smaller than the payload we claim
        assert path.stat().st_size * 8 >= q.payload_bits()


def test_real_peft_adapter_via_canonical_form(tmp_path):
    from conftest import ADAPTER_TABLE, make_peft_adapter

    from edge_lora.adapter import load_peft

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "a")
    raw = load_peft(tmp_path / "a")
    with pytest.raises(AdapterError, match="canonical form"):
        quantize_factors(raw, FactorQuantConfig(bits=8))
    canonical, _ = canonicalize(raw)
    q, report = quantize_factors(canonical, FactorQuantConfig(bits=8, group_size=16))
    assert report.metrics["rel_error_worst"] < 0.01


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "bits=5 is not supported"),
    (dict(bits=None), "exactly one of"),
    (dict(bits=4, mixed_avg_bits=3.0), "exactly one of"),
    (dict(bits=4, group_size=4), "group_size"),
])
def test_bad_settings(kwargs, match):
    # a config is checked when it is made, before any work
    with pytest.raises(QuantizeError, match=match):
        quantize_factors(steep_adapter(), FactorQuantConfig(**kwargs))


def test_bit_budget_below_minimum():
    import re

    with pytest.raises(BitBudgetError, match="minimum for this adapter is") as err:
        quantize_factors(steep_adapter(), FactorQuantConfig(bits=None, mixed_avg_bits=0.1, group_size=16))
    assert isinstance(err.value, BudgetError) and err.value.exit_code == 2   # a setting, known before any work
    minimum = float(re.search(r"is ([0-9.]+) bits/param", str(err.value)).group(1))
    q, _ = quantize_factors(steep_adapter(), FactorQuantConfig(bits=None, mixed_avg_bits=minimum, group_size=16))
    assert 0 < q.bits_per_param() <= minimum


@pytest.mark.parametrize("text,expected", [("8", dict(bits=8, mixed_avg_bits=None)),
                                           ("2", dict(bits=2, mixed_avg_bits=None)),
                                           ("1", dict(bits=1, mixed_avg_bits=None)),
                                           ("mixed:2.5", dict(bits=None, mixed_avg_bits=2.5)),
                                           ("MIXED:3", dict(bits=None, mixed_avg_bits=3.0))])
def test_parse_bits(text, expected):
    assert parse_bits(text) == expected


@pytest.mark.parametrize("text", ["5", "0", "16", "4.0", "int4", "", "mixed:abc", "mixed:", "mixed:0", "mixed:inf"])
def test_parse_bits_refuses(text):
    with pytest.raises(QuantizeError, match="not supported|positive number"):
        parse_bits(text)


def test_group_size_not_dividing_d_is_reported_and_sized_honestly(tmp_path):
    adapter = steep_adapter(d_out=96, d_in=80)          # 96 = 3·32, 80 = 2·32 + 16
    q, report = quantize_factors(adapter, FactorQuantConfig(bits=4, group_size=32))
    assert "d=80 ends with a group of 16" in report.metrics["short_last_group"]
    assert "d=96" not in report.metrics["short_last_group"]
    m = next(iter(q.modules.values()))
    assert m.A_rows.scales.shape == (8, 3) and m.B_rows.scales.shape == (8, 3)   # the short group has a scale
    _, aligned = quantize_factors(adapter, FactorQuantConfig(bits=4, group_size=16))
    assert "short_last_group" not in aligned.metrics


def test_file_overhead_is_small():
    """The flat layout: a 40-module file is its payload plus a JSON header, not 100 bytes per tensor per module."""
    import tempfile
    from pathlib import Path

    adapter = steep_adapter(layers=40)
    q, _ = quantize_factors(adapter, FactorQuantConfig(bits=None, mixed_avg_bits=2.5, group_size=16))
    with tempfile.TemporaryDirectory() as tmp:
        size = save_quantized(q, Path(tmp) / "q.safetensors").stat().st_size
    assert q.payload_bits() / 8 <= size <= q.payload_bits() / 8 + 80 * len(q.modules) + 2048


def test_corrupt_file(tmp_path):
    q, _ = quantize_factors(steep_adapter(), FactorQuantConfig(bits=4, group_size=16))
    path = save_quantized(q, tmp_path / "q.safetensors")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_quantized(path)


def test_one_bit_is_sign_times_mean_magnitude():
    from edge_lora.stages.quantize_factors import quantize_rows

    x = np.array([[0.5, -1.0, 2.0, -0.5, 1.0, -3.0, 0.25, 0.75]])
    q = quantize_rows(x, [1], group_size=4, symmetric=True)
    # per group of 4, every value becomes ±mean|v| with its own sign (the least-squares binarisation)
    expected = np.concatenate([np.sign(x[0, :4]) * np.abs(x[0, :4]).mean(), np.sign(x[0, 4:]) * np.abs(x[0, 4:]).mean()])
    np.testing.assert_allclose(q.dequantize()[0], expected, rtol=1e-3)
    assert q.payload_bits() < quantize_rows(x, [2], group_size=4, symmetric=True).payload_bits()


def test_one_bit_refuses_asymmetric():
    with pytest.raises(QuantizeError, match="symmetric"):
        FactorQuantConfig(bits=1, symmetric=False)
