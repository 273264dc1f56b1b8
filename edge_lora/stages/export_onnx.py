"""ONNX export through optimum-onnx: the merged model, or the base with hot-swappable LoRA factors.

merged:  ``onnx_export_from_model`` on the merged torch model. Causal LMs get the KV-cache graph
         (task ``text-generation-with-past``: inputs input_ids, attention_mask, position_ids,
         past_key_values.*; outputs logits, present.*), encoders ``feature-extraction``.
hotswap: every adapted module is wrapped as ``y = base(x) + (x·A)·B`` with *tag* factors (seeded random,
         rank 2), exported the same way; then a graph pass (edge_lora.passes.lora_inputs) finds each tag
         initializer by its bytes (names do not survive the TorchScript exporter: weights become
         ``onnx::MatMul_123``), renames it to the name from :func:`lora_input_names`, makes it a graph input of
         shape [d_in, "rank.<m>"] / ["rank.<m>", d_out] and leaves an empty rank-0 initializer as its default.
         Without an adapter the branch adds exact zeros.

Packed projections (``export.fuse_projections``, every mode; edge_lora.passes.fuse): MatMuls that read one
value (q/k/v, gate/up) become one MatMul over the concatenated weight + Split. In a hot-swap graph the branches
of one :func:`lora_groups` group become one branch ``x·W_cat + (x·A_cat)·B_bd``: inputs
``lora.<parent>.q_proj+k_proj+v_proj.A`` (d_in × Σr, ``[A_q | A_k | A_v]``) and ``….B`` (Σr × Σd_out, block
diagonal). edge_lora.json records each branch under ``lora_groups`` (modules, d_in, d_out, out_offsets) and,
with an adapter, its ranks and rank offsets under ``adapter_ranks``; :func:`lora_input_arrays_for` gives the
graph-layout arrays of any adapter for that layout, and :func:`write_ort_adapter` writes them.

A compressed adapter (edge_lora.adapter.compressed) with factors shared across layers exports its shared groups as
chain branches ``x·R·C·L`` (unfused): a shared U (and Vt) is ONE graph input used by every layer and one
tensor in the adapter file (``lora_chains`` in edge_lora.json).

The folder is self-contained: model.onnx (+ external data over 2 GB), config.json, tokenizer files, and
``edge_lora.json`` describing the export.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from edge_lora.adapter import Adapter, base_layer_shape, check_compatible
from edge_lora.errors import CompatibilityError, ModelError
from edge_lora.config import ExportConfig
from edge_lora.report import StageReport

# The LoRA input naming lives beside the fusion pass (which names group inputs); imported from here by callers.
from edge_lora.formats import ort_adapter
from edge_lora.formats.ort_adapter import ADAPTER_FILE, graph_arrays, graph_factors
from edge_lora.formats.export_meta import (  # noqa: F401  (the format's names, importable from here)
    FILE as META_FILE,
    FORMAT_VERSION as META_VERSION,
    MODEL_FILE,
    AdapterQuantization,
    AdapterRanks,
    ExportMeta,
    FusedProjections,
    LoraChain,
    LoraGroup,
    export_folder_hash,
)
from edge_lora import passes
from edge_lora.passes.fuse import (  # noqa: F401
    RANK_DIM,
    FuseDetails,
    FuseProjections,
    fuse_projections,
    lora_group_name,
    lora_groups,
    lora_input_names,
    rank_dim,
)
from edge_lora.passes.lora_inputs import LiftDetails, LiftLoraInputs, lift_lora_inputs  # noqa: F401

TAG_RANK = 2


def lora_input_arrays(module) -> tuple[np.ndarray, np.ndarray]:
    """A torch LoraModule's factors in graph layout (edge_lora.formats.ort_adapter.graph_factors)."""
    return graph_factors(module.B.double().numpy(), module.A.double().numpy(), module.scale)


def resolve_task(model, config: ExportConfig) -> str:
    if config.task != "auto":
        return config.task
    from edge_lora.base import is_causal_lm

    return "text-generation-with-past" if is_causal_lm(model.config) else "feature-extraction"


