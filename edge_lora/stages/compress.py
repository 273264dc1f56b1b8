"""Compress a LoRA adapter: per-module rank truncation and cross-layer tensorization, chosen by a budget.

    compressed, report = compress(adapter, CompressConfig(budget=0.05))      # relative Frobenius error
    compressed.save("out/");  save_peft(compressed.to_adapter(), "out/peft")

For every group (one module type across layers, one shape) the stage measures, on the small core (see
``tensorize``), what each structure would cost at the budget (svd = per-module truncation, shared-out,
tucker2, cp, tt) and keeps the one with the fewest parameters. Nothing assumes that sharing helps: if the
layers' subspaces are independent, the shared structures cost more and lose.

Budgets (``scope``):
- ``group``  (default): each group's energy-weighted error  sqrt(Σ_l ‖E_l‖² / Σ_l ‖ΔW_l‖²) ≤ budget;
- ``module``: every module's own relative error ≤ budget;
- ``global``: the whole adapter's energy-weighted error ≤ budget; error is spent where it saves most
  parameters (water-filling over the lower convex hulls of every group's error-versus-size curves).

Errors are computed without ΔW: from the core in the search, and from the stored (rounded) factors by Gram
traces at the end (``verify``). With calibration activations (``C = XᵀX`` per module input, see
:func:`collect_calibration`) the output error ``‖(ΔW − ΔŴ)·X‖ / ‖ΔW·X‖`` is reported as well.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edge_lora.adapter import Adapter
from edge_lora.adapter.compressed import CompressedAdapter, CompressedGroup, module_chain
from edge_lora.config import COMPRESS_SCOPES, OUTPUT_STRUCTURES, CompressConfig
from edge_lora.files import write_text_atomic
from edge_lora.errors import AdapterError, BudgetError, CompatibilityError, ConfigError, EdgeLoraError, ModelError
from edge_lora.report import StageReport
from edge_lora.stages import tensorize as tz
from edge_lora.stages.canonicalize import canonicalize, energy_ranks

SCOPES = COMPRESS_SCOPES


# ---------------------------------------------------------------------------------------------- search
def _structures(config: CompressConfig, stack) -> list[str]:
    wanted = list(config.candidates) if config.structure == "auto" else [config.structure]
    if config.error_metric == "output":
        wanted = [s for s in wanted if s in OUTPUT_STRUCTURES]
    if stack is None:  # a single layer: nothing to share
        return ["svd"] if "svd" in wanted or config.structure == "auto" else wanted
    return [s for s in tz.STRUCTURES if s in wanted]


def _search_group(group, stack, modules, allow, config) -> tuple[tz.Candidate | None, dict]:
    """The cheapest feasible candidate of each structure, and the pick. ``allow`` is error² (float, group
    scope) or per-module error² (array, module scope)."""
    cap = config.max_rank
    energy = float(stack.total_energy) if stack is not None else sum(
        float((modules[n].singular_values.double() ** 2).sum()) for n in group.modules)
    alternatives: dict[str, dict] = {}
    best: tz.Candidate | None = None

    def record(name, cand, note="", best_err=None):
        nonlocal best
        if cand is not None:
            alternatives[name] = {"params": cand.params, "rel_err": _rel(cand.total_err_sq, energy),
                                  "worst_module_rel_err": _worst(cand.err_sq, stack, modules, group),
                                  "ranks": {k: v for k, v in cand.spec.items() if k != "fit"}, "feasible": True}
            if best is None or cand.params < best.params:
                best = cand
        else:
            alternatives[name] = {"feasible": False, "note": note,
                                  "best_rel_err": _rel(best_err, energy) if best_err is not None else None}

    for s in _structures(config, stack):
        if s == "svd":
            spectra = tz.svd_spectra(stack, modules, group.modules)
            cand = tz.search_svd(group, spectra, allow, cap)
            best_err = sum(float((sp.double()[cap:] ** 2).sum()) for sp in spectra) if cap is not None else 0.0
            record(s, cand, f"max_rank={cap} keeps too little", best_err)
        elif s == "shared-out":
            cand, best_err = tz.search_shared_out(stack, allow, cap)
            record(s, cand, "no shared output rank on the grid meets the budget", best_err)
        elif s == "tucker2":
            cand, best_err = tz.search_tucker2(stack, allow, cap)
            record(s, cand, "no (r_u, r_v) meets the budget", best_err)
        elif s in ("cp", "tt"):
            bound = best.params if best is not None and config.structure == "auto" else None
            if s == "cp":
                auto_cap = config.cp_auto_max_rank if config.structure == "auto" else None
                cand, note = tz.search_cp(stack, allow, cap, bound, auto_cap)
            else:
                cand, note = tz.search_tt(stack, allow, cap, bound)
            record(s, cand, note)
    return best, alternatives


def _rel(err_sq, energy) -> float:
    if err_sq is None:
        return float("nan")
    return math.sqrt(max(float(err_sq), 0.0) / energy) if energy > 0 else 0.0


def _module_energies(stack, modules, group) -> np.ndarray:
    if stack is not None:
        return stack.energy.numpy()
    return np.array([float((modules[n].singular_values.double() ** 2).sum()) for n in group.modules])


def _worst(err_sq, stack, modules, group) -> float:
    e = _module_energies(stack, modules, group)
    rel = np.where(e > 0, np.sqrt(np.maximum(err_sq, 0) / np.where(e > 0, e, 1)), 0.0)
    return float(rel.max()) if rel.size else 0.0


def _group_curves(group, stack, modules, cap) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Error² versus params per structure (lower envelopes), for plots and the global budget."""
    spectra = tz.svd_spectra(stack, modules, group.modules)
    curves = {"svd": tz.truncation_curve(spectra, np.zeros(len(spectra)), group.d_out + group.d_in, 0, cap)}
    if stack is None:
        return curves
    p, e, _ = tz.tucker2_pareto(stack, cap)
    curves["tucker2"] = (p, e)
    ps, es = [], []
    for r_u in tz.shared_out_grid(stack.F.shape[0]):
        if cap is not None and r_u > cap:
            break
        sp, outside = tz.shared_out_spectra(stack, r_u)
        pp, ee = tz.truncation_curve(sp, outside, r_u + group.d_in, group.d_out * r_u, cap)
        ps.append(pp)
        es.append(ee)
    curves["shared-out"] = _pareto(np.concatenate(ps), np.concatenate(es))
    return curves


