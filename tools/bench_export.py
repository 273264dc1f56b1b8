"""Benchmark the export stage on SmolLM2 and write the ``## Export`` section of BENCHMARKS.md.

    python tools/bench_export.py                                   # demo adapter date-iso-r16, 2 threads
    python tools/bench_export.py --adapter PATH --rounds 10 --no-write

Measures
1. end-to-end ``python -m edge_lora export`` (load, merge, export, validate) for cpu-fp32 and cpu-hotswap:
   wall time and peak RSS of the child process, stage seconds and validation metrics from report.json;
2. decode latency (ms/token, batch 1, KV cache, ONNX Runtime CPU) of the plain base export, the merged
   export, the hot-swap export with no adapter and with the adapter active, interleaved A B A B (the order
   rotates every round) so drift hits all variants alike; medians over rounds;
3. where the hot-swap time goes: graph node counts (all, and LoRA branch nodes: every node between a ``lora.*``
   input and the Add that joins the base output), and ORT's profiler over decode steps: time by op type and in
   the LoRA branch nodes.
All exports use the packed projections of ``export.fuse_projections`` (q/k/v and gate/up: one MatMul + Split,
one LoRA branch per group); the base is re-exported each run (unless --skip-export) so it matches.
Only the ``## Export`` section of BENCHMARKS.md is replaced; other tools own the other sections.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmarks_md import write_section  # noqa: E402

import numpy as np


def child_export(args) -> None:
    """Run in a child process: the CLI in-process, then print our own peak RSS (the export's)."""
    from edge_lora.cli import main

    code = main(["export", "--base", args.base, "--adapter", args.adapter, "--profile", args.profile,
                 "--out", args.out, "--force", "--quiet"])
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"exit_code": code, "peak_rss_mb": rss_kb / 1024}))


def run_export(base: str, adapter: str, profile: str, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child-export", "--base", base, "--adapter", adapter,
                           "--profile", profile, "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"export {profile} failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    return {"profile": profile, "wall_s": wall, "peak_rss_mb": child["peak_rss_mb"], "status": report["status"],
            "stage_s": {k: v["seconds"] for k, v in stages.items()},
            "validate": stages["validate"]["metrics"]}


# ------------------------------------------------------------------------------------------ decode
def decode_ms(session, run_options, prompt: np.ndarray, n_tokens: int, cpu: list | None = None) -> list[float]:
    """Wall ms per decode step; with ``cpu``, the process CPU ms of each step are appended to it (less sensitive
    than wall time to other jobs on a shared machine, but it counts spinning worker threads too)."""
    from edge_lora.runtimes.ort_generate import OrtCausalLM

    lm = OrtCausalLM(session, None, run_options)
    mask = np.ones_like(prompt)
    from edge_lora.runtimes.ort_session import empty_past

    logits, past = lm.step(prompt, mask, empty_past(session, 1))
    times = []
    for _ in range(n_tokens):
        ids = logits.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=-1)
        t, c = time.perf_counter(), time.process_time()
        logits, past = lm.step(ids, mask, past)
        times.append((time.perf_counter() - t) * 1e3)
        if cpu is not None:
            cpu.append((time.process_time() - c) * 1e3)
    return times


