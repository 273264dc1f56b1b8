"""compress: budgets are met and measured honestly, the file round-trips, PEFT loads the expansion, bad input
gets a clear error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import ADAPTER_TABLE, make_peft_adapter, model_output

from edge_lora.adapter import Adapter, LoraModule, load_peft, save_peft
from edge_lora.adapter.compressed import CompressedAdapter, module_chain
from edge_lora.errors import AdapterError, BudgetError, ConfigError
from edge_lora.stages import tensorize as tz
from edge_lora.stages.compress import CompressConfig, compress, markdown_report, write_plots

FAST = ("svd", "shared-out", "tucker2")


def dense_errors(adapter: Adapter, result: CompressedAdapter) -> dict[str, tuple[float, float]]:
    """name -> (‖ΔW − ΔŴ‖², ‖ΔW‖²) from dense matrices: the ground truth the Gram traces must match."""
    out = {}
    for g in result.groups:
        for name in g.modules:
            ref = adapter.modules[name].delta()
            left, core, right = module_chain(g, name)
            approx = left.double() @ (core.double() if core is not None else torch.eye(left.shape[1],
                                                                                     dtype=torch.float64)) @ right.double()
            out[name] = (float(((ref - approx) ** 2).sum()), float((ref ** 2).sum()))
    return out


def planted(**kw):
    return tz.planted_adapter(layers=6, r=4, shapes={"self_attn.q_proj": (32, 32), "mlp.up_proj": (48, 32)},
                              seed=7, **kw)


@pytest.mark.parametrize("scope", ["group", "module", "global"])
@pytest.mark.parametrize("kw", [dict(), dict(shared_out=5)])
def test_budget_is_met_in_every_scope(scope, kw):
    ad = planted(**kw)
    budget = 0.08
    result, report = compress(ad, CompressConfig(budget=budget, scope=scope, candidates=FAST))
    errs = dense_errors(ad, result)
    fp16_slack = 2e-3  # factors are stored in float16; the verified error includes that rounding
    if scope == "module":
        for name, (e, r) in errs.items():
            assert math.sqrt(e / r) <= budget + fp16_slack, name
    elif scope == "group":
        for g in result.groups:
            e = sum(errs[n][0] for n in g.modules)
            r = sum(errs[n][1] for n in g.modules)
            assert math.sqrt(e / r) <= budget + fp16_slack, g.name
    total = math.sqrt(sum(e for e, _ in errs.values()) / sum(r for _, r in errs.values()))
    assert total <= budget + fp16_slack
    # the reported (Gram-trace) error is the dense one
    assert report.metrics["rel_err"] == pytest.approx(total, rel=1e-3, abs=1e-6)
    assert report.metrics["params_after"] < report.metrics["params_before"]


def test_global_scope_spends_error_where_it_saves_most():
    # one group is easy to compress (steep, shared spectrum), the other is not: global should beat group scope
    ad = planted(shared_out=5)
    _, group_rep = compress(ad, CompressConfig(budget=0.1, scope="group", candidates=FAST))
    _, global_rep = compress(ad, CompressConfig(budget=0.1, scope="global", candidates=FAST))
    assert global_rep.metrics["params_after"] <= group_rep.metrics["params_after"]
    assert global_rep.metrics["rel_err"] <= 0.1 + 2e-3


def test_energy_budget_and_exact_budget():
    ad = planted()
    _, rep = compress(ad, CompressConfig(energy=0.99, candidates=FAST))
    assert rep.metrics["budget"] == pytest.approx(0.1)
    result, rep = compress(ad, CompressConfig(budget=0.0, structure="svd", storage_dtype="float32"))
    assert rep.metrics["rel_err"] < 1e-5  # nothing dropped


@pytest.mark.parametrize("structure", tz.STRUCTURES)
def test_save_load_expand_round_trip(tmp_path, structure):
    ad = planted(shared_out=5, shared_in=5)
    result, _ = compress(ad, CompressConfig(budget=0.1, structure=structure))
    result.save(tmp_path / "c")
    loaded = CompressedAdapter.load(tmp_path / "c")
    assert loaded.params == result.params
    assert [g.structure for g in loaded.groups] == [structure] * len(result.groups)
    # shared factors are stored once per group
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c" / "compressed.safetensors"), "pt") as f:
        keys = list(f.keys())
    if structure != "svd":
        assert sum(k.endswith(".U") for k in keys) == len(result.groups)
    expanded = loaded.to_adapter()
    for g in loaded.groups:
        for name in g.modules:
            left, core, right = module_chain(g, name)
            chain = left.double() @ (core.double() if core is not None else torch.eye(left.shape[1],
                                                                                    dtype=torch.float64)) @ right.double()
            torch.testing.assert_close(expanded.modules[name].delta(), chain, rtol=1e-4, atol=1e-6)
    # PEFT folder round trip through the importer
    save_peft(expanded, tmp_path / "peft")
    again = load_peft(tmp_path / "peft")
    for name, m in expanded.modules.items():
        torch.testing.assert_close(again.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-7)


def _merged_output(base, compressed: CompressedAdapter):
    """The base with ΔŴ added to each weight by hand: the compressed adapter's own outputs."""
    import copy
    model = copy.deepcopy(base)
    with torch.no_grad():
        for g in compressed.groups:
            for name in g.modules:
                left, core, right = module_chain(g, name)
                delta = left.double() @ (core.double() if core is not None else torch.eye(left.shape[1],
                                                                                        dtype=torch.float64)) @ right.double()
                layer = model.get_submodule(name)
                layer.weight += delta.to(layer.weight.dtype)
                if name in compressed.biases:
                    layer.bias = torch.nn.Parameter(compressed.biases[name].clone())
    return model_output(model)


