"""The small-core trick is exact, the search finds planted structure, and grouping never stacks mismatched shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_lora.adapter import LoraModule
from edge_lora.stages import tensorize as tz
from edge_lora.stages.canonicalize import canonicalize
from edge_lora.stages.compress import CompressConfig, compress


def dense_stack(adapter, group):
    return torch.stack([adapter.modules[n].delta() for n in group.modules])  # L × d_out × d_in, float64


def small_case(seed=0, **kw):
    ad = tz.planted_adapter(layers=5, r=4, shapes={"self_attn.q_proj": (20, 24)}, seed=seed, **kw)
    can = canonicalize(ad)[0]
    group = tz.group_modules(can.modules)[0]
    return ad, can, group, tz.build_core_stack(group, can.modules)


def test_spectra_match_dense_unfoldings():
    ad, can, group, st = small_case()
    T = dense_stack(ad, group)
    L, d_out, d_in = T.shape
    out = torch.linalg.svdvals(T.permute(1, 0, 2).reshape(d_out, -1))
    inp = torch.linalg.svdvals(T.permute(2, 0, 1).reshape(d_in, -1))
    lay = torch.linalg.svdvals(T.reshape(L, -1))
    k = st.sigma_out.numel()
    tol = dict(rtol=1e-5, atol=1e-6 * float(out[0]))  # canonical factors are stored in float32
    torch.testing.assert_close(st.sigma_out, out[:k], **tol)
    assert out[k:].numel() == 0 or float(out[k:].max()) < 1e-6 * float(out[0])
    torch.testing.assert_close(st.sigma_in, inp[:st.sigma_in.numel()], **tol)
    torch.testing.assert_close(st.sigma_layer, lay, **tol)


@pytest.mark.parametrize("r_u,r_v", [(1, 1), (3, 7), (8, 5), (12, 12)])
def test_hosvd_table_is_the_dense_hosvd_error(r_u, r_v):
    ad, can, group, st = small_case(seed=1)
    T = dense_stack(ad, group)
    L, d_out, d_in = T.shape
    Uo = torch.linalg.svd(T.permute(1, 0, 2).reshape(d_out, -1), full_matrices=False)[0][:, :r_u]
    Vi = torch.linalg.svd(T.permute(2, 0, 1).reshape(d_in, -1), full_matrices=False)[0][:, :r_v]
    approx = torch.einsum("ia,lab,jb->lij", Uo, torch.einsum("ia,lij,jb->lab", Uo, T, Vi), Vi)
    dense_err = float(((T - approx) ** 2).sum())
    table, _ = tz.tucker_tables(st, False)
    assert float(st.total_energy - table[r_u, r_v]) == pytest.approx(dense_err, rel=1e-4,
                                                                      abs=1e-10 * float((T ** 2).sum()))


@pytest.mark.parametrize("r_u,r_v", [(2, 3), (6, 4), (9, 9)])
def test_tucker2_on_core_equals_dense_tucker(r_u, r_v):
    """HOOI on the small core, lifted by Q_B and Q_A, reaches the same error as tensorly on the dense tensor."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    ad, can, group, st = small_case(seed=2)
    T = dense_stack(ad, group)
    with tl.backend_context("pytorch"):
        (core, factors), _ = partial_tucker(T, [r_u, r_v], modes=[1, 2], n_iter_max=200, tol=1e-14)
        dense = tl.tucker_to_tensor((core, [torch.eye(T.shape[0], dtype=T.dtype)] + factors))
    Xu, Xv, cores = tz.refine_tucker2(st, r_u, r_v, iters=200)
    U, V = st.lift_U(Xu).double(), st.lift_V(Xv).double()
    torch.testing.assert_close(U.T @ U, torch.eye(r_u, dtype=torch.float64), atol=1e-5, rtol=0)
    ours = torch.einsum("ia,lab,jb->lij", U, cores, V)
    e_dense = float(((T - dense) ** 2).sum()) / float((T ** 2).sum())
    e_ours = float(((T - ours) ** 2).sum()) / float((T ** 2).sum())
    assert e_ours == pytest.approx(e_dense, rel=1e-3, abs=1e-9)
    # and the error the core claims (energy outside the fitted cores) is the true one
    claimed = (st.total_energy - float((cores ** 2).sum())) / float((T ** 2).sum())
    assert claimed == pytest.approx(e_ours, rel=1e-4, abs=1e-9)


