"""Quantized LoRA factors for hot-swap exports: integer codes + per-block scales as graph inputs, dequantized in the graph.

A hot-swap export (``export_onnx.export_hotswap``) takes each LoRA factor as a float graph input with a rank-0
default: ``A_in`` (d_in × rank) and ``B_in`` (rank × d_out). This module turns every such input into

    codes  (int8 d × rank, or nibble-packed uint8 ⌈d/2⌉ × rank for int4)  ─┐
    scales (float32, ⌈d/g⌉ blocks along d)                                 ─┴─ DequantizeLinear(axis, block_size=g) ─► the old float value

(opset 21 blocked quantization: groups run along d, i.e. axis 0 for A_in and axis 1 for B_in), and writes ONNX
Runtime adapter files that carry codes and scales instead of floats. Both defaults stay rank 0, so with no adapter
active the branch still adds exact zeros and the model is the plain base.

Three pieces, with one seam between the layout and the quantizer:

- :func:`quantize_lora_arrays`: ``{graph input name: float array in graph layout}`` → ``{codes name: codes,
  scales name: scales}``. It knows nothing about modules: per-module branches, fused groups (one A input and one
  block-diagonal B input per q/k/v or gate/up group, from ``export_onnx.lora_input_arrays_for``) and shared
  cross-layer chains are all just named arrays; the last part of the name says where d is (:data:`FACTOR_AXES`).
  The zero blocks of a block-diagonal B quantize to exact zeros (symmetric codes) but still cost their codes.
- :func:`quantize_hotswap_graph`: the onnx_ir pass on a hot-swap model.onnx.
- :func:`write_quantized_ort_adapter` / :func:`write_quantized_arrays`: the adapter files.

int4 in the graph: ORT 1.32's CPU DequantizeLinear runs int4 with block_size, but its adapter format refuses int4
parameters ("data_type 22 is not a supported LoRA parameter type"), so int4 codes travel nibble-packed in uint8
(two codes per byte, the second half of the d axis in the high nibbles) and the graph unpacks them with
BitwiseAnd / BitShift / Concat before a uint8 DequantizeLinear with zero point 8. Symmetric codes: int8 in
[−127, 127], int4 in [−7, 7]; scale = max|x| / 127 (or 7) per block, fp32.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_lora.errors import EdgeLoraError, ModelError
from edge_lora.report import StageReport

BITS = (8, 4)
MIN_OPSET = 21       # DequantizeLinear with block_size
MIN_IR_VERSION = 10  # opset 21 needs IR version 10
CODES, SCALES = "codes", "scales"
INT4_ZERO = 8        # int4 codes c ∈ [−7, 7] are stored as the nibble c + 8


class HotswapQuantError(EdgeLoraError):
    """A hot-swap quantization setting or input does not fit."""


@dataclass(frozen=True)
class HotswapQuantConfig:
    bits: int = 8          # 8: int8 codes; 4: int4 codes, nibble-packed in uint8
    group_size: int = 64   # values per scale along d (DequantizeLinear block_size)

    def validate(self) -> None:
        if self.bits not in BITS:
            raise HotswapQuantError(f"hot-swap factor quantization supports bits in {BITS}, not {self.bits!r}: "
                                    "ORT's DequantizeLinear takes int8 and (via uint8 nibbles) int4 codes here.")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 8:
            raise HotswapQuantError(f"group_size={self.group_size!r} must be an integer ≥ 8 (one fp32 scale per "
                                    "group; smaller groups cost more in scales than they save).")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


def quantized_input_names(input_name: str) -> tuple[str, str]:
    """Codes and scales input names for a float LoRA input: the ONE place they are made (graph pass and writer)."""
    return f"{input_name}.{CODES}", f"{input_name}.{SCALES}"


# Which axis of a graph-layout factor is d (where groups run), by the input name's last part. A (d_in × r) and B
# (r × d_out) of plain and fused branches; Vt (d_in × r_v) and U (r_u × d_out) of shared cross-layer chains. A
# chain's core G (r_v × r_u) has no d axis and is a few hundred numbers: it stays float.
FACTOR_AXES = {"A": 0, "Vt": 0, "B": 1, "U": 1}


def block_axis(input_name: str) -> int | None:
    """Axis of d in graph layout, or None for an input that stays float (a chain core, anything unknown)."""
    if not input_name.startswith("lora."):
        return None
    return FACTOR_AXES.get(input_name.rsplit(".", 1)[-1])


# ---------------------------------------------------------------------------------------------- the seam
def _pack_int4(codes: np.ndarray, axis: int) -> np.ndarray:
    """int4 codes → uint8, two per byte along ``axis``: byte i holds code i (low nibble) and code i + ⌈d/2⌉ (high),
    so the graph unpacks with one Concat of the two nibble planes, no interleaving Reshape."""
    d = codes.shape[axis]
    half = (d + 1) // 2
    nib = (codes.astype(np.int16) + INT4_ZERO).astype(np.uint8)
    lo = np.take(nib, range(half), axis=axis)
    hi = np.take(nib, range(half, d), axis=axis)
    if hi.shape[axis] < half:   # odd d: the last high nibble is padding, sliced off in the graph
        pad = [(0, 0)] * nib.ndim
        pad[axis] = (0, half - hi.shape[axis])
        hi = np.pad(hi, pad, constant_values=INT4_ZERO)
    return np.ascontiguousarray(lo | (hi << 4))


def _unpack_int4(packed: np.ndarray, axis: int, d: int) -> np.ndarray:
    lo, hi = packed & 0x0F, packed >> 4
    nib = np.concatenate([lo, hi], axis=axis)
    return np.take(nib, range(d), axis=axis).astype(np.int16) - INT4_ZERO


def quantize_array(x: np.ndarray, axis: int, cfg: HotswapQuantConfig) -> tuple[np.ndarray, np.ndarray]:
    """One float factor in graph layout → (codes, scales); scales have ⌈d/g⌉ along ``axis``."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise HotswapQuantError(f"a LoRA factor must be 2-D, got shape {x.shape}.")
    moved = np.moveaxis(x, axis, 0).astype(np.float64)       # d × rank
    d, r = moved.shape
    n_groups = math.ceil(d / cfg.group_size) if d else 0
    scales = np.zeros((n_groups, r), dtype=np.float32)
    codes = np.zeros((d, r), dtype=np.int8)
    for k in range(n_groups):
        sl = slice(k * cfg.group_size, min((k + 1) * cfg.group_size, d))   # a short last group keeps its own scale
        amax = np.abs(moved[sl]).max(axis=0)
        scale = (amax / cfg.qmax).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
        codes[sl] = np.clip(np.rint(moved[sl] / safe), -cfg.qmax, cfg.qmax).astype(np.int8)
        scales[k] = scale
    if not np.isfinite(scales).all():
        raise HotswapQuantError("a LoRA factor has non-finite values; check the adapter with `inspect`.")
    codes, scales = np.moveaxis(codes, 0, axis), np.moveaxis(scales, 0, axis)
    if cfg.bits == 4:
        codes = _pack_int4(codes, axis)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales)


