"""The compressed adapter: shared factors stored once, a JSON header, and an exact expansion to plain LoRA.

File layout (one ``compressed.safetensors``; the header is the safetensors metadata entry ``edge_lora``):

- ``group{i}.U``   d_out × r   shared output basis   (shared-out, tucker2, cp, tt)
- ``group{i}.Vt``  r × d_in    shared input basis     (tucker2, cp, tt)
- ``group{i}.G2``  r1 × r_u × r2, ``group{i}.G3`` r2 × r_v   (tt: the train over layers of the Tucker core)
- ``module.{name}.B`` / ``.A`` / ``.G`` / ``.w``   per-module factors (see below)
- ``bias.{name}``, ``extra.{key}``  lora_bias vectors and PEFT's full tensors (modules_to_save ...)

Module ``name`` of a group is ``ΔW = left @ core @ right`` (:func:`module_chain`), so a hot-swap exporter can
keep shared tensors as single graph inputs:

=============  ==============  =====================================  ================
structure      left            core                                   right
=============  ==============  =====================================  ================
svd            B (d_out × k)   –                                      A (k × d_in)
shared-out     U (shared)      G (r_u × k)                            A (k × d_in)
tucker2        U (shared)      G (r_u × r_v)                          Vt (shared)
cp             U (shared)      diag(w) (w: R)                         Vt (shared)
tt             U (shared)      (Σ_a w[a]·G2[a]) @ G3  (r_u × r_v)      Vt (shared)
=============  ==============  =====================================  ================

The header: ``{"format": "edge_lora.compressed", "version": 1, "storage_dtype", "peft_config", "source",
"groups": [{"name", "structure", "modules", "ranks"}], "modules": {name: {"group", "kind", "rank"}}}``.
``source`` is the PEFT adapter folder it was compressed from, relative to the file's folder (files written before
that hold an absolute path, still read); in memory it is a path usable from anywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from edge_lora.adapter import Adapter, LoraModule
from edge_lora.errors import AdapterError
from edge_lora.files import atomic_file
from edge_lora.formats.export_meta import loaded_source, stored_source

FORMAT = "edge_lora.compressed"
VERSION = 1
FILE_NAME = "compressed.safetensors"
SHARED_KEYS = ("U", "Vt", "G2", "G3")


@dataclass
class CompressedGroup:
    name: str
    structure: str
    modules: list[str]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    per_module: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return (sum(t.numel() for t in self.shared.values())
                + sum(t.numel() for d in self.per_module.values() for t in d.values()))


def module_chain(group: CompressedGroup, name: str):
    """(left, core, right) with ΔW = left @ core @ right; core is None for plain B·A."""
    p, s = group.per_module.get(name, {}), group.shared
    if group.structure == "svd":
        return p["B"], None, p["A"]
    if group.structure == "shared-out":
        return s["U"], p["G"], p["A"]
    if group.structure == "tucker2":
        return s["U"], p["G"], s["Vt"]
    if group.structure == "cp":
        return s["U"], torch.diag(p["w"]), s["Vt"]
    if group.structure == "tt":
        core = torch.einsum("a,aub->ub", p["w"].double(), s["G2"].double()) @ s["G3"].double()
        return s["U"], core.to(s["U"].dtype), s["Vt"]
    raise AdapterError(f"group {group.name!r}: unknown structure {group.structure!r} in the compressed file.")


def expand_module(group: CompressedGroup, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain LoRA factors (B: d_out × k, A: k × d_in) with B·A = ΔW, balanced, k = rank of the core."""
    left, core, right = module_chain(group, name)
    left, right = left.double(), right.double()
    if core is None:
        return left.float(), right.float()
    if core.numel() == 0:
        return left.new_zeros(left.shape[0], 0).float(), right.new_zeros(0, right.shape[1]).float()
    Uc, Sc, Vch = torch.linalg.svd(core.double(), full_matrices=False)
    keep = Sc > 1e-12 * max(float(Sc.max()), 1e-300)
    root = Sc[keep].sqrt()
    return ((left @ Uc[:, keep]) * root).float(), (root[:, None] * (Vch[keep] @ right)).float()


