"""Gauge-fixed SVD form of every module, computed from the factors (never from ΔW).

``B·A = (B·G)(G⁻¹·A)`` for any invertible G, so raw factors carry arbitrary per-module noise. We fold the
scale into B, take thin QRs ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, an r × r SVD ``R_B R_Aᵀ = Ũ S Ṽᵀ``, and
set ``U = Q_B Ũ``, ``V = Q_A Ṽ`` with signs fixed (the largest-magnitude entry of each column of U is
positive). The module is stored balanced: ``B = U·S^½``, ``A = S^½·Vᵀ``, scale 1. Cost O((d_in+d_out)·r²).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from edge_lora.adapter import Adapter, LoraModule
from edge_lora.report import StageReport


@dataclass(frozen=True)
class CanonicalizeConfig:
    compute_dtype: str = "float64"   # QR/SVD precision; results are stored as float32
    # Torch threads while the stage runs. The QRs are of d × r matrices: MKL's threaded QR on them is slower
    # than one thread, and 100-300× slower when other processes hold the cores (BENCHMARKS.md, Canonicalize).
    threads: int | None = 1


def svd_factors(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0):
    """U (d_out × k), S (k), V (d_in × k) with scale·B·A = U·diag(S)·Vᵀ, k = min(r, d_out, d_in).

    Singular values come sorted descending; signs are fixed so the result does not depend on the gauge.
    """
    Q_B, R_B = torch.linalg.qr(B * scale)           # d_out × k, k × r
    Q_A, R_A = torch.linalg.qr(A.T)                 # d_in × k', k' × r
    U_small, S, Vh_small = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    U = Q_B @ U_small
    V = Q_A @ Vh_small.T
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, S, V * signs


def canonicalize_module(module: LoraModule, compute_dtype: torch.dtype = torch.float64) -> LoraModule:
    U, S, V = svd_factors(module.B.to(compute_dtype), module.A.to(compute_dtype), module.scale)
    root = S.sqrt()
    bias = module.bias * module.scale if module.bias is not None else None
    return LoraModule(name=module.name, kind=module.kind, A=(V * root).T.float().contiguous(),
                      B=(U * root).float().contiguous(), scale=1.0, alpha=float(S.shape[0]),
                      bias=bias, singular_values=S.float())


def canonicalize(adapter: Adapter, config: CanonicalizeConfig = CanonicalizeConfig()) -> tuple[Adapter, StageReport]:
    start = time.perf_counter()
    dtype = getattr(torch, config.compute_dtype)
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        modules = {name: canonicalize_module(m, dtype) for name, m in adapter.modules.items()}
    finally:
        torch.set_num_threads(previous)
    result = adapter.replace_modules(modules, form="canonical")
    energy = sum(float((m.singular_values.double() ** 2).sum()) for m in modules.values())
    report = StageReport(stage="canonicalize", config=asdict(config), seconds=time.perf_counter() - start,
                         metrics={"modules": len(modules), "total_energy": energy})
    return result, report


# ------------------------------------------------------------------------------ errors without ΔW
def frobenius_sq(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖²_F = tr((BᵀB)(AAᵀ)), with r × r Gram matrices only."""
    B, A = B.double(), A.double()
    return float(((B.T @ B) * (A @ A.T)).sum())  # tr(XY) = Σ X∘Yᵀ and both Grams are symmetric


def difference_frobenius_sq(B1, A1, B2, A2) -> float:
    """‖B1·A1 − B2·A2‖²_F as ‖[B1, −B2]·[A1; A2]‖²_F: a trace of two (r1 + r2)-sized Gram products."""
    return max(frobenius_sq(torch.cat([B1.double(), -B2.double()], dim=1),
                            torch.cat([A1.double(), A2.double()], dim=0)), 0.0)


def relative_error(reference: LoraModule, approx: LoraModule) -> float:
    """‖ΔW − ΔŴ‖_F / ‖ΔW‖_F of two versions of one module (biases not included)."""
    ref_sq = frobenius_sq(reference.B * reference.scale, reference.A)
    if ref_sq == 0:
        return 0.0 if frobenius_sq(approx.B * approx.scale, approx.A) == 0 else float("inf")
    diff = difference_frobenius_sq(reference.B * reference.scale, reference.A, approx.B * approx.scale, approx.A)
    return (diff / ref_sq) ** 0.5


def output_error_sq(B: torch.Tensor, A: torch.Tensor, C: torch.Tensor) -> float:
    """‖B·A·X‖²_F for calibration activations X with C = X·Xᵀ (d_in × d_in): tr((BᵀB)(A·C·Aᵀ))."""
    B, A = B.double(), A.double()
    return float(((B.T @ B) * (A @ C.double() @ A.T)).sum())


def energy_ranks(singular_values: torch.Tensor, fractions=(0.5, 0.9, 0.99)) -> dict[str, int]:
    """Smallest rank holding each fraction of the energy Σ s_i²."""
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return {f"{int(f * 100)}%": 0 for f in fractions}
    cumulative = torch.cumsum(energy, 0) / total
    return {f"{int(f * 100)}%": int(torch.searchsorted(cumulative, torch.tensor(f - 1e-12, dtype=cumulative.dtype)) + 1)
            for f in fractions}


def run(adapter: Adapter, config: CanonicalizeConfig = CanonicalizeConfig()) -> tuple[Adapter, StageReport]:
    """The stage entry (every stage module has one: ``run(input, config) -> (output, StageReport)``)."""
    return canonicalize(adapter, config)
