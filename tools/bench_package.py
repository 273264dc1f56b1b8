"""Benchmark OTA packages on a trained demo adapter and write the "## OTA packages" section of BENCHMARKS.md.

    python tools/bench_package.py                       # ~/.cache/edge_lora/adapters/date-iso-r16, base smollm2
    python tools/bench_package.py --adapter PATH --base smollm2 --repeats 5 --no-write

Measures: package size against the raw PEFT adapter; delta size when one layer changes and when every tensor
changes (a full retrain), for each delta method (zstd alone, zstd with the previous file as a --patch-from
dictionary, per-tensor copy-ops); device-side verify and install times (medians over --repeats, fresh root
each time), with the factors probe, and once with the torch-logits probe (which loads the base model).

The one-layer and full-retrain versions are made from the trained adapter: one layer's LoRA tensors (or all of
them) are multiplied by (1 + 0.05·noise), which changes every float in them, as further training does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTION = "## OTA packages"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402
DEMO_ADAPTERS = ("date-iso-r16", "date-iso-patterns")


def find_adapter(arg: str | None) -> Path | None:
    from edge_lora.base import cache_dir

    if arg:
        return Path(arg)
    for name in DEMO_ADAPTERS:
        p = cache_dir() / "adapters" / name
        if (p / "adapter_config.json").is_file() and (p / "adapter_model.safetensors").is_file():
            return p
    return None


def perturbed_copy(src: Path, dst: Path, layer: int | None, seed: int) -> Path:
    """A copy of the adapter with one layer's LoRA tensors (or all, layer=None) changed."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    rng = np.random.default_rng(seed)
    with safe_open(str(src / "adapter_model.safetensors"), "np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, t in tensors.items():
        if layer is None or f"layers.{layer}." in k:
            tensors[k] = (t * (1 + 0.05 * rng.standard_normal(t.shape))).astype(t.dtype)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata=meta)
    return dst


