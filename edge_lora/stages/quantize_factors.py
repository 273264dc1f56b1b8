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
FORMAT = "edge_lora.quantized_factors/2"


class QuantizeError(EdgeLoraError):
    """A quantization setting is out of range."""


class BitBudgetError(QuantizeError, BudgetError):
    """A mixed bit budget below what one 2-bit component costs. Exit 2, not BudgetError's 3: the minimum is known
    before any work from the adapter's shapes, so this is a setting to change, not a target the data missed."""

    exit_code = 2


def parse_bits(text: str) -> dict:
    """``8|4|3|2`` or ``mixed:AVG_BITS`` (the CLI's --bits) → FactorQuantConfig keyword arguments."""
    text = str(text).strip()
    uniform = ", ".join(map(str, sorted(SUPPORTED_BITS, reverse=True)))
    if text.lower().startswith("mixed:"):
        value = text.split(":", 1)[1]
        try:
            avg = float(value)
        except ValueError:
            avg = float("nan")
        if not math.isfinite(avg) or avg <= 0:
            raise QuantizeError(f"--bits {text}: after 'mixed:' give the average bit budget per parameter as a "
                                f"positive number, e.g. mixed:3.0 (got {value!r}).")
        return {"bits": None, "mixed_avg_bits": avg}
    if text.isdigit() and int(text) in SUPPORTED_BITS:
        return {"bits": int(text), "mixed_avg_bits": None}
    raise QuantizeError(f"--bits {text} is not supported: use a uniform width ({uniform}) or mixed:AVG_BITS "
                        "(per-component widths from {0, 2, 3, 4, 8} within an average budget, e.g. mixed:2.5).")


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
        if self.mixed_avg_bits is not None and not (isinstance(self.mixed_avg_bits, (int, float))
                                                    and math.isfinite(self.mixed_avg_bits) and self.mixed_avg_bits > 0):
            raise QuantizeError(f"mixed_avg_bits={self.mixed_avg_bits!r} must be a positive number of bits per "
                                "parameter, e.g. 3.0.")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 8:
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
        minimum = math.ceil((floor + cheapest) / params * 1000) / 1000   # rounded up, so the number given works
        raise BitBudgetError(f"a budget of {cfg.mixed_avg_bits} bits per parameter cannot keep even one component "
                             f"at 2 bits: the minimum for this adapter is {minimum:.3f} bits/param with group size "
                             f"{cfg.group_size} (every component pays 16 bits of width bytes, the cheapest 2-bit "
                             f"component its codes and scales). Raise the budget (mixed:{minimum:.3f} or more).")
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
    """One safetensors file with at most five flat tensors, so the file costs what the payload says:

    - ``bits``   uint8, the width of every row: per module (header order) Bᵀ's rows, then A's rows;
    - ``codes``  uint8, every live row's codes bit-packed (:func:`pack_codes`), each row starting on a byte;
    - ``scales`` float16, ``ceil(d / group_size)`` per live row, same order; dropped rows store nothing;
    - ``zeros``  uint8, likewise (asymmetric only);  ``bias`` float16, the lora_bias vectors in order.

    The JSON header (metadata key ``edge_lora``) lists modules in order with kind, d_out, d_in, rank and bias, so
    every offset is implied. One tensor per module part would cost ~100 header bytes each: 150 KB of a 390 KB
    file for a 210-module adapter. Written to a temp file, fsynced, renamed."""
    from safetensors.numpy import save_file

    bits, codes, scales, zeros, biases, modules = [], [], [], [], [], []
    for name, m in q.modules.items():
        for rows in (m.B_rows, m.A_rows):
            bits.append(rows.bits)
            for i, b in enumerate(rows.bits):
                if b == 0:
                    continue
                codes.append(pack_codes(rows.codes[i], int(b)))
                scales.append(rows.scales[i])
                if rows.zeros is not None:
                    zeros.append(rows.zeros[i])
        if m.bias is not None:
            biases.append(m.bias.numpy().astype(np.float16))
        modules.append({"name": name, "kind": m.kind, "d_out": m.B_rows.d, "d_in": m.A_rows.d,
                        "rank": len(m.B_rows.bits), "has_bias": m.bias is not None})

    def flat(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    tensors = {"bits": flat(bits, np.uint8), "codes": flat(codes, np.uint8), "scales": flat(scales, np.float16)}
    if not q.config.symmetric:
        tensors["zeros"] = flat(zeros, np.uint8)
    if biases:
        tensors["bias"] = flat(biases, np.float16)
    header = {"format": FORMAT, "config": asdict(q.config), "original_params": q.original_params,
              "modules": modules, "peft_config": q.source_config}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)   # mkstemp's 0600 would make the shipped file unreadable to other users
        save_file(tensors, tmp, metadata={"edge_lora": json.dumps(header, separators=(",", ":"))})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class _Cursor:
    """Reads consecutive slices of a flat tensor; running past its end means the file is corrupt."""

    def __init__(self, path, key: str, array: np.ndarray):
        self.path, self.key, self.array, self.at = path, key, array, 0

    def take(self, n: int) -> np.ndarray:
        if self.at + n > len(self.array):
            raise AdapterError(f"{self.path}: tensor {self.key!r} has {len(self.array)} entries, the header implies "
                               "more; the file is corrupt or truncated. Re-run the quantize stage.")
        out = self.array[self.at:self.at + n]
        self.at += n
        return out

    def check_used(self) -> None:
        if self.at != len(self.array):
            raise AdapterError(f"{self.path}: tensor {self.key!r} has {len(self.array)} entries, the header implies "
                               f"{self.at}; the file is corrupt. Re-run the quantize stage.")


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
            raise AdapterError(f"{path}: format {header['format']!r} is not {FORMAT!r}; re-run the quantize stage "
                               "with this edge_lora.")
        cfg = FactorQuantConfig(**header["config"])
        cur = {k: _Cursor(path, k, tensors[k]) for k in ("bits", "codes", "scales")}
        for k in ("zeros", "bias"):
            if k in tensors:
                cur[k] = _Cursor(path, k, tensors[k])
        modules = {}
        for entry in header["modules"]:
            parts = {}
            r = int(entry["rank"])
            for part, d in (("B", int(entry["d_out"])), ("A", int(entry["d_in"]))):
                bits = cur["bits"].take(r).copy()
                n_groups = math.ceil(d / cfg.group_size)
                scales = np.zeros((r, n_groups), dtype=np.float16)
                zeros = None if cfg.symmetric else np.zeros((r, n_groups), dtype=np.uint8)
                codes = []
                for i, b in enumerate(bits):
                    b = int(b)
                    if b not in (0,) + SUPPORTED_BITS:
                        raise AdapterError(f"{path}: module {entry['name']} has a {b}-bit row; the file is corrupt.")
                    codes.append(unpack_codes(cur["codes"].take(math.ceil(b * d / 8)), b, d if b else 0))
                    if b:
                        scales[i] = cur["scales"].take(n_groups)
                        if zeros is not None:
                            zeros[i] = cur["zeros"].take(n_groups)
                parts[part] = QuantizedRows(bits=bits, codes=codes, scales=scales, zeros=zeros, d=d,
                                            group_size=cfg.group_size)
            bias = (torch.from_numpy(cur["bias"].take(int(entry["d_out"])).astype(np.float32))
                    if entry["has_bias"] else None)
            modules[entry["name"]] = QuantizedModule(name=entry["name"], kind=entry["kind"], B_rows=parts["B"],
                                                     A_rows=parts["A"], bias=bias)
        for c in cur.values():
            c.check_used()
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: the edge_lora header or a tensor it names is missing or malformed ({exc!r}). "
                           "Re-run the quantize stage.") from exc
    return QuantizedAdapter(modules=modules, config=cfg, source_config=header.get("peft_config", {}),
                            original_params=int(header["original_params"]))


