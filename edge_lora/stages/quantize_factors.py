"""Quantize adapter factors: group-wise int2..int8, symmetric or asymmetric, uniform or mixed by energy.

We quantize the balanced canonical factors. Each singular component i is a pair of vectors, column i of
``B = U·S^½`` (length d_out) and row i of ``A = S^½·Vᵀ`` (length d_in), so both factors are handled as
(r × d) matrices whose rows are components: ``Bᵀ`` and ``A``. Groups run along d within a row; a last
group shorter than ``group_size`` keeps its own scale (no padding, no refusal).

Mixed precision gives every component its own bit width from {0, 2, 3, 4, 8}: zero drops it. The allocation
is a greedy Lagrangian on measured errors: start from nothing, and repeatedly buy the upgrade that removes the
most squared error per bit spent, until the bit budget is used. Measured, not modelled: the error of each
(component, bits) choice is computed from the quantized vectors with the rank-1 identity
``‖b aᵀ − b̂ âᵀ‖² = ‖b‖²‖a‖² + ‖b̂‖²‖â‖² − 2(b·b̂)(a·â)``.

Sizes are honest: codes, scales (fp16), zero points (one byte per group when asymmetric) and the per-row bit
widths all count; ``bits_per_param`` divides by the parameters of the factors being replaced.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_lora.adapter import Adapter, LoraModule
from edge_lora.errors import AdapterError, BudgetError, EdgeLoraError
from edge_lora.report import StageReport

SUPPORTED_BITS = (2, 3, 4, 8)
MIXED_CHOICES = (0, 2, 3, 4, 8)
SCALE_BITS = 16
FORMAT = "edge_lora.quantized_factors/1"


class QuantizeError(EdgeLoraError):
    """A quantization setting is out of range."""


@dataclass(frozen=True)
class FactorQuantConfig:
    bits: int | None = 4                 # uniform width; None when mixed_avg_bits is given
    mixed_avg_bits: float | None = None  # total budget in bits per original factor parameter, all overheads in
    group_size: int = 64
    symmetric: bool = True

    def validate(self) -> None:
        if (self.bits is None) == (self.mixed_avg_bits is None):
            raise QuantizeError("give exactly one of bits (uniform: 2, 3, 4 or 8) or mixed_avg_bits (a budget in "
                                "bits per parameter, e.g. 3.5).")
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise QuantizeError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS} "
                                "(or mixed:AVG_BITS for mixed precision).")
        if not isinstance(self.group_size, int) or self.group_size < 8:
            raise QuantizeError(f"group_size={self.group_size!r} must be an integer ≥ 8 (scales cost 16 bits "
                                "per group; tiny groups cost more than they save).")


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class QuantizedRows:
    """An (r × d) matrix quantized row by row; row i has its own bit width (0 = dropped)."""

    bits: np.ndarray        # (r,) uint8
    codes: list[np.ndarray]  # per row, unpacked uint8 codes (length d), empty for 0-bit rows
    scales: np.ndarray      # (r, n_groups) float16
    zeros: np.ndarray | None  # (r, n_groups) uint8 code of zero, asymmetric only
    d: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        out = np.zeros((len(self.bits), self.d), dtype=np.float32)
        for i, b in enumerate(self.bits):
            if b == 0:
                continue
            out[i] = _dequantize_row(self.codes[i], self.scales[i], None if self.zeros is None else self.zeros[i],
                                     int(b), self.group_size)
        return out

    def payload_bits(self) -> int:
        groups = self.scales.shape[1]
        live = int((self.bits > 0).sum())
        bits = int(sum(int(b) * self.d for b in self.bits))               # codes
        bits += live * groups * SCALE_BITS                                 # scales
        bits += live * groups * 8 if self.zeros is not None else 0         # zero points
        return bits + 8 * len(self.bits)                                   # per-row widths


def _groups(d: int, g: int) -> list[slice]:
    return [slice(s, min(s + g, d)) for s in range(0, d, g)]


def _quantize_row(x: np.ndarray, bits: int, g: int, symmetric: bool):
    n_groups = math.ceil(len(x) / g)
    codes = np.empty(len(x), dtype=np.uint8)
    scales = np.empty(n_groups, dtype=np.float16)
    zeros = None if symmetric else np.empty(n_groups, dtype=np.uint8)
    levels = (1 << bits) - 1
    for k, sl in enumerate(_groups(len(x), g)):
        v = x[sl].astype(np.float64)
        if symmetric:
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


def _dequantize_row(codes, scales, zeros, bits: int, g: int) -> np.ndarray:
    out = np.empty(len(codes), dtype=np.float32)
    half = (1 << (bits - 1)) - 1
    for k, sl in enumerate(_groups(len(codes), g)):
        offset = float(zeros[k]) if zeros is not None else (half if bits > 1 else 0.5)
        out[sl] = (codes[sl].astype(np.float32) - offset) * np.float32(scales[k])
    return out


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


# ---------------------------------------------------------------------------------------------- packing
def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit packing of b-bit codes into bytes (exactly ceil(len·b / 8) bytes)."""
    if bits == 0 or len(codes) == 0:
        return np.zeros(0, dtype=np.uint8)
    planes = ((codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)  # (n, b)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 0 or n == 0:
        return np.zeros(0, dtype=np.uint8)
    flat = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits)
    return (flat << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- adapter
@dataclass
class QuantizedModule:
    name: str
    kind: str
    B_rows: QuantizedRows   # Bᵀ: components × d_out
    A_rows: QuantizedRows   # A: components × d_in
    bias: torch.Tensor | None = None

    def dequantize(self) -> LoraModule:
        B = torch.from_numpy(self.B_rows.dequantize().T.copy())
        A = torch.from_numpy(self.A_rows.dequantize())
        live = torch.from_numpy(self.B_rows.bits > 0)
        return LoraModule(name=self.name, kind=self.kind, A=A[live].contiguous(), B=B[:, live].contiguous(),
                          scale=1.0, alpha=float(int(live.sum())), bias=self.bias)

    def payload_bits(self) -> int:
        bias = self.bias.numel() * 16 if self.bias is not None else 0
        return self.B_rows.payload_bits() + self.A_rows.payload_bits() + bias


@dataclass
class QuantizedAdapter:
    modules: dict[str, QuantizedModule]
    config: FactorQuantConfig
    source_config: dict = field(default_factory=dict)
    original_params: int = 0

    def dequantize(self, like: Adapter) -> Adapter:
        """The adapter the device will run, as float factors (for scoring and for --as-peft)."""
        return like.replace_modules({n: q.dequantize() for n, q in self.modules.items()}, form="quantized")

    def payload_bits(self) -> int:
        return sum(q.payload_bits() for q in self.modules.values())

    def bits_per_param(self) -> float:
        return self.payload_bits() / max(self.original_params, 1)


def _component_errors(b: np.ndarray, a: np.ndarray, cfg: FactorQuantConfig) -> dict[int, float]:
    """Squared Frobenius error of the rank-1 term b·aᵀ for each candidate width (0 = dropped)."""
    nb, na = float(b @ b), float(a @ a)
    errors = {0: nb * na}
    for bits in MIXED_CHOICES[1:]:
        qb = quantize_rows(b[None], [bits], cfg.group_size, cfg.symmetric).dequantize()[0].astype(np.float64)
        qa = quantize_rows(a[None], [bits], cfg.group_size, cfg.symmetric).dequantize()[0].astype(np.float64)
        errors[bits] = max(nb * na + float(qb @ qb) * float(qa @ qa) - 2 * float(b @ qb) * float(a @ qa), 0.0)
    return errors


def _component_cost(bits: int, d_out: int, d_in: int, cfg: FactorQuantConfig) -> int:
    if bits == 0:
        return 16  # the two per-row width bytes are paid anyway
    groups = math.ceil(d_out / cfg.group_size) + math.ceil(d_in / cfg.group_size)
    return bits * (d_out + d_in) + groups * (SCALE_BITS + (0 if cfg.symmetric else 8)) + 16


def allocate_bits(adapter: Adapter, cfg: FactorQuantConfig) -> dict[str, list[int]]:
    """Per-module, per-component widths meeting ``mixed_avg_bits`` over the whole adapter (greedy Lagrangian)."""
    params = adapter.params
    budget = cfg.mixed_avg_bits * params
    floor = sum(_component_cost(0, m.d_out, m.d_in, cfg) * m.rank for m in adapter.modules.values())
    cheapest = min(_component_cost(2, m.d_out, m.d_in, cfg) for m in adapter.modules.values())
    if budget < floor + cheapest:
        raise BudgetError(f"a budget of {cfg.mixed_avg_bits} bits per parameter cannot keep even one component "
                          f"at 2 bits (the minimum is {(floor + cheapest) / params:.3f} bits/param with group size "
                          f"{cfg.group_size}); raise mixed_avg_bits.")
    alloc = {n: [0] * m.rank for n, m in adapter.modules.items()}
    errors, heap = {}, []
    for name, m in adapter.modules.items():
        B, A = m.B.double().numpy(), m.A.double().numpy()
        for i in range(m.rank):
            errors[name, i] = _component_errors(B[:, i].copy(), A[i].copy(), cfg)
    spent = floor

    def push(name, i):
        m = adapter.modules[name]
        cur = alloc[name][i]
        nxt = [b for b in MIXED_CHOICES if b > cur]
        if not nxt:
            return
        # Best next step among all larger widths (allows 0→4 when 0→2 gains little), by gain per bit.
        best = max(nxt, key=lambda b: (errors[name, i][cur] - errors[name, i][b]) /
                   (_component_cost(b, m.d_out, m.d_in, cfg) - _component_cost(cur, m.d_out, m.d_in, cfg)))
        cost = _component_cost(best, m.d_out, m.d_in, cfg) - _component_cost(cur, m.d_out, m.d_in, cfg)
        gain = errors[name, i][cur] - errors[name, i][best]
        heapq.heappush(heap, (-gain / cost, name, i, best, cost))

    for name, m in adapter.modules.items():
        for i in range(m.rank):
            push(name, i)
    while heap:
        _, name, i, bits, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # a cheaper upgrade elsewhere may still fit
        alloc[name][i] = bits
        spent += cost
        push(name, i)
    return alloc


def quantize_factors(adapter: Adapter, cfg: FactorQuantConfig = FactorQuantConfig()) -> tuple[QuantizedAdapter, StageReport]:
    """Quantize a canonical adapter's balanced factors. Uniform width, or mixed by measured energy."""
    cfg.validate()
    if adapter.form not in ("canonical", "compressed"):
        raise AdapterError("quantize the canonical form (run canonicalize first): raw factors carry an arbitrary "
                           "gauge, and a badly balanced pair loses far more at the same bits.")
    start = time.perf_counter()
    if cfg.mixed_avg_bits is not None:
        alloc = allocate_bits(adapter, cfg)
    else:
        alloc = {n: [cfg.bits] * m.rank for n, m in adapter.modules.items()}
    modules = {}
    for name, m in adapter.modules.items():
        modules[name] = QuantizedModule(
            name=name, kind=m.kind, bias=m.bias,
            B_rows=quantize_rows(m.B.T.double().numpy(), alloc[name], cfg.group_size, cfg.symmetric),
            A_rows=quantize_rows(m.A.double().numpy(), alloc[name], cfg.group_size, cfg.symmetric))
    q = QuantizedAdapter(modules=modules, config=cfg, source_config=adapter.config, original_params=adapter.params)
    from edge_lora.stages.canonicalize import relative_error

    errors = {n: relative_error(adapter.modules[n], modules[n].dequantize()) for n in modules}
    energy = {n: float((adapter.modules[n].B.double().norm() * adapter.modules[n].A.double().norm()) ** 2)
              for n in modules}
    total = sum(energy.values()) or 1.0
    histogram = {}
    for widths in alloc.values():
        for b in widths:
            histogram[b] = histogram.get(b, 0) + 1
    report = StageReport(stage="quantize_factors", config=asdict(cfg), seconds=time.perf_counter() - start, metrics={
        "bits_per_param": q.bits_per_param(),
        "payload_bytes": q.payload_bits() / 8,
        "rel_error_weighted": math.sqrt(sum(energy[n] * errors[n] ** 2 for n in modules) / total),
        "rel_error_worst": max(errors.values()) if errors else 0.0,
        "worst_module": max(errors, key=errors.get) if errors else None,
        "component_bits_histogram": dict(sorted(histogram.items())),
    })
    return q, report


# ---------------------------------------------------------------------------------------------- file format
def save_quantized(q: QuantizedAdapter, path: str | os.PathLike) -> Path:
    """One safetensors file: packed codes, fp16 scales, uint8 zero points, and a JSON header in the metadata
    (``edge_lora`` key) that says how each tensor is packed. Written to a temp file, fsynced, renamed."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    modules = {}
    for name, m in q.modules.items():
        entry = {"kind": m.kind, "has_bias": m.bias is not None}
        for part, rows in (("B", m.B_rows), ("A", m.A_rows)):
            tensors[f"{name}.{part}.bits"] = rows.bits
            tensors[f"{name}.{part}.codes"] = np.concatenate(
                [pack_codes(c, int(b)) for c, b in zip(rows.codes, rows.bits)] or [np.zeros(0, np.uint8)])
            tensors[f"{name}.{part}.scales"] = rows.scales
            if rows.zeros is not None:
                tensors[f"{name}.{part}.zeros"] = rows.zeros
            entry[part] = {"d": rows.d}
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.numpy().astype(np.float16)
        modules[name] = entry
    header = {"format": FORMAT, "config": asdict(q.config), "original_params": q.original_params,
              "modules": modules, "peft_config": q.source_config}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"edge_lora": json.dumps(header)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_quantized(path: str | os.PathLike) -> QuantizedAdapter:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} cannot be read as safetensors ({exc}); it is truncated or corrupt.") from exc
    try:
        header = json.loads(meta["edge_lora"])
        if header["format"] != FORMAT:
            raise AdapterError(f"{path}: format {header['format']!r} is not {FORMAT!r}; upgrade edge_lora.")
        cfg = FactorQuantConfig(**header["config"])
        modules = {}
        for name, entry in header["modules"].items():
            parts = {}
            for part in ("B", "A"):
                bits = tensors[f"{name}.{part}.bits"]
                d = int(entry[part]["d"])
                packed = tensors[f"{name}.{part}.codes"]
                codes, offset = [], 0
                for b in bits:
                    n_bytes = math.ceil(int(b) * d / 8)
                    codes.append(unpack_codes(packed[offset:offset + n_bytes], int(b), d if b else 0))
                    offset += n_bytes
                if offset != len(packed):
                    raise AdapterError(f"{path}: tensor {name}.{part}.codes has {len(packed)} bytes, the header "
                                       f"implies {offset}; the file is corrupt.")
                parts[part] = QuantizedRows(bits=bits, codes=codes, scales=tensors[f"{name}.{part}.scales"],
                                            zeros=tensors.get(f"{name}.{part}.zeros"), d=d,
                                            group_size=cfg.group_size)
            bias = torch.from_numpy(tensors[f"{name}.bias"].astype(np.float32)) if entry["has_bias"] else None
            modules[name] = QuantizedModule(name=name, kind=entry["kind"], B_rows=parts["B"], A_rows=parts["A"],
                                            bias=bias)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: the edge_lora header or a tensor it names is missing or malformed ({exc!r}). "
                           "Re-run the quantize stage.") from exc
    return QuantizedAdapter(modules=modules, config=cfg, source_config=header.get("peft_config", {}),
                            original_params=int(header["original_params"]))
