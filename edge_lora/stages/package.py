"""Package stage: a trained adapter (PEFT folder, or an export folder with an ``.onnx_adapter``) -> one signed
OTA file; and what the CLI verbs keygen, verify, install, rollback call (edge_lora/cli/ota.py). Device-side
code lives in ``edge_lora.ota`` and never imports torch unless a torch-logits probe is run. Format: docs/ota.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edge_lora import __version__
from edge_lora.errors import CompatibilityError, ModelError, PackageError
from edge_lora.report import StageReport
from edge_lora.files import SafetensorsHeaderError, parse_safetensors_header
from edge_lora.formats.export_meta import FILE as EXPORT_META, MODEL_FILE, ExportMeta
from edge_lora.ota import codec
from edge_lora.ota.container import DEFAULT_LIMITS, Limits, check_adapter_id, check_name, pack_container, write_atomic
from edge_lora.ota.manifest import FORMAT, FORMAT_VERSION, canonical_json, open_package, payload_digest
from edge_lora.ota.probe import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ProbeSkipped,
    build_factors,
    build_ort,
    build_torch_logits,
)

ROLES = {CONFIG_NAME: "peft-config", WEIGHTS_NAME: "peft-weights"}
ORT_SUFFIX = ".onnx_adapter"
SUMMARY_FILES = ("metrics.json", "report.json", "export.json")  # read for the validation/requirements summary
ORT_ADAPTER_FILE = "adapter.onnx_adapter"   # the hot-swap export's adapter file name (stages.export_onnx)


def hotswap_export_meta(folder: str | os.PathLike) -> ExportMeta | None:
    """The ExportMeta of a hot-swap export folder (model.onnx + edge_lora.json with mode 'hotswap'), else None.
    A damaged edge_lora.json raises ExportMetaError, as in every other command."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file() or not (folder / EXPORT_META).is_file():
        return None
    meta = ExportMeta.read(folder)
    return meta if meta.hotswap else None


def _ort_adapter_from_peft(src: Path, meta: ExportMeta) -> bytes:
    """The PEFT adapter in ``src`` as the adapter file of the export: float, or, when the export ships quantized
    adapters, the codes of the one factor quantizer with the export's settings (its devices expect that)."""
    from edge_lora.adapter import load_peft
    from edge_lora.stages.export_onnx import write_ort_adapter

    adapter = load_peft(src)
    quant = meta.adapter_quantization
    if quant is not None:
        from edge_lora.stages.quantize_factors import FactorQuantConfig, quantize_adapter

        adapter, _ = quantize_adapter(adapter, None, FactorQuantConfig(
            bits=quant.bits, mixed_avg_bits=quant.mixed_avg_bits, group_size=quant.group_size,
            symmetric=quant.symmetric))
    with tempfile.TemporaryDirectory(prefix="edge-lora-ort-") as tmp:
        path = Path(tmp) / ORT_ADAPTER_FILE
        write_ort_adapter(adapter, path, meta)   # the exact layout, fused groups included
        return path.read_bytes()


# ---------------------------------------------------------------------------------------------- inputs
def collect_payload(src: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> dict[str, tuple[str, bytes]]:
    """name -> (role, bytes) of the files that travel: the PEFT pair and any ``*.onnx_adapter``."""
    folder = Path(src)
    if not folder.is_dir():
        raise PackageError(f"{folder} is not a folder. Pass a PEFT adapter folder (adapter_config.json + "
                           "adapter_model.safetensors) or an export folder holding a .onnx_adapter file.")
    out: dict[str, tuple[str, bytes]] = {}
    for p in sorted(folder.iterdir()):
        role = ROLES.get(p.name) or ("ort-adapter" if p.name.endswith(ORT_SUFFIX) else None)
        if role is None:
            continue
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"{p} is a link or not a regular file; package real files only (copy it in).")
        check_name(p.name, str(folder))
        if st.st_size > limits.max_entry_bytes:
            raise PackageError(f"{p} is {st.st_size} bytes, over the per-entry limit of {limits.max_entry_bytes}.")
        out[p.name] = (role, p.read_bytes())
    peft = {CONFIG_NAME, WEIGHTS_NAME} & set(out)
    if len(peft) == 1:
        missing = ({CONFIG_NAME, WEIGHTS_NAME} - peft).pop()
        raise PackageError(f"{folder} has {peft.pop()} but no {missing}: a PEFT adapter needs both (pickled "
                           "adapter_model.bin is not accepted; re-save with safe_serialization=True).")
    if not out:
        raise PackageError(f"{folder} holds no adapter: expected {CONFIG_NAME} + {WEIGHTS_NAME} (PEFT) or a "
                           f"*{ORT_SUFFIX} file (hot-swap export).")
    return out


