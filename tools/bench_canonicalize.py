"""Benchmark: canonicalize a 7B-shaped adapter from its factors, against a dense-ΔW SVD baseline.

    python tools/bench_canonicalize.py            # writes the "## Canonicalize" section of BENCHMARKS.md
    python tools/bench_canonicalize.py --no-write

The adapter is Llama-2-7B-shaped: 32 layers × q,k,v,o (4096×4096), gate, up (11008×4096), down (4096×11008),
rank 16. The factor path does two thin QRs and an r×r SVD per module; the baseline builds ΔW = s·B·A and takes
its SVD (full_matrices=False), which is what a naive "SVD the update" does. The baseline runs on a few modules
of each shape and is extrapolated per module (its cost does not depend on the adapter's rank).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from edge_lora.stages.canonicalize import canonicalize, canonicalize_module  # noqa: E402
from edge_lora.stages.tensorize import planted_adapter  # noqa: E402

SHAPES_7B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
             "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
             "mlp.down_proj": (4096, 11008)}
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchmarks_md import write_section  # noqa: E402


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load:.1f} at start")


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-modules", type=int, default=2, help="dense baseline modules per shape")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    # One thread for the factor path: MKL's threaded QR on tall-skinny matrices is slower than one thread and
    # collapses when other processes hold the cores. The dense baseline gets both cores.
    torch.set_num_threads(1)
    env = machine()
    adapter = planted_adapter(layers=32, r=16, shapes=SHAPES_7B, seed=0)
    n = len(adapter.modules)
    factor_total = best_of(lambda: canonicalize(adapter), args.repeats)
    print(f"factor path: {n} modules in {factor_total:.2f} s", flush=True)
    torch.set_num_threads(2)
    t = time.perf_counter()
    canonicalize(adapter)
    factor_two_threads = time.perf_counter() - t
    print(f"factor path, 2 threads: {factor_two_threads:.2f} s", flush=True)

    rows = []
    for shape in sorted(set(SHAPES_7B.values())):
        names = [nm for nm, m in adapter.modules.items() if (m.d_out, m.d_in) == shape]
        torch.set_num_threads(1)
        fac = best_of(lambda: [canonicalize_module(adapter.modules[nm]) for nm in names[:8]], args.repeats) / 8
        torch.set_num_threads(2)
        dense_times = []
        for nm in names[:args.dense_modules]:
            m = adapter.modules[nm]
            t = time.perf_counter()
            delta = m.scale * (m.B @ m.A)
            torch.linalg.svd(delta, full_matrices=False)
            dense_times.append(time.perf_counter() - t)
            del delta
        dense = min(dense_times)
        rows.append((shape, len(names), fac, dense))
        print(f"{shape}: factor {fac * 1e3:.1f} ms/module, dense {dense:.2f} s/module", flush=True)
    dense_total = sum(count * dense for _, count, _, dense in rows)

    body = [
        f"`{' '.join(['python tools/bench_canonicalize.py', *sys.argv[1:]])}` — gauge-fixed SVD of every module of a Llama-2-7B-shaped adapter "
        "(32 layers × 7 projections, d 4096, ffn 11008, rank 16; 224 modules), from the factors (two thin QRs and "
        "an r×r SVD per module, float64), against building ΔW = s·B·A and taking its SVD (float32, "
        "full_matrices=False).", "",
        f"Machine: {env}. Best of {args.repeats}; factor path on 1 torch thread, dense baseline on 2. The dense "
        f"baseline ran on {args.dense_modules} module(s) per shape and is extrapolated per module (its cost does "
        "not depend on the rank).", "",
        "| module shape (out×in) | modules | factor path ms/module | dense ΔW SVD s/module | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for shape, count, fac, dense in rows:
        body.append(f"| {shape[0]}×{shape[1]} | {count} | {fac * 1e3:.1f} | {dense:.2f} | {dense / fac:,.0f}× |")
    body += ["", f"All {n} modules: factor path **{factor_total:.2f} s** (measured); dense baseline "
                 f"≈ {dense_total:,.0f} s (extrapolated) — **{dense_total / factor_total:,.0f}×**.", "",
             f"The same factor path with 2 torch threads took {factor_two_threads:.2f} s. `canonicalize` and "
             "`compress` run on one thread by default: on a busy 2-core machine MKL's threaded QR of a d × 16 "
             "matrix collapsed (0.47 s against 1.6 ms for one 11008×16 QR, measured while other jobs held the "
             "cores), while on an idle one the second thread gains little."]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section("Canonicalize", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
