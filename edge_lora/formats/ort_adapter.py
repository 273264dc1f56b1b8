"""The adapter file of a hot-swap export (``adapter.onnx_adapter``, ONNX Runtime's adapter format), one owner.

Two encodings, told apart by their parameter names:

- **float**: one float32 parameter per LoRA graph input, named as the graph names it (``lora.<group>.A`` of
  shape d_in × Σr, ``lora.<group>.B`` of shape Σr × Σd_out, block-diagonal for a fused q/k/v or gate/up group;
  ``lora.<group>.U`` / ``.Vt`` / ``lora.<module>.G`` for cross-layer shared chains). ORT loads it as it is.
- **quantized**: the payload of :mod:`edge_lora.formats.quantized_factors` (the codes of the one factor
  quantizer: per-component widths 0/2/3/4/8, fp16 group scales) as parameters ``edge_lora.quantized.bits``,
  ``.codes``, ``.scales`` (``.zeros``, ``.bias``) and its JSON header as the uint8 parameter
  ``edge_lora.quantized.header``. The graph stays float: :func:`load` decodes the codes once, lays the factors out
  for the export's LoRA groups (:func:`graph_arrays`) and hands ORT float parameters built in memory (an anonymous
  memfd on Linux: no file on disk). Decode then runs at float-LoRA speed; dequantizing inside the graph was
  measured 37-45% slower per token, because ORT cannot constant-fold inputs an adapter may override.

ORT's adapter format has no metadata field and refuses int4 and bit-packed types, hence the uint8 parameters.
Its model-version field is not enforced by ORT: binding an adapter file to its exact base is the export's
``base_sha256`` and the OTA manifest's content hash.

Torch-free: the device imports this module (runtimes/, ota/).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.errors import AdapterError, CompatibilityError
from edge_lora.formats.quantized_factors import QuantizedFactors

ADAPTER_FILE = "adapter.onnx_adapter"
QUANTIZED_PREFIX = "edge_lora.quantized."
HEADER_PARAM = QUANTIZED_PREFIX + "header"


def graph_factors(B: np.ndarray, A: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A module's factors as the graph takes them: A_in = Aᵀ (d_in × r), B_in = scale·Bᵀ (r × d_out), so the
    branch x·A_in·B_in = scale·(B·A·xᵀ)ᵀ. For embeddings d_in is the vocabulary and x·A_in is a row lookup."""
    a = np.ascontiguousarray(np.asarray(A, dtype=np.float32).T)
    b = np.ascontiguousarray((np.float32(scale) * np.asarray(B, dtype=np.float32)).T)
    return a, b


