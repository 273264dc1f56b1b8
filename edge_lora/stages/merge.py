"""Fold the adapter into the base weights: ``W' = W + ΔW`` with ``ΔW = scale·B·A`` (y = W x sense).

The base layer decides how ΔW lands in its weight tensor, exactly as PEFT does it:
- ``nn.Linear`` stores W as out × in: add ΔW;
- GPT-2's ``Conv1D`` stores in × out: add ΔWᵀ;
- ``nn.Embedding`` stores num × dim, and ΔW is dim × num (the "input" is a one-hot token id): add ΔWᵀ.
DoRA (``LoraModule.magnitude`` m) rescales each output row as PEFT's merge does:
``W' = m / ‖W + ΔW‖_row · (W + ΔW)``. ``lora_bias`` adds ``scale·bias`` to the base bias; tensors saved through ``modules_to_save`` replace the
base tensors. A tied weight that receives an update (LoRA on an embedding tied to lm_head) is untied:
the unmerged model applies ΔW to the embedding lookup only (PEFT's own merge_and_unload gets this wrong).
Everything is computed first and checked finite, and only then written into the model, so a
bad adapter never leaves a half-merged model behind.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from edge_lora.adapter import Adapter, base_layer_shape, check_compatible
from edge_lora.errors import AdapterError
from edge_lora.config import MergeConfig
from edge_lora.report import StageReport


def _layer_delta(layer, module, dtype: torch.dtype) -> torch.Tensor:
    """ΔW laid out like ``layer.weight``."""
    delta = module.scale * (module.B.to(dtype) @ module.A.to(dtype))   # d_out × d_in
    from transformers.pytorch_utils import Conv1D

    kind, _, _ = base_layer_shape(layer)
    if kind == "embedding" or isinstance(layer, Conv1D):
        delta = delta.T   # Embedding (num × dim) and Conv1D (in × out) store Wᵀ
    return delta


def _shared_storages(model: torch.nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


def merge(model: torch.nn.Module, adapter: Adapter, config: MergeConfig = MergeConfig()
          ) -> tuple[torch.nn.Module, StageReport]:
    """Merge ``adapter`` into ``model`` in place (fp32 weights) and return it with a StageReport."""
    start = time.perf_counter()
    check_compatible(adapter, model)
    dtype = getattr(torch, config.compute_dtype)
    updates: dict[str, tuple[torch.nn.Parameter | None, torch.Tensor, torch.nn.Module, str]] = {}
    delta_sq = weight_sq = 0.0
    with torch.no_grad():
        for name, module in adapter.modules.items():
            layer = model.get_submodule(name)
            delta = _layer_delta(layer, module, dtype)
            delta_sq += float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
            # PEFT saves its copy of a LoRA'd embedding beside the factors: that copy is the W to add ΔW to.
            weight = adapter.extra_tensors.get(f"{name}.weight", layer.weight)
            weight_sq += float(torch.linalg.vector_norm(weight, dtype=torch.float64)) ** 2
            new = weight + delta if delta.dtype == weight.dtype else (weight.to(dtype) + delta).to(weight.dtype)
            if module.magnitude is not None:
                from transformers.pytorch_utils import Conv1D

                if module.kind != "linear" or isinstance(layer, Conv1D):
                    raise AdapterError(f"{name}: DoRA is merged for nn.Linear layers only, not "
                                       f"{type(layer).__name__}; merge it in PEFT and use that model as the base.")
                full = weight.to(dtype) + delta
                norm = torch.linalg.vector_norm(full, dim=1)
                new = ((module.magnitude.to(dtype) / norm)[:, None] * full).to(weight.dtype)
            updates[f"{name}.weight"] = (layer.weight, new, layer, "weight")
            if module.bias is not None:
                old = layer.bias if layer.bias is not None else torch.zeros(module.d_out, dtype=layer.weight.dtype)
                updates[f"{name}.bias"] = (layer.bias, (old.to(dtype) + module.scale * module.bias.to(dtype))
                                           .to(layer.weight.dtype), layer, "bias")
        state = model.state_dict(keep_vars=True)
        for key, tensor in adapter.extra_tensors.items():
            if key in updates:
                continue   # already the base of a merged module (above)
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            target = state[key]
            updates[key] = (target, tensor.to(target.dtype), owner, attr)

        if config.check_finite:
            bad = [k for k, (_, new, _, _) in updates.items() if not torch.isfinite(new).all()]
            if bad:
                raise AdapterError(f"merging {adapter.source or 'the adapter'} gives NaN/Inf in {', '.join(bad[:5])}"
                                   f"{' ...' if len(bad) > 5 else ''}; the base was left unchanged. The adapter's "
                                   "factors or scale are too large for fp32: check the training run.")
        shared = _shared_storages(model)
        untied = []
        for key, (param, new, owner, attr) in updates.items():
            # A new Parameter rather than copy_: no second pass over the weights (and no copy-on-write faults
            # on weights safetensors memory-mapped). It also unties a tied weight (LoRA on an embedding tied to
            # lm_head), which is right: the unmerged model applies ΔW to this module only.
            setattr(owner, attr, torch.nn.Parameter(new, requires_grad=False))
            if param is not None and param.data_ptr() in shared:
                untied.append(key)
        if untied and hasattr(model, "config"):
            model.config.tie_word_embeddings = False

    report = StageReport(
        stage="merge", config=asdict(config), seconds=time.perf_counter() - start,
        metrics={"modules": len(adapter.modules), "extra_tensors": len(adapter.extra_tensors),
                 "biases": sum(m.bias is not None for m in adapter.modules.values()),
                 "untied": untied,
                 "relative_update_norm": (delta_sq / weight_sq) ** 0.5 if weight_sq else 0.0},
    )
    return model, report


@dataclass(frozen=True)
class MergeInput:
    model: torch.nn.Module   # merged in place
    adapter: Adapter         # per-module factors (a compressed or quantized adapter's expansion)


def run(inp: MergeInput, config: MergeConfig = MergeConfig()) -> tuple[torch.nn.Module, StageReport]:
    """The stage entry (every stage module has one: ``run(input, config) -> (output, StageReport)``)."""
    return merge(inp.model, inp.adapter, config)
