"""Probes: fixed inputs and expected outputs stored in the signed manifest, run on the device against the
decoded, staged adapter before the install switches to it.

Kinds (``manifest["probes"]`` is a list; the device runs every kind it can and needs at least one to pass):
- ``factors``: numpy only. For each LoRA module, y = scale·(B·(A·x) + b) for a fixed pseudo-random x (from SHAKE-256,
  so it is the same on every machine and numpy version); compares a fixed sample of y's entries and ‖y‖ within
  rtol/atol. Cheap; shows the tensors and the config decode to the update that was packaged.
- ``torch-logits``: the base model plus the installed PEFT folder (``peft``), fixed input ids; expected top-1
  ids per position (and a sha256 of them), and a few logits per position, within tolerance. A top-1 id may
  differ only where the packager's top-1/top-2 margin was inside the tolerance. Runs when the device has
  torch + peft and the installer was given the base model.
- ``ort``: the hot-swap ONNX export plus the staged ``.onnx_adapter``; same checks as torch-logits, through
  ONNX Runtime. The probe records the export's identity (sha256 of model.onnx*) and the device refuses to run it
  on another export. Runs when the device has onnxruntime and the installer knows the export (``--export``).

Expected values are stored as numbers, not float digests: digests of floats break across BLAS builds.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_lora.errors import ExportMetaError
from edge_lora.formats.export_meta import ExportMeta, export_folder_hash
from edge_lora.formats.peft_config import pattern_key
from edge_lora.ota.codec import safetensors_layout
from edge_lora.ota.errors import PackageError, ProbeError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


class ProbeSkipped(Exception):
    """A probe kind this device cannot run (no runtime, no base model): reported, not fatal."""


# --------------------------------------------------------------------------------------- numpy helpers
def det_uniform(tag: str, n: int) -> np.ndarray:
    """n numbers in [-1, 1) from SHAKE-256(tag): identical on every machine, forever."""
    raw = np.frombuffer(hashlib.shake_256(tag.encode()).digest(4 * n), dtype=">u4").astype(np.float64)
    return raw / 2.0**31 - 1.0


def det_indices(tag: str, n: int, k: int) -> list[int]:
    k = min(k, n)
    out: list[int] = []
    raw = hashlib.shake_256(("idx|" + tag).encode()).digest(8 * (k + 64))
    for (v,) in struct.iter_unpack(">Q", raw):
        if v % n not in out:
            out.append(v % n)
        if len(out) == k:
            break
    return sorted(out) if len(out) == k else list(range(k))


def read_safetensors_numpy(data: bytes, where: str) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as float arrays (BF16 widened to fp32), without torch or pickles."""
    layout = safetensors_layout(data)
    if layout is None:
        raise ProbeError(f"{where} is not a readable safetensors file.")
    out = {}
    for name, (dtype, shape, start, end) in layout[1].items():
        if dtype == "BF16":
            u16 = np.frombuffer(data[start:end], dtype="<u2")
            arr = (u16.astype(np.uint32) << 16).view(np.float32)
        elif dtype in _DTYPES:
            arr = np.frombuffer(data[start:end], dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        else:
            continue  # integer tensors (quantized codes) are checked by hash; factors probes skip them
        if arr.size != math.prod(shape):
            raise ProbeError(f"{where}: tensor {name} has {arr.size} values for shape {list(shape)}.")
        out[name] = arr.reshape(shape).astype(np.float64)
    return out


def module_scale(config: dict, module: str) -> float:
    """PEFT's scale for a module: alpha/r, or alpha/sqrt(r) with rsLoRA; rank_pattern/alpha_pattern override."""
    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rk, ak = pattern_key(rp, module), pattern_key(ap, module)
    r = float(rp[rk] if rk is not None else config.get("r", 8))
    alpha = float(ap[ak] if ak is not None else config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_modules(tensors: dict[str, np.ndarray]) -> dict[str, tuple]:
    """module name (without PEFT's prefix) -> (A, B, bias or None), all 2-D."""
    out = {}
    for key in sorted(tensors):
        for a_suf, b_suf in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suf):
                prefix = key[: -len(a_suf)]
                b = tensors.get(prefix + b_suf)
                if b is None:
                    raise ProbeError(f"{prefix}: has {a_suf[1:]} but no {b_suf[1:]}.")
                name = prefix.removeprefix(PEFT_PREFIX)
                a2, b2 = tensors[key].reshape(tensors[key].shape[0], -1), b.reshape(b.shape[0], -1)
                if b2.shape[1] != a2.shape[0]:
                    raise ProbeError(f"{name}: B has {b2.shape[1]} columns but A has {a2.shape[0]} rows.")
                out[name] = (a2, b2, tensors.get(prefix + ".lora_B.bias"))
    return out


# ------------------------------------------------------------------------------------------ factors
def build_factors(files: dict[str, bytes], samples: int = 8) -> dict:
    if WEIGHTS_NAME not in files or CONFIG_NAME not in files:
        raise ProbeSkipped(f"the factors probe needs {CONFIG_NAME} and {WEIGHTS_NAME} in the payload")
    config = json.loads(files[CONFIG_NAME])
    mods = lora_modules(read_safetensors_numpy(files[WEIGHTS_NAME], WEIGHTS_NAME))
    if not mods:
        raise ProbeSkipped(f"{WEIGHTS_NAME} holds no LoRA A/B pairs")
    out = []
    for name, y, scale in _factor_outputs(config, mods):
        idx = det_indices(name, y.size, samples)
        out.append({"module": name, "scale": scale, "index": idx, "expected": [float(v) for v in y[idx]],
                    "norm": float(np.linalg.norm(y))})
    return {"kind": "factors", "config": CONFIG_NAME, "weights": WEIGHTS_NAME, "rtol": 1e-6, "atol": 1e-9,
            "modules": out}


def _factor_outputs(config: dict, mods: dict):
    for name, (a, b, bias) in mods.items():
        scale = module_scale(config, name)
        x = det_uniform("x|" + name, a.shape[1])
        y = b @ (a @ x)
        if bias is not None:
            y = y + bias.reshape(-1)
        yield name, scale * y, scale


def run_factors(probe: dict, files: dict[str, bytes], version_dir: Path, base) -> str:
    try:
        cfg_name, w_name = probe["config"], probe["weights"]
        rtol, atol = float(probe["rtol"]), float(probe["atol"])
        expected = {m["module"]: m for m in probe["modules"]}
        config = json.loads(files[cfg_name])
        mods = lora_modules(read_safetensors_numpy(files[w_name], w_name))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProbeError(f"factors probe: malformed probe or payload ({type(exc).__name__}: {exc}).") from exc
    if set(mods) != set(expected):
        diff = sorted(set(mods) ^ set(expected))[:5]
        raise ProbeError(f"factors probe: the adapter's modules differ from the probe's (e.g. {diff}).")
    worst = 0.0
    for name, y, scale in _factor_outputs(config, mods):
        e = expected[name]
        try:
            idx, exp, norm = [int(i) for i in e["index"]], np.asarray(e["expected"], float), float(e["norm"])
            got = y[idx]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ProbeError(f"factors probe: module {name}: malformed expectation ({exc}).") from exc
        tol = atol * max(1.0, norm) + rtol * np.abs(exp)
        if got.shape != exp.shape or not np.all(np.abs(got - exp) <= tol) \
                or abs(float(np.linalg.norm(y)) - norm) > atol * max(1.0, norm) + rtol * norm:
            raise ProbeError(f"factors probe: module {name} gives {got[:3].tolist()}... (norm "
                             f"{np.linalg.norm(y):.6g}), expected {exp[:3].tolist()}... (norm {norm:.6g}). The "
                             "adapter does not decode to the update that was packaged; not switching to it.")
        worst = max(worst, float(np.max(np.abs(got - exp))) if got.size else 0.0)
    return f"{len(mods)} modules within rtol {rtol:g}/atol {atol:g} (max abs diff {worst:.2g})"


# ---------------------------------------------------------------------------------------- torch-logits
def _torch_outputs(base_model, adapter_dir: str | None, input_ids: list[list[int]]):
    import torch

    model = base_model
    if adapter_dir is not None:
        from pathlib import Path

        from peft import PeftModel

        if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
            # without it PEFT would look for adapter_model.bin and unpickle it
            raise ProbeError(f"torch-logits probe: {adapter_dir} has no adapter_model.safetensors; refusing to let "
                             "PEFT fall back to a pickled checkpoint.")
        model = PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=False)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids, dtype=torch.long))
    t = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return t.detach().to(torch.float64).cpu().numpy()