# ---------------------------------------------------------------------------------------------- CLI helper
def quantize_to_file(original: Adapter, expansion: Adapter, cfg: FactorQuantConfig, path: str | os.PathLike,
                     shared_groups: list[str] | None = None) -> tuple[Adapter, StageReport]:
    """Quantize a per-module adapter (``compress``'s expansion, or the import itself), write ``path``, and return
    the dequantized adapter READ BACK FROM THE FILE, so a PEFT export of it computes exactly what the file holds.

    Errors are measured against ``original`` (truncation and quantization together) and against the expansion
    (quantization alone); sizes against the fp16 PEFT adapter (2 bytes per original parameter)."""
    from edge_lora.stages.canonicalize import canonicalize, relative_error

    source, _ = canonicalize(expansion)
    q, report = quantize_factors(source, cfg)
    path = Path(path)
    save_quantized(q, path)
    dequantized = load_quantized(path).dequantize(source)
    errors = {n: relative_error(m, dequantized.modules[n]) for n, m in original.modules.items()
              if n in dequantized.modules}
    energy = {n: float(((m.scale * m.B.double()).T @ (m.scale * m.B.double()) * (m.A.double() @ m.A.double().T)).sum())
              for n, m in original.modules.items() if n in errors}
    total = sum(energy.values()) or 1.0
    fp16_bytes = original.params * 2
    payload = q.payload_bits() / 8
    file_bytes = path.stat().st_size
    m = report.metrics
    m.update({
        "file": str(path), "file_bytes": file_bytes, "fp16_peft_bytes": fp16_bytes,
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
    return dequantized, report