def bench_decode(folders: dict[str, Path], adapter_file: Path, threads: int, rounds: int, n_tokens: int) -> dict:
    from edge_lora.runtimes.hotswap import HotswapSession
    from edge_lora.runtimes.ort_session import load_session

    hot = HotswapSession(folders["hotswap"], threads=threads)
    t = time.perf_counter()
    hot.load_adapter("a", adapter_file)
    load_adapter_ms = (time.perf_counter() - t) * 1e3
    variants = {
        "base": (load_session(folders["base"], threads=threads), None),
        "merged": (load_session(folders["merged"], threads=threads), None),
        "hotswap, no adapter": (hot.session, None),
        "hotswap + adapter": (hot.session, hot.run_options("a")),
    }
    # equality on SmolLM2 itself: the hot-swap graph with no adapter vs the base export, with the adapter vs
    # the merged export, and bit-identical outputs after swapping the adapter off and on again
    from edge_lora.runtimes.ort_session import full_feeds, probe_ids

    ids = probe_ids(49152, 64, seed=3)
    logits = {name: s.run(None, full_feeds(s, ids), o)[0] for name, (s, o) in variants.items()}
    again = hot.session.run(None, full_feeds(hot.session, ids), hot.run_options("a"))[0]
    checks = {
        "hotswap_no_adapter_vs_base_max_abs": float(np.abs(logits["hotswap, no adapter"] - logits["base"]).max()),
        "hotswap_adapter_vs_merged_max_abs": float(np.abs(logits["hotswap + adapter"] - logits["merged"]).max()),
        "hotswap_adapter_vs_merged_top1": float((logits["hotswap + adapter"].argmax(-1)
                                                 == logits["merged"].argmax(-1)).mean()),
        "swap_back_bit_identical": bool(np.array_equal(again, logits["hotswap + adapter"])),
    }
    prompt = np.arange(100, 132, dtype=np.int64)[None, :]
    for session, options in variants.values():   # warm-up
        decode_ms(session, options, prompt, 8)
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    cpu_round: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            session, options = variants[name]
            cpu: list[float] = []
            per_round[name].append(statistics.median(decode_ms(session, options, prompt, n_tokens, cpu)))
            cpu_round[name].append(statistics.median(cpu))
    out = {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                  "cpu_ms": statistics.median(cpu_round[name])}
           for name, v in per_round.items()}
    base = out["base"]["median_ms"]
    for name in out:
        out[name]["vs_base"] = out[name]["median_ms"] / base - 1
        out[name]["cpu_vs_base"] = out[name]["cpu_ms"] / out["base"]["cpu_ms"] - 1
    return {"variants": out, "checks": checks, "load_adapter_ms": load_adapter_ms, "rounds": rounds, "tokens": n_tokens,
            "threads": threads}


def lora_nodes(folder: Path) -> set[str]:
    """Names of the LoRA branch nodes: from each ``lora.*`` input down through MatMuls, to the joining Add."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    out, todo = set(), [i.name for i in graph.input if i.name.startswith("lora.")]
    while todo:
        for node in readers.get(todo.pop(), []):
            if node.name in out:
                continue
            out.add(node.name)
            if node.op_type in ("MatMul", "Gather"):
                todo.extend(node.output)
    return out


def graph_counts(folder: Path) -> dict:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    by_op: dict[str, int] = {}
    for node in graph.node:
        by_op[node.op_type] = by_op.get(node.op_type, 0) + 1
    lora = lora_nodes(folder)
    lora_ops: dict[str, int] = {}
    for node in graph.node:
        if node.name in lora:
            lora_ops[node.op_type] = lora_ops.get(node.op_type, 0) + 1
    return {"nodes": len(graph.node), "MatMul": by_op.get("MatMul", 0), "Split": by_op.get("Split", 0),
            "lora_nodes": len(lora), "lora_ops": lora_ops,
            "lora_inputs": sum(1 for i in graph.input if i.name.startswith("lora."))}


def profile_decode(folder: Path, adapter_file: Path | None, threads: int, n_tokens: int) -> dict:
    """Op-type time of n decode steps from ORT's profiler; LoRA branch nodes (see lora_nodes) counted apart."""
    import onnxruntime as ort

    from edge_lora.runtimes.ort_session import session_options

    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path("/tmp") / f"edge_lora_prof_{os.getpid()}")
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    options, keep = None, None
    if adapter_file is not None:
        from edge_lora.formats import ort_adapter
        from edge_lora.stages.export_onnx import read_meta

        # a float file is memory-mapped as it is; a quantized one (the factor quantizer's codes) is expanded to
        # float for this export's LoRA groups, as HotswapSession.load_adapter does
        meta = read_meta(folder)
        keep, _ = ort_adapter.load(adapter_file, meta.lora_groups, meta.lora_unreachable)
        options = ort.RunOptions()
        options.add_active_adapter(keep)
    decode_ms(session, options, np.arange(100, 132, dtype=np.int64)[None, :], n_tokens)
    path = session.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink(missing_ok=True)
    lora = lora_nodes(folder)
    by_op: dict[str, float] = {}
    lora_us = total_us = 0.0
    kernels = 0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"]
        total_us += e["dur"]
        kernels += 1
        if e["name"][:-len("_kernel_time")] in lora:
            lora_us += e["dur"]
    steps = n_tokens + 1
    return {"kernel_ms_per_step": total_us / 1e3 / steps, "lora_ms_per_step": lora_us / 1e3 / steps,
            "kernels_per_step": kernels / steps,
            "ms_per_step_by_op": {k: v / 1e3 / steps for k, v in by_op.items()},
            "top_ops_ms_per_step": dict(sorted(((k, v / 1e3 / steps) for k, v in by_op.items()),
                                               key=lambda kv: -kv[1])[:6])}