def build_torch_logits(base_loader: Callable, adapter_dir: str, seq_len: int = 16, n_check: int = 4,
                       atol: float = 2e-3, rtol: float = 2e-3) -> dict:
    """Run base + adapter (and the base alone, to prove the adapter changes the output)."""
    model = base_loader()
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise ProbeSkipped("the base model has no vocab_size")
    ids = [det_indices(f"ids|{i}", vocab, 1)[0] for i in range(seq_len)]
    base_out = _torch_outputs(model, None, [ids])[0]
    out = _torch_outputs(base_loader(), adapter_dir, [ids])[0]
    top = np.argsort(-out, axis=-1)
    top1 = top[:, 0]
    check = det_indices("check", out.shape[-1], n_check)
    expected = [[float(out[p, top1[p]])] + [float(out[p, c]) for c in check] for p in range(out.shape[0])]
    margin = [float(out[p, top[p, 0]] - out[p, top[p, 1]]) for p in range(out.shape[0])]
    return {"kind": "torch-logits", "input_ids": [ids], "top1": [int(v) for v in top1],
            "top1_sha256": hashlib.sha256(np.asarray(top1, "<i8").tobytes()).hexdigest(),
            "check_ids": check, "expected": expected, "margin": margin, "atol": atol, "rtol": rtol,
            "adapter_effect_max_abs": float(np.max(np.abs(out - base_out)))}