def test_grouping_splits_shapes_and_unindexed_modules():
    def mod(name, d_out, d_in):
        return LoraModule(name=name, kind="linear", A=torch.randn(2, d_in), B=torch.randn(d_out, 2), scale=1, alpha=2)

    modules = {n: mod(n, *s) for n, s in {
        "model.layers.0.mlp.up_proj": (8, 4), "model.layers.1.mlp.up_proj": (8, 4),
        "model.layers.2.mlp.up_proj": (6, 4),           # a narrower layer: must not be stacked with the others
        "lm_head": (10, 4),                             # no layer index: a group of its own
        "model.layers.10.mlp.up_proj": (8, 4),
    }.items()}
    groups = {g.name: g for g in tz.group_modules(modules)}
    assert set(groups) == {"model.layers.*.mlp.up_proj [8x4]", "model.layers.*.mlp.up_proj [6x4]", "lm_head"}
    assert groups["model.layers.*.mlp.up_proj [8x4]"].layers == [0, 1, 10]


@pytest.mark.parametrize("planted,expected", [
    (dict(shared_out=6), "shared-out"),
    (dict(shared_out=6, shared_in=6), "tucker2"),
    (dict(), "svd"),
])
def test_planted_structure_is_recovered(planted, expected):
    ad = tz.planted_adapter(layers=12, r=6, shapes={"self_attn.q_proj": (64, 64), "mlp.down_proj": (64, 128)},
                            seed=3, **planted)
    result, report = compress(ad, CompressConfig(budget=0.05, candidates=("svd", "shared-out", "tucker2")))
    for g in report.metrics["groups"]:
        assert g["structure"] == expected, g["alternatives"]
        if "shared_out" in planted:
            assert g["ranks"]["r_u"] == 6
        if "shared_in" in planted:
            assert g["ranks"]["r_v"] == 6
        if expected == "svd":  # independent layers: sharing must not be forced on them
            assert g["alternatives"]["tucker2"]["params"] > g["params_after"]
            assert g["alternatives"]["shared-out"]["params"] > g["params_after"]


def test_cp_and_tt_fits_meet_the_budget_exactly_measured():
    ad = tz.planted_adapter(layers=6, r=3, shapes={"self_attn.q_proj": (24, 20)}, shared_out=4, shared_in=4, seed=4)
    for structure in ("cp", "tt"):
        result, report = compress(ad, CompressConfig(budget=0.1, structure=structure, storage_dtype="float32"))
        group = result.groups[0]
        dense_err, dense_ref = 0.0, 0.0
        for name in group.modules:
            B, A = ad.modules[name].B.double() * ad.modules[name].scale, ad.modules[name].A.double()
            ref = B @ A
            from edge_lora.adapter.compressed import module_chain
            left, core, right = module_chain(group, name)
            approx = left.double() @ core.double() @ right.double()
            dense_err += float(((ref - approx) ** 2).sum())
            dense_ref += float((ref ** 2).sum())
        assert (dense_err / dense_ref) ** 0.5 <= 0.1 + 1e-6
        assert report.metrics["rel_err"] == pytest.approx((dense_err / dense_ref) ** 0.5, rel=1e-4, abs=1e-7)


def test_min_rank_lower_bound():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert tz.min_rank_for(s, 0.0) == 4
    assert tz.min_rank_for(s, 0.25) == 3
    assert tz.min_rank_for(s, 1.25) == 2
    assert tz.min_rank_for(s, 100.0) == 0


def test_pareto_and_curves_are_monotone():
    ad, can, group, st = small_case(seed=5)
    p, e, ranks = tz.tucker2_pareto(st)
    assert np.all(np.diff(p) > 0) and np.all(np.diff(e) < 0)
    assert ranks[0] == (0, 0)
