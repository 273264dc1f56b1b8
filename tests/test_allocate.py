"""Output-aware allocation (stages/allocate.py): the whitened form is exact, its errors are the dense output errors,
the allocation meets its budget, and the default is deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_lora.adapter import Adapter, LoraModule
from edge_lora.config import AllocateConfig
from edge_lora.errors import ConfigError
from edge_lora.stages import allocate as al


def _module(name, d_out, d_in, r, seed, decay=0.7):
    g = torch.Generator().manual_seed(seed)
    s = decay ** torch.arange(r, dtype=torch.float64)
    B = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))[0] * s
    A = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))[0].T
    return LoraModule(name=name, kind="linear", A=A.float(), B=B.float(), scale=2.0, alpha=2.0 * r)


def _activations(d_in, n, seed):
    """Anisotropic inputs (scales over two decades, one large direction), as real hidden states have."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.logspace(-2, 0, d_in, dtype=torch.float64)
    X[:, -1] *= 20
    return X


def _case(seed=0, shapes=((48, 40, 8), (40, 40, 8), (64, 40, 6))):
    modules, grams, energy, xs = {}, {}, {}, {}
    for k, (d_out, d_in, r) in enumerate(shapes):
        name = f"model.layers.{k}.mlp.up_proj"
        modules[name] = _module(name, d_out, d_in, r, seed + k)
        X = _activations(d_in, 200, seed + 10 + k)
        xs[name] = X
        grams[name] = X.T @ X
        W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 20 + k), dtype=torch.float64)
        energy[name] = float((X @ W.T).pow(2).sum())
    adapter = Adapter(modules=modules, config={"peft_type": "LORA"})
    metric = al.OutputMetric(grams=grams, output_energy=energy, tokens=200, source="test")
    return adapter, metric, xs


def _dense_output_err_sq(ref: LoraModule, cand: LoraModule, X, C_ridged):
    """‖(ΔW − ΔŴ)·X‖² + ridge term, from dense matrices: tr(E·C·Eᵀ) with C = XᵀX + λI."""
    E = ref.scale * ref.B.double() @ ref.A.double() - cand.scale * cand.B.double() @ cand.A.double()
    lam = float(C_ridged[0, 0] - (X.T @ X)[0, 0])
    return float((X @ E.T).pow(2).sum()) + lam * float(E.pow(2).sum())


def test_whitened_form_keeps_the_product_and_is_orthogonal_through_C():
    adapter, metric, _ = _case()
    white = al.whiten(adapter, metric)
    for n, m in adapter.modules.items():
        w = white.modules[n]
        torch.testing.assert_close(w.B.double() @ w.A.double(), m.scale * m.B.double() @ m.A.double(),
                                   rtol=1e-4, atol=1e-5)
        C = metric.ridged(n)
        gram_a = w.A.double() @ C @ w.A.double().T
        s = w.singular_values.double()
        torch.testing.assert_close(gram_a, torch.diag(s), rtol=1e-3, atol=1e-3 * float(s[0]))
        torch.testing.assert_close(w.B.double().T @ w.B.double(), torch.diag(s), rtol=1e-3, atol=1e-3 * float(s[0]))


def test_whitened_errors_equal_the_dense_output_error():
    adapter, metric, xs = _case()
    q, _ = al.allocate(adapter, metric, AllocateConfig(target_error=0.2, group_size=8))
    measured = al.output_errors(adapter, q.expanded, metric)
    for n, m in adapter.modules.items():
        dense = _dense_output_err_sq(m, q.expanded.modules[n], xs[n], metric.ridged(n))
        assert measured[n][0] == pytest.approx(dense, rel=1e-6)


def test_whitened_truncation_is_the_best_output_fit():
    """Dropping the last whitened components costs exactly their s², and less than dropping as many Frobenius
    components (the whitened SVD is the optimal rank-k fit of the layer's output)."""
    from edge_lora.stages.canonicalize import canonicalize_module

    adapter, metric, xs = _case()
    for n, m in adapter.modules.items():
        C = metric.ridged(n)
        w = al.whiten_module(m, C)
        f = canonicalize_module(m)
        k = 3
        keep_w = LoraModule(name=n, kind="linear", A=w.A[:k], B=w.B[:, :k], scale=1.0, alpha=k)
        keep_f = LoraModule(name=n, kind="linear", A=f.A[:k], B=f.B[:, :k], scale=1.0, alpha=k)
        err_w = _dense_output_err_sq(m, keep_w, xs[n], C)
        err_f = _dense_output_err_sq(m, keep_f, xs[n], C)
        assert err_w == pytest.approx(float((w.singular_values.double()[k:] ** 2).sum()), rel=1e-3)
        assert err_w < err_f


@pytest.mark.parametrize("target", [0.05, 0.15, 0.4])
def test_allocation_meets_its_error_budget(target):
    adapter, metric, _ = _case()
    q, report = al.allocate(adapter, metric, AllocateConfig(target_error=target, group_size=8))
    m = report.metrics
    assert m["estimated_rel_error"] <= target
    # the estimate adds per-component errors; cross terms between quantization errors are small
    assert m["measured_rel_error"] <= target * 1.1 + 1e-3
    assert m["measured_rel_error"] == pytest.approx(m["estimated_rel_error"], rel=0.15, abs=2e-3)
    # a looser budget never costs more bytes
    looser, _ = al.allocate(adapter, metric, AllocateConfig(target_error=min(1.0, target * 2), group_size=8))
    assert looser.payload_bits() <= q.payload_bits()