def _pareto(p: np.ndarray, e: np.ndarray):
    order = np.lexsort((e, p))
    p, e = p[order], e[order]
    keep = e < np.minimum.accumulate(np.concatenate([[np.inf], e[:-1]]))
    return p[keep], e[keep]


def _lower_hull(p: np.ndarray, e: np.ndarray):
    """Lower convex hull of (params, err²) points, params increasing (err² decreasing)."""
    p, e = _pareto(p, e)
    hull: list[int] = []
    for i in range(len(p)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> i
            if (e[b] - e[a]) * (p[i] - p[a]) >= (e[i] - e[a]) * (p[b] - p[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return p[hull], e[hull]


def _global_allowances(groups, stacks, modules, allow_total: float, cap) -> list[float]:
    """Water-filling: start every group at its smallest form, then repeatedly buy the error reduction with the
    most error removed per parameter until the total error fits."""
    hulls = []
    for g, st in zip(groups, stacks):
        curves = _group_curves(g, st, modules, cap)
        p = np.concatenate([c[0] for c in curves.values()])
        e = np.concatenate([c[1] for c in curves.values()])
        hulls.append(_lower_hull(p, e))
    pos = [0] * len(groups)
    total = sum(float(h[1][0]) for h in hulls)
    while total > allow_total * (1 + 1e-12):
        best_i, best_rate = None, -1.0
        for i, (p, e) in enumerate(hulls):
            if pos[i] + 1 < len(p):
                rate = (e[pos[i]] - e[pos[i] + 1]) / max(p[pos[i] + 1] - p[pos[i]], 1e-9)
                if rate > best_rate:
                    best_i, best_rate = i, rate
        if best_i is None:
            break
        i = best_i
        total -= float(hulls[i][1][pos[i]] - hulls[i][1][pos[i] + 1])
        pos[i] += 1
    # hand out the slack left on the last step in proportion, so no group is asked for more than its hull point
    slack = max(allow_total - total, 0.0)
    errs = [float(h[1][pos[i]]) for i, h in enumerate(hulls)]
    weight = sum(errs) or 1.0
    return [e + slack * (e / weight if sum(errs) > 0 else 1.0 / len(errs)) for e in errs]


# ---------------------------------------------------------------------------------------------- fitting
def _fit(cand: tz.Candidate, group, stack, modules, config) -> CompressedGroup:
    s = cand.structure
    ranks = {k: v for k, v in cand.spec.items() if k != "fit"}
    ranks.update(d_out=group.d_out, d_in=group.d_in)
    out = CompressedGroup(name=group.name, structure=s, modules=list(group.modules), ranks=ranks)
    if s == "svd":
        for name, k in zip(group.modules, cand.spec["ranks"]):
            m = modules[name]
            out.per_module[name] = {"B": m.B[:, :k].clone(), "A": m.A[:k].clone()}
        return out
    eye_u = torch.eye(stack.F.shape[0], dtype=tz.F64)
    if s == "shared-out":
        r_u = cand.spec["r_u"]
        out.shared["U"] = stack.lift_U(eye_u[:, :r_u])
        for l, (name, k) in enumerate(zip(group.modules, cand.spec["ranks"])):
            M = stack.F[:r_u, stack.block(l)] * stack.S[l]
            Y, sig, Zh = torch.linalg.svd(M, full_matrices=False)
            root = sig[:k].sqrt()
            G = Y[:, :k] * root
            A = root[:, None] * (stack.V[l].double() @ Zh[:k].T).T
            out.per_module[name] = {"G": G.float(), "A": A.float()}
        return out
    eye_v = torch.eye(stack.G.shape[0], dtype=tz.F64)
    if s == "tucker2":
        Xu, Xv, cores = tz.refine_tucker2(stack, cand.spec["r_u"], cand.spec["r_v"], config.hooi_iters)
        out.shared["U"] = stack.lift_U(Xu)
        out.shared["Vt"] = stack.lift_V(Xv).T.contiguous()
        for l, name in enumerate(group.modules):
            out.per_module[name] = {"G": cores[l].float()}
        return out
    r_u, r_v = cand.spec["r_u"], cand.spec["r_v"]
    if s == "cp":
        weights, (Wl, Wu, Wv) = cand.spec["fit"]
        out.shared["U"] = stack.lift_U(eye_u[:, :r_u] @ Wu.double())
        out.shared["Vt"] = stack.lift_V(eye_v[:, :r_v] @ Wv.double()).T.contiguous()
        for l, name in enumerate(group.modules):
            out.per_module[name] = {"w": (weights * Wl[l]).float()}
        return out
    if s == "tt":
        G1, G2, G3 = cand.spec["fit"]
        out.shared["U"] = stack.lift_U(eye_u[:, :r_u])
        out.shared["Vt"] = stack.lift_V(eye_v[:, :r_v]).T.contiguous()
        out.shared["G2"] = G2.float()
        out.shared["G3"] = G3[:, :, 0].float()
        for l, name in enumerate(group.modules):
            out.per_module[name] = {"w": G1[0, l].float()}
        return out
    raise AssertionError(s)


def _round(group: CompressedGroup, dtype: torch.dtype) -> None:
    """Round every stored tensor through the storage dtype so verified errors are those of the file."""
    group.shared = {k: v.to(dtype).float() for k, v in group.shared.items()}
    group.per_module = {n: {k: v.to(dtype).float() for k, v in d.items()} for n, d in group.per_module.items()}


def verify_errors(group: CompressedGroup, modules) -> np.ndarray:
    """‖ΔW_l − ΔŴ_l‖²_F per module from Gram traces of the stored factors (no ΔW, no d_out × d_in matrix)."""
    err = []
    gram_cache: dict[int, tuple] = {}

    def cached(t, side):  # shared bases: converted and Gram'd once per group (t is kept so ids stay unique)
        key = (id(t), side)
        if key not in gram_cache:
            d = t.double()
            gram_cache[key] = (t, d, d.T @ d if side == "left" else d @ d.T)
        return gram_cache[key][1:]

    for name in group.modules:
        m = modules[name]
        B, A = m.B.double() * m.scale, m.A.double()
        left_raw, core, right_raw = module_chain(group, name)
        left, left_gram = cached(left_raw, "left")
        right, RRt = cached(right_raw, "right")
        core = torch.eye(left.shape[1], dtype=tz.F64) if core is None else core.double()
        ref = float(((B.T @ B) * (A @ A.T)).sum())
        BtL = B.T @ left                          # r × a
        RAt = right @ A.T                         # b × r
        cross = float(torch.trace(BtL @ core @ RAt))
        approx = float(torch.trace(left_gram @ core @ RRt @ core.T))
        err.append(max(ref - 2 * cross + approx, 0.0))
    return np.array(err)


def output_err_sq(group: CompressedGroup, modules, calibration: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per module ‖(ΔW − ΔŴ)X‖²_F and ‖ΔW X‖²_F with C = XXᵀ, as Gram traces (no ΔW)."""
    from edge_lora.stages.canonicalize import output_error_sq

    err, ref = [], []
    for name in group.modules:
        C = calibration[name].double()
        m = modules[name]
        left, core, right = module_chain(group, name)
        left_core = left.double() if core is None else left.double() @ core.double()
        Bcat = torch.cat([m.B.double() * m.scale, -left_core], dim=1)
        Acat = torch.cat([m.A.double(), right.double()], dim=0)
        err.append(max(output_error_sq(Bcat, Acat, C), 0.0))
        ref.append(output_error_sq(m.B * m.scale, m.A, C))
    return np.array(err), np.array(ref)


def output_errors(group: CompressedGroup, modules, calibration: dict) -> dict[str, float]:
    """Relative output error ‖(ΔW − ΔŴ)X‖ / ‖ΔW X‖ per module that has calibration."""
    sub = CompressedGroup(name=group.name, structure=group.structure,
                          modules=[n for n in group.modules if n in calibration], shared=group.shared,
                          per_module=group.per_module, ranks=group.ranks)
    if not sub.modules:
        return {}
    err, ref = output_err_sq(sub, modules, calibration)
    return {n: math.sqrt(e / r) if r > 0 else 0.0 for n, e, r in zip(sub.modules, err, ref)}


# ---------------------------------------------------------------------------------------------- the stage
def compress(adapter: Adapter, config: CompressConfig = CompressConfig(),
             calibration: dict[str, torch.Tensor] | None = None) -> tuple[CompressedAdapter, StageReport]:
    """Choose and fit a structure per group within the budget. ``calibration`` (module name → XᵀX over its
    inputs, d_in × d_in) adds output errors to the report."""
    if not adapter.modules:
        raise AdapterError("compress: the adapter has no LoRA modules; there is nothing to compress.")
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _compress(adapter, config, calibration)
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class CompressInput:
    adapter: Adapter
    calibration: dict | None = None   # module name -> C = XXᵀ of its inputs (collect_calibration), for output budgets


def run(inp: CompressInput, config: CompressConfig = CompressConfig()) -> tuple[CompressedAdapter, StageReport]:
    """The stage entry (every stage module has one: ``run(input, config) -> (output, StageReport)``)."""
    return compress(inp.adapter, config, inp.calibration)


def _whiten(modules, calibration):
    """Per module, the Cholesky factor L of its (lightly damped) C and the canonical form of (B, A·L): in those
    coordinates the Frobenius error is the output error, so the same search applies."""
    from edge_lora.adapter import LoraModule
    from edge_lora.stages.canonicalize import canonicalize_module

    missing = [n for n in modules if n not in calibration]
    if missing:
        raise ConfigError(f"compress: error_metric='output' needs calibration for every module; none for "
                          f"{missing[:3]}{' ...' if len(missing) > 3 else ''}. Collect it with "
                          "collect_calibration() over the modules' own base model.")
    factors, whitened = {}, {}
    for n, m in modules.items():
        C = calibration[n].double()
        if C.shape != (m.d_in, m.d_in):
            raise CompatibilityError(f"compress: calibration for {n!r} is {tuple(C.shape)}, expected "
                                     f"{m.d_in}×{m.d_in} (XXᵀ over the module's inputs): collect it over the "
                                     "adapter's own base model.")
        damp = 1e-6 * float(torch.trace(C)) / m.d_in + 1e-30
        L = torch.linalg.cholesky(C + damp * torch.eye(m.d_in, dtype=C.dtype))
        factors[n] = L
        whitened[n] = canonicalize_module(LoraModule(name=n, kind=m.kind, A=(m.A.double() @ L).float(), B=m.B,
                                                     scale=m.scale, alpha=m.alpha, bias=m.bias))
    return factors, whitened


def _unwhiten(group: CompressedGroup, factors) -> None:
    for name, parts in group.per_module.items():
        if "A" in parts and parts["A"].numel():
            parts["A"] = torch.linalg.solve_triangular(factors[name], parts["A"].double(), upper=False,
                                                       left=False).float()


def _compress(adapter, config, calibration):
    start = time.perf_counter()
    canonical = adapter if adapter.form == "canonical" else canonicalize(adapter)[0]
    original = canonical.modules
    whitening = None
    if config.error_metric == "output":
        whitening, modules = _whiten(original, calibration or {})
    else:
        modules = original
    budget = config.relative_budget()
    groups = tz.group_modules(modules)
    t0 = time.perf_counter()
    stacks = []
    for g in groups:
        energy = sum(float((modules[n].singular_values.double() ** 2).sum()) for n in g.modules)
        stacks.append(tz.build_core_stack(g, modules) if len(g.modules) > 1 and energy > 0 else None)
    t_core = time.perf_counter() - t0

    energies = [_module_energies(st, modules, g) for g, st in zip(groups, stacks)]
    # Budget 0 means "drop nothing"; a full-rank fit still measures ~1e-16 of round-off, so the squared budget
    # gets a floor of float64 round-off (a relative error of 1e-7) instead of refusing an exact fit.
    budget_sq = max(budget ** 2, 1e-14)
    if config.scope == "global":
        total_energy = sum(float(e.sum()) for e in energies)
        allows: list = _global_allowances(groups, stacks, modules, budget_sq * total_energy, config.max_rank)
    elif config.scope == "module":
        allows = [budget_sq * e for e in energies]
    else:
        allows = [budget_sq * float(e.sum()) for e in energies]

    dtype = getattr(torch, config.storage_dtype)
    out_groups, group_reports = [], []
    for g, st, allow, e in zip(groups, stacks, allows, energies):
        if float(e.sum()) == 0:  # an untrained (B = 0) or empty group: nothing to keep
            cand, alternatives = tz.Candidate("svd", 0, np.zeros(len(g.modules)), {"ranks": [0] * len(g.modules)}), {}
        else:
            cand, alternatives = _search_group(g, st, modules, allow, config)
        if cand is None:
            best = min((a.get("best_rel_err") for a in alternatives.values()
                        if a.get("best_rel_err") is not None and not math.isnan(a["best_rel_err"])), default=None)
            notes = "; ".join(f"{k}: {a.get('note')}" for k, a in alternatives.items())
            raise BudgetError(
                f"group {g.name!r}: no {config.structure if config.structure != 'auto' else 'structure'} meets "
                f"the relative error budget {budget:g} ({config.scope} scope"
                f"{', max_rank=' + str(config.max_rank) if config.max_rank is not None else ''}). Best achievable: "
                f"{best:.4g}. ({notes}). Raise --budget, lift --max-rank, or use --structure auto."
                if best is not None else
                f"group {g.name!r}: no {config.structure} fit meets the relative error budget {budget:g} ({notes}). "
                "Raise --budget or use --structure auto.")
        cg = _fit(cand, g, st, modules, config)
        if whitening is not None:
            _unwhiten(cg, whitening)
        _round(cg, dtype)
        if whitening is not None:  # the budget metric is the output error, measured with the raw C
            err_sq, e = output_err_sq(cg, original, calibration)
        else:
            err_sq = verify_errors(cg, original) if config.verify else cand.err_sq
        out_groups.append(cg)
        group_reports.append(_group_report(g, st, cg, cand, alternatives, err_sq, e, calibration, original, dtype,
                                           config))

    result = CompressedAdapter(
        groups=out_groups, kinds={n: m.kind for n, m in original.items()},
        biases={n: m.bias for n, m in original.items() if m.bias is not None},
        peft_config=dict(adapter.config), extra_tensors=dict(adapter.extra_tensors), source=adapter.source,
        storage_dtype=config.storage_dtype)
    report = _stage_report(adapter, result, group_reports, config, budget, time.perf_counter() - start, t_core)
    return result, report


def _group_report(g, st, cg, cand, alternatives, err_sq, energy, calibration, modules, dtype, config) -> dict:
    bpe = torch.tensor([], dtype=dtype).element_size()
    params_before = sum(modules[n].rank * (g.d_out + g.d_in) for n in g.modules)
    rel = np.where(energy > 0, np.sqrt(np.maximum(err_sq, 0) / np.where(energy > 0, energy, 1)), 0.0)
    worst = int(np.argmax(rel)) if rel.size else 0
    rep = {
        "group": g.name, "layers": len(g.modules), "d_out": g.d_out, "d_in": g.d_in,
        "structure": cg.structure, "ranks": {k: v for k, v in cg.ranks.items() if k not in ("d_out", "d_in")},
        "params_before": params_before, "params_after": cg.params,
        "bytes_before": params_before * bpe, "bytes_after": cg.params * bpe,
        "rel_err": _rel(float(err_sq.sum()), float(energy.sum())),
        "worst_module": g.modules[worst], "worst_module_rel_err": float(rel[worst]) if rel.size else 0.0,
        "module_rel_err": {n: float(r) for n, r in zip(g.modules, rel)},
        "energy": float(energy.sum()),
        "alternatives": {k: {**v, "bytes": v["params"] * bpe} if v.get("feasible") else v
                         for k, v in alternatives.items()},
    }
    if st is not None:
        rep["spectra"] = {mode: {"values": [float(x) for x in sig[:64]], "size": int(sig.numel()), **energy_ranks(sig)}
                          for mode, sig in (("layer", st.sigma_layer), ("output", st.sigma_out),
                                            ("input", st.sigma_in))}
    if calibration:
        outs = output_errors(cg, modules, calibration)
        if outs:
            rep["output_rel_err"] = outs
    if config.curves and float(energy.sum()) > 0:
        curves = _group_curves(g, st, modules, config.max_rank)
        rep["curves"] = {k: {"params": [int(x) for x in p], "rel_err": [_rel(x, float(energy.sum())) for x in e]}
                         for k, (p, e) in curves.items()}
    return rep


def _stage_report(adapter, result, groups, config, budget, seconds, t_core) -> StageReport:
    err_sq = sum(g["rel_err"] ** 2 * g["energy"] for g in groups)
    energy = sum(g["energy"] for g in groups)
    worst = max(groups, key=lambda g: g["worst_module_rel_err"]) if groups else None
    before = adapter.params
    metrics = {
        "budget": budget, "scope": config.scope, "error_metric": config.error_metric,
        "params_before": before, "params_after": result.params,
        "bytes_before_fp16": before * 2, "bytes_after": result.nbytes,
        "size_ratio_vs_fp16_peft": result.nbytes / max(before * 2, 1),
        "param_reduction": 1 - result.params / max(before, 1),
        "rel_err": math.sqrt(err_sq / energy) if energy > 0 else 0.0,
        "worst_module": worst["worst_module"] if worst else None,
        "worst_module_rel_err": worst["worst_module_rel_err"] if worst else 0.0,
        "chosen": {g["group"]: g["structure"] for g in groups},
        "core_seconds": t_core,
        "groups": groups,
    }
    return StageReport(stage="compress", config={k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in asdict(config).items()},
                       metrics=metrics, seconds=seconds)


# ---------------------------------------------------------------------------------------------- calibration
def collect_calibration(model, tokenizer, texts: list, module_names: list[str],
                        max_tokens: int = 512) -> dict[str, torch.Tensor]:
    """C = Σ x xᵀ over the inputs of each named Linear, from forward hooks on a few hundred tokens."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return hook

    for name in module_names:
        layer = model.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        hooks.append(layer.register_forward_hook(hook_for(name)))
    try:
        seen = 0
        with torch.inference_mode():
            for text in texts:  # strings, or token id lists when there is no tokenizer
                ids = (tokenizer(text, return_tensors="pt")["input_ids"] if isinstance(text, str)
                       else torch.as_tensor(text).reshape(1, -1))[:, :max_tokens - seen]
                if ids.numel() == 0:
                    break
                model(input_ids=ids)
                seen += ids.shape[1]
                if seen >= max_tokens:
                    break
    finally:
        for h in hooks:
            h.remove()
    return grams


# ---------------------------------------------------------------------------------------------- report files
def markdown_report(report: StageReport) -> str:
    m = report.metrics
    lines = [
        "# Compression report", "",
        f"budget: relative error ≤ {m['budget']:g} ({m['scope']} scope); "
        f"result: energy-weighted relative error {m['rel_err']:.4f}, worst module {m['worst_module']} "
        f"({m['worst_module_rel_err']:.4f}).", "",
        "| | params | bytes |", "|---|---:|---:|",
        f"| before (fp16 PEFT) | {m['params_before']:,} | {m['bytes_before_fp16']:,} |",
        f"| after ({report.config['storage_dtype']}) | {m['params_after']:,} | {m['bytes_after']:,} |",
        f"| ratio | {m['params_after'] / max(m['params_before'], 1):.3f} | {m['size_ratio_vs_fp16_peft']:.3f} |", "",
        "## Per group", "",
        "| group | L | chosen | ranks | params before | params after | rel err | worst module err | "
        "svd | shared-out | tucker2 | cp | tt |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in m["groups"]:
        alts = []
        for s in tz.STRUCTURES:
            a = g["alternatives"].get(s)
            alts.append("–" if a is None else (f"{a['params']:,}" if a.get("feasible") else "✗"))
        ranks = ", ".join(f"{k}={_short(v)}" for k, v in g["ranks"].items())
        lines.append(f"| {g['group']} | {g['layers']} | {g['structure']} | {ranks} | {g['params_before']:,} | "
                     f"{g['params_after']:,} | {g['rel_err']:.4f} | {g['worst_module_rel_err']:.4f} | "
                     + " | ".join(alts) + " |")
    lines += ["", "Alternatives: parameters each structure needs to meet the same budget (✗: cannot, – : not "
              "tried; the JSON report says why).", "", "## Spectra (rank holding 50/90/99% of the energy)", "",
              "| group | layer mode | output mode | input mode |", "|---|---|---|---|"]
    for g in m["groups"]:
        if "spectra" in g:
            sp = g["spectra"]
            lines.append(f"| {g['group']} | " + " | ".join(
                f"{sp[k]['50%']}/{sp[k]['90%']}/{sp[k]['99%']} of {sp[k]['size']}"
                for k in ("layer", "output", "input")) + " |")
    return "\n".join(lines) + "\n"


def _short(v):
    if isinstance(v, list):
        return f"{min(v)}..{max(v)} (Σ{sum(v)})" if v else "[]"
    return v


def write_plots(report: StageReport, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in report.metrics["groups"] if "spectra" in g or "curves" in g]
    if not groups:
        return []
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    paths = []
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        for mode, style in (("layer", "o-"), ("output", "-"), ("input", "--")):
            if "spectra" in g:
                vals = np.array(g["spectra"][mode]["values"])
                if vals.size and vals[0] > 0:
                    ax.semilogy(np.arange(1, len(vals) + 1), vals / vals[0], style, ms=2, label=mode)
        ax.set_title(g["group"].split(".")[-1] + f" (L={g['layers']})", fontsize=9)
        ax.set_xlabel("component")
        ax.set_ylim(1e-4, 1.5)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle("Mode spectra of the cross-layer core (σ / σ₁)")
    fig.tight_layout()
    paths.append(folder / "spectra.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    bpe = torch.tensor([], dtype=getattr(torch, report.config["storage_dtype"])).element_size()
    for ax, g in zip(axes.flat, groups):
        for name, c in g.get("curves", {}).items():
            kib, err = np.array(c["params"]) * bpe / 1024, np.array(c["rel_err"])
            ax.plot(kib[kib > 0], err[kib > 0], label=name, lw=1)
        for name, a in g["alternatives"].items():
            if a.get("feasible") and name in ("cp", "tt"):
                ax.plot(a["bytes"] / 1024, a["rel_err"], "x", label=name)
        ax.plot(g["bytes_after"] / 1024, g["rel_err"], "k*", ms=9, label=f"chosen: {g['structure']}")
        ax.axvline(g["bytes_before"] / 1024, color="grey", lw=0.5)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_ylim(1e-3, 1.2)
        ax.set_xlabel("KiB (log)")
        ax.set_ylabel("relative error")
        ax.set_title(g["group"].split(".")[-1], fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle("Error versus size per group (grey: original)")
    fig.tight_layout()
    paths.append(folder / "error_vs_bytes.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------- a folder
QUANTIZED_FILE = "quantized.safetensors"
PLOT_FILES = ("spectra.png", "error_vs_bytes.png")


@dataclass(frozen=True)
class CompressedFolder:
    """What :func:`compress_folder` wrote: the report (``report.json``; with quantization, its report is under
    ``metrics["quantize"]``), the markdown (``report.md``) and the file names in the folder."""

    out: Path
    report: StageReport
    markdown: str
    files: tuple[str, ...]
    as_peft: Path | None = None


def factor_quant_config(bits: str | None, group_size: int | None = None, asymmetric: bool = False):
    """``compress --bits/--group-size/--asymmetric`` → a FactorQuantConfig, or None without ``bits``. Checked
    before any work: a bad ``--bits`` must not cost a compression run."""
    from edge_lora.stages.quantize_factors import FactorQuantConfig, QuantizeError, parse_bits

    if bits is None:
        if group_size is not None or asymmetric:
            raise QuantizeError("--group-size and --asymmetric set factor quantization; add --bits (8, 4, 3, 2 or "
                                "mixed:AVG_BITS) to quantize.")
        return None
    return FactorQuantConfig(**parse_bits(bits), group_size=64 if group_size is None else group_size,
                             symmetric=not asymmetric)


def calibration_texts(path: str | os.PathLike | None, flag: str = "--calibration-text") -> list[str]:
    """The non-empty lines of ``--calibration-text`` (default: the task-agnostic text of edge_lora.calibration),
    or, for a JSONL file of prompt/completion objects (the ``--eval-data`` format), each prompt with its
    completion; ``flag``: the option the file came from, for the error messages."""
    if path is None:
        from edge_lora.calibration import TEXTS

        return list(TEXTS)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file; pass a UTF-8 text file (one calibration text "
                          "per line), or leave the flag out to use the built-in task-agnostic text.")
    try:
        raw = path.read_text(encoding="utf-8")
        if raw.lstrip().startswith("{"):   # the --eval-data JSONL of export/validate: prompt + completion lines
            from edge_lora.eval_data import load_eval_data

            return [e.prompt + e.target for e in load_eval_data(path, flag).examples]
        texts = [t for t in raw.splitlines() if t.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path} cannot be read as UTF-8 text ({exc}); pass a plain text "
                          "file, one calibration text per line.") from exc
    if not texts:
        raise ConfigError(f"{flag} {path} has no non-empty lines; give a few hundred tokens of text "
                          "like the adapter's inputs.")
    return texts


def calibrate(base, adapter: Adapter, text_file: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """C = XXᵀ of every adapted module's inputs on ``base`` over the calibration texts."""
    from edge_lora.base import load_base

    texts = calibration_texts(text_file)   # before loading the base: a wrong path fails fast
    model, tokenizer = load_base(base)
    if tokenizer is None:
        raise ModelError(f"--calibrate {base}: the base has no tokenizer files to encode calibration text; pass "
                         "the HF folder that holds them (tokenizer.json / tokenizer_config.json).")
    return collect_calibration(model, tokenizer, texts, list(adapter.modules))


def compress_folder(adapter_dir: str | os.PathLike, out: str | os.PathLike, config: CompressConfig,
                    quant_config=None, calibrate_base=None, calibration_text: str | os.PathLike | None = None,
                    as_peft: str | os.PathLike | None = None, force: bool = False) -> CompressedFolder:
    """``python -m edge_lora compress``: compress the PEFT folder ``adapter_dir`` (and, with ``quant_config``,
    quantize the result) into the folder ``out``: compressed.safetensors, quantized.safetensors (with
    ``quant_config``), report.json, report.md and plots, all written into a temporary folder renamed into place
    at the end (a failure leaves no ``out``; an existing one is replaced only with ``force``). ``as_peft``: also
    write the plain PEFT expansion (dequantized with ``quant_config``). Raises BudgetError when no fit meets the
    budget."""
    from edge_lora.adapter import load_peft, save_peft
    from edge_lora.files import atomic_folder

    out = Path(out)
    for folder, flag in ((out, "--out"), (as_peft, "--as-peft")):
        if folder is not None and Path(folder).exists() and not force:
            raise EdgeLoraError(f"{flag} {folder} already exists; choose another folder or pass --force to "
                                "replace it.")
    if config.error_metric == "output" and calibrate_base is None:
        raise ConfigError("--output-budget needs --calibrate BASE (the model whose activations define the error).")
    if calibration_text is not None and calibrate_base is None:
        raise ConfigError(f"--calibration-text {calibration_text} is only read with --calibrate BASE; add it.")
    adapter = load_peft(adapter_dir)
    calibration = calibrate(calibrate_base, adapter, calibration_text) if calibrate_base is not None else None
    result, report = compress(adapter, config, calibration)
    expansion = result.to_adapter()
    markdown = markdown_report(report)
    with atomic_folder(out) as tmp:
        files = [result.save(tmp).name]
        if quant_config is not None:
            from edge_lora.stages.quantize_factors import quantize_to_file

            expansion, qreport = quantize_to_file(adapter, expansion, quant_config, tmp / QUANTIZED_FILE,
                                                   [g.name for g in result.groups if g.structure != "svd"])
            report.metrics["quantize"] = qreport.to_dict()
            markdown += "\n" + qreport.metrics["summary"] + "\n"
            files.append(QUANTIZED_FILE)
        write_text_atomic(tmp / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
        write_text_atomic(tmp / "report.md", markdown)
        files += ["report.md", "report.json"] + [p.name for p in write_plots(report, tmp)]
        if as_peft is not None:   # before the rename: a failure here leaves no half-finished out either
            save_peft(expansion, as_peft, overwrite=force)
    return CompressedFolder(out=out, report=report, markdown=markdown, files=tuple(files),
                            as_peft=Path(as_peft) if as_peft is not None else None)
