"""Quantize adapter factors: group-wise int2..int8, symmetric or asymmetric, uniform or mixed by energy.

We quantize the balanced canonical factors. Each singular component i is a pair of vectors, column i of
``B = U·S^½`` (length d_out) and row i of ``A = S^½·Vᵀ`` (length d_in), so both factors are handled as
(r × d) matrices whose rows are components: ``Bᵀ`` and ``A``. Groups run along d within a row; a last
group shorter than ``group_size`` keeps its own scale (no padding, no refusal).

Mixed precision gives every component its own bit width from {0, 1, 2, 3, 4, 8}: zero drops it, one is sign × scale. The allocation
is a greedy Lagrangian on measured errors: start from nothing, and repeatedly buy the upgrade that removes the
most squared error per bit spent, until the bit budget is used. Measured, not modelled: the error of each
(component, bits) choice is computed from the quantized vectors with the rank-1 identity
``‖b aᵀ − b̂ âᵀ‖² = ‖b‖²‖a‖² + ‖b̂‖²‖â‖² − 2(b·b̂)(a·â)``.

Sizes are honest: codes, scales (fp16), zero points (one byte per group when asymmetric) and the per-row bit
widths all count; ``bits_per_param`` divides by the parameters of the factors being replaced.
"""

from __future__ import annotations

import heapq
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.adapter.quantized import (  # noqa: F401  (the quantizer's names, importable from here)
    MIXED_CHOICES,
    mixed_choices,
    BitBudgetError,
    FactorQuantConfig,
    QuantizedAdapter,
    QuantizedModule,
    QuantizeError,
    parse_bits,
)
from edge_lora.errors import AdapterError
from edge_lora.formats.quantized_factors import (  # noqa: F401
    FORMAT,
    SCALE_BITS,
    SUPPORTED_BITS,
    QuantizedRows,
    pack_codes,
    unpack_codes,
)
from edge_lora.formats.quantized_factors import groups as _groups
from edge_lora.report import StageReport


# ---------------------------------------------------------------------------------------------- rows
def _quantize_row(x: np.ndarray, bits: int, g: int, symmetric: bool):
    n_groups = math.ceil(len(x) / g)
    codes = np.empty(len(x), dtype=np.uint8)
    scales = np.empty(n_groups, dtype=np.float16)
    zeros = None if symmetric else np.empty(n_groups, dtype=np.uint8)
    levels = (1 << bits) - 1
    for k, sl in enumerate(_groups(len(x), g)):
        v = x[sl].astype(np.float64)
        if bits == 1:
            # Sign × magnitude: codes 0/1 decode to ∓scale/2, and scale/2 = mean |v| minimises ‖v − α·sign(v)‖².
            scale = np.float16(2.0 * float(np.abs(v).mean()))
            q = (v > 0).astype(np.float64)
        elif symmetric:
            # Codes 0..2^b−2, centred on half = 2^(b−1)−1, so +x and −x are both representable.
            half = (1 << (bits - 1)) - 1
            amax = float(np.abs(v).max())
            scale = np.float16(amax / half if amax > 0 and half > 0 else (amax or 1.0))
            s = float(scale) or 1.0
            q = np.clip(np.rint(v / s) + half, 0, 2 * half if half > 0 else 1)
        else:
            # The range must contain 0 so the zero point is an exact code (and clipping never bites).
            lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
            scale = np.float16((hi - lo) / levels if hi > lo else (abs(hi) or 1.0))
            s = float(scale) or 1.0
            zero = int(np.clip(np.rint(-lo / s), 0, levels))
            zeros[k] = zero
            q = np.clip(np.rint(v / s) + zero, 0, levels)
        if not np.isfinite(scale):
            raise QuantizeError(f"a factor group spans {float(np.abs(v).max()):.3g}, beyond fp16 scales; the "
                                "adapter's values are not finite-sized (check it with inspect).")
        codes[sl] = q.astype(np.uint8)
        scales[k] = scale
    return codes, scales, zeros