def check_exportable(model, task: str) -> None:
    """Refuse, before any export work, a model type optimum-onnx has no ONNX config for (or not for ``task``),
    naming what it does support."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers every ONNX config with the TasksManager)
    from optimum.exporters.tasks import TasksManager

    kind = model.config.model_type
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(kind, exporter="onnx", library_name="transformers")
    except KeyError:
        known = sorted(TasksManager.get_supported_model_type_for_task(task, exporter="onnx"))
        raise ModelError(f"model type {kind!r} ({type(model).__name__}) has no ONNX export in optimum-onnx, so "
                         f"edge_lora cannot export it. Model types it exports for {task!r}: "
                         f"{', '.join(known)}.") from None
    if task not in tasks:
        raise ModelError(f"model type {kind!r} exports to ONNX only for tasks {sorted(tasks)}, not {task!r}; set "
                         "export.task to one of them.")


@contextlib.contextmanager
def _quiet_exporter():
    """optimum and the TorchScript exporter print pages of tracer warnings; keep them out of the CLI output."""
    loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def optimum_export(model, out_dir: Path, task: str, config: ExportConfig) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    kwargs = {"opset": config.opset} if config.opset else {}
    old = os.environ.get("FORCE_ONNX_EXTERNAL_DATA")
    if config.external_data == "always":
        os.environ["FORCE_ONNX_EXTERNAL_DATA"] = "1"
    try:
        with _quiet_exporter():
            onnx_export_from_model(model, str(out_dir), task=task, do_validation=False, **kwargs)
    except Exception as exc:
        raise ModelError(f"optimum-onnx could not export {type(model).__name__} for task {task!r}: {exc}") from exc
    finally:
        if config.external_data == "always":
            if old is None:
                os.environ.pop("FORCE_ONNX_EXTERNAL_DATA", None)
            else:
                os.environ["FORCE_ONNX_EXTERNAL_DATA"] = old
    if not (out_dir / MODEL_FILE).is_file():
        raise ModelError(f"optimum-onnx wrote no {MODEL_FILE} into {out_dir}: {sorted(p.name for p in out_dir.iterdir())}")


def graph_facts(path: Path) -> tuple[list[str], list[str], int | None]:
    """(inputs without initializer-backed ones, outputs, default-domain opset) of an ONNX file, without its
    external data."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return [i.name for i in proto.graph.input if i.name not in inits], [o.name for o in proto.graph.output], opset


def model_opset(path: Path) -> int | None:
    """The default-domain (ai.onnx) opset an ONNX file imports: what a device runtime must support."""
    return graph_facts(path)[2]


def _new_meta(out_dir: Path, **values) -> ExportMeta:
    """The ExportMeta of a just-exported folder: ``values`` plus what the graph on disk says."""
    inputs, outputs, opset = graph_facts(out_dir / MODEL_FILE)
    external = any(p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE for p in out_dir.iterdir())
    return ExportMeta(inputs=inputs, outputs=outputs, model_file=MODEL_FILE, external_data=external, opset=opset,
                      folder=out_dir, **values)


def read_meta(folder: str | os.PathLike) -> ExportMeta:
    """The export folder's edge_lora.json (:meth:`ExportMeta.read`)."""
    return ExportMeta.read(folder)


def _save_side_files(model, tokenizer, out_dir: Path) -> None:
    model.config.save_pretrained(out_dir)   # optimum writes it too; ours has the merge's untying
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ------------------------------------------------------------------------------------------ merged
def export_merged(model, tokenizer, out_dir: Path, config: ExportConfig = ExportConfig(),
                  meta: dict | None = None) -> tuple[ExportMeta, StageReport]:
    """Export a (merged) torch model into ``out_dir`` (which must exist and be empty) and write its
    edge_lora.json. ``meta``: provenance fields of :class:`ExportMeta` (base, adapter_source, ...; paths relative
    to ``out_dir``)."""
    start = time.perf_counter()
    task = resolve_task(model, config)
    graph, why_not = choose_graph(model, task, config)
    fused = None
    if graph == "fused":
        fused_export(model, out_dir, config)
    else:
        optimum_export(model, out_dir, task, config)
        fused = passes.apply(out_dir / MODEL_FILE, FuseProjections())[0].details if config.fuse_projections else None
    _save_side_files(model, tokenizer, out_dir)
    info = _new_meta(out_dir, mode="merged", task=task, graph=graph, fused_projections=_fuse_summary(fused),
                     **(meta or {}))
    info = info.write(out_dir)
    return info, _graph_note(_report(config, out_dir, info, start), why_not)


