"""The adapter model: an exact import of a PEFT LoRA folder, a saver PEFT itself loads, and a check
against a base model.

Convention, whatever the base layer: a module's update is ``ΔW = scale · B @ A`` with ``A`` (r × d_in) and
``B`` (d_out × r), in the ``y = W x`` sense. How the base stores ``W`` (transposed for GPT-2's Conv1D with
``fan_in_fan_out``, and for embeddings, where the "input" is a one-hot token id) is the base's business: the
merge stage reads it off the layer type, exactly as PEFT does.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from edge_lora.files import atomic_folder
from edge_lora.errors import AdapterError, CompatibilityError
from edge_lora.formats.peft_config import check_lora_config, check_modules, pattern_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# DoRA adds a learned magnitude vector per module; the other features that change what the tensors mean are
# refused by check_lora_config (edge_lora.formats.peft_config.UNSUPPORTED).
DORA_UNSUPPORTED = ("DoRA adds a learned magnitude vector per module; it is not a low-rank update and cannot be "
                    "canonicalized, compressed, quantized or hot-swapped as one (the merged export profiles, e.g. "
                    "cpu-fp32 or cpu-int4, merge it exactly)")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                       r"lora_embedding_A|lora_embedding_B)$")


ModuleKind = Literal["linear", "embedding"]
# "peft" as imported; "pruned" (rank-0 modules dropped), "canonical" (gauge-fixed SVD form), "compressed" and
# "quantized" (the float expansion of a CompressedAdapter / QuantizedAdapter), "whitened" (the canonical form of
# an output metric: stages/allocate.py)
AdapterForm = Literal["peft", "pruned", "canonical", "compressed", "quantized", "whitened"]
FORMS = typing.get_args(AdapterForm)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module. ``bias`` (PEFT ``lora_bias``) is added as ``scale · bias``, like PEFT does. Frozen:
    a stage that changes a module makes a new one (``dataclasses.replace``)."""

    name: str                  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: ModuleKind
    A: torch.Tensor            # r × d_in, float32
    B: torch.Tensor            # d_out × r, float32
    scale: float
    alpha: float
    bias: torch.Tensor | None = None
    singular_values: torch.Tensor | None = None  # set by canonicalize; then scale == 1 and B·A = U·diag(S)·Vᵀ
    # DoRA's learned norm of each output row (d_out): W' = m / ‖W + ΔW‖_row · (W + ΔW). Only load_peft(...,
    # allow_dora=True) sets it, for the merge stage; every other reader refuses DoRA.
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    @property
    def params(self) -> int:
        return self.A.numel() + self.B.numel() + (self.bias.numel() if self.bias is not None else 0)

    def delta(self) -> torch.Tensor:
        """The dense ΔW (d_out × d_in). Only for tests and small shapes: stages never build it."""
        return self.scale * (self.B.double() @ self.A.double())


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: its modules (sorted by name), the PEFT config it came with, and any full tensors
    PEFT saved beside the factors (``modules_to_save``, trained biases, embedding copies), keyed by their
    name in the base model's state dict."""

    modules: dict[str, LoraModule]
    config: dict
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str | None = None
    storage_dtype: str = "float32"   # dtype of the factors in the source file (sizes are reported in it)
    form: AdapterForm = "peft"

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"Adapter.form must be one of {FORMS}, not {self.form!r}")

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules.values())

    def replace_modules(self, modules: dict[str, LoraModule], form: str | None = None) -> "Adapter":
        return replace(self, modules=dict(sorted(modules.items())), form=form or self.form)