def graph_arrays(factors: Mapping[str, tuple[np.ndarray, np.ndarray]], groups: Sequence,
                 unreachable: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Float32 arrays per LoRA graph input for per-module ``factors`` (module → (B: d_out × k, A: k × d_in), scale
    folded in) on an export's plain LoRA ``groups`` (records with ``inputs``, ``modules``, ``d_in``, ``d_out``):
    ``A_cat = [A_1ᵀ | A_2ᵀ …]`` and a block-diagonal ``B``. A module the groups do not name is a
    CompatibilityError (the export has no branch for it) unless it is ``unreachable`` (adapted in the export, but
    its output reaches no graph output, e.g. BERT's pooler in a feature-extraction export); a group none of whose
    modules has rank > 0 is left out (the graph's rank-0 default applies)."""
    covered = {m for g in groups for m in g.modules} | set(unreachable)
    stray = sorted(m for m, (B, _) in factors.items() if m not in covered and B.shape[1] > 0)
    if stray:
        raise CompatibilityError(f"the adapter has factors for {stray[:3]}{' …' if len(stray) > 3 else ''}, which "
                                 "this hot-swap export has no LoRA branch for; re-export the base with those "
                                 "modules (an adapter of the same targets, or export.hotswap_targets).")
    arrays: dict[str, np.ndarray] = {}
    for group in groups:
        d_out = [int(d) for d in group.d_out]
        ranks = [int(factors[m][0].shape[1]) if m in factors else 0 for m in group.modules]
        if sum(ranks) == 0:
            continue
        a_cat = np.zeros((int(group.d_in), sum(ranks)), np.float32)
        b_bd = np.zeros((sum(ranks), sum(d_out)), np.float32)
        r0, c0 = 0, 0
        for m, r, d in zip(group.modules, ranks, d_out):
            if r:
                B, A = factors[m]   # graph_factors' layout, written in place (a swap lays out every module)
                if A.shape[1] != int(group.d_in) or B.shape[0] != d:
                    raise CompatibilityError(f"adapter module {m} is {B.shape[0]}×{A.shape[1]}, the export's branch "
                                             f"expects {d}×{group.d_in}; the adapter is for another base.")
                a_cat[:, r0:r0 + r], b_bd[r0:r0 + r, c0:c0 + d] = A.T, B.T
            r0, c0 = r0 + r, c0 + d
        arrays[group.inputs[0]], arrays[group.inputs[1]] = a_cat, b_bd
    return arrays


# ---------------------------------------------------------------------------------------------- writing
def _export(parameters: dict[str, np.ndarray], path: str) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    # the OrtValues point into `parameters`, which outlive export_adapter
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in parameters.items()})
    fmt.export_adapter(path)


def quantized_parameters(q: QuantizedFactors) -> dict[str, np.ndarray]:
    header = json.dumps(q.header(), separators=(",", ":"), sort_keys=True).encode()
    params = {QUANTIZED_PREFIX + k: v for k, v in q.arrays().items()}
    params[HEADER_PARAM] = np.frombuffer(header, dtype=np.uint8).copy()
    return params


def _write(parameters: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """ORT writes the file itself (export_adapter takes a path): into a temp name beside it, then fsync + rename."""
    from edge_lora.files import atomic_file

    with atomic_file(path) as tmp:
        _export(parameters, str(tmp))
    return Path(path)


def write_float(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    if not arrays:
        raise AdapterError(f"nothing to write to {path}: no LoRA input has rank > 0.")
    return _write({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, path)


def write_quantized(q: QuantizedFactors, path: str | os.PathLike) -> Path:
    return _write(quantized_parameters(q), path)


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class AdapterFile:
    """An adapter file's parameters as numpy arrays (copied out of ORT's reader)."""

    path: str
    parameters: dict

    @property
    def is_quantized(self) -> bool:
        return HEADER_PARAM in self.parameters

    def quantized(self) -> QuantizedFactors:
        try:
            header = json.loads(bytes(self.parameters[HEADER_PARAM]).decode())
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{self.path}: its {HEADER_PARAM} parameter is not a JSON header; the file is "
                               "damaged or was not written by edge_lora.") from exc
        if not isinstance(header, dict):
            raise AdapterError(f"{self.path}: {HEADER_PARAM} is not a JSON object; the file is damaged.")
        arrays = {k[len(QUANTIZED_PREFIX):]: v for k, v in self.parameters.items()
                  if k.startswith(QUANTIZED_PREFIX) and k != HEADER_PARAM}
        return QuantizedFactors.from_arrays(arrays, header, self.path)

    def float_arrays(self, groups: Sequence, unreachable: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """What the graph's LoRA inputs receive: the file's own arrays (float), or the codes decoded and laid out
        for ``groups`` (quantized; see :func:`graph_arrays` for ``unreachable``)."""
        if not self.is_quantized:
            stale = sorted(n for n in self.parameters if n.endswith((".codes", ".scales")))
            if stale:
                raise AdapterError(f"{self.path}: parameters {stale[:2]} are per-input int8/int4 codes of an older "
                                   "edge_lora; export the adapter again (its codes are now those of `compress "
                                   "--bits` and the quantize stage, one quantizer for both).")
            return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.parameters.items()}
        q = self.quantized()
        return graph_arrays({n: m.factors() for n, m in q.modules.items()}, groups, unreachable)


def read(path: str | os.PathLike) -> AdapterFile:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise AdapterError(f"adapter file {path} does not exist.")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:   # ORT raises its own exception types for a corrupt file
        raise AdapterError(f"{path} is not an ONNX Runtime adapter file: {exc}") from exc
    # .numpy() copies out of the reader's buffer, which goes away with `fmt`
    return AdapterFile(str(path), {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()})


def parameter_names(path: str | os.PathLike) -> list[str]:
    return sorted(read(path).parameters)


def load(path: str | os.PathLike, groups: Sequence, unreachable: Sequence[str] = ()):
    """(``ort.LoraAdapter``, the float arrays it feeds: graph input name → array) for a hot-swap session whose
    plain LoRA branches are ``groups``. A float file is memory-mapped by ORT as it is; a quantized one is expanded
    to float in memory. The arrays are what an IO-binding loop binds (edge_lora.runtimes.kv_loop)."""
    import onnxruntime as ort

    f = read(path)
    if not f.is_quantized:
        arrays = f.float_arrays(groups)   # refuses the older per-input codes with a clear message
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        return adapter, arrays
    arrays = f.float_arrays(groups, unreachable)
    if not arrays:
        raise AdapterError(f"{path}: every module of the adapter has rank 0 after quantization; nothing to load.")
    return load_arrays(arrays), arrays


def load_arrays(arrays: dict[str, np.ndarray]):
    """An ``ort.LoraAdapter`` holding float ``arrays``, built in memory. ORT's Python API loads adapters from a
    path only (and memory-maps it), so the bytes go to an anonymous memfd (Linux) read through /proc/self/fd;
    elsewhere to a private temporary folder (mode 0700) removed right after the load (a mapped file's data
    stays valid after its unlink on POSIX)."""
    import onnxruntime as ort

    params = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
    adapter = ort.LoraAdapter()
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("edge_lora-adapter", getattr(os, "MFD_CLOEXEC", 0))
        try:
            _export(params, f"/proc/self/fd/{fd}")
            adapter.Load(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)   # the mapping ORT made keeps the memory alive until the adapter is freed
        return adapter
    folder = tempfile.mkdtemp(prefix="edge_lora-adapter-")
    try:
        path = os.path.join(folder, "expanded.onnx_adapter")
        _export(params, path)
        adapter.Load(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return adapter