def dequantize_array(codes: np.ndarray, scales: np.ndarray, axis: int, d: int, cfg: HotswapQuantConfig) -> np.ndarray:
    """What the graph computes from (codes, scales): the reference for tests and for scoring."""
    values = _unpack_int4(codes, axis, d) if cfg.bits == 4 else codes.astype(np.int16)
    full = np.repeat(scales, cfg.group_size, axis=axis)
    full = np.take(full, range(d), axis=axis)
    return (values.astype(np.float32) * full).astype(np.float32)


def quantize_lora_arrays(arrays: dict[str, np.ndarray], cfg: HotswapQuantConfig = HotswapQuantConfig()
                         ) -> dict[str, np.ndarray]:
    """``{float input name: graph-layout array}`` → ``{codes name: codes, scales name: scales}``. Layout-agnostic."""
    cfg.validate()
    out = {}
    for name, x in arrays.items():
        axis = block_axis(name)
        if axis is None:   # stays a float input of the graph too (see FACTOR_AXES)
            out[name] = np.ascontiguousarray(x, dtype=np.float32)
            continue
        codes, scales = quantize_array(x, axis, cfg)
        c, s = quantized_input_names(name)
        out[c], out[s] = codes, scales
    return out


def dequantize_lora_arrays(quantized: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]],
                           cfg: HotswapQuantConfig) -> dict[str, np.ndarray]:
    """Inverse of :func:`quantize_lora_arrays` (up to rounding): ``shapes`` are the float arrays' shapes."""
    out = {}
    for name, shape in shapes.items():
        axis = block_axis(name)
        if axis is None:
            out[name] = quantized[name]
            continue
        c, s = quantized_input_names(name)
        out[name] = dequantize_array(quantized[c], quantized[s], axis, shape[axis], cfg)
    return out