def quantize_rows(m: np.ndarray, bits_per_row, group_size: int, symmetric: bool) -> QuantizedRows:
    r, d = m.shape
    n_groups = math.ceil(d / group_size)
    scales = np.zeros((r, n_groups), dtype=np.float16)
    zeros = None if symmetric else np.zeros((r, n_groups), dtype=np.uint8)
    codes = []
    for i in range(r):
        b = int(bits_per_row[i])
        if b == 0:
            codes.append(np.zeros(0, dtype=np.uint8))
            continue
        c, s, z = _quantize_row(m[i], b, group_size, symmetric)
        codes.append(c)
        scales[i] = s
        if zeros is not None:
            zeros[i] = z
    return QuantizedRows(bits=np.asarray(bits_per_row, dtype=np.uint8), codes=codes, scales=scales, zeros=zeros,
                         d=d, group_size=group_size)



def gptq_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor of H⁻¹ that :func:`quantize_rows_gptq` spreads errors with (compute once per H)."""
    import torch   # torch's LAPACK honours torch.set_num_threads; numpy's OpenBLAS spins on busy cores (100× slower)

    H = torch.from_numpy(np.ascontiguousarray(hessian, dtype=np.float64))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H))).T.contiguous().numpy()


def quantize_rows_gptq(m: np.ndarray, bits: int, group_size: int, hessian: np.ndarray | None = None,
                       factor: np.ndarray | None = None) -> QuantizedRows:
    """Symmetric b-bit codes for every row of ``m`` (r × d) that minimise (a − â)ᵀ·H·(a − â) instead of the
    plain rounding error: columns are coded one at a time and each one's rounding error is pushed onto the columns
    not yet coded through H⁻¹ (the optimal-brain-quantization update GPTQ uses). H = C = XᵀX of the layer's inputs
    makes that the error of the layer's output. The codes and fp16 group scales are the ordinary format: the
    device decodes them like any others. Each group's scale is set from the values as they are when coding reaches
    it. ``factor``: :func:`gptq_factor` of H, when the caller codes one matrix at several widths."""
    r, d = m.shape
    n_groups = math.ceil(d / group_size)
    # upper Cholesky factor of H⁻¹: row j holds how column j's error spreads over the later columns
    U = factor if factor is not None else gptq_factor(hessian)
    W = m.astype(np.float64).copy()
    codes = np.zeros((r, d), dtype=np.uint8)
    scales = np.zeros((r, n_groups), dtype=np.float16)
    half = (1 << (bits - 1)) - 1
    for k, sl in enumerate(_groups(d, group_size)):
        V = W[:, sl]
        if bits == 1:
            scale = (2.0 * np.abs(V).mean(axis=1)).astype(np.float16)
        else:
            amax = np.abs(V).max(axis=1)
            scale = np.where(amax > 0, amax / half, 1.0).astype(np.float16)
        scales[:, k] = scale
        s = scale.astype(np.float64)
        s[s == 0] = 1.0
        for j in range(sl.start, sl.stop):
            col = W[:, j]
            if bits == 1:
                c = (col > 0).astype(np.float64)
                deq = (c - 0.5) * s
            else:
                c = np.clip(np.rint(col / s) + half, 0, 2 * half)
                deq = (c - half) * s
            codes[:, j] = c.astype(np.uint8)
            err = (col - deq) / U[j, j]
            W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    return QuantizedRows(bits=np.full(r, bits, dtype=np.uint8), codes=[codes[i] for i in range(r)], scales=scales,
                         zeros=None, d=d, group_size=group_size)


def rank1_error(b, a, qb, qa, gram: np.ndarray | None = None) -> float:
    """‖b aᵀ − b̂ âᵀ‖² (or through C on the input side) by the rank-1 identity, from the vectors."""
    def dot(u, v):
        return float(u @ v) if gram is None else float(u @ (gram @ v))

    return max(float(b @ b) * dot(a, a) + float(qb @ qb) * dot(qa, qa) - 2 * float(b @ qb) * dot(a, qa), 0.0)


def component_errors(b: np.ndarray, a: np.ndarray, cfg: FactorQuantConfig, gram: np.ndarray | None = None
                     ) -> dict[int, float]:
    """Squared error of the rank-1 term b·aᵀ for each candidate width (0 = dropped): in the weight space
    ‖b aᵀ − b̂ âᵀ‖²_F, or with ``gram`` (C = XᵀX of the module's inputs) in the output space ‖(b aᵀ − b̂ âᵀ)·X‖²_F,
    where every inner product on the input side is taken through C."""
    def dot(u, v):
        return float(u @ v) if gram is None else float(u @ (gram @ v))

    nb, na = float(b @ b), dot(a, a)
    errors = {0: nb * na}
    for bits in mixed_choices(cfg.symmetric)[1:]:
        qb = quantize_rows(b[None], [bits], cfg.group_size, cfg.symmetric).dequantize()[0].astype(np.float64)
        qa = quantize_rows(a[None], [bits], cfg.group_size, cfg.symmetric).dequantize()[0].astype(np.float64)
        errors[bits] = max(nb * na + float(qb @ qb) * dot(qa, qa) - 2 * float(b @ qb) * dot(a, qa), 0.0)
    return errors


def _component_cost(bits: int, d_out: int, d_in: int, cfg: FactorQuantConfig) -> int:
    if bits == 0:
        return 16  # the two per-row width bytes are paid anyway
    groups = math.ceil(d_out / cfg.group_size) + math.ceil(d_in / cfg.group_size)
    return bits * (d_out + d_in) + groups * (SCALE_BITS + (0 if cfg.symmetric else 8)) + 16


@dataclass(frozen=True)
class Allocation:
    """Per-module, per-component widths and the greedy path that led there: ``path`` is (payload bits, total
    weighted error²) after every upgrade bought, the size-versus-error curve of this adapter."""

    bits: dict[str, list[int]]
    path: tuple[tuple[int, float], ...]
    error_sq: float          # the estimated total (weighted) error² of ``bits``
    reference_sq: float      # the total (weighted) energy of the adapter: error² of dropping everything


def greedy_allocation(adapter: Adapter, cfg: FactorQuantConfig, errors: dict[tuple[str, int], dict[int, float]],
                      bit_budget: float | None = None, error_target_sq: float | None = None) -> Allocation:
    """Start from nothing and repeatedly buy the upgrade (a component's next width) that removes the most error
    per bit spent: until ``bit_budget`` is spent (cheaper upgrades may still fit after a costly one does not), or
    until the total error falls to ``error_target_sq``, whichever is given; with neither, to the end (every
    component at its best width), which traces the whole curve."""
    choices = mixed_choices(cfg.symmetric)
    alloc = {n: [0] * m.rank for n, m in adapter.modules.items()}
    spent = sum(_component_cost(0, m.d_out, m.d_in, cfg) * m.rank for m in adapter.modules.values())
    total = reference = sum(e[0] for e in errors.values())
    path = [(spent, total)]
    heap: list = []

    def push(name, i):
        m = adapter.modules[name]
        cur = alloc[name][i]
        nxt = [b for b in choices if b > cur]
        if not nxt:
            return
        # Best next step among all larger widths (allows 0→4 when 0→2 gains little), by gain per bit.
        best = max(nxt, key=lambda b: (errors[name, i][cur] - errors[name, i][b]) /
                   (_component_cost(b, m.d_out, m.d_in, cfg) - _component_cost(cur, m.d_out, m.d_in, cfg)))
        cost = _component_cost(best, m.d_out, m.d_in, cfg) - _component_cost(cur, m.d_out, m.d_in, cfg)
        gain = errors[name, i][cur] - errors[name, i][best]
        heapq.heappush(heap, (-gain / cost, name, i, best, cost, gain))

    for name, m in adapter.modules.items():
        for i in range(m.rank):
            push(name, i)
    while heap:
        if error_target_sq is not None and total <= error_target_sq:
            break
        _, name, i, bits, cost, gain = heapq.heappop(heap)
        if bit_budget is not None and spent + cost > bit_budget:
            continue  # a cheaper upgrade elsewhere may still fit
        alloc[name][i] = bits
        spent += cost
        total -= gain
        path.append((spent, total))
        push(name, i)
    return Allocation(bits=alloc, path=tuple(path), error_sq=max(total, 0.0), reference_sq=reference)


def allocate_bits(adapter: Adapter, cfg: FactorQuantConfig) -> dict[str, list[int]]:
    """Per-module, per-component widths meeting ``mixed_avg_bits`` over the whole adapter (greedy Lagrangian on
    weight-space errors)."""
    params = adapter.params
    budget = cfg.mixed_avg_bits * params
    floor = sum(_component_cost(0, m.d_out, m.d_in, cfg) * m.rank for m in adapter.modules.values())
    cheapest = min(_component_cost(min(mixed_choices(cfg.symmetric)[1:]), m.d_out, m.d_in, cfg)
                   for m in adapter.modules.values())
    if budget < floor + cheapest:
        minimum = math.ceil((floor + cheapest) / params * 1000) / 1000   # rounded up, so the number given works
        raise BitBudgetError(f"a budget of {cfg.mixed_avg_bits} bits per parameter cannot keep even one component: "
                             f"the minimum for this adapter is {minimum:.3f} bits/param with group size "
                             f"{cfg.group_size} (every component pays 16 bits of width bytes, the cheapest "
                             f"component its codes and scales). Raise the budget (mixed:{minimum:.3f} or more).")
    errors = {}
    for name, m in adapter.modules.items():
        B, A = m.B.double().numpy(), m.A.double().numpy()
        for i in range(m.rank):
            errors[name, i] = component_errors(B[:, i].copy(), A[i].copy(), cfg)
    return greedy_allocation(adapter, cfg, errors, bit_budget=budget).bits


def quantize_factors(adapter: Adapter, cfg: FactorQuantConfig = FactorQuantConfig(),
                     alloc: dict[str, list[int]] | None = None) -> tuple[QuantizedAdapter, StageReport]:
    """Quantize a canonical adapter's balanced factors. Uniform width, mixed by measured energy, or the widths
    ``alloc`` chose (stages/allocate.py: by output error, on the whitened canonical form)."""
    if adapter.form not in ("canonical", "compressed", "whitened"):
        raise AdapterError("quantize the canonical form (run canonicalize first): raw factors carry an arbitrary "
                           "gauge, and a badly balanced pair loses far more at the same bits.")
    start = time.perf_counter()
    if alloc is not None:
        pass
    elif cfg.mixed_avg_bits is not None:
        alloc = allocate_bits(adapter, cfg)
    else:
        alloc = {n: [cfg.bits] * m.rank for n, m in adapter.modules.items()}
    modules = {}
    for name, m in adapter.modules.items():
        modules[name] = QuantizedModule(
            name=name, kind=m.kind, bias=m.bias.float().numpy() if m.bias is not None else None,
            B_rows=quantize_rows(m.B.T.double().numpy(), alloc[name], cfg.group_size, cfg.symmetric),
            A_rows=quantize_rows(m.A.double().numpy(), alloc[name], cfg.group_size, cfg.symmetric))
    q = QuantizedAdapter(modules=modules, config=cfg, source_config=adapter.config, original_params=adapter.params,
                         source=adapter.source)
    from edge_lora.stages.canonicalize import relative_error

    errors = {n: relative_error(adapter.modules[n], modules[n].dequantize()) for n in modules}
    energy = {n: float((adapter.modules[n].B.double().norm() * adapter.modules[n].A.double().norm()) ** 2)
              for n in modules}
    total = sum(energy.values()) or 1.0
    histogram = {}
    for widths in alloc.values():
        for b in widths:
            histogram[b] = histogram.get(b, 0) + 1
    short = sorted({d for m in adapter.modules.values() for d in (m.d_out, m.d_in) if d % cfg.group_size})
    report = StageReport(stage="quantize_factors", config=asdict(cfg), seconds=time.perf_counter() - start, metrics={
        "bits_per_param": q.bits_per_param(),
        "payload_bytes": q.payload_bits() / 8,
        "rel_error_weighted": math.sqrt(sum(energy[n] * errors[n] ** 2 for n in modules) / total),
        "rel_error_worst": max(errors.values()) if errors else 0.0,
        "worst_module": max(errors, key=errors.get) if errors else None,
        "component_bits_histogram": dict(sorted(histogram.items())),
    })
    if short:
        report.metrics["short_last_group"] = short_group_note(short, cfg.group_size)
    return q, report


def short_group_note(dims, group_size: int) -> str:
    """What happens when group_size does not divide d: said once, the same way in the report, help and docs."""
    parts = ", ".join(f"d={d} is one group of {d}" if d < group_size else f"d={d} ends with a group of "
                      f"{d % group_size}" for d in dims)
    return (f"group size {group_size} does not divide every factor length ({parts}): the last group of each such "
            "row is shorter and keeps its own fp16 scale (no padding; the size counts that scale).")


# ---------------------------------------------------------------------------------------------- file format
def save_quantized(q: QuantizedAdapter, path: str | os.PathLike) -> Path:
    """``quantized.safetensors`` (layout: edge_lora.formats.quantized_factors), written atomically."""
    return q.save(path)


def load_quantized(path: str | os.PathLike) -> QuantizedAdapter:
    return QuantizedAdapter.load(path)


# ---------------------------------------------------------------------------------------------- the stage
def quantize_adapter(original: Adapter, expansion: Adapter | None = None, cfg: FactorQuantConfig = FactorQuantConfig(),
                     shared_groups: list[str] | None = None, folder: str | os.PathLike | None = None
                     ) -> tuple[QuantizedAdapter, StageReport]:
    """THE factor quantizer of edge_lora (``compress --bits``, and exports with ``quantize.adapter`` set):
    canonicalize the per-module ``expansion`` (``compress``'s result expanded, or ``original`` itself), quantize
    its balanced factors, and report sizes against the fp16 PEFT adapter (2 bytes per original parameter) and
    errors against ``original`` (truncation and quantization together) and the expansion (quantization alone).

    The returned QuantizedAdapter's ``expanded`` is exactly what its file decodes to (the encoding is lossless:
    tested bit for bit), so a merged export, a PEFT expansion and the device all run the same factors.
    ``folder``: where its file goes, if known (the file's size counts the source path as stored there)."""
    from edge_lora.formats.quantized_factors import to_bytes
    from edge_lora.stages.canonicalize import canonicalize, relative_error

    source, _ = canonicalize(expansion if expansion is not None else original)
    q, report = quantize_factors(source, cfg)
    dequantized = q.expanded
    errors = {n: relative_error(m, dequantized.modules[n]) for n, m in original.modules.items()
              if n in dequantized.modules}
    energy = {n: float(((m.scale * m.B.double()).T @ (m.scale * m.B.double()) * (m.A.double() @ m.A.double().T)).sum())
              for n, m in original.modules.items() if n in errors}
    total = sum(energy.values()) or 1.0
    fp16_bytes = original.params * 2
    payload = q.payload_bits() / 8
    file_bytes = len(to_bytes(q.to_format(folder)))
    m = report.metrics
    m.update({
        "file": "quantized.safetensors", "file_bytes": file_bytes, "fp16_peft_bytes": fp16_bytes,
        "bits_per_original_param": q.payload_bits() / max(original.params, 1),
        "size_ratio_vs_fp16_peft": fp16_bytes / max(payload, 1), "file_ratio_vs_fp16_peft": fp16_bytes / file_bytes,
        "rel_error_vs_original_weighted": math.sqrt(sum(energy[n] * errors[n] ** 2 for n in errors) / total),
        "rel_error_vs_original_worst": max(errors.values()) if errors else 0.0,
        "worst_module_vs_original": max(errors, key=errors.get) if errors else None,
    })
    label = f"int{cfg.bits}" if cfg.bits is not None else f"mixed {cfg.mixed_avg_bits:g}"
    kind = "symmetric" if cfg.symmetric else "asymmetric"
    widths = ", ".join(f"{b} bits × {n}" for b, n in m["component_bits_histogram"].items())
    lines = [
        f"## Factor quantization ({label}, groups of {cfg.group_size}, {kind})",
        "",
        (f"{m['bits_per_original_param']:.3f} bits per parameter of the original adapter ({m['bits_per_param']:.3f} "
         f"per parameter of the factors quantized; codes, fp16 scales{', zero points' if not cfg.symmetric else ''} "
         f"and per-row widths all counted). Payload {payload / 1024:.1f} KiB, file {file_bytes / 1024:.1f} KiB: "
         f"{m['size_ratio_vs_fp16_peft']:.1f}× ({m['file_ratio_vs_fp16_peft']:.1f}× by file) smaller than the fp16 "
         f"PEFT adapter ({fp16_bytes / 1024:.1f} KiB)."),
        "",
        (f"Relative error ‖ΔW−ΔŴ‖/‖ΔW‖ against the original adapter (truncation + quantization): energy-weighted "
         f"{m['rel_error_vs_original_weighted']:.4f}, worst {m['rel_error_vs_original_worst']:.4f} "
         f"({m['worst_module_vs_original']}); quantization alone: weighted {m['rel_error_weighted']:.4f}, worst "
         f"{m['rel_error_worst']:.4f}. Component widths: {widths}."),
    ]
    if shared_groups:
        note = (f"groups {', '.join(shared_groups)} share factors across layers; factor quantization takes per-module "
                "factors, so each module's expansion was canonicalized and quantized (the shared tensors are not "
                "stored once in the quantized file).")
        report.skipped.append(note)
        lines += ["", "Note: " + note]
    if "short_last_group" in m:
        lines += ["", "Note: " + m["short_last_group"]]
    m["summary"] = "\n".join(lines)
    return q, report


def quantize_to_file(original: Adapter, expansion: Adapter, cfg: FactorQuantConfig, path: str | os.PathLike,
                     shared_groups: list[str] | None = None) -> tuple[Adapter, StageReport]:
    """:func:`quantize_adapter`, written to ``path`` (quantized.safetensors); returns the dequantized adapter (on
    ``expansion``'s config, for ``--as-peft``) and the report."""
    q, report = quantize_adapter(original, expansion, cfg, shared_groups, folder=Path(path).parent)
    save_quantized(q, path)
    return q.dequantize(canonical_like(expansion)), report


def canonical_like(adapter: Adapter) -> Adapter:
    """``adapter``'s config and extra tensors with no modules: what a dequantized expansion is laid onto."""
    return adapter.replace_modules({}, form=adapter.form)


def adapter_quant_config(setting: str, group_size: int) -> FactorQuantConfig | None:
    """A profile's ``quantize.adapter`` (``"fp32"``, ``"int8"``/``"int4"``/``"int3"``/``"int2"``, or
    ``"mixed:AVG_BITS"``) and ``quantize.adapter_block_size`` → the one quantizer's settings (None: stays float)."""
    text = str(setting).strip().lower()
    if text == "fp32":
        return None
    bits = text[3:] if text.startswith("int") else text
    try:
        return FactorQuantConfig(**parse_bits(bits), group_size=group_size)
    except QuantizeError as exc:
        raise QuantizeError(f"quantize.adapter = {setting!r}: {exc} Valid: 'fp32', 'int8', 'int4', 'int3', 'int2' "
                            "or 'mixed:AVG_BITS' (e.g. 'mixed:2.5').") from None


@dataclass(frozen=True)
class QuantizeFactorsInput:
    original: Adapter               # the PEFT adapter that sizes and errors are measured against
    expansion: Adapter | None = None   # what to quantize (compress's result expanded); None: the original
    shared_groups: tuple[str, ...] = ()   # compress groups that shared factors across layers (for the report)


def run(inp: QuantizeFactorsInput, config: FactorQuantConfig = FactorQuantConfig()
        ) -> tuple[QuantizedAdapter, StageReport]:
    """The stage entry (every stage module has one: ``run(input, config) -> (output, StageReport)``)."""
    return quantize_adapter(inp.original, inp.expansion, config, list(inp.shared_groups) or None)