# ------------------------------------------------------------------------------------------ fused graph
def choose_graph(model, task: str, config: ExportConfig, lora_targets=(), chains=None) -> tuple[str, str | None]:
    """("fused", None) when ``export.graph = "fused"`` and edge_lora.stages.export_fused can write this model;
    ("optimum", why the fused graph was not used) otherwise (None when it was not asked for)."""
    from edge_lora.stages.export_fused import fused_support

    if config.graph != "fused":
        return "optimum", None
    if task != "text-generation-with-past":
        return "optimum", f"task {task!r} (the fused graph is a KV-cache decoder)"
    if chains:
        return "optimum", "a compressed adapter with factors shared across layers (chain branches)"
    reason = fused_support(model, lora_targets)
    return ("optimum", reason) if reason else ("fused", None)


def fused_export(model, out_dir: Path, config: ExportConfig, lora_targets=()):
    """Write the fused decoder graph of ``model`` to ``out_dir/model.onnx``; returns its LoRA groups."""
    import onnx_ir as ir
    from edge_lora.stages.export_fused import build

    graph = build(model, lora_targets)
    big = sum(v.const_value.nbytes for v in graph.model.graph.initializers.values()) > 1_800_000_000
    external = config.external_data == "always" or big
    try:
        ir.save(graph.model, out_dir / MODEL_FILE, external_data=MODEL_FILE + ".data" if external else None)
    except OSError as exc:
        raise ModelError(f"cannot write the fused graph into {out_dir}: {exc}") from exc
    return graph.lora_groups


def _graph_note(report: StageReport, why_not: str | None) -> StageReport:
    if why_not is not None:
        report.skipped.append(f"export.graph = 'fused' fell back to optimum's graph: {why_not}")
    return report


def _fuse_summary(details: FuseDetails | None) -> FusedProjections | None:
    if details is None:
        return None
    return FusedProjections(details.fused, details.nodes_before, details.nodes_after)


def _report(config: ExportConfig, out_dir: Path, info: ExportMeta, start: float) -> StageReport:
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.name.startswith(MODEL_FILE))
    return StageReport(stage="export", config=asdict(config), seconds=time.perf_counter() - start,
                       output_hash=export_folder_hash(out_dir),
                       metrics={"mode": info.mode, "task": info.task, "graph": info.graph, "model_bytes": size,
                                "inputs": len(info.inputs), "outputs": len(info.outputs),
                                "external_data": info.external_data, "opset": info.opset})


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ layout
# The graph edits (lift the tags to inputs, pack projections) are passes: edge_lora.passes.lora_inputs and .fuse.
# LoraGroup and LoraChain are records of edge_lora.json: defined in edge_lora.formats.export_meta, imported above.
SHARED_STRUCTURES = ("shared-out", "tucker2", "cp", "tt")


def lora_chain_input_names(module: str, group: str, structure: str) -> tuple[str, str, str]:
    """Graph input names (R, C, L) of a chain branch; shared factors are named after the group, so they are ONE
    input (and one adapter-file tensor) for all its modules. The one place these names are made."""
    group = re.sub(r"[^\w.*+-]+", "_", group).strip("_")   # "model.layers.*.mlp.up_proj [576x64]"
    right = f"lora.{group}.Vt" if structure in ("tucker2", "cp", "tt") else f"lora.{module}.A"
    return right, f"lora.{module}.G", f"lora.{group}.U"


def hotswap_layout(adapter: Adapter, spec=None) -> list[LoraGroup]:
    """The LoRA groups an adapter file must fill. ``spec``: an export's :class:`ExportMeta` (exact: its
    ``lora_groups``), or module names (the export's branches; grouped by :func:`lora_groups`, shapes taken from
    ``adapter``), or None (the adapter's own modules)."""
    if isinstance(spec, ExportMeta):
        return list(spec.lora_groups)
    names = set(adapter.modules) if spec is None else set(spec)
    layout = []
    for modules in lora_groups(names):
        present = [m for m in modules if m in adapter.modules]
        if not present:
            continue
        if len(present) != len(modules):
            raise CompatibilityError(
                f"the export fuses {', '.join(modules)} into one LoRA branch, but the adapter has factors for "
                f"{', '.join(present)} only, and a module name set does not say the other modules' sizes. Pass "
                "the export's edge_lora.json (read_meta(folder)) as the layout instead of module names.")
        mods = [adapter.modules[m] for m in modules]
        d_in = {m.A.shape[1] for m in mods}
        if len(d_in) != 1:
            raise CompatibilityError(f"modules {modules} fuse into one branch but read inputs of different sizes "
                                     f"{sorted(d_in)}; the adapter does not fit this base.")
        layout.append(LoraGroup(lora_group_name(modules), lora_input_names(lora_group_name(modules)),
                                tuple(modules), d_in.pop(), tuple(m.B.shape[0] for m in mods)))
    return layout