# ---------------------------------------------------------------------------------------------- adapter files
def write_quantized_arrays(arrays: dict[str, np.ndarray], path: str | os.PathLike,
                           cfg: HotswapQuantConfig = HotswapQuantConfig(), adapter_version: int = 1,
                           model_version: int = 1) -> dict[str, np.ndarray]:
    """Quantize graph-layout float arrays and write them as an ONNX Runtime adapter file. Returns what was written."""
    import onnxruntime as ort

    quantized = quantize_lora_arrays(arrays, cfg)
    # The file has no metadata field for the group size: a float graph expanding it at load time reads it back
    # from the scales' shapes (recover_group_size), so refuse a size that could not be recovered.
    d_by_input = {k: v.shape[block_axis(k)] for k, v in arrays.items() if block_axis(k) is not None}
    recovered = recover_group_size(quantized, d_by_input)
    if recovered is not None and recovered != cfg.group_size:
        raise HotswapQuantError(f"group_size={cfg.group_size} divides none of the factor sizes "
                                f"{sorted(set(d_by_input.values()))[:5]}, so a reader of the file would take it for "
                                f"{recovered}; use a power of two such as 32 or 64.")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(model_version)
    # the OrtValues point into the arrays in `quantized`, which outlive export_adapter
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in quantized.items()})
    fmt.export_adapter(str(path))
    return quantized


def adapter_float_arrays(adapter, layout=None) -> dict[str, np.ndarray]:
    """Graph-layout float arrays per LoRA input name, from export_onnx's own layout function (so names and layouts
    cannot drift from the graph). ``layout``: the export's edge_lora.json dict (exact), its module names, or None."""
    from edge_lora.stages import export_onnx

    if hasattr(export_onnx, "lora_input_arrays_for"):
        return export_onnx.lora_input_arrays_for(adapter, layout)
    arrays = {}   # the per-module layout (one A and one B input per module)
    for name, module in adapter.modules.items():
        if module.rank == 0 or (layout is not None and name not in layout):
            continue
        a_name, b_name = export_onnx.lora_input_names(name)
        arrays[a_name], arrays[b_name] = export_onnx.lora_input_arrays(module)
    return arrays