def _summaries(folder: Path) -> dict:
    """Scalar fields of metrics.json / report.json / export.json next to the adapter, if present."""
    out = {}
    for name in SUMMARY_FILES:
        p = folder / name
        if not p.is_file() or p.is_symlink() or p.stat().st_size > 1 << 20:
            continue
        try:
            data = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as exc:   # not skipped: metrics.json binds the trained-on base
            raise PackageError(f"{p} is not valid JSON ({exc}); repair or remove it (it is read for the package "
                               "summary and, for metrics.json, the base the adapter was trained on).") from exc
        if isinstance(data, dict):
            # paths of the build machine mean nothing on a device and would be signed into the manifest
            out[name] = {k: v for k, v in list(data.items())[:64]
                         if (isinstance(v, str) and not _is_absolute_path(v)) or isinstance(v, (int, bool))
                         or (isinstance(v, float) and math.isfinite(v))}
    return out


def _is_absolute_path(text: str) -> bool:
    return os.path.isabs(text) or text.startswith("~") or re.match(r"[A-Za-z]:[\\/]", text) is not None


def _check_adapter(payload: dict[str, tuple[str, bytes]], base_path: Path | None) -> dict:
    """Packager-side validation, the same strict reader the device runs (ota/adapter_check.py)."""
    from edge_lora.ota.adapter_check import base_shapes, check_adapter

    return check_adapter({n: d for n, (_, d) in payload.items()},
                         base_shapes(base_path) if base_path is not None else None)


def _metadata(payload) -> dict:
    if WEIGHTS_NAME not in payload:
        return {}
    try:
        _, _, meta = parse_safetensors_header(payload[WEIGHTS_NAME][1])
    except SafetensorsHeaderError:
        return {}
    return {k: str(v)[:200] for k, v in list(meta.items())[:16]}