# ------------------------------------------------------------------------------------------ markdown
def section(results: dict, command: str) -> str:
    m, h = results["exports"]["cpu-fp32"], results["exports"]["cpu-hotswap"]
    d = results["decode"]
    lines = ["## Export", "",
             f"Written by `tools/bench_export.py` on {results['date']} ({results['machine']}). Command:", "",
             f"    {command}", "",
             f"Base `{results['base']}`, adapter `{results['adapter']}`. End to end = `python -m edge_lora export` "
             "in a fresh process (load, merge, optimum export, validation against PyTorch + PEFT), one run each.",
             "", "| profile | status | wall s | peak RSS MB | load | merge | export | validate | top-1 | mean KL | "
             "greedy agr. | EM ref | EM cand |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (m, h):
        v, s = r["validate"], r["stage_s"]
        lines.append(
            f"| {r['profile']} | {r['status']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{s.get('load', 0):.1f} | {s.get('merge', 0):.1f} | {s.get('export', 0):.1f} | "
            f"{s.get('validate', 0):.1f} | {v.get('top1_agreement', float('nan')):.4f} | "
            f"{v.get('mean_kl', float('nan')):.2e} | {v.get('generation_agreement', float('nan')):.3f} | "
            f"{v.get('exact_match_reference', float('nan')):.3f} | {v.get('exact_match_candidate', float('nan')):.3f} |")
    lines += ["", f"Decode, batch 1, 32-token prompt then {d['tokens']} tokens with the KV cache; ONNX Runtime "
              f"{results['ort']} CPUExecutionProvider, fp32, {d['threads']} intra-op threads, spinning on. Median "
              f"over {d['rounds']} interleaved rounds (order rotates each round) of the per-round median ms/token:",
              "", "| variant | ms/token (median) | min | max | vs base | CPU ms/token | CPU vs base |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in d["variants"].items():
        lines.append(f"| {name} | {v['median_ms']:.2f} | {v['min_ms']:.2f} | {v['max_ms']:.2f} | "
                     f"{v['vs_base'] * 100:+.1f}% | {v.get('cpu_ms', float('nan')):.2f} | "
                     f"{v.get('cpu_vs_base', float('nan')) * 100:+.1f}% |")
    lines += ["", ("CPU ms/token is the process's CPU time per step (all ORT threads, spinning included): steadier "
                   "than wall time when other jobs share the cores.")]
    lines += ["", f"Loading the adapter file into a live session (LoraAdapter.Load + probe check): "
              f"{d['load_adapter_ms']:.1f} ms.", "",
              "Equality on SmolLM2, 64-token input, logits: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float)
                                                                       else f"{k} = {v}"
                                                                       for k, v in d["checks"].items()) + "."]
    g = results.get("graphs")
    if g:
        lines += ["", ("Graph size (packed projections: q/k/v and gate/up are one MatMul + Split, and one LoRA "
                       "branch per group in the hot-swap graph):"), "",
                  "| export | nodes | MatMul | Split | LoRA inputs | LoRA branch nodes |", "|---|---:|---:|---:|---:|---|"]
        for name, v in g.items():
            ops = ", ".join(f"{k} {n}" for k, n in sorted(v["lora_ops"].items()))
            lines.append(f"| {name} | {v['nodes']} | {v['MatMul']} | {v['Split']} | {v['lora_inputs']} | "
                         f"{v['lora_nodes']}{' (' + ops + ')' if ops else ''} |")
    p = results.get("profile")
    if p:
        lines += ["", "Where the hot-swap time goes (ORT profiler, kernel time per decode step):", "",
                  "| variant | kernels/step | kernels ms/step | LoRA branch ms/step | top ops (ms/step) |",
                  "|---|---:|---:|---:|---|"]
        for name, v in p.items():
            ops = ", ".join(f"{k} {t:.2f}" for k, t in v["top_ops_ms_per_step"].items())
            lines.append(f"| {name} | {v.get('kernels_per_step', float('nan')):.0f} | {v['kernel_ms_per_step']:.2f} | "
                         f"{v['lora_ms_per_step']:.2f} | {ops} |")
    if results.get("notes"):
        lines += [""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--adapter", default=None, help="default: <cache>/adapters/date-iso-r16")
    parser.add_argument("--work", default="/tmp/edge_lora_bench_export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--skip-export", action="store_true",
                        help="reuse the exports and their timings from the last run in --work (decode only)")
    parser.add_argument("--child-export", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_export:
        return child_export(args)

    import onnxruntime as ort

    from edge_lora.base import cache_dir, load_base
    from edge_lora.stages.export_onnx import ADAPTER_FILE, export_merged

    adapter = args.adapter or str(cache_dir() / "adapters" / "date-iso-r16")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = "python tools/bench_export.py" + "".join(
        f" --{k} {v}" for k, v in (("adapter", args.adapter), ("rounds", args.rounds), ("threads", args.threads))
        if v and (k != "rounds" or v != 8) and (k != "threads" or v != 2))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "base": args.base, "adapter": adapter,
               "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}",
               "ort": ort.__version__, "notes": []}
    load_start = os.getloadavg()[0]
    previous = work / "bench_export.json"
    if args.skip_export and previous.is_file():
        before = json.loads(previous.read_text())
        results["exports"] = before["exports"]
        results["notes"].append(f"exports: timings from this tool's run of {before['date']} (--skip-export).")
        results["notes"] += [n for n in before["notes"] if n.startswith("1-minute load average during the exp")]
    else:
        exports = {}
        for profile in ("cpu-fp32", "cpu-hotswap"):
            print(f"export {profile} ...", file=sys.stderr)
            exports[profile] = run_export(args.base, adapter, profile, work / profile)
            print(json.dumps({k: v for k, v in exports[profile].items() if k != "validate"}), file=sys.stderr)
        results["exports"] = exports
        results["notes"].append(f"1-minute load average during the exports: {load_start:.1f} at start, "
                                f"{os.getloadavg()[0]:.1f} at the end (the export itself loads up to 2).")
    load_decode = os.getloadavg()[0]

    base_dir = work / "base"
    if not args.skip_export or not (base_dir / "model.onnx").is_file():
        print("export base ...", file=sys.stderr)
        shutil.rmtree(base_dir, ignore_errors=True)
        base_dir.mkdir()
        model, tokenizer = load_base(args.base)
        export_merged(model, tokenizer, base_dir)
        del model
    folders = {"base": base_dir, "merged": work / "cpu-fp32", "hotswap": work / "cpu-hotswap"}
    adapter_file = folders["hotswap"] / ADAPTER_FILE
    print("decode ...", file=sys.stderr)
    results["decode"] = bench_decode(folders, adapter_file, args.threads, args.rounds, args.tokens)
    results["graphs"] = {"base": graph_counts(folders["base"]), "hotswap": graph_counts(folders["hotswap"])}
    results["profile"] = {
        "base": profile_decode(folders["base"], None, args.threads, 16),
        "hotswap, no adapter": profile_decode(folders["hotswap"], None, args.threads, 16),
        "hotswap + adapter": profile_decode(folders["hotswap"], adapter_file, args.threads, 16),
    }
    results["notes"].append(f"1-minute load average during the decode benchmark: {load_decode:.1f} at start, "
                            f"{os.getloadavg()[0]:.1f} at the end; on a busy machine absolute ms/token are "
                            "inflated and noisy, the interleaved ratios less so.")
    overhead = results["decode"]["variants"]["hotswap + adapter"]["vs_base"]
    results["notes"].append(f"hot-swap decode overhead vs the plain base export: {overhead * 100:+.1f}% "
                            f"(target ≤ 5%).")
    (work / "bench_export.json").write_text(json.dumps(results, indent=2))
    text = section(results, command)
    if args.no_write:
        print(text)
    else:
        write_section("Export", text.split("\n", 1)[1] if text.startswith("## Export") else text)
        print(f"wrote ## Export to {REPO / 'BENCHMARKS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