def group_ranks(adapter: Adapter, group: LoraGroup) -> list[int]:
    """Each module's rank in the group's A/B (0 for a module the adapter does not target)."""
    return [adapter.modules[m].rank if m in adapter.modules else 0 for m in group.modules]




def lora_input_arrays_for(adapter, lora_inputs=None) -> dict[str, np.ndarray]:
    """Graph-layout float32 arrays per LoRA input name: what a float adapter file holds. ``adapter``: an Adapter,
    a CompressedAdapter (shared chains get their R, C, L inputs) or a QuantizedAdapter (its float expansion);
    ``lora_inputs``: as ``spec`` of :func:`hotswap_layout`. Groups whose modules all have rank 0 are left out (the
    graph's rank-0 default applies)."""
    from edge_lora.adapter.compressed import CompressedAdapter
    from edge_lora.adapter.quantized import QuantizedAdapter

    arrays: dict[str, np.ndarray] = {}
    if isinstance(adapter, QuantizedAdapter):
        adapter = adapter.expanded
    if isinstance(adapter, CompressedAdapter):
        arrays.update(_chain_arrays(adapter))
        adapter = _plain_part(adapter)
        if not adapter.modules:
            return arrays
    factors = {n: (m.scale * m.B.double().numpy(), m.A.double().numpy()) for n, m in adapter.modules.items()}
    layout = hotswap_layout(adapter, lora_inputs)
    # the writer may hold modules the export adapted but could not reach (see export_hotswap's skipped note)
    arrays.update(graph_arrays(factors, layout, unreachable=set(factors) - {m for g in layout for m in g.modules}))
    return arrays


def _plain_part(compressed):
    """The modules of a compressed adapter's per-module (svd) groups, as a plain Adapter."""
    plain = compressed.expanded
    shared = {m for g in compressed.groups if g.structure in SHARED_STRUCTURES for m in g.modules}
    return plain.replace_modules({n: m for n, m in plain.modules.items() if n not in shared})


def lora_chains(compressed) -> list[LoraChain]:
    return [LoraChain(m, g.name, g.structure, lora_chain_input_names(m, g.name, g.structure))
            for g in compressed.groups if g.structure in SHARED_STRUCTURES for m in g.modules]


def _chain_arrays(compressed) -> dict[str, np.ndarray]:
    """R, C, L per module (a shared one once). A group whose shared basis has rank 0 is left out (all its inputs
    keep their rank-0 defaults); a module of rank 0 in a live group gets 1-wide zero R and C, since its C must
    still have the group's r_u columns for the shared L."""
    from edge_lora.adapter.compressed import module_chain

    arrays = {}
    for group in compressed.groups:
        if group.structure not in SHARED_STRUCTURES or any(t.numel() == 0 for t in group.shared.values()):
            continue
        for m in group.modules:
            chain = LoraChain(m, group.name, group.structure, lora_chain_input_names(m, group.name, group.structure))
            left, core, right = module_chain(group, m)
            for name, t in zip(chain.inputs, (right.T, core.T, left.T)):
                a = t.float().numpy()
                if a.size == 0:
                    a = np.zeros([max(d, 1) for d in a.shape], np.float32)
                arrays[name] = np.ascontiguousarray(a)
    return arrays