@dataclass(frozen=True, eq=False)
class CompressedAdapter:
    """Frozen (its groups are built by the compress stage, then only read); ``expanded`` is computed once."""

    groups: list[CompressedGroup]
    kinds: dict[str, str]                       # module name -> "linear" | "embedding"
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    peft_config: dict = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str | None = None
    storage_dtype: str = "float16"

    @property
    def params(self) -> int:
        return (sum(g.params for g in self.groups) + sum(b.numel() for b in self.biases.values())
                + sum(t.numel() for t in self.extra_tensors.values()))

    @property
    def nbytes(self) -> int:
        return self.params * torch.tensor([], dtype=getattr(torch, self.storage_dtype)).element_size()

    def group_of(self, name: str) -> CompressedGroup:
        for g in self.groups:
            if name in g.modules:
                return g
        raise KeyError(name)

    @cached_property
    def expanded(self) -> Adapter:
        """:meth:`to_adapter`, computed once (the stages that need one ΔW per module all read this)."""
        return self.to_adapter()

    def to_adapter(self) -> Adapter:
        """Per-module B, A (scale 1): the plain LoRA adapter this file stands for; ``save_peft`` writes it."""
        modules = {}
        for g in self.groups:
            for name in g.modules:
                B, A = expand_module(g, name)
                bias = self.biases.get(name)
                modules[name] = LoraModule(name=name, kind=self.kinds[name], A=A.contiguous(), B=B.contiguous(),
                                           scale=1.0, alpha=float(A.shape[0]),
                                           bias=bias.float() if bias is not None else None)
        return Adapter(modules=dict(sorted(modules.items())), config=dict(self.peft_config),
                       extra_tensors={k: v.float() for k, v in self.extra_tensors.items()}, source=self.source,
                       storage_dtype=self.storage_dtype, form="compressed")

    def header(self, folder: str | os.PathLike | None = None) -> dict:
        """The file's JSON header; with ``folder`` (where the file goes) ``source`` is recorded relative to it."""
        source = self.source if folder is None else stored_source(self.source, folder)
        return {
            "format": FORMAT, "version": VERSION, "storage_dtype": self.storage_dtype, "source": source,
            "peft_config": self.peft_config,
            "groups": [{"name": g.name, "structure": g.structure, "modules": g.modules, "ranks": g.ranks,
                        "shared": sorted(g.shared)} for g in self.groups],
            "modules": {n: {"group": i, "kind": self.kinds[n], "bias": n in self.biases}
                        for i, g in enumerate(self.groups) for n in g.modules},
            "extra_tensors": sorted(self.extra_tensors),
        }

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = getattr(torch, self.storage_dtype)
        tensors = {}
        for i, g in enumerate(self.groups):
            for key, t in g.shared.items():
                tensors[f"group{i}.{key}"] = t
            for name, parts in g.per_module.items():
                for key, t in parts.items():
                    tensors[f"module.{name}.{key}"] = t
        tensors.update({f"bias.{n}": b for n, b in self.biases.items()})
        tensors.update({f"extra.{k}": t for k, t in self.extra_tensors.items()})
        # zero-size tensors (rank-0 modules) are implied by the header; safetensors need not hold them
        tensors = {k: t.to(dtype).contiguous() for k, t in tensors.items() if t.numel() > 0}
        path = folder / FILE_NAME
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"edge_lora": json.dumps(self.header(folder))})
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CompressedAdapter:
        from safetensors import safe_open

        folder = Path(folder)
        path = folder / FILE_NAME if folder.is_dir() else folder
        if not path.is_file():
            raise AdapterError(f"{path} does not exist; `python -m edge_lora compress ... --out DIR` writes "
                               f"DIR/{FILE_NAME}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise AdapterError(f"{path} cannot be read as safetensors ({exc}); write it again.") from exc
        try:
            header = json.loads(meta["edge_lora"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{path} has no edge_lora header; it was not written by the compress stage.") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
            found = header if not isinstance(header, dict) else f"{header.get('format')!r} version " \
                                                                 f"{header.get('version')!r}"
            raise AdapterError(f"{path}: format {found}; this edge_lora reads {FORMAT!r} version {VERSION}.")
        _check_header(path, header)
        groups = []
        for i, gh in enumerate(header["groups"]):
            g = CompressedGroup(name=gh["name"], structure=gh["structure"], modules=list(gh["modules"]),
                                ranks=gh["ranks"])
            for key in gh["shared"]:
                if f"group{i}.{key}" in tensors:
                    g.shared[key] = tensors[f"group{i}.{key}"]
            for name in g.modules:
                prefix = f"module.{name}."
                g.per_module[name] = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            _fill_empty(g)
            _check_shapes(path, g)
            groups.append(g)
        kinds = {n: m["kind"] for n, m in header["modules"].items()}
        biases = {k[len("bias."):]: t for k, t in tensors.items() if k.startswith("bias.")}
        extra = {k[len("extra."):]: t for k, t in tensors.items() if k.startswith("extra.")}
        return cls(groups=groups, kinds=kinds, biases=biases, peft_config=header.get("peft_config") or {},
                   extra_tensors=extra, source=loaded_source(header.get("source"), path.parent),
                   storage_dtype=header["storage_dtype"])


STORAGE_DTYPES = ("float16", "bfloat16", "float32")
KINDS = ("linear", "embedding")


def _check_header(path: Path, header: dict) -> None:
    """Every header field :meth:`CompressedAdapter.load` reads, of the type it needs: a damaged or hand-edited
    header is an AdapterError naming the file and the key, not a KeyError deep in the loader."""
    from edge_lora.config import COMPRESS_STRUCTURES

    def bad(key: str, what: str):
        return AdapterError(f"{path}: header key {key} {what}; the file is damaged or was not written by "
                            "`python -m edge_lora compress`. Compress the adapter again.")

    def need(obj: dict, key: str, kind, where: str):
        if key not in obj:
            raise bad(f"{where}{key}", "is missing")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise bad(f"{where}{key}", f"is {type(obj[key]).__name__} {obj[key]!r:.80}, not {names}")
        return obj[key]

    if need(header, "storage_dtype", str, "") not in STORAGE_DTYPES:
        raise bad("storage_dtype", f"is {header['storage_dtype']!r}, not one of {', '.join(STORAGE_DTYPES)}")
    for key, kind in (("source", str), ("peft_config", dict)):
        if header.get(key) is not None:
            need(header, key, kind, "")
    modules = need(header, "modules", dict, "")
    for name, m in modules.items():
        if not isinstance(m, dict):
            raise bad(f"modules[{name!r}]", f"is {type(m).__name__}, not an object")
        if need(m, "kind", str, f"modules[{name!r}].") not in KINDS:
            raise bad(f"modules[{name!r}].kind", f"is {m['kind']!r}, not one of {', '.join(KINDS)}")
    for i, gh in enumerate(need(header, "groups", list, "")):
        where = f"groups[{i}]."
        if not isinstance(gh, dict):
            raise bad(f"groups[{i}]", f"is {type(gh).__name__}, not an object")
        need(gh, "name", str, where)
        structure = need(gh, "structure", str, where)
        if structure not in COMPRESS_STRUCTURES:
            raise bad(f"{where}structure", f"is {structure!r}, not one of {', '.join(COMPRESS_STRUCTURES)}")
        names = need(gh, "modules", list, where)
        for name in names:
            if not isinstance(name, str) or name not in modules:
                raise bad(f"{where}modules", f"names {name!r}, which is not in the header's modules")
        shared = need(gh, "shared", list, where)
        if any(k not in SHARED_KEYS for k in shared):
            raise bad(f"{where}shared", f"is {shared!r}; shared tensors are {', '.join(SHARED_KEYS)}")
        ranks = need(gh, "ranks", dict, where)
        required = ["d_out", "d_in"] + {"shared-out": ["r_u"], "tucker2": ["r_u", "r_v"]}.get(structure, [])
        for key in required:
            if need(ranks, key, int, f"{where}ranks.") < 0:
                raise bad(f"{where}ranks.{key}", f"is {ranks[key]}, not a size ≥ 0")


def _check_shapes(path: Path, g: CompressedGroup) -> None:
    """Each module's ΔW = left @ core @ right chains up to d_out × d_in; a missing or misshapen tensor is an
    AdapterError here rather than a shape error at export."""
    d_out, d_in = g.ranks["d_out"], g.ranks["d_in"]
    for name in g.modules:
        try:
            left, core, right = module_chain(g, name)
        except KeyError as exc:
            raise AdapterError(f"{path}: module {name!r} ({g.structure}) has no tensor {exc.args[0]!r}; the file is "
                               "damaged. Compress the adapter again.") from None
        except RuntimeError as exc:   # tt: the train's tensors do not contract
            raise AdapterError(f"{path}: module {name!r} ({g.structure}): its tensors do not fit together ({exc}); "
                               "the file is damaged. Compress the adapter again.") from None
        inner = (left.shape[-1], right.shape[0]) if core is None else (left.shape[-1], core.shape[0],
                                                                       core.shape[-1], right.shape[0])
        ok = (left.dim() == 2 and right.dim() == 2 and left.shape[0] == d_out and right.shape[1] == d_in
              and inner[0] == inner[1] and (core is None or inner[2] == inner[3]))
        if not ok:
            shapes = [tuple(t.shape) for t in (left, core, right) if t is not None]
            raise AdapterError(f"{path}: module {name!r} ({g.structure}) has factors of shapes {shapes}, which do "
                               f"not chain to {d_out}×{d_in}; the file is damaged. Compress the adapter again.")


def _fill_empty(g: CompressedGroup) -> None:
    """Rank-0 modules have no tensors in the file; give them zero-size factors of the right shape."""
    d_out, d_in = g.ranks["d_out"], g.ranks["d_in"]
    for name in g.modules:
        p = g.per_module.setdefault(name, {})
        if g.structure == "svd":
            p.setdefault("B", torch.zeros(d_out, 0))
            p.setdefault("A", torch.zeros(0, d_in))
        elif g.structure == "shared-out":
            p.setdefault("G", torch.zeros(g.ranks["r_u"], 0))
            p.setdefault("A", torch.zeros(0, d_in))
        elif g.structure == "tucker2":
            p.setdefault("G", torch.zeros(g.ranks["r_u"], g.ranks["r_v"]))
        elif g.structure in ("cp", "tt"):
            p.setdefault("w", torch.zeros(g.ranks.get("R", g.ranks.get("r1", 0))))
    if g.structure in ("shared-out", "tucker2", "cp", "tt"):
        g.shared.setdefault("U", torch.zeros(d_out, 0))
    if g.structure in ("tucker2", "cp", "tt"):
        g.shared.setdefault("Vt", torch.zeros(0, d_in))
