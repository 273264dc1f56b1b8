"""``edge_lora.json``: what an export folder holds and where it came from. :class:`ExportMeta` is its only reader
and writer.

The build side makes one in memory (``stages/export_onnx`` at export, ``stages/quantize_base`` returns an updated
copy) and writes it; validate, profile, package, the runtimes and the OTA probes read it. Standard library only
(no torch, no numpy): the device side imports it.

Rules of the format:

- ``format_version`` first; a file of another version, one that is not JSON, has a key this version does not
  know or a value of the wrong type is refused with :class:`~edge_lora.errors.ExportMetaError` (one message per
  fault, the same in every command): re-export the folder.
- Every path inside is relative to the export folder (``model_file``, ``adapter_file``, ``base_path``,
  ``adapter_source``, ``reference_adapter``, and ``base`` when it names a path): an export folder, its report and
  the OTA packages made from it carry no build machine's layout. :meth:`ExportMeta.path` resolves them against
  the folder the file was read from. The pipeline builds the folder under a temporary name beside the target and
  renames it at the end; relative paths computed in the temporary folder stay right (same parent).
- Every key is written, ``null`` or empty when it does not apply, in the order of the dataclass fields.
- Nothing is read that nobody writes (``opset`` is the ONNX model's default-domain opset, written at export and
  after the base is quantized; precision is derived from the graph where it is needed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType

from edge_lora.errors import ExportMetaError
from edge_lora.files import write_text_atomic

FILE = "edge_lora.json"
FORMAT_VERSION = 2
MODEL_FILE = "model.onnx"
MODES = ("merged", "hotswap")
GRAPHS = ("optimum", "fused")
PATH_FIELDS = ("model_file", "adapter_file", "base_path", "adapter_source", "reference_adapter", "merge_on_swap")
REEXPORT = ("re-export the folder (python -m edge_lora export --base BASE --adapter ADAPTER --profile PROFILE "
            "--out DIR --force)")

__all__ = ["FILE", "FORMAT_VERSION", "MODEL_FILE", "AdapterQuantization", "AdapterRanks", "BaseQuantization",
           "ExportMeta", "FusedProjections", "LoraChain", "LoraGroup", "export_folder_hash", "loaded_source",
           "relative_path", "stored_source"]


class _Bad(ValueError):
    """A fault at a key of the file; :meth:`ExportMeta.loads` adds the file name and the fix."""


# ------------------------------------------------------------------------------------------ value parsers
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}


def _tname(value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _str(v, where: str) -> str:
    if not isinstance(v, str):
        raise _Bad(f"{where} must be a string, not {_tname(v)}")
    return v


def _int(v, where: str) -> int:
    if type(v) is not int:
        raise _Bad(f"{where} must be an integer, not {_tname(v)}")
    return v


def _count(v, where: str) -> int:
    if _int(v, where) < 0:
        raise _Bad(f"{where} must be ≥ 0, not {v}")
    return v


def _bool(v, where: str) -> bool:
    if type(v) is not bool:
        raise _Bad(f"{where} must be true or false, not {_tname(v)}")
    return v


def _number(v, where: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise _Bad(f"{where} must be a finite number, not {v!r}")
    return v


def _optional(parse: Callable) -> Callable:
    return lambda v, where: None if v is None else parse(v, where)


def _list(parse: Callable) -> Callable:
    def run(v, where):
        if not isinstance(v, list):
            raise _Bad(f"{where} must be a list, not {_tname(v)}")
        return tuple(parse(x, f"{where}[{i}]") for i, x in enumerate(v))
    return run


def _mapping(parse: Callable) -> Callable:
    def run(v, where):
        if not isinstance(v, dict):
            raise _Bad(f"{where} must be an object, not {_tname(v)}")
        return {_str(k, f"a key of {where}"): parse(x, f"{where}[{k!r}]") for k, x in v.items()}
    return run


def _object(v, where: str, parsers: dict[str, Callable], required: tuple[str, ...] = ()) -> dict:
    """The keys of one JSON object, each parsed; unknown keys and missing ``required`` keys are faults."""
    if not isinstance(v, dict):
        raise _Bad(f"{where} must be an object, not {_tname(v)}")
    unknown = [k for k in v if k not in parsers]
    if unknown:
        raise _Bad(f"{where} has unknown key(s) {', '.join(map(repr, unknown))} (this edge_lora knows "
                   f"{', '.join(parsers)})")
    missing = [k for k in required if k not in v]
    if missing:
        raise _Bad(f"{where} lacks required key(s) {', '.join(map(repr, missing))}")
    return {k: parsers[k](x, f"{where}.{k}" if where != "the file" else k) for k, x in v.items()}


def _offsets(sizes) -> tuple[int, ...]:
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return tuple(out)


def _derived(values: dict, key: str, expect: tuple, where: str) -> None:
    """A written-for-readers key (offsets) must agree with what it is derived from."""
    got = values.pop(key, None)
    if got is not None and tuple(got) != tuple(expect):
        raise _Bad(f"{where}.{key} is {list(got)}, but its sizes give {list(expect)}")


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class LoraGroup:
    """One LoRA branch of a hot-swap graph: the modules whose outputs it updates (one, or a fused group), the
    graph inputs A (d_in × Σr) and B (Σr × Σd_out, block-diagonal), and each module's d_out in column order."""

    name: str
    inputs: tuple[str, str]
    modules: tuple[str, ...]
    d_in: int
    d_out: tuple[int, ...]

    def __post_init__(self):
        # numpy ints and lists from graph passes become plain ints and tuples, so the record serialises as JSON
        object.__setattr__(self, "inputs", tuple(str(x) for x in self.inputs))
        object.__setattr__(self, "modules", tuple(str(x) for x in self.modules))
        object.__setattr__(self, "d_in", int(self.d_in))
        object.__setattr__(self, "d_out", tuple(int(x) for x in self.d_out))
        if len(self.inputs) != 2 or len(self.d_out) != len(self.modules) or not self.modules:
            raise ValueError(f"LoraGroup {self.name!r}: two inputs (A, B) and one d_out per module, got "
                             f"{len(self.inputs)} inputs, {len(self.modules)} modules, {len(self.d_out)} d_out")

    @property
    def out_offsets(self) -> tuple[int, ...]:
        """Where each module's columns start in B."""
        return _offsets(self.d_out)

    def as_meta(self) -> dict:
        return {"name": self.name, "inputs": list(self.inputs), "modules": list(self.modules), "d_in": self.d_in,
                "d_out": list(self.d_out), "out_offsets": list(self.out_offsets)}

    @classmethod
    def from_meta(cls, v, where: str = "lora_groups[]") -> "LoraGroup":
        d = _object(v, where, {"name": _str, "inputs": _list(_str), "modules": _list(_str), "d_in": _count,
                               "d_out": _list(_count), "out_offsets": _list(_count)},
                    required=("name", "inputs", "modules", "d_in", "d_out"))
        _derived(d, "out_offsets", _offsets(d["d_out"]), where)
        return _construct(cls, d, where)