@pytest.mark.parametrize("case", ["llama-all7", "llama-patterns-rslora"])
def test_peft_loads_expansion_and_outputs_match(tmp_path, case):
    from peft import PeftModel

    from edge_lora.base import tiny_model

    kind, kwargs = ADAPTER_TABLE[case]
    make_peft_adapter(kind, kwargs, tmp_path / "orig")
    ad = load_peft(tmp_path / "orig")
    result, _ = compress(ad, CompressConfig(budget=0.3, candidates=FAST, storage_dtype="float32"))
    save_peft(result.to_adapter(), tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_model(kind, seed=0), str(tmp_path / "peft")).eval()
    expected = _merged_output(tiny_model(kind, seed=0), result)
    torch.testing.assert_close(model_output(peft_model), expected, rtol=1e-4, atol=1e-4)


def test_cli_writes_everything(tmp_path, capsys):
    from edge_lora.cli import main

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "orig")
    rc = main(["compress", str(tmp_path / "orig"), "--out", str(tmp_path / "out"), "--budget", "0.3",
               "--as-peft", str(tmp_path / "peft"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stage"] == "compress"
    for f in ("compressed.safetensors", "report.json", "report.md", "spectra.png", "error_vs_bytes.png"):
        assert (tmp_path / "out" / f).is_file(), f
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    rc = main(["compress", str(tmp_path / "orig"), "--out", str(tmp_path / "out2"), "--budget", "0.001",
               "--structure", "tucker2", "--max-rank", "1"])
    assert rc == 3
    assert "group" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ CLI: --bits
def _dequantized_output(kind, quantized_file):
    """The base plus each module's dequantized B·A added by hand: what the quantized file stands for."""
    from edge_lora.base import tiny_model
    from edge_lora.stages.quantize_factors import load_quantized

    model = tiny_model(kind, seed=0)
    with torch.no_grad():
        for name, qm in load_quantized(quantized_file).modules.items():
            m = qm.dequantize()
            layer = model.get_submodule(name)
            layer.weight += (m.scale * m.B.double() @ m.A.double()).to(layer.weight.dtype)
    return model_output(model)


@pytest.mark.parametrize("bits,structure", [("4", "svd"), ("mixed:3.0", "tucker2"), ("2", "shared-out")])
def test_cli_bits_peft_scores_exactly_the_quantized_file(tmp_path, capsys, bits, structure):
    from peft import PeftModel

    from edge_lora.cli import main
    from edge_lora.base import tiny_model

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "orig")
    rc = main(["compress", str(tmp_path / "orig"), "--out", str(tmp_path / "out"), "--budget", "0.3",
               "--structure", structure, "--bits", bits, "--group-size", "16", "--as-peft", str(tmp_path / "peft"),
               "--json"])
    assert rc == 0
    q = json.loads(capsys.readouterr().out)["metrics"]["quantize"]["metrics"]
    assert (tmp_path / "out" / "quantized.safetensors").stat().st_size == q["file_bytes"]
    assert q["fp16_peft_bytes"] == load_peft(tmp_path / "orig").params * 2
    assert q["size_ratio_vs_fp16_peft"] > 1 and 0 < q["rel_error_vs_original_weighted"] < 1
    if structure != "svd":
        assert "expansion was canonicalized" in (tmp_path / "out" / "report.md").read_text()
    peft_model = PeftModel.from_pretrained(tiny_model(kind, seed=0), str(tmp_path / "peft")).eval()
    expected = _dequantized_output(kind, tmp_path / "out" / "quantized.safetensors")
    torch.testing.assert_close(model_output(peft_model), expected, rtol=1e-5, atol=1e-5)
    # and the quantization did something: the unquantized expansion gives other outputs
    unquantized = _merged_output(tiny_model(kind, seed=0), CompressedAdapter.load(tmp_path / "out"))
    assert not torch.allclose(expected, unquantized, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", ["5", "16", "int4", "mixed:abc", "mixed:", "mixed:-1", "mixed:nan"])
def test_cli_unsupported_bits_exit_2_before_any_work(tmp_path, capsys, bits):
    from edge_lora.cli import main

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "orig")
    rc = main(["compress", str(tmp_path / "orig"), "--out", str(tmp_path / "out"), "--bits", bits])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--bits {bits}" in err and ("8, 4, 3, 2" in err or "e.g. mixed:3.0" in err)
    assert not (tmp_path / "out").exists()


def test_cli_bit_budget_below_minimum_names_a_minimum_that_works(tmp_path, capsys):
    import re

    from edge_lora.cli import main

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "orig")
    args = ["compress", str(tmp_path / "orig"), "--out", str(tmp_path / "out"), "--budget", "0"]
    assert main(args + ["--bits", "mixed:0.05"]) == 2
    err = capsys.readouterr().err
    minimum = re.search(r"the minimum for this adapter is ([0-9.]+) bits/param", err)
    assert minimum, err
    assert main(args + ["--bits", f"mixed:{minimum.group(1)}"]) == 0


@pytest.mark.parametrize("group_size,rc,text", [
    (24, 0, "last group of each such row is shorter and keeps its own fp16 scale"),  # d = 64 = 2·24 + 16
    (4, 2, "group_size=4 must be an integer ≥ 8"),
])
def test_cli_group_size(tmp_path, capsys, group_size, rc, text):
    from edge_lora.cli import main

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "orig")
    assert main(["compress", str(tmp_path / "orig"), "--out", str(tmp_path / "out"), "--bits", "4",
                 "--group-size", str(group_size)]) == rc
    captured = capsys.readouterr()
    assert text in (captured.out if rc == 0 else captured.err)