def write_ort_adapter(adapter, path: Path, modules=None) -> list[str]:
    """Write ``adapter`` as the ONNX Runtime adapter file of a hot-swap export (edge_lora.formats.ort_adapter):
    a QuantizedAdapter as its codes (expanded to float when the device loads it), any other adapter as float
    arrays. ``modules``: the export's edge_lora.json layout (preferred: exact), its module names, or None (the
    adapter's own modules); see :func:`hotswap_layout`. Returns the parameter names the graph receives.

    The model-version field is not enforced by ORT; binding to the exact base is edge_lora.json's base_sha256.
    """
    from edge_lora.adapter.quantized import QuantizedAdapter

    arrays = lora_input_arrays_for(adapter, modules)   # for a quantized adapter: checks it fits the layout
    if isinstance(adapter, QuantizedAdapter):
        ort_adapter.write_quantized(adapter.to_format(Path(path).parent), path)
    else:
        ort_adapter.write_float(arrays, path)
    return sorted(arrays)


# ------------------------------------------------------------------------------------------ hotswap graph
class LoraBranch(torch.nn.Module):
    """``base(x) + (x·A)·B`` (``A[x]·B`` for an embedding), with A and B in graph layout (see lora_input_arrays)."""

    def __init__(self, base: torch.nn.Module, kind: str, d_in: int, d_out: int, seed: int, name: str = ""):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.base = base
        self.kind = kind
        self.input_names = lora_input_names(name)
        self.rank_dim = rank_dim(name)
        # Tags: random, so every factor's bytes are unique and the graph pass can find it after export.
        self.lora_A = torch.nn.Parameter(torch.randn(d_in, TAG_RANK, generator=gen), requires_grad=False)
        self.lora_B = torch.nn.Parameter(torch.randn(TAG_RANK, d_out, generator=gen), requires_grad=False)

    def tags(self):
        return [(self.input_names[0], self.lora_A, [self.lora_A.shape[0], self.rank_dim]),
                (self.input_names[1], self.lora_B, [self.rank_dim, self.lora_B.shape[1]])]

    def forward(self, x):
        if self.kind == "embedding":
            return self.base(x) + torch.nn.functional.embedding(x, self.lora_A) @ self.lora_B
        return self.base(x) + (x @ self.lora_A) @ self.lora_B


class ChainBranch(torch.nn.Module):
    """``base(x) + ((x·R)·C)·L``: a compressed adapter's module with factors shared across layers. ``shared``
    holds the group's shared tags (one Parameter for all its modules, so the export has one initializer)."""

    def __init__(self, base: torch.nn.Module, chain: LoraChain, d_in: int, d_out: int, seed: int,
                 shared: dict[str, torch.nn.Parameter]):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.base = base
        self.chain = chain
        r_name, _, l_name = chain.inputs

        def tag(name, *shape):
            if name not in shared:
                shared[name] = torch.nn.Parameter(torch.randn(*shape, generator=gen), requires_grad=False)
            return shared[name]

        self.lora_R = tag(r_name, d_in, TAG_RANK)
        self.lora_C = torch.nn.Parameter(torch.randn(TAG_RANK, TAG_RANK + 1, generator=gen), requires_grad=False)
        self.lora_L = tag(l_name, TAG_RANK + 1, d_out)

    def tags(self):
        # the right factor's rank is shared by the group (tucker2/cp/tt: Vt) or the module's own (shared-out: A)
        c = self.chain
        r_in = rank_dim(f"{c.group}.v" if c.inputs[0].endswith(".Vt") else f"{c.module}.k")
        r_out = rank_dim(f"{c.group}.u")
        return [(c.inputs[0], self.lora_R, [self.lora_R.shape[0], r_in]),
                (c.inputs[1], self.lora_C, [r_in, r_out]),
                (c.inputs[2], self.lora_L, [r_out, self.lora_L.shape[1]])]

    def forward(self, x):
        return self.base(x) + ((x @ self.lora_R) @ self.lora_C) @ self.lora_L


def hotswap_targets(adapter: Adapter | None, config: ExportConfig) -> list[str]:
    names = set(adapter.modules) if adapter is not None else set()
    names.update(config.hotswap_targets)
    if not names:
        raise CompatibilityError("hotswap export needs target modules: pass an adapter, or list module names "
                                 "in export.hotswap_targets.")
    return sorted(names)