def test_allocation_meets_its_size_budget():
    adapter, metric, _ = _case()
    q, report = al.allocate(adapter, metric, AllocateConfig(target_error=None, target_bits=1.5, group_size=8))
    assert q.bits_per_param() <= 1.5
    assert report.metrics["bits_per_original_param"] > 1.0   # the budget is used, not wasted


def test_output_aware_allocation_beats_the_weight_space_one_on_output_error():
    """At the same bytes, widths chosen by output error leave less output error than widths chosen by ‖ΔW−ΔŴ‖."""
    from edge_lora.adapter.quantized import FactorQuantConfig
    from edge_lora.stages.quantize_factors import quantize_adapter

    adapter, metric, _ = _case()
    q, report = al.allocate(adapter, metric, AllocateConfig(target_error=None, target_bits=1.5, group_size=8))
    weight_space, _ = quantize_adapter(adapter, cfg=FactorQuantConfig(bits=None, mixed_avg_bits=1.5, group_size=8))
    assert weight_space.bits_per_param() <= 1.5
    w = al.module_weights(adapter, metric, "layer")

    def rel(candidate):
        errs = al.output_errors(adapter, candidate.expanded, metric)
        return math.sqrt(sum(w[n] * e for n, (e, _) in errs.items()) / sum(w[n] * r for n, (_, r) in errs.items()))

    assert rel(q) < 0.8 * rel(weight_space)


def test_config_refuses_both_or_neither_budget():
    with pytest.raises(ConfigError, match="exactly one"):
        AllocateConfig(target_error=0.1, target_bits=1.0)
    with pytest.raises(ConfigError, match="exactly one"):
        AllocateConfig(target_error=None)
    with pytest.raises(ConfigError, match="target_error"):
        AllocateConfig(target_error=1.5)
    with pytest.raises(ConfigError, match="weighting"):
        AllocateConfig(weighting="loudest")


def test_calibration_from_another_base_is_refused():
    adapter, metric, _ = _case()
    name = next(iter(adapter.modules))
    grams = dict(metric.grams)
    grams[name] = torch.eye(7, dtype=torch.float64)
    bad = al.OutputMetric(grams=grams, output_energy=metric.output_energy, tokens=1, source="test")
    with pytest.raises(Exception, match="another base model"):
        al.whiten(adapter, bad)


def test_the_default_is_deterministic_and_writes_one_folder(tmp_path):
    """`compress ADAPTER --out DIR` with no flags, twice, on a tiny real model: byte-identical files."""
    from edge_lora.base import tiny_model
    from tests.conftest import ADAPTER_TABLE, make_peft_adapter
    from tests.test_cli import with_tokenizer

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    tiny_model(kind).save_pretrained(tmp_path / "base0")
    base = with_tokenizer(tmp_path / "base0", tmp_path / "base")
    text = tmp_path / "calib.txt"
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(0, 120, 40)) for _ in range(8)) + "\n")
    outs = []
    for k in range(2):
        done = al.allocate_folder(tmp_path / "adapter", tmp_path / f"out{k}", base=base, calibration_text=text)
        outs.append(done.out)
        assert sorted(p.name for p in done.out.iterdir()) == sorted(done.files)
    assert (outs[0] / "quantized.safetensors").read_bytes() == (outs[1] / "quantized.safetensors").read_bytes()
    report = done.report.metrics
    assert report["estimated_rel_error"] <= AllocateConfig().target_error
    with pytest.raises(Exception, match="already exists"):
        al.allocate_folder(tmp_path / "adapter", outs[0], base=base, calibration_text=text)


def test_no_base_is_a_clear_error(tmp_path):
    from tests.conftest import ADAPTER_TABLE, make_peft_adapter

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    with pytest.raises(ConfigError, match="--calibrate BASE"):
        al.allocate_folder(tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fisher_weighting_on_a_real_tiny_model(tmp_path):
    """The output-side Fisher comes from a real backward pass: one positive weight per output channel, and the
    allocation with it meets its budget in that metric."""
    from edge_lora.adapter import load_peft
    from edge_lora.base import load_base, tiny_model
    from tests.conftest import ADAPTER_TABLE, make_peft_adapter
    from tests.test_cli import with_tokenizer

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    tiny_model(kind).save_pretrained(tmp_path / "base0")
    model, tok = load_base(with_tokenizer(tmp_path / "base0", tmp_path / "base"))
    adapter = load_peft(tmp_path / "adapter")
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 120, 30)) for _ in range(4)]
    metric = al.measure_output_metric(model, tok, texts, list(adapter.modules), 512, "test", fisher=True)
    for n, m in adapter.modules.items():
        D = metric.output_fisher[n]
        assert D.shape == (m.d_out,) and bool((D >= 0).all()) and float(D.sum()) > 0
    assert all(p.grad is None for p in model.parameters())   # no gradients left behind on the base
    q, report = al.allocate(adapter, metric, AllocateConfig(target_error=0.2, weighting="fisher", group_size=8))
    assert report.metrics["estimated_rel_error"] <= 0.2
    assert report.metrics["measured_rel_error"] <= 0.2 * 1.1 + 1e-3
    with pytest.raises(ConfigError, match="fisher=True"):
        al.allocate(adapter, al.OutputMetric(metric.grams, metric.output_energy, 1, "x"),
                    AllocateConfig(weighting="fisher"))
