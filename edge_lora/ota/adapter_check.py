"""The strict adapter reader shared by the packager and the device: a PEFT payload is accepted only if
safetensors, PEFT and this project would all read it the same way.

    summary = check_adapter({"adapter_config.json": ..., "adapter_model.safetensors": ...}, base_shapes)

Refused (each with the tensor or key named): a safetensors header with duplicate names, an unknown dtype, shapes
whose byte count differs from the offsets, overlapping, gapped or trailing data; tensors without PEFT's
``base_model.model.`` prefix, an A without its B; a config that is not LoRA, a rank ``r`` (or ``rank_pattern``)
that the tensors contradict, unusable ``target_modules``, and whatever PEFT refuses or reads differently
(``edge_lora.formats.peft_config``: tensors of modules the config does not target, lora_bias or DoRA tensors the
config contradicts, initialisations that rewrite the base, unknown keys that are switched on, modules_to_save);
NaN/Inf values; and, given the base's weight shapes, a
module the base lacks or whose shape does not fit. numpy and json only: the device runs it without torch.
"""

from __future__ import annotations

import json
import math

import numpy as np

from edge_lora.errors import CompatibilityError
from edge_lora.formats.peft_config import check_lora_config, check_modules, pattern_key
from edge_lora.ota.errors import BaseMismatchError, PackageError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# safetensors' dtypes and their sizes in bytes (what the format defines; anything else is refused)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B",
                 ".lora_magnitude_vector")


class AdapterPayloadError(PackageError):
    """The adapter files of a package would not be read the same way by safetensors, PEFT and edge_lora."""


class ShapeMismatchError(BaseMismatchError, CompatibilityError):
    """The adapter's shapes do not fit the base: a wrong base to the device, an incompatible pair to the packager."""


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise AdapterPayloadError(f"{WEIGHTS_NAME}: its header names tensor {k!r} twice; readers disagree on "
                                      "which one counts. Re-save the adapter.")
        seen[k] = v
    return seen


def strict_layout(data: bytes) -> dict[str, tuple[str, tuple, int, int]]:
    """{tensor: (dtype, shape, start, end)} with absolute offsets, after every check safetensors itself makes."""
    where = WEIGHTS_NAME
    if len(data) < 8:
        raise AdapterPayloadError(f"{where} is shorter than the 8-byte safetensors header length.")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise AdapterPayloadError(f"{where} declares a {n}-byte header in a {len(data)}-byte file.")
    try:
        header = json.loads(data[8:8 + n], object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, AdapterPayloadError):
            raise
        raise AdapterPayloadError(f"{where}: its header is not JSON ({exc}).") from None
    if not isinstance(header, dict):
        raise AdapterPayloadError(f"{where}: its header is not a JSON object.")
    header.pop("__metadata__", None)
    out, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterPayloadError(f"{where}: tensor {name!r} lacks dtype, shape or data_offsets.") from None
        if dtype not in DTYPE_BYTES:
            raise AdapterPayloadError(f"{where}: tensor {name!r} has dtype {dtype!r}, which safetensors does not "
                                      f"define ({', '.join(DTYPE_BYTES)}).")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and type(start) is int and type(end) is int and 0 <= start <= end):
            raise AdapterPayloadError(f"{where}: tensor {name!r} has a malformed shape {shape!r} or offsets "
                                      f"{info['data_offsets']!r}.")
        if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise AdapterPayloadError(f"{where}: tensor {name!r} spans {end - start} bytes, but shape {shape} of "
                                      f"{dtype} needs {math.prod(shape) * DTYPE_BYTES[dtype]}.")
        spans.append((start, end, name))
        out[name] = (dtype, tuple(shape), 8 + n + start, 8 + n + end)
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            raise AdapterPayloadError(f"{where}: tensor {name!r} starts at byte {start} of the data, expected {at}: "
                                      "tensors overlap or leave gaps, which readers resolve differently.")
        at = end
    if 8 + n + at != len(data):
        raise AdapterPayloadError(f"{where}: {len(data) - 8 - n - at} bytes after the last tensor; the file was "
                                  "appended to or truncated.")
    return out


def _config(data: bytes) -> dict:
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterPayloadError(f"{CONFIG_NAME} is not valid JSON ({exc}).") from None
    check_lora_config(config, CONFIG_NAME, AdapterPayloadError)
    if config.get("modules_to_save"):
        raise AdapterPayloadError(f"{CONFIG_NAME}: modules_to_save is {config['modules_to_save']!r}: whole copies of "
                                  "base modules, which no device probe checks and the LoRA inputs cannot carry. Ship "
                                  "a merged export instead, or retrain without modules_to_save.")
    return config