def check_hotswappable(adapter: Adapter, base) -> None:
    """Hot-swap carries low-rank factors only; refuse what would be silently dropped."""
    check_compatible(adapter, base)
    biased = [n for n, m in adapter.modules.items() if m.bias is not None]
    if biased:
        raise CompatibilityError(f"adapter {adapter.source}: modules {biased[:3]} have lora_bias, which a "
                                 "hot-swap adapter cannot carry; use the merged profile (cpu-fp32).")
    state = base.state_dict()
    changed = [k for k, t in adapter.extra_tensors.items() if not torch.equal(t.to(state[k].dtype), state[k])]
    if changed:
        raise CompatibilityError(f"adapter {adapter.source}: it replaces full tensors {changed[:3]} "
                                 "(modules_to_save); a hot-swap adapter carries LoRA factors only. Use the "
                                 "merged profile (cpu-fp32).")


def wrap_for_hotswap(model, targets: list[str], chains: dict[str, LoraChain] | None = None) -> dict:
    """Replace each target module by a LoraBranch (or, for ``chains``, a ChainBranch) around it, in place.
    Returns module name → branch."""
    branches, shared = {}, {}
    for i, name in enumerate(targets):
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise CompatibilityError(f"hotswap target {name!r} is not a module of the base model.") from None
        shape = base_layer_shape(layer)
        if shape is None:
            raise CompatibilityError(f"hotswap target {name!r} is a {type(layer).__name__}; LoRA needs a Linear, "
                                     "Conv1D or Embedding.")
        kind, d_out, d_in = shape
        if chains and name in chains:
            if kind == "embedding":
                raise CompatibilityError(f"{name}: an embedding in a shared-factor group cannot be hot-swapped; "
                                         "compress it with structure svd (per module).")
            branch = ChainBranch(layer, chains[name], d_in, d_out, seed=1000 + i, shared=shared)
        else:
            branch = LoraBranch(layer, kind, d_in, d_out, seed=1000 + i, name=name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, branch)
        branches[name] = branch
    return branches


def _graph_passes(model_path: Path, branches: dict, fuse: bool
                  ) -> tuple[dict[str, list[str]], list[LoraGroup], FuseDetails | None]:
    """Lift the tags to inputs, then (``fuse``) pack projections and fuse the LoRA groups: one load and save.
    Returns (module → its graph inputs, the LoRA groups of plain branches, the fuse pass's details or None)."""
    tags = {m: [(n, p.detach().numpy(), dims) for n, p, dims in br.tags()] for m, br in branches.items()}
    # the fuse pass needs no lift result: input names come from lora_input_names, and a module the lift did not
    # find has no such inputs, so the fuse pass leaves it alone
    plain = {m: list(br.input_names) for m, br in branches.items() if isinstance(br, LoraBranch)}
    results = passes.apply(model_path, LiftLoraInputs(tags), *([FuseProjections(plain)] if fuse else []))
    lifted: LiftDetails = results[0].details
    fused: FuseDetails | None = results[1].details if fuse else None
    groups = list(fused.groups) if fused is not None else []
    in_group = {m for g in groups for m in g.modules}
    for m in sorted((set(lifted.inputs) & set(plain)) - in_group):
        br = branches[m]
        groups.append(LoraGroup(m, lifted.inputs[m], (m,), int(br.lora_A.shape[0]), (int(br.lora_B.shape[1]),)))
    module_inputs = {m: list(v) for m, v in lifted.inputs.items()}
    for g in groups:
        for m in g.modules:
            module_inputs[m] = list(g.inputs)
    return dict(sorted(module_inputs.items())), sorted(groups, key=lambda g: g.name), fused