@dataclass(frozen=True)
class LoraChain:
    """A module of a compressed adapter's shared group: ``x·R·C·L`` with R (d_in × r_v), C (r_v × r_u),
    L (r_u × d_out) in graph layout; a shared factor is the same input name in every module of its group."""

    module: str
    group: str
    structure: str
    inputs: tuple[str, str, str]   # R, C, L

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(str(x) for x in self.inputs))
        if len(self.inputs) != 3:
            raise ValueError(f"LoraChain {self.module!r}: three inputs (R, C, L), got {len(self.inputs)}")

    def as_meta(self) -> dict:
        return {"module": self.module, "group": self.group, "structure": self.structure, "inputs": list(self.inputs)}

    @classmethod
    def from_meta(cls, v, where: str = "lora_chains[]") -> "LoraChain":
        d = _object(v, where, {"module": _str, "group": _str, "structure": _str, "inputs": _list(_str)},
                    required=("module", "group", "structure", "inputs"))
        return _construct(cls, d, where)


@dataclass(frozen=True)
class AdapterRanks:
    """Each module's rank in its LoRA group's A/B, in the group's module order (0: the adapter does not touch
    that module)."""

    ranks: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))

    @property
    def rank_offsets(self) -> tuple[int, ...]:
        """Where each module's rows start in the group's B (and columns in A)."""
        return _offsets(self.ranks)

    def as_meta(self) -> dict:
        return {"ranks": list(self.ranks), "rank_offsets": list(self.rank_offsets)}

    @classmethod
    def from_meta(cls, v, where: str = "adapter_ranks[]") -> "AdapterRanks":
        d = _object(v, where, {"ranks": _list(_count), "rank_offsets": _list(_count)}, required=("ranks",))
        _derived(d, "rank_offsets", _offsets(d["ranks"]), where)
        return _construct(cls, d, where)