def test_cli_group_size_without_bits_is_refused(tmp_path, capsys):
    from edge_lora.cli import main

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "orig")
    assert main(["compress", str(tmp_path / "orig"), "--out", str(tmp_path / "out"), "--asymmetric"]) == 2
    assert "add --bits" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad inputs
def test_unmeetable_budget_names_group_and_best():
    ad = planted()
    with pytest.raises(BudgetError) as err:
        compress(ad, CompressConfig(budget=0.01, structure="svd", max_rank=1))
    msg = str(err.value)
    assert "model.layers.*" in msg and "Best achievable" in msg and "max_rank=1" in msg
    with pytest.raises(BudgetError, match="tucker2|Best achievable"):
        compress(ad, CompressConfig(budget=0.001, structure="tucker2", max_rank=2))


@pytest.mark.parametrize("bad, key", [(dict(budget=-0.1), "budget"), (dict(budget=float("nan")), "budget"),
                                      (dict(energy=1.5), "energy"), (dict(scope="layer"), "scope"),
                                      (dict(structure="hosvd"), "structure"), (dict(max_rank=-1), "max_rank"),
                                      (dict(candidates=("svd", "pca")), "candidates")])
def test_bad_config_is_a_config_error_not_a_budget_miss(bad, key):
    """A typo in a setting is exit 2 (change the setting), never BudgetError's 3 (the data missed a target)."""
    with pytest.raises(ConfigError, match=rf"compress\.{key} = .* is not valid; use ") as err:
        CompressConfig(**bad)
    assert not isinstance(err.value, BudgetError) and err.value.exit_code == 2


def test_empty_adapter():
    with pytest.raises(AdapterError, match="no LoRA modules"):
        compress(Adapter(modules={}, config={}))


def test_zero_and_rank0_modules(tmp_path):
    ad = planted()
    names = list(ad.modules)
    zero = ad.modules[names[0]]
    ad.modules[names[0]] = LoraModule(name=zero.name, kind="linear", A=zero.A, B=torch.zeros_like(zero.B),
                                      scale=zero.scale, alpha=zero.alpha)  # untrained: B = 0
    empty = ad.modules[names[1]]
    ad.modules[names[1]] = LoraModule(name=empty.name, kind="linear", A=torch.zeros(0, empty.d_in),
                                      B=torch.zeros(empty.d_out, 0), scale=1.0, alpha=1.0)  # rank 0
    result, report = compress(ad, CompressConfig(budget=0.1, candidates=FAST))
    exp = result.to_adapter()
    assert exp.modules[names[0]].rank == 0 and exp.modules[names[1]].rank == 0
    result.save(tmp_path / "c")
    assert CompressedAdapter.load(tmp_path / "c").to_adapter().modules[names[0]].rank == 0
    save_peft(exp, tmp_path / "peft")  # rank-0 modules are left out of the PEFT folder
    assert names[0] not in load_peft(tmp_path / "peft").modules
    # a whole adapter of zeros compresses to nothing, and saving that as PEFT says so
    all_zero = Adapter(modules={n: LoraModule(name=n, kind="linear", A=m.A, B=torch.zeros_like(m.B), scale=1.0,
                                              alpha=1.0) for n, m in planted().modules.items()}, config={})
    result, report = compress(all_zero)
    assert report.metrics["params_after"] == 0
    with pytest.raises(AdapterError, match="rank 0"):
        save_peft(result.to_adapter(), tmp_path / "zeros")