def check_adapter(files: dict[str, bytes], base_shapes: dict[str, tuple] | None = None) -> dict:
    """Raise AdapterPayloadError (ShapeMismatchError for a base that does not fit) or return a summary."""
    if WEIGHTS_NAME not in files:
        return {}
    if CONFIG_NAME not in files:
        raise AdapterPayloadError(f"{WEIGHTS_NAME} comes without {CONFIG_NAME}; a PEFT adapter needs both.")
    config = _config(files[CONFIG_NAME])
    data = files[WEIGHTS_NAME]
    layout = strict_layout(data)
    modules: dict[str, dict[str, tuple]] = {}
    dtypes: dict[str, int] = {}
    params = 0
    for key, (dtype, shape, start, end) in layout.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterPayloadError(f"{WEIGHTS_NAME}: tensor {key!r} lacks PEFT's {PEFT_PREFIX!r} prefix; PEFT "
                                      "would not load it where this adapter puts it.")
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        params += math.prod(shape)
        if dtype in ("F64", "F32", "F16", "BF16"):
            raw = np.frombuffer(data[start:end], dtype="<u2" if dtype == "BF16" else
                                {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype])
            values = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw
            if not np.all(np.isfinite(values)):
                raise AdapterPayloadError(f"{WEIGHTS_NAME}: tensor {key} has NaN or Inf values; the training run "
                                          "diverged. Refusing it.")
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            modules.setdefault(key[len(PEFT_PREFIX):-len(suffix)], {})[suffix] = shape
    check_modules(config, {name: {s[1:].replace("lora_magnitude_vector", "magnitude") for s in parts}
                           for name, parts in modules.items()}, WEIGHTS_NAME, AdapterPayloadError)
    rp = config.get("rank_pattern") or {}
    for name, parts in sorted(modules.items()):
        emb = ".lora_embedding_A" in parts or ".lora_embedding_B" in parts
        a_key, b_key = (".lora_embedding_A", ".lora_embedding_B") if emb else (".lora_A.weight", ".lora_B.weight")
        if a_key not in parts or b_key not in parts:
            missing = a_key if a_key not in parts else b_key
            raise AdapterPayloadError(f"{WEIGHTS_NAME}: module {name!r} has no {missing[1:]} tensor.")
        a, b = parts[a_key], parts[b_key]
        if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
            raise AdapterPayloadError(f"{WEIGHTS_NAME}: module {name!r} has factors of shapes {list(a)} and "
                                      f"{list(b)}, which do not multiply.")
        key = pattern_key(rp, name)
        r = rp[key] if key is not None else config.get("r", 8)
        if a[0] != r:
            raise AdapterPayloadError(f"{name}: the tensors have rank {a[0]} but {CONFIG_NAME} gives r = {r}; PEFT "
                                      "would build another shape and refuse or mis-load them.")
        if base_shapes is not None:
            d_out, d_in = b[0], a[1]
            found = next((k for k in (f"{name}.weight",) if k in base_shapes), None) or next(
                (k for k in base_shapes if k.endswith(f".{name}.weight")), None)
            if found is None:
                raise ShapeMismatchError(f"adapter module {name} has no weight in the base model; the adapter was "
                                        "trained for another architecture.")
            if tuple(base_shapes[found][:2]) not in ((d_out, d_in), (d_in, d_out)):
                raise ShapeMismatchError(f"adapter module {name} updates a {d_out}x{d_in} weight but the base's "
                                        f"{found} is {list(base_shapes[found])}; wrong base model.")
    if not modules:
        raise AdapterPayloadError(f"{WEIGHTS_NAME} holds no LoRA A/B pairs.")
    return {"finite": True, "modules": len(modules), "tensor_dtypes": dtypes, "params": int(params),
            **({"base_shapes": "ok"} if base_shapes is not None else {})}


def base_shapes(folder) -> dict[str, tuple]:
    """{tensor: shape} of a base model folder's safetensors files, from their headers only."""
    from pathlib import Path

    from edge_lora.files import SafetensorsHeaderError, read_safetensors_header

    shapes: dict[str, tuple] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            header, _ = read_safetensors_header(f)
            shapes.update({k: tuple(v["shape"]) for k, v in header.items()})
        except (OSError, SafetensorsHeaderError, KeyError, TypeError) as exc:
            raise PackageError(f"base weights {f} are not a readable safetensors file ({exc}); check --base.") \
                from None
    return shapes