def layers_of(adapter: Path) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "np") as f:
        return sorted({int(m.group(1)) for k in f.keys() if (m := re.search(r"layers\.(\d+)\.", k))})


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def fmt_bytes(n: int) -> str:
    return f"{n:,}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", help="trained PEFT adapter folder (default: the demo adapter in the cache)")
    ap.add_argument("--base", default="smollm2", help="its base model (default %(default)s)")
    ap.add_argument("--id", default=None, help="adapter id (default: the folder name)")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats, median reported (default 5)")
    ap.add_argument("--level", type=int, default=19, help="zstd level (default 19)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    args = ap.parse_args(argv)

    adapter = find_adapter(args.adapter)
    if adapter is None or not (adapter / "adapter_model.safetensors").is_file():
        from edge_lora.base import cache_dir

        where = args.adapter or f"{cache_dir() / 'adapters'}/{{{','.join(DEMO_ADAPTERS)}}}"
        print(f"No trained demo adapter at {where}. Train one first:\n    python tools/train_demo_adapter.py\n"
              "or pass --adapter PATH to a PEFT adapter folder.", file=sys.stderr)
        return 1

    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from edge_lora.base import base_content_hash, resolve_base
    from edge_lora.ota.install import install, verify_package
    from edge_lora.ota.keys import keygen, load_private_key, load_public_key
    from edge_lora.ota.manifest import open_package
    from edge_lora.stages.package import build_package

    aid = args.id or adapter.name
    base_path = resolve_base(args.base)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    log(f"hashing the base model {base_path} ...")
    t_hash, bhash = timed(lambda: base_content_hash(base_path), 1)
    raw = sum((adapter / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors"))
    layers = layers_of(adapter)
    mid = layers[len(layers) // 2] if layers else None

    with tempfile.TemporaryDirectory(prefix="edge-lora-bench-") as tmp:
        tmp = Path(tmp)
        priv, pub = keygen(tmp / "keys")
        priv, pub = load_private_key(priv), load_public_key(pub)
        kw = {"key": priv, "base": base_path, "base_hash": bhash, "adapter_id": aid, "level": args.level}
        log(f"packaging {adapter} (v1, with torch-logits probe) ...")
        v1 = tmp / "v1.elpkg"
        t_pack, rep1 = timed(lambda: build_package(adapter, version=1, out=v1, **kw), 1)
        one = perturbed_copy(adapter, tmp / "one" / aid, mid, seed=1)
        full = perturbed_copy(adapter, tmp / "full" / aid, None, seed=2)
        log("packaging deltas ...")
        rows = {}
        for label, src in (("one layer changed", one), ("full retrain", full)):
            d = tmp / f"{label[:3]}-delta.elpkg"
            rep = build_package(src, version=2, out=d, from_package=v1, probes=("factors",), **kw)
            rows[label] = {"delta": d.stat().st_size,
                           "measured": rep["measured"].get("adapter_model.safetensors", {}),
                           "chosen": rep["entries"], "path": d}
        m1 = open_package(v1, pub).manifest
        v1_size = v1.stat().st_size
        manifest_bytes = len(json.dumps(m1, separators=(",", ":")))

        def fresh_root(with_v1: bool) -> Path:
            r = Path(tempfile.mkdtemp(dir=tmp, prefix="root-"))
            if with_v1:
                install(v1, pub, r, base=bhash)
            else:
                (r / "base.json").write_text(json.dumps({"content_hash": bhash}))
            return r

        log("timing verify/install ...")
        t_verify, _ = timed(lambda: verify_package(v1, pub), args.repeats)
        roots = [fresh_root(False) for _ in range(args.repeats)]
        t_install, _ = timed(lambda: install(v1, pub, roots.pop()), args.repeats)
        t_delta = {}
        for label, row in rows.items():
            roots = [fresh_root(True) for _ in range(args.repeats)]
            t_delta[label], _ = timed(lambda row=row, roots=roots: install(row["path"], pub, roots.pop()),
                                      args.repeats)
        reps_torch = max(1, min(3, args.repeats))
        roots = [fresh_root(False) for _ in range(reps_torch)]
        t_torch, rep_t = timed(lambda: install(v1, pub, roots.pop(), base=base_path), reps_torch)
        torch_status = {p["kind"]: p["status"] for p in rep_t["probes"]}

    pct = lambda n: f"{100 * n / raw:.1f}%"
    n_mid = sum(1 for f in m1["probes"][0].get("modules", []) if f".layers.{mid}." in f["module"])
    one_label = f"one layer changed (layer {mid} of {len(layers)}: {n_mid} modules)"
    lines = [
        SECTION, "",
        (f"Adapter `{adapter.name}` ({rep1['payload_bytes']:,} bytes of PEFT files, "
        f"{m1['validation']['packager_checks'].get('params', 0):,} params, "
        f"{', '.join(f'{k}×{v}' for k, v in m1['compression']['tensor_dtypes'].items())} tensors) on "
        f"`{base_path.name}`; zstd level {args.level}. {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}; times are medians of {args.repeats} runs (torch-logits install: "
        f"{reps_torch}), each install into a fresh root on the local disk, fsync included."),
        "",
        "| artifact | bytes | vs raw PEFT adapter |",
        "|---|---:|---:|",
        f"| raw PEFT adapter (adapter_config.json + adapter_model.safetensors) | {fmt_bytes(raw)} | 100% |",
        (f"| full package (manifest {manifest_bytes:,} B incl. probes, signature, zstd payload) | "
        f"{fmt_bytes(v1_size)} | {pct(v1_size)} |"),
    ]
    for label, row in rows.items():
        name = one_label if label.startswith("one") else "full retrain (every tensor changed)"
        lines.append(f"| delta package, {name} | {fmt_bytes(row['delta'])} | {pct(row['delta'])} |")
    lines += ["", "Delta methods for `adapter_model.safetensors` (stored bytes; the smallest is shipped):", "",
              ("| change | zstd, no delta | zstd with previous file as dictionary (--patch-from) | "
              "per-tensor copy-ops + zstd | shipped |"), "|---|---:|---:|---:|---|"]
    for label, row in rows.items():
        ms = row["measured"]
        lines.append(f"| {label} | {fmt_bytes(ms.get('zstd', 0))} | {fmt_bytes(ms.get('zstd-patch', 0))} | "
                     f"{fmt_bytes(ms.get('copy-ops', 0))} | {row['chosen'].get('adapter_model.safetensors')} |")
    lines += ["", "| device-side step | median |", "|---|---:|",
              f"| verify full package (signature, sha256, zstd decode, factors probe) | {t_verify * 1000:.0f} ms |",
              (f"| install full package (verify + stage + fsync + factors probe + rename + pointer switch) | "
              f"{t_install * 1000:.0f} ms |")]
    for label in rows:
        lines.append(f"| install delta over v1, {label} | {t_delta[label] * 1000:.0f} ms |")
    lines += [(f"| install full package with the torch-logits probe (loads the base, runs PEFT; "
              f"{torch_status.get('torch-logits')}) | {t_torch * 1000:.0f} ms |"),
              f"| base model content hash (once per device; recorded in ROOT/base.json) | {t_hash * 1000:.0f} ms |",
              f"| build the full package (packager side, incl. torch-logits probe) | {t_pack:.1f} s |",
              "", (f"Reproduce: `python tools/bench_package.py --adapter {adapter} --base {args.base} "
                  f"--repeats {args.repeats}`"), ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        body = text.split("\n", 1)[1] if text.startswith(SECTION) else text
        write_section(SECTION.removeprefix("## "), body, path=Path(args.out))
        log(f"wrote the '{SECTION}' section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