# ---------------------------------------------------------------------------------------------- build
def build_package(src, key, version: int, base, out, from_package=None, adapter_id: str | None = None,
                  level: int = codec.ZSTD_LEVEL, probes=("factors", "torch-logits", "ort"),
                  limits: Limits = DEFAULT_LIMITS, base_hash: str | None = None, export=None) -> dict:
    """Write a signed full (or, with ``from_package``, delta) package; return a summary.

    ``key`` is a private key path or object; ``base`` an HF folder or 'smollm2' (``base_hash`` skips hashing it
    again when the caller knows it). ``src`` may be a hot-swap export folder (its ``adapter.onnx_adapter``
    travels, with an ``ort`` probe); ``export`` names the hot-swap export for a PEFT folder (an
    ``adapter.onnx_adapter`` is written from the PEFT adapter for the export's LoRA inputs and travels too)."""
    from edge_lora.base import base_content_hash, is_causal_lm, resolve_base
    from edge_lora.ota.keys import key_id, load_private_key

    t0 = time.perf_counter()
    src = Path(src)
    from edge_lora.ota.manifest import MAX_VERSION

    if type(version) is not int or not 1 <= version <= MAX_VERSION:
        raise PackageError(f"--version must be an integer from 1 to {MAX_VERSION} (what every device accepts), "
                           f"not {version!r}.")
    if type(level) is not int or not 1 <= level <= 22:
        raise PackageError(f"--level {level!r}: zstd levels run from 1 to 22 (default {codec.ZSTD_LEVEL}).")
    if Path(out).is_dir():
        raise PackageError(f"--out {out} is a folder; give the package file to write, e.g. {Path(out) / 'v1.elpkg'}.")
    priv = load_private_key(key) if isinstance(key, (str, os.PathLike)) else key
    pub = priv.public_key()
    adapter_id = adapter_id or src.name
    check_adapter_id(adapter_id, "--id")
    payload = collect_payload(src, limits)
    base_path = resolve_base(base)
    bhash = base_hash or base_content_hash(base_path)
    export_dir = Path(export) if export is not None else (src if hotswap_export_meta(src) is not None else None)
    export_meta = hotswap_export_meta(export_dir) if export_dir is not None else None
    if export_dir is not None:
        if export_meta is None:
            raise PackageError(f"--export {export_dir} is not a hot-swap export folder (model.onnx + edge_lora.json "
                               "with mode 'hotswap'); export with `python -m edge_lora export --profile "
                               "cpu-hotswap`.")
        if export_meta.base_sha256 and export_meta.base_sha256 != bhash:
            raise CompatibilityError(f"{export_dir}/{EXPORT_META} says the export is of base "
                                     f"{export_meta.base_sha256[:16]}…, but --base {base} is {bhash[:16]}…. "
                                     "Package it with the base the export was made from.")
        if not any(r == "ort-adapter" for r, _ in payload.values()):
            if WEIGHTS_NAME not in payload:
                raise PackageError(f"{src} has no {ORT_SUFFIX} file and no PEFT adapter to write one from.")
            data_ = _ort_adapter_from_peft(src, export_meta)
            if len(data_) > limits.max_entry_bytes:
                raise PackageError(f"the generated {ORT_ADAPTER_FILE} is over the per-entry limit.")
            payload[ORT_ADAPTER_FILE] = ("ort-adapter", data_)
    summaries = _summaries(src)
    trained_on = summaries.get("metrics.json", {}).get("base_sha256")
    if trained_on and trained_on != bhash:
        raise CompatibilityError(f"{src}/metrics.json says the adapter was trained on base {trained_on[:16]}…, "
                                 f"but --base {base} is {bhash[:16]}…. Package it with the base it was trained on.")
    checks = _check_adapter(payload, base_path)

    files = [{"name": n, "role": r, "size": len(d), "sha256": codec.sha256(d)} for n, (r, d) in payload.items()]
    data = {n: d for n, (_, d) in payload.items()}

    # probes
    probe_list, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="edge-lora-pkg-") as tmp:
        for n, d in data.items():
            (Path(tmp) / n).write_bytes(d)
        for kind in probes:
            try:
                if kind == "factors":
                    probe_list.append(build_factors(data))
                elif kind == "torch-logits":
                    if WEIGHTS_NAME not in data:
                        raise ProbeSkipped("no PEFT weights in the payload")
                    from transformers import AutoConfig

                    if not is_causal_lm(AutoConfig.from_pretrained(base_path, local_files_only=True)):
                        raise ProbeSkipped("the base is not a causal LM")
                    from edge_lora.base import load_base

                    try:
                        probe_list.append(build_torch_logits(lambda: load_base(base_path)[0], tmp))
                    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
                        # PEFT's own refusals (NotImplementedError, NoMatchingPeftModuleError, shape errors),
                        # and whatever else stops base + adapter from running
                        raise PackageError(f"{src}: the torch-logits probe could not run the adapter on --base "
                                           f"{base} ({type(exc).__name__}: {exc}). Check that the "
                                           "adapter was trained on this base, or package with --probe factors "
                                           "to skip this probe.") from exc
                    checks["adapter_changes_output_max_abs"] = probe_list[-1]["adapter_effect_max_abs"]
                    if probe_list[-1]["adapter_effect_max_abs"] == 0.0:
                        raise PackageError(f"{src}: the adapter does not change the base model's output at all "
                                           "(all-zero update?); refusing to ship a no-op adapter.")
                elif kind == "ort":
                    ort_files = [n for n, (r, _) in payload.items() if r == "ort-adapter"]
                    if not ort_files:
                        continue  # a plain PEFT folder: nothing for ONNX Runtime travels
                    if export_dir is None:
                        raise ProbeSkipped(f"no hot-swap export to run {ort_files[0]} on (pass --export DIR)")
                    for n in ort_files:
                        probe = build_ort(export_dir, Path(tmp) / n, n)
                        if probe["adapter_effect_max_abs"] == 0.0:
                            raise PackageError(f"{src}: {n} does not change the export's output at all "
                                               "(all-zero update, or its parameters fit no LoRA input); refusing "
                                               "to ship a no-op adapter.")
                        probe_list.append(probe)
                    checks["ort_adapter_changes_output_max_abs"] = probe_list[-1]["adapter_effect_max_abs"]
                else:
                    raise PackageError(f"unknown probe kind {kind!r}; choose from factors, torch-logits, ort.")
            except ProbeSkipped as exc:
                skipped.append(f"{kind}: {exc}")
    if not probe_list:
        raise PackageError(f"No probe could be built for {src} ({'; '.join(skipped)}); the device would have no "
                           "way to check the adapter before switching to it.")

    # entries
    entries, blobs, delta, measured = [], [], None, {}
    old_files: dict[str, bytes] = {}
    if from_package is not None:
        old = open_package(from_package, pub, limits)
        om = old.manifest
        if old.is_delta:
            raise PackageError(f"--from {from_package} is itself a delta package; build deltas from the previous "
                               "full package.")
        if om["adapter_id"] != adapter_id:
            raise PackageError(f"--from {from_package} is adapter {om['adapter_id']!r}, not {adapter_id!r}.")
        if om["version"] >= version:
            raise PackageError(f"--from {from_package} is version {om['version']}; --version must be higher.")
        if om["base"]["content_hash"] != bhash:
            raise PackageError(f"--from {from_package} is bound to another base model; a delta cannot move an "
                               "adapter to a new base. Ship a full package.")
        from edge_lora.ota.manifest import decode_payload

        old_files = decode_payload(old, None, limits)
        delta = {"from_version": om["version"], "from_payload_digest": om["payload"]["digest"],
                 "unchanged": [], "measured": measured}
    for f in files:
        name, new = f["name"], data[f["name"]]
        prev = old_files.get(name)
        if delta is not None and prev is not None and codec.sha256(prev) == f["sha256"]:
            delta["unchanged"].append(name)
            continue
        options = {"zstd": (codec.zstd_compress(new, level), len(new))}
        if prev is not None:
            options["zstd-patch"] = (codec.zstd_patch_compress(new, prev, level), len(new))
            ops = codec.plan_tensor_delta(prev, new)
            if ops is not None:
                options["copy-ops"] = (codec.zstd_compress(ops, level), len(ops))
            measured[name] = {k: len(v[0]) for k, v in options.items()}
        enc = min(options, key=lambda k: len(options[k][0]))
        stored, decoded = options[enc]
        entries.append({"name": name, "encoding": enc, "stored_size": len(stored),
                        "stored_sha256": codec.sha256(stored), "decoded_size": decoded})
        blobs.append((name, stored))

    try:   # the manifest names the architecture from it: an unreadable one must not become "unknown"
        base_cfg = json.loads((base_path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{base_path / 'config.json'} cannot be read as JSON ({exc}); pass an HF model folder "
                         "saved with save_pretrained as --base.") from exc
    roles = {f["role"] for f in files}
    export_summary = summaries.get("export.json", {})
    requirements = {"min_reader_format": FORMAT_VERSION,
                    "runtimes": ({"peft": ">=0.13", "safetensors": ">=0.4"} if "peft-weights" in roles else {})
                    | ({"onnxruntime": ">=1.20"} if "ort-adapter" in roles else {}),
                    "onnx_opset": export_meta.opset if export_meta is not None else export_summary.get("opset")}
    raw_total = sum(f["size"] for f in files)
    stored_total = sum(len(b) for _, b in blobs)
    compression = {"codec": "zstd", "level": level, "payload_bytes": raw_total, "stored_bytes": stored_total,
                   "ratio": round(stored_total / raw_total, 4) if raw_total else None,
                   "quantization": _metadata(payload) or {"factors": "as trained (no edge_lora quantization)"},
                   "tensor_dtypes": checks.get("tensor_dtypes", {})}
    validation = {"packager_checks": {k: v for k, v in checks.items() if k != "tensor_dtypes"},
                  **{k: v for k, v in summaries.items() if k != "export.json"}}
    if skipped:
        validation["probes_skipped"] = skipped
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"edge_lora {__version__}",
        "adapter_id": adapter_id, "version": version, "signer": {"key_id": key_id(pub)},
        "base": {"content_hash": bhash, "name": base_path.name,
                 "architecture": (base_cfg.get("architectures") or [base_cfg.get("model_type", "unknown")])[0]},
        "requirements": requirements,
        "payload": {"files": files, "total_bytes": raw_total, "digest": payload_digest(files)},
        "entries": entries, "delta": delta, "compression": compression, "validation": validation,
        "probes": probe_list,
    }
    mbytes = canonical_json(manifest)
    if len(mbytes) > limits.max_manifest_bytes:
        raise PackageError(f"the manifest is {len(mbytes)} bytes, over the {limits.max_manifest_bytes}-byte limit.")
    blob = pack_container(mbytes, priv.sign(mbytes), key_id(pub), blobs)
    try:
        write_atomic(out, blob)
    except OSError as exc:
        raise PackageError(f"--out {out}: cannot write the package there ({exc.strerror or exc}); pass a file path "
                           "in a folder you can write.") from exc
    notes = []
    full_estimate = sum(v["zstd"] for v in measured.values())
    if delta is not None and full_estimate and stored_total > 0.8 * full_estimate:
        notes.append("the delta is not much smaller than a full package (most tensors changed); consider "
                     "shipping the full package, which installs without the previous version")
    return {"out": str(out), "kind": "delta" if delta else "full", "notes": notes, "adapter_id": adapter_id,
            "version": version, "bytes": len(blob), "payload_bytes": raw_total,
            "entries": {e["name"]: e["encoding"] for e in entries},
            "unchanged": delta["unchanged"] if delta else [], "measured": measured,
            "probes": [p["kind"] for p in probe_list], "skipped": skipped, "base_hash": bhash,
            "seconds": round(time.perf_counter() - t0, 3)}


