"""The quantized adapter format: group-wise int2..int8 codes of the balanced canonical factors, one owner.

Written on the build side (``stages/quantize_factors.py`` quantizes, ``compress --bits`` and hot-swap exports
write), decoded on the device (``formats/ort_adapter.py`` expands it when an adapter file is loaded) with numpy
alone: no torch here.

Each module's factors are handled as two (components × d) matrices, ``Bᵀ`` (d = d_out) and ``A`` (d = d_in);
row i of both is singular component i, and has its own bit width from {0, 1, 2, 3, 4, 8} (0: dropped). Groups of
``group_size`` values run along d within a row; a last group shorter than that keeps its own scale.

Five flat tensors, so a file costs what its payload says (one tensor per module part would cost ~100 header
bytes each):

- ``bits``   uint8, the width of every row: per module (header order) Bᵀ's rows, then A's rows;
- ``codes``  uint8, every live row's codes bit-packed little-endian (:func:`pack_codes`), each row on a byte;
- ``scales`` float16, ``ceil(d / group_size)`` per live row, same order; dropped rows store nothing;
- ``zeros``  uint8, likewise (asymmetric only);   ``bias``  float16, the lora_bias vectors in module order.

The JSON header lists the modules in order (name, kind, d_out, d_in, rank, has_bias), so every offset is
implied; it travels as the safetensors metadata entry ``edge_lora`` of ``quantized.safetensors``, or as the
uint8 parameter ``edge_lora.quantized.header`` of an ONNX Runtime adapter file (:mod:`edge_lora.formats.ort_adapter`).

Symmetric codes of b bits are 0 … 2^b − 2 around ``half = 2^(b−1) − 1`` (so +x and −x are both exact), except
1 bit, where codes 0 / 1 stand for −scale/2 / +scale/2 (sign × magnitude); asymmetric codes 0 … 2^b − 1 with a
per-group zero point.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_lora.errors import AdapterError

FORMAT = "edge_lora.quantized_factors/2"
# 1 bit is sign × scale (symmetric only): codes 0/1 stand for ∓scale/2, the offset of dequantize_rows.
SUPPORTED_BITS = (1, 2, 3, 4, 8)
ROW_BITS = (0,) + SUPPORTED_BITS
SCALE_BITS = 16
TENSORS = ("bits", "codes", "scales", "zeros", "bias")


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
    return unpack_rows(np.asarray(packed)[: math.ceil(bits * n / 8)], bits, 1, n)[0]


def unpack_rows(packed: np.ndarray, bits: int, rows: int, n: int) -> np.ndarray:
    """(rows × n) codes from ``rows`` consecutive packed rows of n b-bit codes, each starting on a byte."""
    width = math.ceil(bits * n / 8)
    packed = np.asarray(packed, dtype=np.uint8).reshape(rows, width)
    if bits == 8:   # little-endian packing of bytes is the bytes themselves
        return packed[:, :n].copy()
    planes = np.unpackbits(packed, axis=1, bitorder="little")[:, : n * bits].reshape(rows, n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)


def groups(d: int, g: int) -> list[slice]:
    return [slice(s, min(s + g, d)) for s in range(0, d, g)]


def dequantize_rows(codes, scales, zeros, bits: int, g: int) -> np.ndarray:
    """(rows × d) float32 from (rows × d) codes of one width and their (rows × groups) scales / zero points: one
    vector op for them all, not one per row or group (the device expands every row of an adapter it loads)."""
    d = codes.shape[1]
    groups_used = -(-d // g)
    scale = np.repeat(np.asarray(scales, dtype=np.float32)[:, :groups_used], g, axis=1)[:, :d]
    if zeros is not None:
        offset = np.repeat(np.asarray(zeros, dtype=np.float32)[:, :groups_used], g, axis=1)[:, :d]
    else:
        offset = np.float32((1 << (bits - 1)) - 1 if bits > 1 else 0.5)
    return (codes.astype(np.float32) - offset) * scale


def dequantize_row(codes, scales, zeros, bits: int, g: int) -> np.ndarray:
    return dequantize_rows(np.asarray(codes)[None], np.asarray(scales)[None],
                           None if zeros is None else np.asarray(zeros)[None], bits, g)[0]


# ---------------------------------------------------------------------------------------------- records
@dataclass
class QuantizedRows:
    """An (r × d) matrix quantized row by row; row i has its own bit width (0 = dropped)."""

    bits: np.ndarray          # (r,) uint8
    codes: list[np.ndarray]   # per row, unpacked uint8 codes (length d), empty for 0-bit rows (or r × d)
    scales: np.ndarray        # (r, n_groups) float16
    zeros: np.ndarray | None  # (r, n_groups) uint8 code of zero, asymmetric only
    d: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        """(r × d) float32, the rows of one width at once."""
        g = self.group_size
        if isinstance(self.codes, np.ndarray) and len(self.bits) and (self.bits == self.bits[0]).all() \
                and self.bits[0]:   # one width, codes as one matrix (as from_arrays reads a uniform file)
            return dequantize_rows(self.codes, self.scales, self.zeros, int(self.bits[0]), g)
        out = np.zeros((len(self.bits), self.d), dtype=np.float32)
        for b in set(self.bits.tolist()) - {0}:
            rows = np.flatnonzero(self.bits == b)
            out[rows] = dequantize_rows(np.stack([self.codes[i] for i in rows]), self.scales[rows],
                                        None if self.zeros is None else self.zeros[rows], b, g)
        return out

    def payload_bits(self) -> int:
        n_groups = self.scales.shape[1]
        live = int((self.bits > 0).sum())
        bits = int(sum(int(b) * self.d for b in self.bits))                 # codes
        bits += live * n_groups * SCALE_BITS                                 # scales
        bits += live * n_groups * 8 if self.zeros is not None else 0         # zero points
        return bits + 8 * len(self.bits)                                     # per-row widths


@dataclass
class ModuleCodes:
    """One module: Bᵀ's rows (components × d_out) and A's rows (components × d_in); ``bias`` float32 or None."""

    name: str
    kind: str
    B_rows: QuantizedRows
    A_rows: QuantizedRows
    bias: np.ndarray | None = None

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(B: d_out × k, A: k × d_in) float32 over the live components, with ΔW = B·A (scale folded in)."""
        live = self.B_rows.bits > 0
        b_rows, a_rows = self.B_rows.dequantize(), self.A_rows.dequantize()
        if not live.all():
            b_rows, a_rows = b_rows[live], a_rows[live]
        return np.ascontiguousarray(b_rows.T), np.ascontiguousarray(a_rows)

    def payload_bits(self) -> int:
        bias = self.bias.size * 16 if self.bias is not None else 0
        return self.B_rows.payload_bits() + self.A_rows.payload_bits() + bias