def export_hotswap(model, tokenizer, adapter, out_dir: Path,
                   config: ExportConfig = ExportConfig(mode="hotswap"), meta: dict | None = None
                   ) -> tuple[ExportMeta, StageReport]:
    """Export the (unmerged) base with a LoRA branch per target module; write ``adapter`` (if any) beside it.

    ``adapter``: an Adapter, a CompressedAdapter (modules of shared groups get a chain branch whose shared
    factors are single graph inputs, unfused; per-module groups are plain LoRA), a QuantizedAdapter (its codes
    are the adapter file; the graph is float and the device expands them at load), or None.
    ``model`` is modified in place (its target modules are wrapped); pass a model you do not need afterwards.
    """
    from edge_lora.adapter.compressed import CompressedAdapter
    from edge_lora.adapter.quantized import QuantizedAdapter

    start = time.perf_counter()
    compressed = adapter if isinstance(adapter, CompressedAdapter) else None
    quantized = adapter if isinstance(adapter, QuantizedAdapter) else None
    plain = compressed.expanded if compressed is not None else quantized.expanded if quantized else adapter
    if plain is not None:
        check_hotswappable(plain, model)
    targets = hotswap_targets(plain, config)
    chains = {c.module: c for c in lora_chains(compressed)} if compressed is not None else {}
    task = resolve_task(model, config)
    graph, why_not = choose_graph(model, task, config, targets, chains)
    if graph == "fused":
        for name in targets:   # the same refusals as wrap_for_hotswap
            if base_layer_shape(model.get_submodule(name)) is None:
                raise CompatibilityError(f"hotswap target {name!r} is not a Linear; LoRA needs a Linear.")
        groups = list(fused_export(model, out_dir, config, targets))
        lora_inputs = {m: list(g.inputs) for g in groups for m in g.modules}
        branches, fused = dict.fromkeys(lora_inputs), None
        if config.merge_on_swap:
            from edge_lora.stages.export_fused import MERGE_DIR, write_merge_files

            write_merge_files(model, groups, out_dir)
            meta = {**(meta or {}), "merge_on_swap": MERGE_DIR}
    else:
        branches = wrap_for_hotswap(model, targets, chains)
        optimum_export(model, out_dir, task, config)
        lora_inputs, groups, fused = _graph_passes(out_dir / MODEL_FILE, branches, config.fuse_projections)
    _save_side_files(model, tokenizer, out_dir)
    # the device's expansion of a quantized file must know these have no branch on purpose
    unused = sorted(set(branches) - set(lora_inputs))
    info = _new_meta(out_dir, mode="hotswap", task=task, graph=graph, lora_inputs=lora_inputs, lora_groups=groups,
                     lora_chains=[c for c in chains.values() if c.module in lora_inputs], lora_unreachable=unused,
                     fused_projections=_fuse_summary(fused), **(meta or {}))
    if adapter is not None:
        params = write_ort_adapter(adapter, out_dir / ADAPTER_FILE, info)
        qc = quantized.config if quantized is not None else None
        info = replace(info, adapter_file=ADAPTER_FILE, adapter_parameters=len(params),
                       adapter_ranks={g.name: AdapterRanks(group_ranks(plain, g)) for g in groups},
                       adapter_quantization=None if qc is None else AdapterQuantization(
                           bits=qc.bits, mixed_avg_bits=qc.mixed_avg_bits, group_size=qc.group_size,
                           symmetric=qc.symmetric))
    info = info.write(out_dir)
    report = _graph_note(_report(config, out_dir, info, start), why_not)
    if config.merge_on_swap and not info.merge_on_swap:
        report.skipped.append("export.merge_on_swap needs the fused graph; this export has none")
    report.metrics["lora_modules"] = len(lora_inputs)
    report.metrics["lora_branches"] = len(groups) + len(info.lora_chains)
    if info.adapter_file:
        report.metrics["adapter_file_sha256"] = _file_sha256(out_dir / info.adapter_file)
    if unused:
        report.skipped.append(f"{len(unused)} adapted module(s) do not reach the exported outputs and have no "
                              f"LoRA input: {', '.join(unused[:5])}")
    return info, report


# ------------------------------------------------------------------------------------------ the stage
@dataclass(frozen=True)
class Provenance:
    """Where an export came from, as its ExportMeta records it. Paths relative to the export folder."""

    base: str | None = None
    base_path: str | None = None
    base_sha256: str | None = None
    adapter_source: str | None = None
    adapter_sha256: str | None = None
    reference_adapter: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class ExportInput:
    model: torch.nn.Module     # merged (mode "merged") or the plain base (mode "hotswap"; wrapped in place)
    tokenizer: object | None
    adapter: object | None     # hotswap: Adapter, CompressedAdapter or QuantizedAdapter (None: base only)
    out_dir: Path              # an existing, empty folder
    provenance: Provenance = Provenance()


def run(inp: ExportInput, config: ExportConfig = ExportConfig()) -> tuple[ExportMeta, StageReport]:
    """The stage entry (every stage module has one: ``run(input, config) -> (output, StageReport)``)."""
    fields = asdict(inp.provenance)
    if config.mode == "hotswap":
        return export_hotswap(inp.model, inp.tokenizer, inp.adapter, inp.out_dir, config, fields)
    return export_merged(inp.model, inp.tokenizer, inp.out_dir, config, fields)