# ------------------------------------------------------------------------------------------------- verbs
# What `python -m edge_lora keygen | verify | install | rollback` call: the key files by path, sizes in MiB.
def size_limits(max_mb: float | None = None) -> Limits:
    """Limits with one size limit per entry, per payload and per package of ``max_mb`` MiB (None: defaults)."""
    if max_mb is None:
        return Limits()
    import math

    if not (isinstance(max_mb, (int, float)) and math.isfinite(max_mb) and 0 < max_mb <= 1 << 30):
        raise PackageError(f"--max-mb {max_mb}: give a positive, finite size in MiB (the default is 1024).")
    b = int(max_mb * (1 << 20))
    return Limits(max_package_bytes=b, max_entry_bytes=b, max_total_bytes=b)


def new_key_pair(out: str | os.PathLike, force: bool = False) -> tuple[Path, Path, str]:
    """Write an Ed25519 key pair into the folder ``out``: (private key path, public key path, key id)."""
    from edge_lora.ota.keys import key_id, keygen, load_public_key

    priv, pub = keygen(out, force=force)
    return Path(priv), Path(pub), key_id(load_public_key(pub))


def verify_file(package, pubkey: str | os.PathLike, root=None, base=None, max_mb: float | None = None,
                export=None) -> dict:
    """Every check ``install`` makes, writing nothing, with the probes run: ``base`` an HF folder or 'smollm2'
    (also runs the torch-logits probe) or a 64-hex content hash; ``export`` the hot-swap export for ort probes
    (default: the one recorded under ``root``)."""
    from edge_lora.ota.install import device_export, verify_package
    from edge_lora.ota.keys import load_public_key

    probe_base = None
    if base is not None and not re.fullmatch(r"[0-9a-f]{64}", str(base)):
        from edge_lora.base import resolve_base

        probe_base = resolve_base(base)
    rep = verify_package(package, load_public_key(pubkey), root, base, size_limits(max_mb), run_probe=True,
                         probe_base=probe_base, probe_export=device_export(root, export))
    rep.setdefault("probes", "not run (delta without --root)")
    return rep