@dataclass
class QuantizedFactors:
    """The whole payload: modules in file order, the quantizer's settings and where the adapter came from.

    ``settings`` holds ``bits`` (uniform width or None), ``mixed_avg_bits`` (or None), ``group_size`` and
    ``symmetric``; ``original_params`` counts the factors of the adapter that was quantized (sizes are quoted per
    original parameter); ``source`` is the original PEFT adapter folder the codes stand for (validation compares
    with it), as stored: relative to the file's folder (``QuantizedAdapter.save`` and the export write it so and
    ``QuantizedAdapter.load`` resolves it; files written before hold an absolute path, still read)."""

    modules: dict[str, ModuleCodes]
    settings: dict
    original_params: int = 0
    peft_config: dict = field(default_factory=dict)
    source: str | None = None

    @property
    def group_size(self) -> int:
        return int(self.settings["group_size"])

    @property
    def symmetric(self) -> bool:
        return bool(self.settings["symmetric"])

    def payload_bits(self) -> int:
        return sum(m.payload_bits() for m in self.modules.values())

    def header(self) -> dict:
        modules = [{"name": n, "kind": m.kind, "d_out": m.B_rows.d, "d_in": m.A_rows.d, "rank": len(m.B_rows.bits),
                    "has_bias": m.bias is not None} for n, m in self.modules.items()]
        header = {"format": FORMAT, "config": dict(self.settings), "original_params": self.original_params,
                  "modules": modules, "peft_config": self.peft_config}
        if self.source is not None:
            header["source"] = self.source
        return header

    def arrays(self) -> dict[str, np.ndarray]:
        """The flat tensors (see the module docstring), in their storage dtypes."""
        bits, codes, scales, zeros, biases = [], [], [], [], []
        for m in self.modules.values():
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
                biases.append(np.asarray(m.bias, dtype=np.float16))

        def flat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        out = {"bits": flat(bits, np.uint8), "codes": flat(codes, np.uint8), "scales": flat(scales, np.float16)}
        if not self.symmetric:
            out["zeros"] = flat(zeros, np.uint8)
        if biases:
            out["bias"] = flat(biases, np.float16)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], header: dict, where) -> "QuantizedFactors":
        """Decode the flat tensors with their header; any inconsistency is an AdapterError naming ``where``."""
        try:
            if header.get("format") != FORMAT:
                raise AdapterError(f"{where}: format {header.get('format')!r} is not {FORMAT!r}; write it again "
                                   "with this edge_lora (compress --bits, or the export).")
            settings = dict(header["config"])
            g, symmetric = int(settings["group_size"]), bool(settings["symmetric"])
            if g < 1:
                raise ValueError(f"group_size {g}")
            unknown = sorted(set(arrays) - set(TENSORS))
            if unknown:
                raise AdapterError(f"{where}: unknown tensor(s) {unknown}; the file was not written by edge_lora.")
            cur = {k: _Cursor(where, k, arrays[k]) for k in TENSORS if k in arrays}
            for k in ("bits", "codes", "scales"):
                if k not in cur:
                    raise AdapterError(f"{where}: no {k!r} tensor; the file is truncated or not a quantized adapter.")
            if not symmetric and "zeros" not in cur:
                raise AdapterError(f"{where}: asymmetric codes but no 'zeros' tensor; the file is corrupt.")
            modules = {}
            for entry in header["modules"]:
                name, r = str(entry["name"]), int(entry["rank"])
                parts = {}
                for part, d in (("B", int(entry["d_out"])), ("A", int(entry["d_in"]))):
                    row_bits = cur["bits"].take(r).astype(np.uint8).copy()
                    bad = sorted(set(row_bits.tolist()) - set(ROW_BITS))
                    if bad:
                        raise AdapterError(f"{where}: module {name} has a {bad[0]}-bit row; the file is corrupt.")
                    n_groups = math.ceil(d / g)
                    live = row_bits > 0
                    widths = [math.ceil(int(b) * d / 8) for b in row_bits]
                    packed = cur["codes"].take(sum(widths))
                    scales = np.zeros((r, n_groups), dtype=np.float16)
                    scales[live] = cur["scales"].take(int(live.sum()) * n_groups).reshape(-1, n_groups)
                    zeros = None
                    if not symmetric:
                        zeros = np.zeros((r, n_groups), dtype=np.uint8)
                        zeros[live] = cur["zeros"].take(int(live.sum()) * n_groups).reshape(-1, n_groups)
                    if live.all() and (row_bits == row_bits[0]).all():   # one width (uniform files): one unpack
                        codes = unpack_rows(packed, int(row_bits[0]), r, d)
                    else:
                        starts = np.concatenate([[0], np.cumsum(widths)]).astype(int)
                        codes = [unpack_codes(packed[starts[i]:starts[i + 1]], int(b), d if b else 0)
                                 for i, b in enumerate(row_bits)]
                    parts[part] = QuantizedRows(bits=row_bits, codes=codes, scales=scales, zeros=zeros, d=d,
                                                group_size=g)
                bias = cur["bias"].take(int(entry["d_out"])).astype(np.float32) if entry["has_bias"] else None
                if "bias" not in cur and entry["has_bias"]:
                    raise AdapterError(f"{where}: module {name} has a bias but the file has no 'bias' tensor.")
                modules[name] = ModuleCodes(name=name, kind=str(entry["kind"]), B_rows=parts["B"],
                                            A_rows=parts["A"], bias=bias)
            for c in cur.values():
                c.check_used()
            return cls(modules=modules, settings=settings, original_params=int(header["original_params"]),
                       peft_config=header.get("peft_config") or {}, source=header.get("source"))
        except AdapterError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AdapterError(f"{where}: the quantized-adapter header or a tensor it names is missing or malformed "
                               f"({exc!r}). Write it again (compress --bits, or the export).") from exc