def write_quantized_ort_adapter(adapter, path: str | os.PathLike, cfg: HotswapQuantConfig = HotswapQuantConfig(),
                                layout=None, adapter_version: int = 1, model_version: int = 1) -> StageReport:
    """The quantized counterpart of ``export_onnx.write_ort_adapter`` (``layout`` as there: the export's
    edge_lora.json dict is exact), with sizes and errors in the report.

    A plain Adapter is written in its canonical balanced gauge (A = S^½Vᵀ, B = U·S^½; same ΔW): PEFT's raw factors
    carry an arbitrary scale split between A and B, and quantizing a badly balanced pair costs far more error at
    the same bits (see quantize_factors)."""
    from edge_lora.adapter import Adapter
    from edge_lora.stages.canonicalize import canonicalize

    if isinstance(adapter, Adapter) and adapter.form != "canonical":
        adapter, _ = canonicalize(adapter)
    arrays = adapter_float_arrays(adapter, layout)
    if not arrays:
        raise HotswapQuantError(f"adapter {adapter.source}: no module with rank > 0 to write.")
    quantized = write_quantized_arrays(arrays, path, cfg, adapter_version, model_version)
    back = dequantize_lora_arrays(quantized, {k: v.shape for k, v in arrays.items()}, cfg)
    rel = {k: float(np.linalg.norm(back[k] - v) / max(np.linalg.norm(v), 1e-30)) for k, v in arrays.items()
           if block_axis(k) is not None}
    values = sum(v.size for v in arrays.values())
    payload = sum(v.nbytes for v in quantized.values())
    return StageReport(stage="hotswap_quant", config=asdict(cfg), metrics={
        "parameters": len(quantized), "values": values, "payload_bytes": payload,
        "float32_payload_bytes": values * 4, "file_bytes": Path(path).stat().st_size,
        "bits_per_value": payload * 8 / max(values, 1),
        "factor_rel_error_max": max(rel.values()), "factor_rel_error_worst_input": max(rel, key=rel.get),
    })


# ---------------------------------------------------------------------------------------------- graph pass
def _lora_float_inputs(graph) -> list:
    import onnx_ir as ir

    return [v for v in graph.inputs if block_axis(v.name) is not None
            and v.type is not None and v.type.dtype == ir.DataType.FLOAT]