def install_file(package, pubkey: str | os.PathLike, root, base=None, max_mb: float | None = None,
                 export=None) -> dict:
    """Verify and install ``package`` atomically under ``root`` (see edge_lora.ota.install.install)."""
    from edge_lora.ota.install import install
    from edge_lora.ota.keys import load_public_key

    return install(package, load_public_key(pubkey), root, base, size_limits(max_mb), export=export)


def rollback_version(root, adapter_id: str, to: int | None = None, pubkey: str | os.PathLike | None = None,
                     base=None, export=None) -> dict:
    """Switch ``adapter_id`` under ``root`` back to its kept previous version (or ``to``); with ``pubkey`` the kept
    version's signature is checked again."""
    from edge_lora.ota.install import rollback
    from edge_lora.ota.keys import load_public_key

    public_key = load_public_key(pubkey) if pubkey else None
    return rollback(root, adapter_id, to=to, public_key=public_key, base=base, export=export)


# ---------------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class PackageInput:
    src: Path                        # a PEFT folder, or a hot-swap export folder (its adapter file travels)
    key: object                      # the signing key: a private key path or object
    base: str                        # the base the adapter is bound to: an HF folder or 'smollm2'
    out: Path                        # the package file to write
    version: int = 1
    adapter_id: str | None = None    # default: the source folder's name
    from_package: Path | None = None   # the previous full package: write a delta against it
    export: Path | None = None       # the hot-swap export a PEFT folder is packaged for


@dataclass(frozen=True)
class PackageConfig:
    level: int = codec.ZSTD_LEVEL
    probes: tuple[str, ...] = ("factors", "torch-logits", "ort")
    limits: Limits = DEFAULT_LIMITS


def run(inp: PackageInput, config: PackageConfig = PackageConfig()) -> tuple[Path, StageReport]:
    """The stage entry (every stage module has one: ``run(input, config) -> (output, StageReport)``)."""
    start = time.perf_counter()
    summary = build_package(inp.src, inp.key, inp.version, inp.base, inp.out, from_package=inp.from_package,
                            adapter_id=inp.adapter_id, level=config.level, probes=config.probes,
                            limits=config.limits, export=inp.export)
    metrics = {k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool, list))}
    return Path(inp.out), StageReport(stage="package", metrics=metrics, seconds=time.perf_counter() - start,
                                      config={"level": config.level, "probes": list(config.probes)})
