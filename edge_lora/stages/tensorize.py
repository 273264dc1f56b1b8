"""Cross-layer structure of one module type, computed on the small core (never on ΔW).

A *group* is one module type across layers (``model.layers.*.self_attn.q_proj``) with one shape. From the
canonical form ``ΔW_l = U_l·diag(S_l)·V_lᵀ`` (orthonormal U_l, V_l) we stack the factors of all layers,
``[U_1 … U_L] = Q_B·R_B`` and ``[V_1 … V_L] = Q_A·R_A``, so that ``ΔW_l = Q_B·C_l·Q_Aᵀ`` with the small core
``C_l = R_B,l·diag(S_l)·R_A,lᵀ`` (k_B × k_A, k ≤ Σ r_l). Q_B and Q_A are orthonormal, so a Tucker-2 / CP / TT fit
of the core stack, lifted by Q_B and Q_A, has exactly the error of the same fit on the L × d_out × d_in tensor.

Q_B is never formed during the search either: R_B comes from the eigen-decomposition of the r-sized Gram
``[U_l]ᵀ[U_l] = W·Λ·Wᵀ`` (``R_B = Λ^½·Wᵀ``, ``Q_B = [U_l]·W·Λ^-½``), which also drops directions the stack does
not span (a planted shared basis gives a core of its true size). Only the chosen factors are lifted to d.

The core is kept in the HOSVD bases: ``D_l = X_outᵀ·C_l·X_in`` where X_out / X_in are the eigenvectors of the
output / input mode Grams ``Σ_l C_l C_lᵀ`` / ``Σ_l C_lᵀ C_l``. Then the error of a truncated HOSVD with ranks
(r_u, r_v) is the energy outside the leading r_u × r_v corner of every D_l: one 2-D cumulative sum gives the
error of every rank pair at once, per layer and for the group. HOOI (tensorly) refines the chosen pair.

Structures (module l's update as ``left · core · right``; a hot-swap export keeps shared tensors single):
- ``svd``:        B_l (d_out × k_l) · A_l (k_l × d_in), per-module truncation.
- ``shared-out``: U (d_out × r_u, shared) · G_l (r_u × k_l) · A_l (k_l × d_in).
- ``tucker2``:    U (d_out × r_u, shared) · G_l (r_u × r_v) · Vt (r_v × d_in, shared)   (LoTR).
- ``cp``:         U (d_out × R, shared) · diag(w_l) (R) · Vt (R × d_in, shared).
- ``tt``:         U · (Σ_a w_l[a]·G2[a]) · G3 · Vt: a tensor train over (layer, out, in) of a Tucker-2 core, so
                  the per-layer cores are mixed from r1 shared slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from edge_lora.config import COMPRESS_STRUCTURES

STRUCTURES = COMPRESS_STRUCTURES   # the fits below; the list lives with CompressConfig (edge_lora.config)
F64 = torch.float64


# ---------------------------------------------------------------------------------------------- grouping
@dataclass
class Group:
    name: str                    # "model.layers.*.self_attn.q_proj" (+ " [d_out×d_in]" when shapes split it)
    modules: list[str]           # in layer order
    layers: list[int | None]
    kind: str
    d_out: int
    d_in: int


def layer_pattern(module_name: str) -> tuple[str, int | None]:
    """Replace the first all-digit path component (the layer index) by ``*``."""
    parts = module_name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i] + ["*"] + parts[i + 1:]), int(p)
    return module_name, None


def group_modules(modules: dict) -> list[Group]:
    """One group per (module type, kind, shape). Modules of one type but different shapes (e.g. a model with
    varying widths) are grouped apart rather than stacked."""
    buckets: dict[tuple, list[tuple[int | None, str]]] = {}
    for name, m in modules.items():
        pattern, layer = layer_pattern(name)
        if layer is None:
            pattern = name  # no layer index: a group of its own
        buckets.setdefault((pattern, m.kind, m.d_out, m.d_in), []).append((layer, name))
    patterns = [k[0] for k in buckets]
    groups = []
    for (pattern, kind, d_out, d_in), members in sorted(buckets.items(), key=lambda kv: kv[0]):
        members.sort(key=lambda t: (t[0] is None, t[0] or 0, t[1]))
        name = pattern if patterns.count(pattern) == 1 else f"{pattern} [{d_out}x{d_in}]"
        groups.append(Group(name=name, modules=[n for _, n in members], layers=[l for l, _ in members],
                            kind=kind, d_out=d_out, d_in=d_in))
    return groups


# ---------------------------------------------------------------------------------------------- the small core
@dataclass
class CoreStack:
    """Everything the search needs about one group, in r-sized and core-sized matrices."""

    group: Group
    S: list[torch.Tensor]            # per module singular values (float64, zeros dropped)
    U: list[torch.Tensor]            # per module d_out × r_l orthonormal (float32)
    V: list[torch.Tensor]            # per module d_in × r_l orthonormal (float32)
    offsets: list[int]               # column offsets of each module in the stacks
    energy: torch.Tensor             # ‖ΔW_l‖² per module
    lift_out: torch.Tensor           # R × k_B:  Q_B = [U_l] @ lift_out
    lift_in: torch.Tensor            # R × k_A
    F: torch.Tensor                  # k_B × R:  X_outᵀ R_B
    G: torch.Tensor                  # k_A × R:  X_inᵀ R_A
    sigma_out: torch.Tensor          # output-mode spectrum (singular values of the mode unfolding)
    sigma_in: torch.Tensor
    sigma_layer: torch.Tensor
    _core: torch.Tensor | None = field(default=None, repr=False)
    _tables: dict = field(default_factory=dict, repr=False)
    _stacks: dict = field(default_factory=dict, repr=False)

    @property
    def L(self) -> int:
        return len(self.S)

    @property
    def total_energy(self) -> float:
        return float(self.energy.sum())

    def block(self, l: int) -> slice:
        return slice(self.offsets[l], self.offsets[l + 1])

    def core(self) -> torch.Tensor:
        """D: L × k_B × k_A, the core stack in the HOSVD bases (built once, on demand)."""
        if self._core is None:
            D = torch.empty(self.L, self.F.shape[0], self.G.shape[0], dtype=F64)
            for l in range(self.L):
                torch.matmul(self.F[:, self.block(l)] * self.S[l], self.G[:, self.block(l)].T, out=D[l])
            self._core = D
        return self._core

    def stacked(self, side: str) -> torch.Tensor:
        if side not in self._stacks:
            self._stacks[side] = _stack(self.U if side == "out" else self.V)
        return self._stacks[side]

    def lift_U(self, X: torch.Tensor) -> torch.Tensor:
        """Q_B @ X_out @ X for a k_B × r coefficient matrix X: a d_out × r orthonormal basis."""
        return self.stacked("out") @ (self.lift_out @ X).float()

    def lift_V(self, X: torch.Tensor) -> torch.Tensor:
        return self.stacked("in") @ (self.lift_in @ X).float()


def _stack(mats: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(mats, dim=1) if len(mats) > 1 else mats[0]


def _range_basis(stack: torch.Tensor, rel_tol: float = 1e-10):
    """R (k × R) and lift (R × k) with stack = (stack @ lift) @ R and stack @ lift orthonormal, from the Gram."""
    gram = (stack.T @ stack).to(F64)
    lam, W = torch.linalg.eigh(gram)
    keep = lam > rel_tol * max(float(lam.max()), 1e-300)
    lam, W = lam[keep].flip(0), W[:, keep].flip(1)
    root = lam.sqrt()
    return root[:, None] * W.T, W / root


def _sym_eig_desc(M: torch.Tensor):
    lam, X = torch.linalg.eigh(M)
    return lam.flip(0).clamp(min=0), X.flip(1)


def build_core_stack(group: Group, modules: dict) -> CoreStack:
    """The small core of a group from its canonical modules (B = U·S^½, A = S^½·Vᵀ)."""
    S, U, V = [], [], []
    for name in group.modules:
        m = modules[name]
        s = m.singular_values.to(F64)
        keep = s > 1e-7 * max(float(s.max()) if s.numel() else 0.0, 1e-30)
        root = s[keep].sqrt().float()
        S.append(s[keep])
        U.append(m.B[:, keep] / root)
        V.append(m.A[keep].T / root)
    offsets = np.cumsum([0] + [int(s.numel()) for s in S]).tolist()
    energy = torch.tensor([float((s ** 2).sum()) for s in S], dtype=F64)
    stacks = {"out": _stack(U), "in": _stack(V)}
    R_B, lift_out = _range_basis(stacks["out"])
    R_A, lift_in = _range_basis(stacks["in"])
    S_all = torch.cat(S)
    lam_out, X_out = _sym_eig_desc((R_B * S_all) @ (R_B * S_all).T)
    lam_in, X_in = _sym_eig_desc((R_A * S_all) @ (R_A * S_all).T)
    # layer mode: <ΔW_l, ΔW_m> = Σ_ij S_l[i]·(U_lᵀU_m)_ij·S_m[j]·(V_lᵀV_m)_ij, from the r-sized Grams
    W = (S_all[:, None] * (R_B.T @ R_B) * S_all[None, :]) * (R_A.T @ R_A)
    L = len(S)
    layer_gram = torch.zeros(L, L, dtype=F64)
    for l in range(L):
        for m in range(L):
            layer_gram[l, m] = W[offsets[l]:offsets[l + 1], offsets[m]:offsets[m + 1]].sum()
    lam_layer = torch.linalg.eigvalsh(layer_gram).flip(0).clamp(min=0)
    return CoreStack(group=group, S=S, U=U, V=V, offsets=offsets, energy=energy,
                     lift_out=lift_out @ X_out, lift_in=lift_in @ X_in, F=X_out.T @ R_B, G=X_in.T @ R_A,
                     sigma_out=lam_out.sqrt(), sigma_in=lam_in.sqrt(), sigma_layer=lam_layer.sqrt(),
                     _stacks=stacks)


def min_rank_for(sigma: torch.Tensor, allowed_sq: float) -> int:
    """Smallest r whose spectral tail Σ_{i≥r} σ_i² is within allowed_sq: a lower bound on the rank any
    structure needs along that mode (Eckart–Young on the mode unfolding)."""
    tail = torch.flip(torch.cumsum(torch.flip(sigma.double() ** 2, [0]), 0), [0]).tolist() + [0.0]
    return next(r for r, t in enumerate(tail) if t <= allowed_sq)


# ---------------------------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    """One way to store a group: its structure, ranks, parameter count and error² per module."""

    structure: str
    params: int
    err_sq: np.ndarray
    spec: dict

    @property
    def total_err_sq(self) -> float:
        return float(self.err_sq.sum())


def feasible(err_sq: np.ndarray, allow: np.ndarray | float) -> bool:
    """Module scope: allow is per module; group scope: a float for the sum."""
    tol = 1e-12
    if isinstance(allow, np.ndarray):
        return bool((err_sq <= allow * (1 + tol) + 1e-30).all())
    return float(err_sq.sum()) <= allow * (1 + tol) + 1e-30


def _pieces_truncation(spectra: list[torch.Tensor], base_err: np.ndarray, allow, cap: int | None):
    """Per-module ranks k_l that keep the fewest components with error within ``allow``.

    Each kept component of module l removes σ_{l,j}² from its error and costs the same in a group, so the
    group optimum keeps the largest σ² first (water-filling); per module, each takes its own shortest prefix.
    Returns (ranks, err_sq) or None when infeasible.
    """
    L = len(spectra)
    caps = [min(int(s.numel()), cap) if cap is not None else int(s.numel()) for s in spectra]
    sq = [(s.double() ** 2).numpy() for s in spectra]
    tails = [np.concatenate([np.cumsum(q[::-1])[::-1], [0.0]]) for q in sq]
    if isinstance(allow, np.ndarray):
        ranks = []
        for l in range(L):
            err = base_err[l] + tails[l][:caps[l] + 1]
            ok = np.nonzero(err <= allow[l] * (1 + 1e-12) + 1e-30)[0]
            if ok.size == 0:
                return None
            ranks.append(int(ok[0]))
    else:
        err_now = float(base_err.sum()) + sum(float(t[0]) for t in tails)
        pieces = sorted(((float(sq[l][j]), l) for l in range(L) for j in range(caps[l])), reverse=True)
        ranks = [0] * L
        for value, l in pieces:
            if err_now <= allow * (1 + 1e-12) + 1e-30:
                break
            ranks[l] += 1
            err_now -= value
        if err_now > allow * (1 + 1e-12) + 1e-30:
            return None
    err_sq = np.array([base_err[l] + tails[l][ranks[l]] for l in range(L)])
    return ranks, err_sq


def truncation_curve(spectra: list[torch.Tensor], base_err: np.ndarray, piece_params: int, fixed_params: int,
                     cap: int | None):
    """(params, err²) of the group water-filling order: a convex curve, for plots and global budgets."""
    sq = sorted((float(v) for s in spectra for v in (s.double() ** 2)[:cap].tolist()), reverse=True)
    total = float(base_err.sum()) + sum(float((s.double() ** 2).sum()) for s in spectra)
    errs = total - np.concatenate([[0.0], np.cumsum(sq)])
    params = fixed_params + piece_params * np.arange(len(errs))
    return params, np.maximum(errs, 0.0)


def svd_spectra(stack: CoreStack | None, modules: dict, names: list[str]) -> list[torch.Tensor]:
    if stack is not None:
        return stack.S
    return [modules[n].singular_values.to(F64) for n in names]


def search_svd(group: Group, spectra, allow, cap) -> Candidate | None:
    got = _pieces_truncation(spectra, np.zeros(len(spectra)), allow, cap)
    if got is None:
        return None
    ranks, err_sq = got
    return Candidate("svd", sum(ranks) * (group.d_out + group.d_in), err_sq, {"ranks": ranks})


def shared_out_grid(k: int) -> list[int]:
    grid = sorted({r for r in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
                   if r < k} | {k})
    return grid


def shared_out_spectra(stack: CoreStack, r_u: int):
    """Per layer: the spectrum of Uᵀ·ΔW_l = (F_l[:r_u]·S_l)·V_lᵀ and the energy outside span(U)."""
    spectra, outside = [], []
    for l in range(stack.L):
        M = stack.F[:r_u, stack.block(l)] * stack.S[l]
        s = torch.linalg.svdvals(M) if M.numel() else torch.zeros(0, dtype=F64)
        spectra.append(s)
        outside.append(max(float(stack.energy[l]) - float((M ** 2).sum()), 0.0))
    return spectra, np.array(outside)


def search_shared_out(stack: CoreStack, allow, cap) -> tuple[Candidate | None, float]:
    """Cheapest (r_u, k_l) over a grid of r_u; returns it (or None) and the best error² seen."""
    g = stack.group
    best, best_err = None, float("inf")
    for r_u in shared_out_grid(stack.F.shape[0]):
        if cap is not None and r_u > cap:
            break
        spectra, outside = shared_out_spectra(stack, r_u)
        best_err = min(best_err, float(outside.sum()))
        got = _pieces_truncation(spectra, outside, allow, cap)
        if got is None:
            continue
        ranks, err_sq = got
        params = g.d_out * r_u + sum(ranks) * (r_u + g.d_in)
        if best is None or params < best.params:
            best = Candidate("shared-out", params, err_sq, {"r_u": r_u, "ranks": ranks})
    return best, best_err


def tucker_tables(stack: CoreStack, per_layer: bool):
    """Captured energy of the truncated HOSVD for every (r_u, r_v): group table (k_B+1 × k_A+1) and optionally
    per layer (L × k_B+1 × k_A+1). Entry [i, j] keeps the leading i output and j input components."""
    def corner(x):
        c = x.cumsum(-1).cumsum(-2)
        return torch.nn.functional.pad(c, (1, 0, 1, 0))

    if "group" not in stack._tables:
        stack._tables["group"] = corner((stack.core() ** 2).sum(0))
    if per_layer and "layer" not in stack._tables:
        stack._tables["layer"] = corner(stack.core() ** 2)
    return stack._tables["group"], stack._tables.get("layer") if per_layer else None


def tucker2_params(g: Group, L: int, r_u, r_v):
    return g.d_out * r_u + g.d_in * r_v + L * r_u * r_v


def search_tucker2(stack: CoreStack, allow, cap) -> tuple[Candidate | None, float]:
    g, L = stack.group, stack.L
    per_layer = isinstance(allow, np.ndarray)
    table, layer_tables = tucker_tables(stack, per_layer)
    kB, kA = table.shape[0] - 1, table.shape[1] - 1
    iu = torch.arange(kB + 1, dtype=F64)[:, None]
    iv = torch.arange(kA + 1, dtype=F64)[None, :]
    params = (g.d_out * iu + g.d_in * iv + L * iu * iv)
    if per_layer:
        err = stack.energy[:, None, None] - layer_tables
        ok = (err <= torch.from_numpy(allow)[:, None, None] * (1 + 1e-12) + 1e-30).all(0)
        best_err = float(err[:, :cap + 1 if cap else None, :cap + 1 if cap else None].sum(0).min())
    else:
        err_g = stack.total_energy - table
        ok = err_g <= allow * (1 + 1e-12) + 1e-30
        best_err = float(err_g[:cap + 1 if cap else None, :cap + 1 if cap else None].min())
    if cap is not None:
        ok[cap + 1:, :] = False
        ok[:, cap + 1:] = False
    if not ok.any():
        return None, best_err
    masked = torch.where(ok, params, torch.full_like(params, float("inf")))
    flat = int(masked.argmin())
    r_u, r_v = divmod(flat, kA + 1)
    if per_layer:
        err_sq = (stack.energy - layer_tables[:, r_u, r_v]).clamp(min=0).numpy()
    else:
        D = stack.core()
        err_sq = (stack.energy - (D[:, :r_u, :r_v] ** 2).sum((1, 2))).clamp(min=0).numpy()
    return Candidate("tucker2", int(params[r_u, r_v]), err_sq, {"r_u": r_u, "r_v": r_v}), best_err


def tucker2_pareto(stack: CoreStack, cap: int | None = None, max_points: int = 400):
    """(params, err²) of the rank pairs on the Pareto front, for plots and the global budget."""
    table, _ = tucker_tables(stack, False)
    g = stack.group
    kB, kA = table.shape[0] - 1, table.shape[1] - 1
    iu = np.arange(kB + 1)[:, None]
    iv = np.arange(kA + 1)[None, :]
    params = (g.d_out * iu + g.d_in * iv + stack.L * iu * iv).astype(float)
    err = (stack.total_energy - table).clamp(min=0).numpy()
    if cap is not None:
        params, err = params[:cap + 1, :cap + 1], err[:cap + 1, :cap + 1]
        iu, iv = iu[:cap + 1], iv[:, :cap + 1]
    ru = np.broadcast_to(iu, params.shape).ravel()
    rv = np.broadcast_to(iv, params.shape).ravel()
    order = np.lexsort((err.ravel(), params.ravel()))
    p, e = params.ravel()[order], err.ravel()[order]
    front, best = [], float("inf")
    for idx in range(len(p)):
        if e[idx] < best - 1e-300:
            best = e[idx]
            front.append(idx)
    front = np.array(front)
    if len(front) > max_points:
        front = front[np.linspace(0, len(front) - 1, max_points).astype(int)]
    return p[front], e[front], [(int(ru[order][i]), int(rv[order][i])) for i in front]


def refine_tucker2(stack: CoreStack, r_u: int, r_v: int, iters: int):
    """HOOI (tensorly partial_tucker) on the core stack, started from the truncated HOSVD.

    Returns coefficient bases Xu (k_B × r_u), Xv (k_A × r_v) and cores (L × r_u × r_v). HOOI only increases the
    captured energy, so a budget met by the HOSVD stays met.
    """
    D = stack.core()
    kB, kA = D.shape[1], D.shape[2]
    Xu = torch.eye(kB, r_u, dtype=F64)
    Xv = torch.eye(kA, r_v, dtype=F64)
    if iters <= 0 or r_u == 0 or r_v == 0 or (r_u == kB and r_v == kA):
        return Xu, Xv, D[:, :r_u, :r_v].clone()
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    with tl.backend_context("pytorch"):
        (core, (Xu2, Xv2)), _ = partial_tucker(D, [r_u, r_v], modes=[1, 2], n_iter_max=iters, tol=0,
                                               init=(D[:, :r_u, :r_v].clone(), [Xu, Xv]))
    if float((core ** 2).sum()) >= float((D[:, :r_u, :r_v] ** 2).sum()):
        return Xu2, Xv2, core
    return Xu, Xv, D[:, :r_u, :r_v].clone()


# ---------------------------------------------------------------------------------------------- CP and TT
def _projection_ranks(stack: CoreStack, allow, cap):
    """Tucker-2 ranks spending half the error budget, the space the CP / TT fits then work in."""
    cand, _ = search_tucker2(stack, 0.5 * allow, cap)
    return (cand.spec["r_u"], cand.spec["r_v"]) if cand else None


def _layer_err(stack: CoreStack, T: torch.Tensor, That: torch.Tensor, r_u: int, r_v: int) -> np.ndarray:
    """Per-layer error²: outside the (r_u, r_v) corner plus the fit error inside it (orthogonal parts)."""
    D = stack.core()
    outside = stack.energy - (D[:, :r_u, :r_v] ** 2).sum((1, 2))
    return (outside.clamp(min=0) + ((T - That) ** 2).sum((1, 2))).numpy()


def fit_cp(T: torch.Tensor, R: int, iters: int = 40):
    import warnings

    import tensorly as tl
    from tensorly.decomposition import parafac

    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # svd init with R above a mode size pads with random columns: fine
        cp = parafac(T, R, n_iter_max=iters, init="svd", tol=1e-7, random_state=0, normalize_factors=True)
        return cp.weights, cp.factors, tl.cp_to_tensor(cp)


def search_cp(stack: CoreStack, allow, cap, lower_bound_params: float | None,
              max_auto_rank: int | None = None) -> tuple[Candidate | None, str]:
    """Smallest CP rank (bisection, fits by tensorly) meeting the budget inside a Tucker-2 projection.

    ``max_auto_rank``: skip the ALS fits when the rank bound already exceeds this (auto mode): fitting hundreds
    of components costs minutes, and such a CP has as many components as per-module truncation keeps."""
    g, L = stack.group, stack.L
    allow_sq = float(allow.sum()) if isinstance(allow, np.ndarray) else allow
    r_min = max(min_rank_for(stack.sigma_out, allow_sq), min_rank_for(stack.sigma_in, allow_sq),
                min_rank_for(stack.sigma_layer, allow_sq))
    # A rank-R CP is a Tucker-2 with ranks (R, R), whose best error is at least half the truncated HOSVD's
    # (err² of HOSVD ≤ 2·optimal for two modes): a cheap bound from the table, tight when layers are independent.
    table, _ = tucker_tables(stack, False)
    k = min(table.shape[0], table.shape[1]) - 1
    diag_err = (stack.total_energy - torch.diagonal(table)[:k + 1]).clamp(min=0) / 2
    ok = torch.nonzero(diag_err <= allow_sq * (1 + 1e-12) + 1e-30)
    r_min = max(r_min, int(ok[0]) if ok.numel() else k + 1)
    per_rank = g.d_out + g.d_in + L
    if lower_bound_params is not None and per_rank * r_min >= lower_bound_params:
        return None, f"pruned: needs CP rank ≥ {r_min} ({per_rank * r_min} params) ≥ best so far"
    if max_auto_rank is not None and r_min > max_auto_rank:
        return None, (f"not fitted: needs CP rank ≥ {r_min} (≥ {per_rank * r_min} params, best so far "
                      f"{lower_bound_params:.0f}); ALS at that rank is too slow for auto, try --structure cp")
    ranks = _projection_ranks(stack, allow, cap)
    if ranks is None:
        return None, "no Tucker-2 projection fits half the budget"
    r_u, r_v = ranks
    T = stack.core()[:, :r_u, :r_v]
    hi = min(L * min(r_u, r_v), cap or 10 ** 9)
    if lower_bound_params is not None:
        hi = min(hi, int(lower_bound_params // per_rank))
    lo, found = max(r_min, 1), None
    if hi >= lo:  # one fit at the largest useful rank settles the common case (CP cannot win) at once
        w, f, That = fit_cp(T, hi)
        err = _layer_err(stack, T, That, r_u, r_v)
        if not feasible(err, allow):
            lo = hi + 1
        else:
            found, hi = (hi, w, f, err), hi - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        w, f, That = fit_cp(T, mid)
        err = _layer_err(stack, T, That, r_u, r_v)
        if feasible(err, allow):
            found, hi = (mid, w, f, err), mid - 1
        else:
            lo = mid + 1
    if found is None:
        limit = "with fewer params than the best so far" if lower_bound_params is not None else "up to the limit"
        return None, f"no CP rank in [{max(r_min, 1)}, {hi}] ({limit}) meets the budget"
    R, w, f, err = found
    return Candidate("cp", per_rank * R, err, {"R": R, "r_u": r_u, "r_v": r_v, "fit": (w, f)}), ""


def tt_params(g: Group, L, r_u, r_v, r1, r2):
    return g.d_out * r_u + g.d_in * r_v + L * r1 + r1 * r_u * r2 + r2 * r_v


def search_tt(stack: CoreStack, allow, cap, lower_bound_params: float | None) -> tuple[Candidate | None, str]:
    """TT over (layer, out, in) of the Tucker-2 core; ranks from the TT-SVD spectra, fit by tensorly."""
    g, L = stack.group, stack.L
    allow_sq = float(allow.sum()) if isinstance(allow, np.ndarray) else allow
    ru_min, rv_min = min_rank_for(stack.sigma_out, allow_sq), min_rank_for(stack.sigma_in, allow_sq)
    bound = g.d_out * ru_min + g.d_in * rv_min
    if lower_bound_params is not None and bound >= lower_bound_params:
        return None, f"pruned: the outer factors alone need ≥ {bound} params ≥ best so far"
    ranks = _projection_ranks(stack, allow, cap)
    if ranks is None:
        return None, "no Tucker-2 projection fits half the budget"
    r_u, r_v = ranks
    if lower_bound_params is not None and g.d_out * r_u + g.d_in * r_v >= lower_bound_params:
        return None, (f"pruned: its Tucker-2 projection (r_u={r_u}, r_v={r_v}) alone needs "
                      f"{g.d_out * r_u + g.d_in * r_v} params ≥ best so far")
    T = stack.core()[:, :r_u, :r_v]
    tt_allow = allow_sq - float((stack.energy - (T ** 2).sum((1, 2))).clamp(min=0).sum())
    U1, s1, _ = torch.linalg.svd(T.reshape(L, -1), full_matrices=False)
    tail1 = (torch.flip(torch.cumsum(torch.flip(s1 ** 2, [0]), 0), [0]).tolist() + [0.0])
    best = None
    # r1 on a coarse grid: each step's spectrum comes from an r_v × r_v Gram, Σ_a H_aᵀ H_a over the
    # leading layer-mode slices H_a (r_u × r_v) of the core
    slices = (U1.T @ T.reshape(L, -1)).reshape(-1, r_u, r_v)
    for r1 in sorted({r for r in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if r < L} | {L}):
        if cap is not None and r1 > cap:
            break
        H = slices[:r1].reshape(r1 * r_u, r_v)
        s2 = torch.linalg.eigvalsh(H.T @ H).flip(0).clamp(min=0).sqrt()
        tail2 = torch.flip(torch.cumsum(torch.flip(s2 ** 2, [0]), 0), [0]).tolist() + [0.0]
        for r2 in range(1, min(len(s2), cap or 10 ** 9) + 1):
            est = tail1[r1] + tail2[r2]
            if est <= tt_allow * (1 + 1e-9) + 1e-30:
                p = tt_params(g, L, r_u, r_v, r1, r2)
                if best is None or p < best[0]:
                    best = (p, r1, r2)
                break
    if best is None:
        return None, "no TT ranks meet the budget"
    if lower_bound_params is not None and best[0] >= lower_bound_params:
        return None, f"pruned: its cheapest ranks (r1={best[1]}, r2={best[2]}) need {best[0]} params ≥ best so far"
    _, r1, r2 = best
    import tensorly as tl
    from tensorly.decomposition import tensor_train

    with tl.backend_context("pytorch"):
        tt = tensor_train(T.contiguous(), rank=[1, r1, r2, 1])
        That = tl.tt_to_tensor(tt)
    err = _layer_err(stack, T, That, r_u, r_v)
    if not feasible(err, allow):
        return None, "TT fit misses the per-module budget"
    cores = [c.clone() for c in tt.factors]
    return Candidate("tt", tt_params(g, L, r_u, r_v, r1, r2), err,
                     {"r_u": r_u, "r_v": r_v, "r1": r1, "r2": r2, "fit": cores}), ""


# ---------------------------------------------------------------------------------------------- synthetic adapters
def planted_adapter(layers: int = 4, shapes: dict[str, tuple[int, int]] | None = None, r: int = 8,
                    shared_out: int | None = None, shared_in: int | None = None, noise: float = 0.0,
                    seed: int = 0, dtype=torch.float32):
    """A LoRA adapter with a known cross-layer structure, for tests and benchmarks.

    Each module type gets ``ΔW_l = B_l·A_l`` of rank r. With ``shared_out`` the columns of every B_l lie in one
    d_out × shared_out basis (the output side shares); with ``shared_in`` the rows of every A_l lie in one
    shared_in × d_in basis. Otherwise the layer's subspace is an independent random draw. Factors are then
    mixed by a random invertible r × r gauge (the raw factors mean nothing), plus optional noise.
    """
    from edge_lora.adapter import Adapter, LoraModule

    shapes = shapes or {"self_attn.q_proj": (32, 32), "mlp.down_proj": (32, 64)}
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for mod, (d_out, d_in) in shapes.items():
        Ub = torch.linalg.qr(torch.randn(d_out, shared_out, generator=g))[0] if shared_out else None
        Vb = torch.linalg.qr(torch.randn(d_in, shared_in, generator=g))[0] if shared_in else None
        for l in range(layers):
            B = Ub @ torch.randn(shared_out, r, generator=g) if Ub is not None else torch.randn(d_out, r, generator=g)
            A = (torch.randn(r, shared_in, generator=g) @ Vb.T) if Vb is not None else torch.randn(r, d_in, generator=g)
            B = B * torch.logspace(0, -1, r)[None, :]     # a decaying spectrum, like trained adapters
            gauge = torch.randn(r, r, generator=g) + 2 * torch.eye(r)
            B, A = B @ gauge, torch.linalg.solve(gauge, A)
            if noise:
                B = B + noise * torch.randn(B.shape, generator=g) * B.std()
                A = A + noise * torch.randn(A.shape, generator=g) * A.std()
            name = f"model.layers.{l}.{mod}"
            modules[name] = LoraModule(name=name, kind="linear", A=A.to(dtype).contiguous(),
                                       B=(0.01 * B).to(dtype).contiguous(), scale=2.0, alpha=2.0 * r)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2.0 * r,
              "target_modules": sorted({n.rsplit(".", 1)[1] for n in modules}), "task_type": "CAUSAL_LM"}
    return Adapter(modules=dict(sorted(modules.items())), config=config, source="planted", form="peft")