def test_report_files(tmp_path):
    _, report = compress(planted(shared_out=5), CompressConfig(budget=0.1, curves=True, candidates=FAST))
    md = markdown_report(report)
    assert "| group |" in md and "shared-out" in md
    paths = write_plots(report, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)
    json.dumps(report.to_dict())  # serialisable


def test_calibration_output_error():
    ad = planted()
    calib = {n: (lambda X: X @ X.T)(torch.randn(m.d_in, 50, dtype=torch.float64)) for n, m in ad.modules.items()}
    result, report = compress(ad, CompressConfig(budget=0.1, candidates=FAST, storage_dtype="float32"),
                              calibration=calib)
    g = report.metrics["groups"][0]
    name = g["worst_module"]
    cg = result.group_of(name)
    left, core, right = module_chain(cg, name)
    approx = left.double() @ (core.double() if core is not None else torch.eye(left.shape[1], dtype=torch.float64)) \
        @ right.double()
    ref = ad.modules[name].delta()
    L = torch.linalg.cholesky(calib[name] + 1e-12 * torch.eye(calib[name].shape[0], dtype=torch.float64))
    dense = float(((ref - approx) @ L).norm() / (ref @ L).norm())
    assert g["output_rel_err"][name] == pytest.approx(dense, rel=1e-4)


def test_different_ranks_in_one_group():
    ad = planted(shared_out=5)
    first = next(iter(ad.modules))
    m = ad.modules[first]
    ad = ad.replace_modules({**ad.modules, first: LoraModule(
        name=m.name, kind="linear", A=torch.cat([m.A, m.A[:2] * 0.5]),
        B=torch.cat([m.B, torch.randn(m.d_out, 2) * 0.01], dim=1), scale=m.scale, alpha=m.alpha)})
    result, report = compress(ad, CompressConfig(budget=0.05, candidates=FAST))
    assert report.metrics["rel_err"] <= 0.05 + 2e-3
    assert np.isfinite(report.metrics["rel_err"])


@pytest.mark.slow
def test_smollm2_demo_adapter_round_trip(tmp_path):
    from peft import PeftModel

    from edge_lora.base import cache_dir, load_base

    folder = cache_dir() / "adapters" / "date-iso-r16"
    if not (folder / "adapter_model.safetensors").is_file():
        pytest.skip("train the demo adapter first: python tools/train_demo_adapter.py")
    ad = load_peft(folder)
    result, report = compress(ad, CompressConfig(budget=0.2))
    assert report.metrics["rel_err"] <= 0.2 + 2e-3
    save_peft(result.to_adapter(), tmp_path / "peft")
    base, tok = load_base("smollm2")
    ids = tok("14 March 2021 =>", return_tensors="pt")["input_ids"]
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, out, rtol=1e-3, atol=1e-3)


def test_output_error_budget_with_hooked_calibration(tmp_path):
    from edge_lora.base import tiny_model
    from edge_lora.stages.compress import collect_calibration

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "orig")
    ad = load_peft(tmp_path / "orig")
    g = torch.Generator().manual_seed(0)
    calib = collect_calibration(tiny_model(kind, seed=0), None,
                                [torch.randint(0, 128, (40,), generator=g).tolist() for _ in range(8)], list(ad.modules))
    assert set(calib) == set(ad.modules)
    budget = 0.3
    result, report = compress(ad, CompressConfig(budget=budget, error_metric="output", storage_dtype="float32"),
                              calibration=calib)
    assert report.metrics["error_metric"] == "output"
    assert set(report.metrics["chosen"].values()) <= {"svd", "shared-out"}
    for grp in result.groups:  # group output error from dense matrices meets the budget
        num = den = 0.0
        for name in grp.modules:
            left, core, right = module_chain(grp, name)
            approx = (left.double() if core is None else left.double() @ core.double()) @ right.double()
            ref = ad.modules[name].delta()
            C = calib[name]
            num += float(torch.trace((ref - approx) @ C @ (ref - approx).T))
            den += float(torch.trace(ref @ C @ ref.T))
        assert math.sqrt(num / den) <= budget + 1e-4, grp.name
    with pytest.raises(ConfigError, match="calibration"):
        compress(ad, CompressConfig(error_metric="output"))
    with pytest.raises(ConfigError, match="input basis"):
        CompressConfig(error_metric="output", structure="tucker2")