# ---------------------------------------------------------------------------------------------- config
def rank_and_alpha(config: dict, module_name: str) -> tuple[int, float]:
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rk = pattern_key(rank_pattern.keys(), module_name)
    ak = pattern_key(alpha_pattern.keys(), module_name)
    r = rank_pattern[rk] if rk is not None else config.get("r", 8)
    alpha = alpha_pattern[ak] if ak is not None else config.get("lora_alpha", 8)
    return int(r), float(alpha)


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _read_config(folder: Path, allow_dora: bool = False) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_NAME}. A PEFT LoRA adapter folder holds {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME}, as written by PeftModel.save_pretrained().")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc}); restore it from the training run.") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object, not {type(config).__name__}.")
    if config.get("use_dora") and not allow_dora:
        raise AdapterError(f"{path}: 'use_dora' is set, and {DORA_UNSUPPORTED}. Retrain without it, or merge it in "
                           "PEFT and use the merged model as the base.")
    check_lora_config(config, str(path), AdapterError)
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise AdapterError(
                f"{folder} holds {pickled[0]}, a pickled checkpoint, and no {WEIGHTS_NAME}. edge_lora never "
                "unpickles files (loading a pickle can run arbitrary code). Convert it once, in an environment "
                "you trust: PeftModel.from_pretrained(base, folder).save_pretrained(out, safe_serialization=True)."
            )
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}; save the adapter with PeftModel.save_pretrained().")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} cannot be read as safetensors ({exc}); it is truncated or corrupt. "
                           "Copy it again from the training run.") from exc