def run_torch_logits(probe: dict, files: dict[str, bytes], version_dir: Path, base) -> str:
    if base is None:
        raise ProbeSkipped("no base model given to the installer (pass --base to run it)")
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise ProbeSkipped(f"torch/peft not installed on this device ({exc.name})") from exc
    from edge_lora.base import load_base

    try:
        ids, top1 = probe["input_ids"], [int(v) for v in probe["top1"]]
        check, exp = [int(c) for c in probe["check_ids"]], np.asarray(probe["expected"], dtype=float)
        margin, atol, rtol = [float(v) for v in probe["margin"]], float(probe["atol"]), float(probe["rtol"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProbeError(f"torch-logits probe: malformed probe ({exc}).") from exc
    model = base() if callable(base) else load_base(base)[0]
    try:
        out = _torch_outputs(model, str(version_dir), ids)[0]
    except (IndexError, RuntimeError, ValueError) as exc:
        raise ProbeError(f"torch-logits probe: the installed adapter does not run on the base model "
                         f"({type(exc).__name__}: {exc}).") from exc
    return _compare_logits("torch-logits", out, top1, check, exp, margin, atol, rtol)


# ----------------------------------------------------------------------------------------------- ort
def export_model_sha256(export_dir) -> str:
    """Identity of a hot-swap export: :func:`edge_lora.formats.export_meta.export_folder_hash` (model.onnx and
    its external data; not the adapter file beside it), as a ProbeError when the folder is no export."""
    try:
        return export_folder_hash(export_dir)
    except ExportMetaError as exc:
        raise ProbeError(f"{exc} It is not a hot-swap export folder.") from None


def _export_vocab(export_dir: Path) -> int:
    cfg = export_dir / "config.json"
    vocab = json.loads(cfg.read_text()).get("vocab_size") if cfg.is_file() else None
    if not isinstance(vocab, int) or vocab < 2:
        raise ProbeSkipped(f"{cfg} gives no vocab_size; cannot choose probe input ids")
    return vocab


def _ort_outputs(export_dir, adapter_path, input_ids: list[list[int]], threads: int = 1):
    """(base output, output with the adapter active) of the first graph output, as float64. HotswapSession keeps
    the LoraAdapter alive while its RunOptions point at it (else ORT silently runs the base)."""
    from edge_lora.runtimes.hotswap import HotswapSession
    from edge_lora.runtimes.ort_session import full_feeds

    session = HotswapSession(export_dir, threads=threads)
    # lora={}: the base; session.run adds the active adapter's tensors (plain LoRA inputs) or its RunOptions
    feeds = full_feeds(session.session, np.asarray(input_ids, dtype=np.int64), lora={})
    out_name = session.output_names[:1]
    base_out = session.run(feeds, output_names=out_name)[0]
    session.load_adapter("probe", adapter_path, check=False)
    out = session.run(feeds, adapter="probe", output_names=out_name)[0]
    return np.asarray(base_out, np.float64), np.asarray(out, np.float64)


def build_ort(export_dir, adapter_file, adapter_name: str | None = None, seq_len: int = 16, n_check: int = 4,
              atol: float = 2e-3, rtol: float = 2e-3) -> dict:
    """Packager side: run the hot-swap export with ``adapter_file`` active on fixed input ids; store the top-1
    ids (+ sha256), the logit of the top-1 id and of ``n_check`` fixed ids per position, the top-1/top-2 margins,
    and the export's identity (sha256 of model.onnx*, the base hash from edge_lora.json)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ProbeSkipped("onnxruntime is not installed") from exc
    export_dir = Path(export_dir)
    vocab = _export_vocab(export_dir)
    meta = ExportMeta.read(export_dir)
    ids = [det_indices(f"ids|{i}", vocab, 1)[0] for i in range(seq_len)]
    base_out, out = _ort_outputs(export_dir, adapter_file, [ids])
    base_out, out = base_out[0], out[0]
    top = np.argsort(-out, axis=-1, kind="stable")
    top1 = top[:, 0]
    check = det_indices("check", out.shape[-1], n_check)
    expected = [[float(out[p, top1[p]])] + [float(out[p, c]) for c in check] for p in range(out.shape[0])]
    margin = [float(out[p, top[p, 0]] - out[p, top[p, 1]]) for p in range(out.shape[0])]
    return {"kind": "ort", "adapter": adapter_name or Path(adapter_file).name,
            "export": {"model_sha256": export_model_sha256(export_dir), "base_sha256": meta.base_sha256,
                       "lora_inputs": len(meta.lora_inputs)},
            "input_ids": [ids], "top1": [int(v) for v in top1],
            "top1_sha256": hashlib.sha256(np.asarray(top1, "<i8").tobytes()).hexdigest(),
            "check_ids": check, "expected": expected, "margin": margin, "atol": atol, "rtol": rtol,
            "adapter_effect_max_abs": float(np.max(np.abs(out - base_out)))}


def _compare_logits(kind: str, out: np.ndarray, top1: list[int], check: list[int], exp: np.ndarray,
                    margin: list[float], atol: float, rtol: float) -> str:
    if out.ndim != 2 or out.shape[0] != len(top1) or exp.shape != (len(top1), 1 + len(check)) \
            or len(margin) != len(top1):
        raise ProbeError(f"{kind} probe: output shape {out.shape} does not fit the probe.")
    got = np.stack([np.concatenate([[out[p, top1[p]]], out[p, check]]) for p in range(len(top1))])
    bad = np.abs(got - exp) > atol + rtol * np.abs(exp)
    flips = [p for p in range(len(top1)) if int(np.argmax(out[p])) != top1[p] and margin[p] > atol]
    if bad.any() or flips:
        p = int(np.argwhere(bad)[0][0]) if bad.any() else flips[0]
        raise ProbeError(f"{kind} probe: position {p}: got top-1 id {int(np.argmax(out[p]))} and logits "
                         f"{got[p].round(5).tolist()}, expected top-1 {top1[p]} and {exp[p].round(5).tolist()} "
                         f"(atol {atol:g}, rtol {rtol:g}). Not switching to this adapter.")
    return f"{len(top1)} positions: top-1 ids equal, logits within atol {atol:g} (max diff " \
           f"{float(np.max(np.abs(got - exp))):.2g})"


def run_ort(probe: dict, files: dict[str, bytes], version_dir: Path, export) -> str:
    """Device side. ``export`` is the device's hot-swap export folder (``install --export DIR``, or the one
    recorded in ROOT/base.json); run_probes passes it in the place other kinds get the base model. Checks the
    export is the one the probe was built on (sha256 of model.onnx*), loads the STAGED .onnx_adapter, runs the
    fixed ids and compares top-1 ids and logits within tolerance."""
    if export is None:
        raise ProbeSkipped("no hot-swap export given to the installer (pass --export DIR once; it is recorded "
                           "in ROOT/base.json)")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ProbeSkipped("onnxruntime is not installed on this device") from exc
    try:
        name, want_model = probe["adapter"], probe["export"]["model_sha256"]
        ids, top1 = probe["input_ids"], [int(v) for v in probe["top1"]]
        check, exp = [int(c) for c in probe["check_ids"]], np.asarray(probe["expected"], dtype=float)
        margin, atol, rtol = [float(v) for v in probe["margin"]], float(probe["atol"]), float(probe["rtol"])
        if not (isinstance(name, str) and isinstance(want_model, str) and isinstance(ids, list) and len(ids) == 1
                and all(type(i) is int for i in ids[0])):
            raise ValueError("adapter, export.model_sha256 or input_ids has the wrong type")
    except (KeyError, TypeError, ValueError) as exc:
        raise ProbeError(f"ort probe: malformed probe ({exc}).") from exc
    if name not in files:
        raise ProbeError(f"ort probe: names {name!r}, which is not in the payload.")
    export = Path(export)
    if not export.is_dir():
        raise ProbeError(f"ort probe: the device's hot-swap export {export} is not a folder.")
    have_model = export_model_sha256(export)
    if have_model != want_model:
        raise ProbeError(f"ort probe: the device's hot-swap export {export} (model sha256 {have_model[:16]}…) is "
                         f"not the export the package was built for ({want_model[:16]}…). The adapter's LoRA "
                         "inputs may not fit it; install the matching export first. Not switching.")
    adapter_path = Path(version_dir) / name
    if not adapter_path.is_file() or adapter_path.is_symlink():
        raise ProbeError(f"ort probe: the staged {adapter_path} is missing or not a regular file.")
    try:
        _, out = _ort_outputs(export, adapter_path, ids)
    except PackageError:
        raise
    except Exception as exc:  # AdapterError (unknown LoRA inputs), ModelError, ORT's own errors
        raise ProbeError(f"ort probe: the staged {name} does not run on the export {export} "
                         f"({type(exc).__name__}: {exc}). Not switching to it.") from exc
    return _compare_logits("ort", out[0], top1, check, exp, margin, atol, rtol)


RUNNERS: dict[str, Callable] = {"factors": run_factors, "torch-logits": run_torch_logits, "ort": run_ort}


def run_probes(probes: list[dict], files: dict[str, bytes], version_dir: Path, base=None,
               export=None) -> list[dict]:
    """Run every probe this device can; raise ProbeError on the first failure or when none could run.

    ``base``: the device's base model (HF folder or a loader) for torch-logits; ``export``: the device's hot-swap
    ONNX export folder, given to the ``ort`` runner in the place of ``base``."""
    results = []
    for p in probes:
        runner = RUNNERS.get(p["kind"])
        try:
            if runner is None:
                raise ProbeSkipped(f"unknown probe kind {p['kind']!r}")
            models = export if p["kind"] == "ort" else base
            results.append({"kind": p["kind"], "status": "passed", "detail": runner(p, files, version_dir, models)})
        except ProbeSkipped as exc:
            results.append({"kind": p["kind"], "status": "skipped", "detail": str(exc)})
        except ProbeError:
            raise
        except Exception as exc:  # any failure to run a probe means: do not switch to this adapter
            raise ProbeError(f"{p['kind']} probe failed to run ({type(exc).__name__}: {exc}); the probe or the "
                             "adapter is malformed. Not switching to it.") from exc
    if not any(r["status"] == "passed" for r in results):
        raise ProbeError("No probe could run on this device (" + "; ".join(
            f"{r['kind']}: {r['detail']}" for r in results) + "). Refusing to switch to an adapter nobody "
            "checked; pass --base (or --export for an ort probe), or package with a 'factors' probe.")
    return results