@dataclass(frozen=True)
class FusedProjections:
    """What packing sibling projections (q/k/v, gate/up) into one MatMul did to the graph."""

    fused: int          # fused MatMuls made
    nodes_before: int
    nodes_after: int

    def as_meta(self) -> dict:
        return {"fused": self.fused, "nodes_before": self.nodes_before, "nodes_after": self.nodes_after}

    @classmethod
    def from_meta(cls, v, where: str = "fused_projections") -> "FusedProjections":
        return _construct(cls, _object(v, where, {"fused": _count, "nodes_before": _count, "nodes_after": _count},
                                       required=("fused", "nodes_before", "nodes_after")), where)


@dataclass(frozen=True)
class BaseQuantization:
    """How the quantize stage stored the base weights (the profiler and the OTA packer label numbers with it)."""

    base: str                # "int8" or "int4"
    method: str              # "weight_only" (MatMulNBits) or "dynamic"
    block_size: int
    symmetric: bool
    accuracy_level: int
    lm_head: str
    embedding: str
    int4_matmuls: int
    int8_matmuls: int
    fp32_matmuls: int
    untied: tuple[str, ...]  # embedding tables untied from the LM head so the head could be quantized
    bytes_after: int

    def __post_init__(self):
        object.__setattr__(self, "untied", tuple(self.untied))

    def as_meta(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_meta(cls, v, where: str = "base_quantization") -> "BaseQuantization":
        parsers = {"base": _str, "method": _str, "block_size": _count, "symmetric": _bool, "accuracy_level": _int,
                   "lm_head": _str, "embedding": _str, "int4_matmuls": _count, "int8_matmuls": _count,
                   "fp32_matmuls": _count, "untied": _list(_str), "bytes_after": _count}
        return _construct(cls, _object(v, where, parsers, required=tuple(parsers)), where)


@dataclass(frozen=True)
class AdapterQuantization:
    """How the adapter file's factors are coded (the one factor quantizer): a uniform width (``bits``) or a
    mixed-precision budget (``mixed_avg_bits``), exactly one of them; groups of ``group_size`` along d."""

    bits: int | None
    mixed_avg_bits: float | None
    group_size: int
    symmetric: bool

    def __post_init__(self):
        if (self.bits is None) == (self.mixed_avg_bits is None):
            raise ValueError("adapter_quantization needs exactly one of bits and mixed_avg_bits, got "
                             f"bits={self.bits!r}, mixed_avg_bits={self.mixed_avg_bits!r}")

    @property
    def label(self) -> str:
        return f"int{self.bits}" if self.bits is not None else f"mixed:{self.mixed_avg_bits:g}"

    def as_meta(self) -> dict:
        return {"bits": self.bits, "mixed_avg_bits": self.mixed_avg_bits, "group_size": self.group_size,
                "symmetric": self.symmetric}

    @classmethod
    def from_meta(cls, v, where: str = "adapter_quantization") -> "AdapterQuantization":
        parsers = {"bits": _optional(_count), "mixed_avg_bits": _optional(_number), "group_size": _count,
                   "symmetric": _bool}
        return _construct(cls, _object(v, where, parsers, required=tuple(parsers)), where)


def _construct(cls, values: dict, where: str):
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise _Bad(f"{where}: {exc}") from None


# ------------------------------------------------------------------------------------------ paths
def relative_path(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """``path`` relative to ``folder`` (both made absolute, symlinks resolved, so a temporary folder and the
    target it is renamed to give the same answer), with forward slashes."""
    rel = os.path.relpath(Path(path).resolve(), Path(folder).resolve())
    return rel.replace(os.sep, "/")


def stored_source(source: str | None, folder: str | os.PathLike) -> str | None:
    """An adapter's ``source`` as a file written into ``folder`` records it: relative to ``folder`` when it names
    a path that exists or an absolute one (no file names a build machine's layout), else as it is (a label such
    as 'planted')."""
    if source is None:
        return None
    if os.path.isabs(source) or Path(source).exists():
        return relative_path(source, folder)
    return source


def loaded_source(source: str | None, folder: str | os.PathLike) -> str | None:
    """The inverse of :func:`stored_source` for a file read from ``folder``: a relative path that exists from
    ``folder`` becomes an absolute one (usable from any working directory); an absolute one (files written before
    sources were relative) or a label is kept."""
    if source is None or os.path.isabs(source):
        return source
    path = Path(folder) / source
    return str(path.resolve()) if path.exists() else source


def _relative_field(v, where: str) -> str:
    v = _str(v, where)
    if os.path.isabs(v) or v.startswith("~"):
        raise _Bad(f"{where} is the absolute path {v!r}; paths in {FILE} are relative to the export folder")
    return v


def _base_field(v, where: str) -> str:
    # a demo name ("smollm2") or a path relative to the export folder, never an absolute one
    return _relative_field(v, where)


# ------------------------------------------------------------------------------------------ the file
def _frozen_mapping(value=None) -> Mapping:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class ExportMeta:
    """The contents of an export folder's ``edge_lora.json`` (see the module docstring). Update with
    ``dataclasses.replace``; :meth:`write` it, :meth:`read` it back."""

    mode: str                                   # "merged" (adapter folded into W) or "hotswap" (factors as inputs)
    task: str                                   # optimum task: text-generation-with-past, feature-extraction
    inputs: tuple[str, ...]                     # the graph's inputs, initializer-backed LoRA inputs excluded
    outputs: tuple[str, ...]
    model_file: str = MODEL_FILE                # relative to the folder
    external_data: bool = False                 # model.onnx keeps its weights in model.onnx* side files
    opset: int | None = None                    # the model's default-domain (ai.onnx) opset
    graph: str = "optimum"                      # who wrote the graph: "optimum" or "fused" (stages/export_fused)
    base: str | None = None                     # --base as given: a demo name, or its path (relative)
    base_path: str | None = None                # the HF folder the base was loaded from (relative)
    base_sha256: str | None = None              # edge_lora.base.base_content_hash of the base weights
    adapter_source: str | None = None           # the adapter folder exported (relative)
    adapter_sha256: str | None = None           # edge_lora.adapter.load.adapter_hash of it
    reference_adapter: str | None = None        # the original PEFT folder validation compares with, if not it
    profile: str | None = None                  # the export profile's name
    fused_projections: FusedProjections | None = None
    lora_inputs: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen_mapping)  # module -> its inputs
    lora_groups: tuple[LoraGroup, ...] = ()     # the plain LoRA branches (hotswap)
    lora_chains: tuple[LoraChain, ...] = ()     # shared-factor chain branches of a compressed adapter (hotswap)
    lora_unreachable: tuple[str, ...] = ()      # adapted modules whose output reaches no graph output: no branch
    adapter_file: str | None = None             # the adapter file beside the model (relative), if any
    merge_on_swap: str | None = None            # folder of the branch-free graph + float weights (relative)
    adapter_parameters: int | None = None       # parameters the adapter file gives the graph
    adapter_ranks: Mapping[str, AdapterRanks] = field(default_factory=_frozen_mapping)   # group -> its ranks
    base_quantization: BaseQuantization | None = None
    adapter_quantization: AdapterQuantization | None = None
    folder: Path | None = field(default=None, compare=False, repr=False)   # read from / written to; not stored

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, not {self.graph!r}")
        for name in ("inputs", "outputs", "lora_groups", "lora_chains", "lora_unreachable"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "lora_inputs", _frozen_mapping(
            {str(k): tuple(v) for k, v in dict(self.lora_inputs or {}).items()}))
        object.__setattr__(self, "adapter_ranks", _frozen_mapping(self.adapter_ranks))
        for name in (*PATH_FIELDS, "base"):
            value = getattr(self, name)
            if value is not None and (os.path.isabs(value) or str(value).startswith("~")):
                raise ValueError(f"ExportMeta.{name} must be relative to the export folder (see "
                                 f"relative_path), not the absolute path {value!r}")
        if self.folder is not None:
            object.__setattr__(self, "folder", Path(self.folder))

    # -------------------------------------------------------------------------------- paths
    def path(self, name: str) -> Path | None:
        """The path field ``name`` (one of PATH_FIELDS) resolved against the folder this was read from or
        written to; None when the field is not set."""
        if name not in PATH_FIELDS:
            raise KeyError(f"{name!r} is not a path field of {FILE}; path fields: {', '.join(PATH_FIELDS)}")
        value = getattr(self, name)
        if value is None:
            return None
        if self.folder is None:
            raise ValueError(f"ExportMeta.path({name!r}): this ExportMeta was neither read nor written, so it "
                             "has no folder to resolve against")
        return Path(os.path.normpath(self.folder / value))

    @property
    def hotswap(self) -> bool:
        return self.mode == "hotswap"

    # -------------------------------------------------------------------------------- serialising
    def to_json(self) -> dict:
        """The file's JSON object: ``format_version``, then every field in order."""
        out: dict = {"format_version": FORMAT_VERSION}
        for f in fields(self):
            if f.name == "folder":
                continue
            value = getattr(self, f.name)
            if f.name == "lora_inputs":
                value = {k: list(v) for k, v in value.items()}
            elif f.name == "adapter_ranks":
                value = {k: v.as_meta() for k, v in value.items()}
            elif f.name in ("lora_groups", "lora_chains"):
                value = [g.as_meta() for g in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif hasattr(value, "as_meta"):
                value = value.as_meta()
            out[f.name] = value
        return out

    def dumps(self) -> str:
        """The exact bytes of the file (as text): 2-space indentation, ASCII, a final newline."""
        return json.dumps(self.to_json(), indent=2, ensure_ascii=True, allow_nan=False) + "\n"

    def write(self, folder: str | os.PathLike) -> "ExportMeta":
        """Write ``folder/edge_lora.json`` atomically; returns this meta bound to ``folder`` (for :meth:`path`)."""
        folder = Path(folder)
        write_text_atomic(folder / FILE, self.dumps())
        return replace(self, folder=folder)

    @classmethod
    def loads(cls, text: str | bytes, where: str = FILE, folder: str | os.PathLike | None = None) -> "ExportMeta":
        """Parse the file's text; ``where`` names it in errors."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ExportMetaError(f"{where} is not valid JSON ({exc}): the file is damaged; {REEXPORT}.") from None
        if not isinstance(data, dict):
            raise ExportMetaError(f"{where} holds {_tname(data)}, not a JSON object: the file is damaged; "
                                  f"{REEXPORT}.")
        version = data.get("format_version")
        if type(version) is not int:
            raise ExportMetaError(f"{where} has no integer format_version (got {version!r}): it is damaged or not "
                                  f"an edge_lora export description; {REEXPORT}.")
        if version > FORMAT_VERSION:
            raise ExportMetaError(f"{where} has format_version {version}, newer than this edge_lora reads "
                                  f"({FORMAT_VERSION}): upgrade edge_lora, or {REEXPORT} with this one.")
        if version < FORMAT_VERSION:
            raise ExportMetaError(f"{where} has format_version {version}, written by an older edge_lora (this one "
                                  f"reads {FORMAT_VERSION}); {REEXPORT}.")
        body = {k: v for k, v in data.items() if k != "format_version"}
        try:
            values = _object(body, "the file", _PARSERS, required=("mode", "task", "inputs", "outputs"))
            if values["mode"] not in MODES:
                raise _Bad(f"mode must be one of {', '.join(map(repr, MODES))}, not {values['mode']!r}")
            return _construct(cls, {**values, "folder": folder}, "the file")
        except _Bad as exc:
            raise ExportMetaError(f"{where}: {exc}. The file is damaged or was edited by hand; {REEXPORT}.") from None

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "ExportMeta":
        """``folder/edge_lora.json``. Raises ExportMetaError (exit code 2) when the folder has none, or it is not
        JSON, not this format version, or has an unknown key or a value of the wrong type."""
        folder = Path(folder)
        path = folder / FILE
        if not folder.is_dir():
            raise ExportMetaError(f"{folder} is not a folder; pass an export folder written by "
                                  "`python -m edge_lora export`.")
        if not path.is_file():
            raise ExportMetaError(f"{folder} has no {FILE}, so it is not an edge_lora export folder; pass a folder "
                                  f"written by `python -m edge_lora export`, or {REEXPORT}.")
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ExportMetaError(f"{path} cannot be read ({exc}).") from None
        return cls.loads(text, str(path), folder)


_PARSERS: dict[str, Callable] = {
    "mode": _str, "task": _str, "graph": _str, "inputs": _list(_str), "outputs": _list(_str),
    "model_file": _relative_field, "external_data": _bool, "opset": _optional(_count),
    "base": _optional(_base_field), "base_path": _optional(_relative_field), "base_sha256": _optional(_str),
    "adapter_source": _optional(_relative_field), "adapter_sha256": _optional(_str),
    "reference_adapter": _optional(_relative_field), "profile": _optional(_str),
    "fused_projections": _optional(FusedProjections.from_meta),
    "lora_inputs": _mapping(_list(_str)),
    "lora_groups": _list(LoraGroup.from_meta), "lora_chains": _list(LoraChain.from_meta),
    "lora_unreachable": _list(_str),
    "adapter_file": _optional(_relative_field), "merge_on_swap": _optional(_relative_field),
    "adapter_parameters": _optional(_count),
    "adapter_ranks": _mapping(AdapterRanks.from_meta),
    "base_quantization": _optional(BaseQuantization.from_meta),
    "adapter_quantization": _optional(AdapterQuantization.from_meta),
}


# ------------------------------------------------------------------------------------------ identity
def export_folder_hash(folder: str | os.PathLike) -> str:
    """The identity of an export: sha256 over the name (NUL-terminated) and bytes of ``model.onnx`` and its
    external-data files (every regular file whose name starts with ``model.onnx``), in name order.

    Covers the graph and its weights, the things an adapter's LoRA inputs must fit, and nothing else: not the
    adapter file (adapters travel and swap on their own; a package names its adapter's sha256 itself), not
    ``edge_lora.json`` (it holds paths and provenance, not behaviour), not ``model.ort`` (derived on the device).
    So the export stage's report, the quantize stage's report and an OTA ``ort`` probe's ``export.model_sha256``
    name one folder the same way, and a device with the same graph but another adapter file beside it matches.
    Raises ExportMetaError when there is no model.onnx."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.name.startswith(MODEL_FILE) and p.is_file()) \
        if folder.is_dir() else []
    if not any(p.name == MODEL_FILE for p in files):
        raise ExportMetaError(f"{folder} has no {MODEL_FILE}; it is not an export folder.")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()
