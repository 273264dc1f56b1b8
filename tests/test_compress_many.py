"""compress-many (edge_lora/stages/compress_many.py): shared bases per module over several adapters."""

from __future__ import annotations

import json

import pytest
import torch

from edge_lora.adapter import Adapter, LoraModule
from edge_lora.errors import BudgetError, CompatibilityError, ConfigError
from edge_lora.stages.compress_many import (ManyConfig, SharedAdapters, compress_many, raw_factor_pca,
                                            relative_error, separate_truncation)

SHAPES = {"layers.0.q": (24, 16), "layers.0.down": (16, 40), "layers.1.q": (24, 16)}


def _adapter(factors: dict, name: str) -> Adapter:
    modules = {m: LoraModule(name=m, kind="linear", A=A.float(), B=B.float(), scale=0.5, alpha=float(A.shape[0]))
               for m, (B, A) in factors.items()}
    return Adapter(modules=modules, config={"peft_type": "LORA", "r": 4, "lora_alpha": 2,
                                            "target_modules": ["q", "down"]}, source=name)


def planted(n: int, shared_rank: int = 3, noise: float = 0.0, seed: int = 0, r: int = 4) -> dict[str, Adapter]:
    """n adapters whose updates live in common subspaces of rank ``shared_rank`` per module (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    bases = {m: (torch.linalg.qr(torch.randn(o, shared_rank, generator=g))[0],
                 torch.linalg.qr(torch.randn(i, shared_rank, generator=g))[0]) for m, (o, i) in SHAPES.items()}
    out = {}
    for k in range(n):
        factors = {}
        for m, (o, i) in SHAPES.items():
            U, V = bases[m]
            B = U @ torch.randn(shared_rank, r, generator=g) + noise * torch.randn(o, r, generator=g)
            A = torch.randn(r, shared_rank, generator=g) @ V.T + noise * torch.randn(r, i, generator=g)
            factors[m] = (B, A)
        out[f"a{k}"] = _adapter(factors, f"a{k}")
    return out


def _delta(adapter: Adapter, m: str) -> torch.Tensor:
    mod = adapter.modules[m]
    return mod.scale * mod.B.double() @ mod.A.double()


def test_shared_bases_find_the_planted_subspace_and_beat_separate_truncation():
    adapters = planted(6, shared_rank=3)
    shared, report = compress_many(adapters, ManyConfig(budget=1e-4))
    assert all(m.rank == 3 for m in shared.modules.values())
    for n, a in adapters.items():
        assert relative_error(a, shared.adapter(n)) < 1e-4
        for m in SHAPES:
            assert torch.allclose(_delta(shared.adapter(n), m), _delta(a, m), atol=1e-4)
    # each adapter alone needs rank 3 too, but pays its bases six times
    assert report.metrics["total_bytes"] < report.metrics["separate_truncation_total_bytes"] / 2


def test_the_budget_holds_for_every_adapter_and_module_not_only_on_average():
    adapters = planted(5, shared_rank=3, noise=0.3, seed=1)
    adapters["odd"] = planted(1, shared_rank=4, seed=7)["a0"]   # unrelated to the others
    for budget in (0.1, 0.3):
        shared, _ = compress_many(adapters, ManyConfig(budget=budget))
        for n in adapters:
            assert shared.worst_module_error(n) <= budget + 1e-9, n
            assert relative_error(adapters[n], shared.adapter(n)) <= budget + 1e-9


def test_independent_adapters_gain_nothing_and_the_report_says_so():
    g = torch.Generator().manual_seed(3)
    adapters = {f"i{k}": _adapter({m: (torch.randn(o, 4, generator=g), torch.randn(4, i, generator=g))
                                   for m, (o, i) in SHAPES.items()}, f"i{k}") for k in range(3)}
    _, report = compress_many(adapters, ManyConfig(budget=0.05))
    assert report.metrics["total_bytes"] >= report.metrics["separate_truncation_total_bytes"]


def test_the_canonical_fit_is_gauge_free_and_raw_factor_pca_is_not():
    """B·A = (B·G)(G⁻¹·A): the same updates in another gauge give the same shared fit; PCA of the raw factors
    (the vlora / lorashare approach) changes with G."""
    adapters = planted(4, shared_rank=2, noise=0.2, seed=2)
    g = torch.Generator().manual_seed(9)
    regauged = {}
    for n, a in adapters.items():
        mods = {}
        for m, mod in a.modules.items():
            G = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
            mods[m] = LoraModule(name=m, kind="linear", B=(mod.B.double() @ G).float(),
                                 A=(torch.linalg.inv(G) @ mod.A.double()).float(), scale=mod.scale, alpha=mod.alpha)
        regauged[n] = a.replace_modules(mods)
    one, _ = compress_many(adapters, ManyConfig(budget=0.1))
    two, _ = compress_many(regauged, ManyConfig(budget=0.1))
    for n in adapters:
        assert abs(one.error(n) - two.error(n)) < 1e-4
    pca_one = [relative_error(adapters[n], a) for n, a in raw_factor_pca(adapters, 2)[0].items()]
    pca_two = [relative_error(regauged[n], a) for n, a in raw_factor_pca(regauged, 2)[0].items()]
    assert max(abs(x - y) for x, y in zip(pca_one, pca_two)) > 0.01


def test_ranks_and_target_modules_may_differ():
    adapters = planted(3, shared_rank=2, seed=4)
    wide = planted(1, shared_rank=2, seed=4, r=8)["a0"]
    adapters["wide"] = wide
    adapters["attn-only"] = adapters["a1"].replace_modules({m: v for m, v in adapters["a1"].modules.items()
                                                            if m.endswith(".q")})
    shared, _ = compress_many(adapters, ManyConfig(budget=0.05))
    assert set(shared.adapter("attn-only").modules) == {"layers.0.q", "layers.1.q"}
    assert shared.worst_module_error("wide") <= 0.05


def test_save_load_and_a_core_bound_to_another_basis(tmp_path):
    from safetensors.torch import load_file, save_file

    adapters = planted(3, noise=0.1)
    shared, report = compress_many(adapters, ManyConfig(budget=0.1))
    shared.save(tmp_path / "set", ManyConfig(budget=0.1), report.metrics)
    back = SharedAdapters.load(tmp_path / "set")
    for n in adapters:
        assert abs(back.error(n) - shared.error(n)) < 1e-6
        for m in SHAPES:   # fp16 storage
            assert torch.allclose(_delta(back.adapter(n), m), _delta(shared.adapter(n), m), atol=2e-2)
    assert json.loads((tmp_path / "set" / "many.json").read_text())["adapters"]["a0"]["bytes"] > 0
    other = planted(3, noise=0.1, seed=5)
    compress_many(other, ManyConfig(budget=0.1))[0].save(tmp_path / "other", ManyConfig(budget=0.1))
    core = tmp_path / "set" / "cores" / "a1.safetensors"
    foreign = tmp_path / "other" / "cores" / "a1.safetensors"
    core.write_bytes(foreign.read_bytes())
    with pytest.raises(Exception, match="does not match its sha256"):
        SharedAdapters.load(tmp_path / "set")
    import hashlib

    manifest = json.loads((tmp_path / "set" / "many.json").read_text())   # the manifest edited to match it
    manifest["adapters"]["a1"]["sha256"] = hashlib.sha256(core.read_bytes()).hexdigest()
    (tmp_path / "set" / "many.json").write_text(json.dumps(manifest))
    with pytest.raises(CompatibilityError, match="fitted to another basis"):
        SharedAdapters.load(tmp_path / "set")
    basis = tmp_path / "other" / "basis.safetensors"
    tensors = load_file(basis)
    save_file({k: v * 2 for k, v in tensors.items()}, basis)
    with pytest.raises(Exception, match="does not match the sha256"):
        SharedAdapters.load(tmp_path / "other")


def test_projecting_a_new_adapter_keeps_the_shipped_cores():
    adapters = planted(5, shared_rank=3, seed=6)
    shared, _ = compress_many({n: a for n, a in adapters.items() if n != "a4"}, ManyConfig(budget=0.01))
    grown = shared.project("a4", adapters["a4"])
    assert grown.error("a4") < 0.01   # it lies in the span the others share
    for n in ("a0", "a1"):
        for m in SHAPES:
            assert torch.equal(grown.modules[m].cores[n], shared.modules[m].cores[n])
    stranger = planted(1, shared_rank=3, seed=99)["a0"]
    assert shared.project("stranger", stranger).error("stranger") > 0.5


def test_bad_sets_are_refused_with_the_reason():
    adapters = planted(3)
    with pytest.raises(ConfigError, match="two adapters or more"):
        compress_many({"a0": adapters["a0"]})
    other_base = _adapter({"layers.0.q": (torch.randn(32, 4), torch.randn(4, 16))}, "x")
    with pytest.raises(CompatibilityError, match="not for one base"):
        compress_many({"a0": adapters["a0"], "x": other_base})
    disjoint = _adapter({"layers.9.v": (torch.randn(8, 4), torch.randn(4, 8))}, "d")
    with pytest.raises(CompatibilityError, match="no target module in common"):
        compress_many({"a0": adapters["a0"].replace_modules({"layers.0.q": adapters["a0"].modules["layers.0.q"]}),
                       "d": disjoint})
    mixed = {**planted(3, shared_rank=3), "odd": planted(1, shared_rank=3, seed=8)["a0"]}
    with pytest.raises(BudgetError, match="with --core-rank 3, adapter 'odd' reaches at best"):
        compress_many(mixed, ManyConfig(budget=0.05, core_rank=3))
    with pytest.raises(ConfigError):
        ManyConfig(budget=1.5)


def test_separate_truncation_meets_the_budget_per_module():
    adapters = planted(2, noise=0.5)
    for n, a in separate_truncation(adapters, 0.2).items():
        for m in SHAPES:
            ref = _delta(adapters[n], m)
            assert torch.linalg.matrix_norm(_delta(a, m) - ref) <= 0.2 * torch.linalg.matrix_norm(ref) + 1e-6


def test_cli_fits_projects_and_refuses(tmp_path, capsys):
    from package_fixtures import make_adapter

    from edge_lora.cli import main

    folders = [make_adapter(tmp_path / f"ad{k}", seed=k + 1) for k in range(3)]
    assert main(["compress-many", *map(str, folders[:2]), "--out", str(tmp_path / "set"), "--budget", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "| ad0 |" in out and "smaller than the 2 fp16 PEFT adapters" in out
    assert main(["compress-many", str(folders[2]), "--onto", str(tmp_path / "set"), "--out",
                 str(tmp_path / "grown"), "--budget", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "against fitting all again: ad2" in out
    assert sorted(p.name for p in (tmp_path / "grown" / "cores").iterdir()) == [
        "ad0.safetensors", "ad1.safetensors", "ad2.safetensors"]
    assert main(["compress-many", str(folders[0]), str(folders[1]), "--out", str(tmp_path / "set")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["compress-many", str(folders[0]), str(folders[1]), "--out", str(tmp_path / "x"),
                 "--budget", "0.01", "--core-rank", "1"]) == 3
    assert "reaches at best" in capsys.readouterr().err and not (tmp_path / "x").exists()



def test_a_damaged_folder_is_a_clean_error(tmp_path):
    from edge_lora.errors import AdapterError

    adapters = planted(2, noise=0.1)
    shared, _ = compress_many(adapters, ManyConfig(budget=0.2))
    shared.save(tmp_path / "set", ManyConfig(budget=0.2))
    manifest = json.loads((tmp_path / "set" / "many.json").read_text())
    del manifest["adapters"]["a0"]["core_file"]
    (tmp_path / "set" / "many.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterError, match="damaged compress-many folder"):
        SharedAdapters.load(tmp_path / "set")
    (tmp_path / "set" / "cores" / "a1.safetensors").write_bytes(b"\0" * 20)
    with pytest.raises(AdapterError):
        SharedAdapters.load(tmp_path / "set")


def test_a_changed_core_and_full_tensors_are_refused(tmp_path):
    from edge_lora.errors import AdapterError

    adapters = planted(2, noise=0.1)
    shared, _ = compress_many(adapters, ManyConfig(budget=0.2))
    shared.save(tmp_path / "set", ManyConfig(budget=0.2))
    core = tmp_path / "set" / "cores" / "a0.safetensors"
    data = bytearray(core.read_bytes())
    data[-1] ^= 1
    core.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="does not match its sha256"):
        SharedAdapters.load(tmp_path / "set")
    saved = Adapter(modules=adapters["a0"].modules, config=adapters["a0"].config,
                    extra_tensors={"lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match="modules_to_save"):
        compress_many({"a0": saved, "a1": adapters["a1"]})