def quantize_hotswap_graph(model_path: str | os.PathLike, cfg: HotswapQuantConfig = HotswapQuantConfig(),
                           out_path: str | os.PathLike | None = None) -> list[str]:
    """onnx_ir pass: every float ``lora.*.A`` / ``lora.*.B`` graph input → codes + scales inputs (rank-0 defaults)
    feeding a blocked DequantizeLinear whose output takes the old value's place. Raises the default-domain opset to
    21 (ops between 18 and 21 only gained types and attributes with backward-compatible defaults). Writes
    ``out_path`` (default: in place). Returns the float input names replaced."""
    import onnx_ir as ir

    cfg.validate()
    model_path = Path(model_path)
    out_path = Path(out_path) if out_path is not None else model_path
    model = ir.load(model_path)
    graph = model.graph
    inputs = _lora_float_inputs(graph)
    if not inputs:
        already = [v.name for v in graph.inputs if v.name.endswith(f".{CODES}")]
        raise HotswapQuantError(f"{model_path}: no float LoRA factor inputs (lora.*.A / lora.*.B) to quantize"
                                + ("; it is already quantized." if already else
                                   "; export the base with --mode hotswap first."))
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        model.opset_imports[""] = MIN_OPSET
        graph.opset_imports[""] = MIN_OPSET
    model.ir_version = max(model.ir_version or 0, MIN_IR_VERSION)
    code_type = ir.DataType.INT8 if cfg.bits == 8 else ir.DataType.UINT8
    code_np = np.int8 if cfg.bits == 8 else np.uint8
    new_nodes, replaced = [], []
    const = {}

    def constant(name: str, array: np.ndarray):
        if name not in const:
            v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
            graph.register_initializer(v)
            const[name] = v
        return const[name]

    for value in inputs:
        name = value.name
        axis = block_axis(name)
        dims = list(value.shape) if value.shape is not None else []
        if len(dims) != 2 or not isinstance(dims[axis], int):
            raise ModelError(f"{model_path}: LoRA input {name} has shape {dims}; expected a fixed d on axis {axis} "
                             "and a symbolic rank on the other. Is this an edge_lora hot-swap export?")
        # One rank dim name per input: ORT's memory planner treats equal dim_params as equal sizes and would reuse
        # one branch's dequantized buffer for another of a different rank ("Shape mismatch attempting to re-use
        # buffer"), and a fused group's rank differs from a single module's.
        d, rank_dim = dims[axis], f"rank_{name[len('lora.'):]}"
        n_groups = math.ceil(d / cfg.group_size)
        stored_d = (d + 1) // 2 if cfg.bits == 4 else d
        c_name, s_name = quantized_input_names(name)

        codes = _rank0_input(graph, c_name, code_type, code_np, stored_d, rank_dim, axis)
        scales = _rank0_input(graph, s_name, ir.DataType.FLOAT, np.float32, n_groups, rank_dim, axis)
        dq_inputs = [codes, scales]
        if cfg.bits == 4:
            lo = ir.node("BitwiseAnd", [codes, constant("lora_quant.nibble_mask", np.array(0x0F, np.uint8))],
                         name=f"{name}.lo")
            hi = ir.node("BitShift", [codes, constant("lora_quant.nibble_shift", np.array(4, np.uint8))],
                         {"direction": "RIGHT"}, name=f"{name}.hi")
            cat = ir.node("Concat", [lo.outputs[0], hi.outputs[0]], {"axis": axis}, name=f"{name}.unpack")
            new_nodes += [lo, hi, cat]
            unpacked = cat.outputs[0]
            if 2 * stored_d != d:   # odd d: drop the padding nibble
                sl = ir.node("Slice", [unpacked, constant("lora_quant.zero", np.array([0], np.int64)),
                                       constant(f"lora_quant.d{d}", np.array([d], np.int64)),
                                       constant(f"lora_quant.axis{axis}", np.array([axis], np.int64))],
                             name=f"{name}.slice")
                new_nodes.append(sl)
                unpacked = sl.outputs[0]
            # a zero point of 8 shaped like the scales (their rank is only known at run time)
            shape = ir.node("Shape", [scales], name=f"{name}.scales_shape")
            zp = ir.node("Expand", [constant("lora_quant.int4_zero", np.array(INT4_ZERO, np.uint8)),
                                    shape.outputs[0]], name=f"{name}.zero_point")
            new_nodes += [shape, zp]
            dq_inputs = [unpacked, scales, zp.outputs[0]]
        dq = ir.node("DequantizeLinear", dq_inputs, {"axis": axis, "block_size": cfg.group_size},
                     name=f"{name}.dequantize")
        new_nodes.append(dq)
        out = dq.outputs[0]
        out.name = f"{name}.dequantized"
        out.shape = ir.Shape([d, rank_dim] if axis == 0 else [rank_dim, d])
        out.type = ir.TensorType(ir.DataType.FLOAT)
        value.replace_all_uses_with(out)
        graph.inputs.remove(value)
        graph.initializers.pop(name, None)
        replaced.append(name)
    graph.extend(new_nodes)
    graph.sort()
    _save(model, model_path, out_path)
    return replaced


def _rank0_input(graph, name: str, dtype, np_dtype, fixed: int, rank_dim: str, axis: int):
    """A graph input of shape (fixed × rank) or (rank × fixed), ``fixed`` on ``axis``, defaulting to rank 0."""
    import onnx_ir as ir

    shape = [fixed, rank_dim] if axis == 0 else [rank_dim, fixed]
    empty = np.zeros((fixed, 0) if axis == 0 else (0, fixed), dtype=np_dtype)
    v = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=ir.tensor(empty, name=name))
    graph.inputs.append(v)
    graph.register_initializer(v)
    return v


def _save(model, model_path: Path, out_path: Path) -> None:
    """Write beside the target and move into place: ir.load reads external data lazily from the files replaced."""
    import onnx_ir as ir

    data = model_path.with_name(model_path.name + "_data")
    side = Path(tempfile.mkdtemp(prefix=".quant-", dir=out_path.parent))
    try:
        ir.save(model, side / out_path.name, external_data=(out_path.name + "_data") if data.exists() else None)
        del model
        for produced in side.iterdir():
            os.replace(produced, out_path.parent / produced.name)
    finally:
        shutil.rmtree(side, ignore_errors=True)


