"""ONNX export through optimum-onnx: the merged model, or the base with hot-swappable LoRA factors.

merged:  ``onnx_export_from_model`` on the merged torch model. Causal LMs get the KV-cache graph
         (task ``text-generation-with-past``: inputs input_ids, attention_mask, position_ids,
         past_key_values.*; outputs logits, present.*), encoders ``feature-extraction``.
hotswap: every adapted module is wrapped as ``y = base(x) + (x·A)·B`` with *tag* factors (seeded random,
         rank 2), exported the same way; then an onnx_ir pass finds each tag initializer by its bytes (names
         do not survive the TorchScript exporter: weights become ``onnx::MatMul_123``), renames it to the name
         from :func:`lora_input_names`, makes it a graph input of shape [d_in, "rank"] / ["rank", d_out] and
         leaves an empty rank-0 initializer as its default. Without an adapter the branch adds exact zeros.

The folder is self-contained: model.onnx (+ external data over 2 GB), config.json, tokenizer files, and
``edge_lora.json`` describing the export.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from edge_lora.adapter import Adapter, base_layer_shape, check_compatible
from edge_lora.errors import CompatibilityError, ModelError
from edge_lora.profiles import ExportConfig
from edge_lora.report import StageReport

MODEL_FILE = "model.onnx"
ADAPTER_FILE = "adapter.onnx_adapter"
META_FILE = "edge_lora.json"
META_VERSION = 1
TAG_RANK = 2
RANK_DIM = "rank"


def lora_input_names(module_name: str) -> tuple[str, str]:
    """Graph input names of a module's factors. The ONE place these names are made: the graph pass and the
    adapter-file writer both call it, so they cannot disagree ("Invalid input name" at run time)."""
    return f"lora.{module_name}.A", f"lora.{module_name}.B"


def lora_input_arrays(module) -> tuple[np.ndarray, np.ndarray]:
    """The factors as the graph takes them: A_in = Aᵀ (d_in × r), B_in = scale·Bᵀ (r × d_out), so the branch
    is x·A_in·B_in = scale·(B·A·xᵀ)ᵀ. For embeddings d_in is the vocabulary and x·A_in is a row lookup."""
    a = module.A.T.contiguous().float().numpy()
    b = (module.scale * module.B.T).contiguous().float().numpy()
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def resolve_task(model, config: ExportConfig) -> str:
    if config.task != "auto":
        return config.task
    from edge_lora.models import is_causal_lm

    return "text-generation-with-past" if is_causal_lm(model.config) else "feature-extraction"


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


def _io_names(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits], [o.name for o in proto.graph.output]


def write_meta(out_dir: Path, meta: dict) -> dict:
    inputs, outputs = _io_names(out_dir / MODEL_FILE)
    meta = {"format_version": META_VERSION, **meta, "inputs": inputs, "outputs": outputs,
            "model_file": MODEL_FILE,
            "external_data": any(p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE for p in out_dir.iterdir())}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ModelError(f"{folder} has no {META_FILE}; it is not an edge_lora export folder.")
    return json.loads(path.read_text())


def _save_side_files(model, tokenizer, out_dir: Path) -> None:
    model.config.save_pretrained(out_dir)   # optimum writes it too; ours has the merge's untying
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ------------------------------------------------------------------------------------------ merged
def export_merged(model, tokenizer, out_dir: Path, config: ExportConfig = ExportConfig(),
                  meta: dict | None = None) -> tuple[dict, StageReport]:
    """Export a (merged) torch model into ``out_dir`` (which must exist and be empty)."""
    start = time.perf_counter()
    task = resolve_task(model, config)
    optimum_export(model, out_dir, task, config)
    _save_side_files(model, tokenizer, out_dir)
    info = write_meta(out_dir, {"mode": "merged", "task": task, **(meta or {})})
    return info, _report(config, out_dir, info, start)


def _report(config: ExportConfig, out_dir: Path, info: dict, start: float) -> StageReport:
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.name.startswith("model.onnx"))
    return StageReport(stage="export", config=asdict(config), seconds=time.perf_counter() - start,
                       output_hash=onnx_folder_hash(out_dir),
                       metrics={"mode": info["mode"], "task": info["task"], "model_bytes": size,
                                "inputs": len(info["inputs"]), "outputs": len(info["outputs"]),
                                "external_data": info["external_data"]})


def onnx_folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.name.startswith("model.onnx") or p.name == ADAPTER_FILE:
            h.update(p.name.encode())
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ hotswap
class LoraBranch(torch.nn.Module):
    """``base(x) + (x·A)·B`` (``A[x]·B`` for an embedding), with A and B in graph layout (see lora_input_arrays)."""

    def __init__(self, base: torch.nn.Module, kind: str, d_in: int, d_out: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.base = base
        self.kind = kind
        # Tags: random, so every factor's bytes are unique and the graph pass can find it after export.
        self.lora_A = torch.nn.Parameter(torch.randn(d_in, TAG_RANK, generator=gen), requires_grad=False)
        self.lora_B = torch.nn.Parameter(torch.randn(TAG_RANK, d_out, generator=gen), requires_grad=False)

    def forward(self, x):
        if self.kind == "embedding":
            return self.base(x) + torch.nn.functional.embedding(x, self.lora_A) @ self.lora_B
        return self.base(x) + (x @ self.lora_A) @ self.lora_B


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


def wrap_for_hotswap(model, targets: list[str]) -> dict[str, LoraBranch]:
    """Replace each target module by a LoraBranch around it, in place. Returns module name → branch."""
    branches = {}
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
        branch = LoraBranch(layer, kind, d_in, d_out, seed=1000 + i)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, branch)
        branches[name] = branch
    return branches


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def lift_lora_inputs(model_path: Path, branches: dict[str, LoraBranch]) -> dict[str, list[str]]:
    """onnx_ir pass: tag initializers → graph inputs with rank-0 defaults. Returns module → [A name, B name].

    A module whose factors are absent from the graph does not reach the exported outputs (e.g. BERT's pooler
    in a feature-extraction export, pruned by the exporter); it is left out of the result."""
    import onnx_ir as ir

    wanted: dict[str, tuple[str, str, int, int]] = {}   # digest → (module, which, fixed dim, position)
    for name, br in branches.items():
        a_name, b_name = lora_input_names(name)
        wanted[_digest(br.lora_A.detach().numpy())] = (name, a_name, br.lora_A.shape[0], 0)
        wanted[_digest(br.lora_B.detach().numpy())] = (name, b_name, br.lora_B.shape[1], 1)
    shapes = {(d, TAG_RANK) for _, _, d, pos in wanted.values() if pos == 0} | \
             {(TAG_RANK, d) for _, _, d, pos in wanted.values() if pos == 1}

    model = ir.load(model_path)
    graph = model.graph
    found: dict[str, list[str]] = {}
    for value in list(graph.initializers.values()):
        if value.const_value is None or tuple(value.shape or ()) not in shapes:
            continue
        hit = wanted.get(_digest(value.const_value.numpy()))
        if hit is None:
            continue
        module, new_name, dim, pos = hit
        value.name = new_name
        dims = [dim, RANK_DIM] if pos == 0 else [RANK_DIM, dim]
        empty = np.zeros((dim, 0) if pos == 0 else (0, dim), dtype=np.float32)
        value.const_value = ir.tensor(empty, name=new_name)
        value.shape = ir.Shape(dims)
        value.type = ir.TensorType(ir.DataType.FLOAT)
        graph.inputs.append(value)
        found.setdefault(module, []).append(new_name)
    half = sorted(m for m, v in found.items() if len(v) != 2)
    if half:
        raise ModelError(f"hotswap export: only one LoRA factor of {half[:3]} was found in the exported graph "
                         "(the exporter folded or duplicated the other); this is a bug in edge_lora.")
    # ir.load reads external data lazily, from the files we are about to replace: write into a side folder
    # under the final names (the model refers to its data file by name), then move both into place.
    data = model_path.with_name(model_path.name + "_data")
    side = Path(tempfile.mkdtemp(prefix=".lift-", dir=model_path.parent))
    try:
        ir.save(model, side / model_path.name, external_data=data.name if data.exists() else None)
        del model
        for produced in side.iterdir():
            os.replace(produced, model_path.parent / produced.name)
    finally:
        shutil.rmtree(side, ignore_errors=True)
    return {m: sorted(v, key=lambda s: s[-1]) for m, v in sorted(found.items())}


def write_ort_adapter(adapter: Adapter, path: Path, modules: set[str] | None = None, adapter_version: int = 1,
                      model_version: int = 1) -> list[str]:
    """Write ``adapter`` as an ONNX Runtime adapter file. Returns the parameter names.

    The model-version field is not enforced by ORT; binding to the exact base is edge_lora.json's base_sha256.
    """
    import onnxruntime as ort

    arrays = {}   # the OrtValues point into these arrays: keep them alive until the file is written
    for name, module in adapter.modules.items():
        if module.rank == 0 or (modules is not None and name not in modules):
            continue
        a_name, b_name = lora_input_names(name)
        arrays[a_name], arrays[b_name] = lora_input_arrays(module)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(model_version)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(path))
    return sorted(arrays)


def export_hotswap(model, tokenizer, adapter: Adapter | None, out_dir: Path,
                   config: ExportConfig = ExportConfig(mode="hotswap"), meta: dict | None = None
                   ) -> tuple[dict, StageReport]:
    """Export the (unmerged) base with a LoRA branch per target module; write ``adapter`` (if any) beside it.

    ``model`` is modified in place (its target modules are wrapped); pass a model you do not need afterwards.
    """
    start = time.perf_counter()
    if adapter is not None:
        check_hotswappable(adapter, model)
    targets = hotswap_targets(adapter, config)
    task = resolve_task(model, config)
    branches = wrap_for_hotswap(model, targets)
    optimum_export(model, out_dir, task, config)
    lora_inputs = lift_lora_inputs(out_dir / MODEL_FILE, branches)
    _save_side_files(model, tokenizer, out_dir)
    extra = {}
    if adapter is not None:
        params = write_ort_adapter(adapter, out_dir / ADAPTER_FILE, set(lora_inputs))
        extra = {"adapter_file": ADAPTER_FILE, "adapter_parameters": len(params)}
    info = write_meta(out_dir, {"mode": "hotswap", "task": task, "lora_inputs": lora_inputs, **extra,
                                **(meta or {})})
    report = _report(config, out_dir, info, start)
    report.metrics["lora_modules"] = len(lora_inputs)
    unused = sorted(set(branches) - set(lora_inputs))
    if unused:
        report.skipped.append(f"{len(unused)} adapted module(s) do not reach the exported outputs and have no "
                              f"LoRA input: {', '.join(unused[:5])}")
    return info, report