# ---------------------------------------------------------------------------------------------- load
def load_peft(path: str | os.PathLike, allow_dora: bool = False) -> Adapter:
    """Read a PEFT LoRA folder exactly: per-module rank and alpha (rank_pattern / alpha_pattern with PEFT's
    key matching), rsLoRA scaling, lora_bias, LoRA on Linear, Conv1D and Embedding layers. ``allow_dora``: read
    a DoRA adapter's magnitudes into ``LoraModule.magnitude`` (for merging; refused otherwise)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"Adapter folder {folder} does not exist or is not a folder.")
    config = _read_config(folder, allow_dora)
    tensors = _read_tensors(folder)
    use_rslora = bool(config.get("use_rslora", False))

    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    dtypes = Counter()
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{folder / WEIGHTS_NAME}: tensor {key!r} lacks the {PEFT_PREFIX!r} prefix that "
                               "PeftModel.save_pretrained() writes; this file was not saved by PEFT.")
        if not tensor.is_floating_point():
            raise AdapterError(f"{folder / WEIGHTS_NAME}: tensor {key!r} has dtype {tensor.dtype}; LoRA tensors "
                               "must be floating point.")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(f"{folder / WEIGHTS_NAME}: tensor {key!r} has {bad} NaN/Inf values; the training "
                               "run diverged. Use an earlier checkpoint.")
        key = key[len(PEFT_PREFIX):]
        if "lora_magnitude_vector" in key:
            if not (allow_dora and config.get("use_dora")) or not key.endswith(".lora_magnitude_vector"):
                raise AdapterError(f"{folder / WEIGHTS_NAME}: tensor {key!r} is a DoRA magnitude; "
                                   f"{DORA_UNSUPPORTED}.")
            parts.setdefault(key.removesuffix(".lora_magnitude_vector"), {})["magnitude"] = tensor
            continue
        match = _LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
            dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
        else:
            # modules_to_save, bias="all"/"lora_only" biases, and PEFT's copy of a LoRA'd embedding
            extra[key.replace(".base_layer.", ".")] = tensor.float()

    check_modules(config, {name: set(p) for name, p in parts.items()}, str(folder / WEIGHTS_NAME), AdapterError)
    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items()):
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_key not in p or b_key not in p:
            missing = a_key if a_key not in p else b_key
            raise AdapterError(f"{folder / WEIGHTS_NAME}: module {name!r} has no {missing} tensor; the file is "
                               "incomplete.")
        A, B = p[a_key].float(), p[b_key].float()
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterError(f"{folder / WEIGHTS_NAME}: module {name!r} has {A.dim()}-D/{B.dim()}-D factors; only "
                               "Linear, Conv1D and Embedding LoRA (2-D factors) are supported.")
        r = A.shape[0]
        if B.shape[1] != r:
            raise AdapterError(f"{folder / WEIGHTS_NAME}: module {name!r} has A of rank {r} but B of shape "
                               f"{tuple(B.shape)}; the factors do not belong together.")
        cfg_r, alpha = rank_and_alpha(config, name)
        if cfg_r != r:
            raise AdapterError(f"{folder}: module {name!r} has rank {r} in the tensors but rank {cfg_r} from "
                               f"{CONFIG_NAME} (r / rank_pattern); config and weights are from different runs.")
        bias = p.get("lora_B.bias")
        magnitude = p.get("magnitude")
        if config.get("use_dora") and magnitude is None:
            raise AdapterError(f"{folder / WEIGHTS_NAME}: module {name!r} has no lora_magnitude_vector although "
                               f"{CONFIG_NAME} sets use_dora; the file is incomplete.")
        if magnitude is not None and (embedding or config.get("fan_in_fan_out") or tuple(magnitude.shape) !=
                                      (B.shape[0],)):
            raise AdapterError(f"{folder / WEIGHTS_NAME}: module {name!r}: DoRA is merged for Linear layers only "
                               f"(magnitude of shape {tuple(magnitude.shape)}, {B.shape[0]} outputs expected; no "
                               "embeddings, no fan_in_fan_out). Merge it in PEFT and use the merged model as the "
                               "base.")
        modules[name] = LoraModule(name=name, kind="embedding" if embedding else "linear", A=A, B=B,
                                   scale=lora_scale(alpha, r, use_rslora), alpha=alpha,
                                   bias=bias.float() if bias is not None else None,
                                   magnitude=magnitude.float() if magnitude is not None else None)
    if not modules:
        raise AdapterError(f"{folder / WEIGHTS_NAME} holds no LoRA factors (no lora_A/lora_B tensors).")
    storage = dtypes.most_common(1)[0][0] if dtypes else "float32"
    return Adapter(modules=modules, config=config, extra_tensors=extra, source=str(folder),
                   storage_dtype=storage, form="peft")


# ---------------------------------------------------------------------------------------------- save
def _unique_key(name: str, names) -> str:
    """The module name as a rank/alpha pattern key that matches this module only (escaped if need be)."""
    matches = [n for n in names if re.match(rf"(.*\.)?({name})$", n)]
    return name if matches == [name] else re.escape(name)


def peft_config_for(adapter: Adapter) -> dict:
    """An adapter_config.json under which PEFT rebuilds every module with its exact rank and scale.

    Keeps the source config where it still describes the modules; otherwise lists modules by full name
    and writes per-module rank_pattern / alpha_pattern entries for those off the most common (rank, scale).
    """
    config = copy.deepcopy(adapter.config)
    names = list(adapter.modules)
    use_rslora = bool(config.get("use_rslora", False))

    def source_config_fits(name: str, m: LoraModule) -> bool:
        r, alpha = rank_and_alpha(config, name)
        return r == m.rank and math.isclose(lora_scale(alpha, r, use_rslora), m.scale, rel_tol=1e-6)

    # An untouched import keeps its own config (save_peft marks an adapter whose rank-0 modules it dropped
    # as no longer untouched: the source target_modules would recreate them).
    if (adapter.form == "peft" and isinstance(config.get("target_modules"), list)
            and all(source_config_fits(n, m) for n, m in adapter.modules.items())):
        return config

    def alpha_for(m: LoraModule) -> float:
        return m.scale * (math.sqrt(m.rank) if use_rslora else m.rank)

    (r0, s0), _ = Counter((m.rank, round(m.scale, 12)) for m in adapter.modules.values()).most_common(1)[0]
    default = next(m for m in adapter.modules.values() if m.rank == r0 and round(m.scale, 12) == s0)
    config.update(r=r0, lora_alpha=alpha_for(default), target_modules=names, rank_pattern={}, alpha_pattern={},
                  exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                  init_lora_weights=True)  # how PEFT would initialise factors it does not find: B = 0
    for name, m in adapter.modules.items():
        if m.rank != r0:
            config["rank_pattern"][_unique_key(name, names)] = m.rank
        if not math.isclose(alpha_for(m), config["lora_alpha"], rel_tol=1e-9):
            config["alpha_pattern"][_unique_key(name, names)] = alpha_for(m)
    return config


def peft_state_dict(adapter: Adapter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        if m.rank == 0:
            continue
        prefix = PEFT_PREFIX + name
        if m.kind == "embedding":
            out[f"{prefix}.lora_embedding_A"] = m.A.to(dtype).contiguous()
            out[f"{prefix}.lora_embedding_B"] = m.B.to(dtype).contiguous()
        else:
            out[f"{prefix}.lora_A.weight"] = m.A.to(dtype).contiguous()
            out[f"{prefix}.lora_B.weight"] = m.B.to(dtype).contiguous()
            if m.bias is not None:
                out[f"{prefix}.lora_B.bias"] = m.bias.to(dtype).contiguous()
    embedded = {n for n, m in adapter.modules.items() if m.kind == "embedding"}
    for key, tensor in adapter.extra_tensors.items():
        module = key.rsplit(".", 1)[0]
        # PEFT stores the copy of a LoRA'd embedding under base_layer; put it back where PEFT looks for it.
        if module in embedded:
            key = f"{module}.base_layer.{key.rsplit('.', 1)[1]}"
        out[PEFT_PREFIX + key] = tensor.to(dtype).contiguous()
    return out


def save_peft(adapter: Adapter, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              overwrite: bool = False) -> Path:
    """Write a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads to the same outputs.

    Written into a temporary folder beside the target and renamed into place, so a crash leaves either
    the old folder or the new one.
    """
    from safetensors.torch import save_file

    out = Path(path)
    if out.exists() and not overwrite:
        raise AdapterError(f"{out} already exists; choose another folder or pass overwrite=True (--force).")
    if any(m.rank == 0 for m in adapter.modules.values()):
        adapter = adapter.replace_modules({n: m for n, m in adapter.modules.items() if m.rank > 0},
                                          form="pruned" if adapter.form == "peft" else adapter.form)
    if not adapter.modules:
        raise AdapterError(f"Nothing to save to {out}: every module has rank 0.")
    config = peft_config_for(adapter)
    with atomic_folder(out) as tmp:
        save_file(peft_state_dict(adapter, dtype), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- base check
def base_layer_shape(layer) -> tuple[str, int, int] | None:
    """(kind, d_out, d_in) of a base layer in the ``y = W x`` sense, or None if LoRA cannot target it."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, torch.nn.Linear):
        return "linear", layer.out_features, layer.in_features
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return "linear", d_out, d_in
    if isinstance(layer, torch.nn.Embedding):
        return "embedding", layer.embedding_dim, layer.num_embeddings
    return None