class _Cursor:
    """Reads consecutive slices of a flat tensor; running past its end means the file is corrupt."""

    def __init__(self, where, key: str, array: np.ndarray):
        self.where, self.key, self.array, self.at = where, key, np.asarray(array).reshape(-1), 0

    def take(self, n: int) -> np.ndarray:
        if self.at + n > len(self.array):
            raise AdapterError(f"{self.where}: tensor {self.key!r} has {len(self.array)} entries, the header implies "
                               "more; the file is corrupt or truncated. Write it again.")
        out = self.array[self.at:self.at + n]
        self.at += n
        return out

    def check_used(self) -> None:
        if self.at != len(self.array):
            raise AdapterError(f"{self.where}: tensor {self.key!r} has {len(self.array)} entries, the header implies "
                               f"{self.at}; the file is corrupt. Write it again.")


# ---------------------------------------------------------------------------------------------- the file
FILE_NAME = "quantized.safetensors"


def to_bytes(q: QuantizedFactors) -> bytes:
    from safetensors.numpy import save

    return save(q.arrays(), metadata={"edge_lora": json.dumps(q.header(), separators=(",", ":"))})


def write_file(q: QuantizedFactors, path: str | os.PathLike) -> Path:
    """``quantized.safetensors``: the flat tensors, the header as metadata ``edge_lora``; written atomically."""
    from edge_lora.files import write_bytes_atomic

    path = Path(path)
    write_bytes_atomic(path, to_bytes(q))
    return path


def read_file(path: str | os.PathLike) -> QuantizedFactors:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path} does not exist; `python -m edge_lora compress ADAPTER --out DIR --bits ...` "
                           f"writes DIR/{FILE_NAME}.")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} cannot be read as safetensors ({exc}); it is truncated or corrupt.") from exc
    try:
        header = json.loads(meta["edge_lora"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} has no edge_lora header; it was not written by `compress --bits`.") from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: the edge_lora header is not a JSON object; the file is corrupt.")
    return QuantizedFactors.from_arrays(arrays, header, path)