def quantize_hotswap_folder(src: str | os.PathLike, dst: str | os.PathLike,
                            cfg: HotswapQuantConfig = HotswapQuantConfig()) -> list[str]:
    """Copy a hot-swap export folder (without its float adapter file) and quantize the copy's graph."""
    from edge_lora.stages.export_onnx import ADAPTER_FILE, META_FILE, MODEL_FILE, update_meta

    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise HotswapQuantError(f"{dst} exists and is not empty; choose an empty folder.")
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name != ADAPTER_FILE:
            shutil.copy2(p, dst / p.name)
    replaced = quantize_hotswap_graph(dst / MODEL_FILE, cfg)
    if (dst / META_FILE).is_file():
        # edge_lora.json's lora_inputs still names the float factors: record what an adapter file must carry now
        update_meta(dst, {"lora_quant": {"bits": cfg.bits, "group_size": cfg.group_size,
                                         "inputs": {n: list(quantized_input_names(n)) for n in replaced}}},
                    drop_keys=("adapter_file", "adapter_parameters"))
    return replaced


# ---------------------------------------------------------------------------------------------- load-time expansion
# A quantized adapter file on a FLOAT hot-swap graph: the codes and scales are dequantized once, in numpy, when the
# adapter is loaded, and ORT gets float factors. The file stays small on disk and over the air, and decode runs at
# float-LoRA speed: dequantizing in the graph (quantize_hotswap_graph) costs every decode step, because ORT cannot
# constant-fold inputs an adapter may override.
def is_quantized_adapter(params) -> bool:
    """Whether an adapter file (its path, or its parameter names) carries quantized factors (codes + scales)."""
    if isinstance(params, (str, os.PathLike)):
        params = _read_adapter_arrays(params)
    return any(n.endswith(f".{CODES}") for n in params)