def compatibility_problems(adapter: Adapter, base) -> list[str]:
    """Every way the adapter does not fit the base torch model, one sentence each (empty when it fits)."""
    problems: list[str] = []
    for name, m in adapter.modules.items():
        try:
            layer = base.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name!r}: not found in the base model. The adapter was trained on another "
                            "architecture (or another head, e.g. ForSequenceClassification); pass its base.")
            continue
        shape = base_layer_shape(layer)
        if shape is None:
            problems.append(f"module {name!r}: the base has a {type(layer).__name__} there, which LoRA cannot "
                            "target (Linear, Conv1D or Embedding expected).")
            continue
        kind, d_out, d_in = shape
        if kind != m.kind:
            problems.append(f"module {name!r}: the adapter holds {m.kind} factors but the base layer is a "
                            f"{type(layer).__name__}.")
        elif (m.d_out, m.d_in) != (d_out, d_in):
            problems.append(f"module {name!r}: ΔW would be {m.d_out}×{m.d_in} but the base layer is {d_out}×{d_in} "
                            "(out×in). The adapter belongs to a model of another size.")
        weight = getattr(layer, "weight", None)
        if weight is not None and not weight.is_floating_point():
            problems.append(f"module {name!r}: the base weight has dtype {weight.dtype}; a floating-point base "
                            "is needed (de-quantize it first).")
    state = base.state_dict()
    for key, tensor in adapter.extra_tensors.items():
        if key not in state:
            problems.append(f"tensor {key!r} (modules_to_save / bias): not in the base model's state dict.")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(f"tensor {key!r}: shape {tuple(tensor.shape)} in the adapter, "
                            f"{tuple(state[key].shape)} in the base.")
    return problems


def check_compatible(adapter: Adapter, base) -> None:
    """Raise CompatibilityError listing every mismatch between adapter and base (up to ten shown)."""
    problems = compatibility_problems(adapter, base)
    if problems:
        shown = "\n  - ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CompatibilityError(f"adapter {adapter.source or ''} does not fit this base model "
                                 f"({len(problems)} problem(s)):\n  - {shown}{more}")