def _read_adapter_arrays(path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:   # ORT raises its own exception types for a missing or corrupt file
        raise HotswapQuantError(f"{path} is not an ONNX Runtime adapter file: {exc}") from exc
    # .numpy() copies out of the reader's buffer, which goes away with `fmt`
    return {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}


def recover_group_size(quantized: dict[str, np.ndarray], d_by_input: dict[str, int]) -> int | None:
    """The group size a quantized file was written with, from its shapes alone (the adapter format has no metadata
    field for it): scales have n = ⌈d/g⌉ groups along d, so g ≥ d/n for every input, and the smallest g consistent
    with all of them is the true one whenever g divides at least one d. :func:`write_quantized_arrays` refuses to
    write a file for which this does not hold, so every file it writes is self-describing. None: inconsistent."""
    pairs = []
    for name, d in d_by_input.items():
        n = quantized[quantized_input_names(name)[1]].shape[block_axis(name)]
        if n == 0 or d == 0:
            continue
        pairs.append((d, n))
    if not pairs:
        return None
    g = max(math.ceil(d / n) for d, n in pairs)
    return g if all(math.ceil(d / g) == n for d, n in pairs) else None


def _quantized_bits(codes: np.ndarray) -> int:
    return 8 if codes.dtype == np.int8 else 4   # int4 travels nibble-packed in uint8 (see the module docstring)


def expand_quantized_adapter(path: str | os.PathLike, input_shapes: dict[str, list]) -> dict[str, np.ndarray]:
    """A quantized adapter file → ``{float LoRA input name: float32 array}`` for a float hot-swap graph.

    ``input_shapes``: the graph's float LoRA inputs and their shapes (``NodeArg.shape`` of the session's
    overridable initializers: d fixed, rank symbolic), which give d exactly (an int4 file only knows ⌈d/2⌉).
    Parameters that are not quantized (a shared chain's core) pass through as they are."""
    arrays = _read_adapter_arrays(path)
    out, d_by_input, bits = {}, {}, set()
    for name, value in arrays.items():
        if name.endswith(f".{SCALES}"):
            continue
        if not name.endswith(f".{CODES}"):
            out[name] = np.ascontiguousarray(value, dtype=np.float32)
            continue
        base = name[: -len(CODES) - 1]
        axis = block_axis(base)
        if axis is None or quantized_input_names(base)[1] not in arrays:
            raise HotswapQuantError(f"{path}: {name} has no matching {quantized_input_names(base)[1]} (or is not a "
                                    "LoRA factor); the file is damaged or was not written by edge_lora.")
        if value.dtype not in (np.int8, np.uint8):
            raise HotswapQuantError(f"{path}: {name} is {value.dtype}; quantized factors are int8 codes or "
                                    "nibble-packed int4 in uint8.")
        # An input the graph lacks is still expanded (d from the codes): the caller's name check then says which
        # modules the export has no branch for, as it does for float files.
        shape = input_shapes.get(base) or []
        d = shape[axis] if len(shape) == 2 and isinstance(shape[axis], int) else None
        stored = value.shape[axis]
        b = _quantized_bits(value)
        if d is None:   # no fixed d in the graph: int8 stores d itself; int4 assumes no padding nibble
            d = stored if b == 8 else 2 * stored
        if stored != (d if b == 8 else (d + 1) // 2):
            raise HotswapQuantError(f"{path}: {name} has {stored} rows along d, the graph's {base} has d = {d}; "
                                    "the adapter is for another base or layout.")
        d_by_input[base] = d
        bits.add(b)
    if len(bits) > 1:
        raise HotswapQuantError(f"{path}: mixes int8 and int4 codes; edge_lora writes one precision per file.")
    if not d_by_input:
        raise HotswapQuantError(f"{path}: no quantized factors (*.codes) in it; load it as a float adapter.")
    g = recover_group_size(arrays, d_by_input)
    if g is None:
        raise HotswapQuantError(f"{path}: its scales do not fit one group size for all factors; the file is "
                                "damaged or was not written by edge_lora.")
    cfg = HotswapQuantConfig(bits=bits.pop(), group_size=g)
    shapes = {}
    for base, d in d_by_input.items():
        axis = block_axis(base)
        rank = arrays[quantized_input_names(base)[0]].shape[1 - axis]
        shapes[base] = (d, rank) if axis == 0 else (rank, d)
    out.update(dequantize_lora_arrays(arrays, shapes, cfg))
    return out


def load_float_ort_adapter(arrays: dict[str, np.ndarray]):
    """An ``ort.LoraAdapter`` holding float ``arrays``. ORT's Python API only loads adapters from a file
    (``LoraAdapter.Load(path)``, which memory-maps it), so the arrays go through a private temporary file: a
    fresh mkdtemp folder (mode 0700, no other user can read or swap the file), deleted right after Load. ORT keeps
    reading the file after Load (checked on 1.32: /proc/self/maps lists it mapped, "(deleted)", after the unlink),
    and deleting a memory-mapped file is safe on POSIX: the mapping keeps the data until the adapter is freed, and
    every load gets a fresh folder, so no later write can land in a live mapping. Where the OS
    refuses to delete a mapped file (Windows), the folder is kept until the process exits."""
    import onnxruntime as ort

    folder = tempfile.mkdtemp(prefix="edge_lora-adapter-")
    path = os.path.join(folder, "expanded.onnx_adapter")
    try:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        # the OrtValues point into `arrays`, which outlive export_adapter
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, np.float32))
                            for k, v in arrays.items()})
        fmt.export_adapter(path)
        adapter = ort.LoraAdapter()
        adapter.Load(path)
    finally:
        try:
            shutil.rmtree(folder)
        except OSError:
            import atexit

            atexit.register(shutil.rmtree, folder, True)
    return adapter
