"""Merge on swap, measured on its own: decode with a swapped-in adapter against the same base without one, swap and
merge time, and resident memory; llama.cpp with the adapter unmerged in the same rounds. Writes the
``## Merge on swap`` section of BENCHMARKS.md.

    python tools/bench_merge_swap.py [--rounds 9] [--threads 2] [--lengths 16,128,512] [--decode 32] [--no-write]

SmolLM2-135M-Instruct with the ``date-iso-r16`` adapter, hot-swap exports of the ``cpu-fast-hotswap`` profile (int8,
blocks of 32) and of the same with int8 in blocks of 128 with zero points (cached in
~/.cache/edge_lora/bench/merge_swap). Each round runs, per runner: a turn without adapter (``swap(None)``: llama.cpp's
base, ORT's branch-free base session), then a turn with it (llama.cpp: the GGUF LoRA unmerged; ORT: the adapter
active on the LoRA branches at once, the turn waiting for the background merge, then decoding on merged weights).
So each "with" turn runs right after its own "without" turn, and the overhead is a per-round ratio (median and
range over rounds, after one warm-up round). A turn prefills each prompt length and decodes ``--decode`` greedy
tokens. Memory: VmRSS of a fresh process per export after load and after three swap + merge cycles (the fp16 weights
are memory-mapped: their pages count once a merge has read them, as clean file pages the kernel can drop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmarks_md import write_section  # noqa: E402

ADAPTER = Path.home() / ".cache" / "edge_lora" / "adapters" / "date-iso-r16"
WORK = Path.home() / ".cache" / "edge_lora" / "bench" / "merge_swap"
EXPORTS = {   # label -> --set overrides of cpu-fast-hotswap
    "int8, blocks of 32 (cpu-fast-hotswap)": [],
    # on the LoRA branches this one misses the general top-1 bar (0.92 < 0.93, BENCHMARKS "Decode"); timed anyway
    "int8, blocks of 128, asymmetric": ["quantize.block_size=128", "quantize.symmetric=false",
                                        "validate.min_top1_general=0.9"],
}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def rss_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def build(label: str, overrides: list[str]) -> Path:
    from edge_lora.pipeline import run_export

    out = WORK / "".join(c if c.isalnum() else "-" for c in label.lower())
    report = out / "report.json"
    if not report.is_file() or json.loads(report.read_text()).get("status") != "PASSED":
        log(f"export {label}")
        run_export("smollm2", ADAPTER, "cpu-fast-hotswap", out, force=True, overrides=overrides, show_progress=False)
    return out


def memory(folder: Path, threads: int) -> dict:
    """Run in a child process: RSS after load, then after each of three swap + merge cycles."""
    from edge_lora.runtimes.ort_cpu import OrtCpuRunner

    start = rss_mb()
    runner = OrtCpuRunner(folder, threads=threads)
    loaded = rss_mb()
    merged = []
    for _ in range(3):
        runner.swap(None)
        runner.swap(folder / "adapter.onnx_adapter")
        runner.merger.wait()
        token = runner.prefill([1, 2, 3])
        runner.decode(token)
        merged.append(rss_mb())
    return {"start": start, "loaded": loaded, "merged": merged}


def speed(runners: dict, lengths: list[int], decode: int, rounds: int) -> dict:
    from edge_lora.runtimes.ort_session import probe_ids

    prompts = {n: probe_ids(32000, n, seed=n)[0].tolist() for n in lengths}
    samples = {label: {"without": {n: [] for n in lengths}, "with": {n: [] for n in lengths}, "swap_ms": [],
                       "merge_s": []} for label in runners}
    for r in range(rounds + 1):
        log(f"round {r + 1}/{rounds + 1}" + (" (warm-up)" if r == 0 else ""))
        for label, (runner, adapter) in runners.items():
            for mode in ("without", "with"):
                t = time.perf_counter()
                runner.swap(adapter if mode == "with" else None)
                swap_ms = 1e3 * (time.perf_counter() - t)
                merger = getattr(runner, "merger", None)
                if mode == "with":
                    if merger is not None:
                        merger.wait()
                        if r:
                            samples[label]["merge_s"].append(time.perf_counter() - t)
                    if r:
                        samples[label]["swap_ms"].append(swap_ms)
                for n in lengths:
                    token = runner.prefill(prompts[n])
                    steps = []
                    for _ in range(decode):
                        t = time.perf_counter()
                        token = runner.decode(token)
                        steps.append(1e3 * (time.perf_counter() - t))
                    if r:
                        samples[label][mode][n].append(statistics.median(steps))
                if mode == "with" and merger is not None and getattr(runner, "decoding_on", "") != "merged":
                    raise RuntimeError(f"{label}: the turn did not decode on merged weights")
    return samples


def render(result: dict, command: str) -> str:
    lengths = result["lengths"]
    out = [f"Command: `{command}` ({result['created']}, {result['seconds'] / 60:.0f} min)", "",
           f"SmolLM2-135M-Instruct + `date-iso-r16`; {result['machine']}; ONNX Runtime {result['ort']}, "
           f"llama-cpp-python {result['llama_cpp']}; {result['threads']} threads, {result['rounds']} rounds after "
           f"a warm-up. Each round: per runner, a turn without the adapter, then one with it; ms/token = median over "
           f"{result['decode']} greedy tokens after the prompt; overhead = with / without in the same round, minus 1 "
           f"(median, range). ORT rows: the hot-swap export with merge on swap (the turn with the adapter waits for "
           f"the background merge, then decodes on merged, re-quantized weights; swap = until the adapter is active "
           f"on the LoRA branches); llama.cpp: the adapter as an unmerged GGUF LoRA.", ""]
    head = "| runner | " + " | ".join(f"without @{n} | with @{n} | overhead @{n}" for n in lengths) + \
        " | swap ms | merge s |"
    out += [head, "|---|" + "---:|" * (3 * len(lengths) + 2)]
    for label, s in result["samples"].items():
        cells = []
        for n in lengths:
            w, a = s["without"][str(n)], s["with"][str(n)]
            ratios = [x / y - 1 for x, y in zip(a, w)]
            cells += [f"{statistics.median(w):.2f}", f"{statistics.median(a):.2f}",
                      f"{100 * statistics.median(ratios):+.1f}% ({100 * min(ratios):+.1f}…{100 * max(ratios):+.1f})"]
        merge = f"{statistics.median(s['merge_s']):.2f}" if s["merge_s"] else "–"
        out.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.median(s['swap_ms']):.1f} | {merge} |")
    out += ["", "Resident memory (VmRSS of a fresh process, MB): after load; after each of three swap + merge "
            "cycles. The same export on the LoRA branches alone (no merge on swap) is the first row of each pair.", "",
            "| export | after load | after merges |", "|---|---:|---|"]
    for label, m in result["memory"].items():
        out.append(f"| {label} | {m['loaded']:.0f} | {', '.join(f'{x:.0f}' for x in m['merged']) or '–'} |")
    return "\n".join(out) + "\n"


def branches_memory(folder: Path, threads: int) -> dict:
    from edge_lora.runtimes.ort_cpu import OrtCpuRunner

    start = rss_mb()
    runner = OrtCpuRunner(folder, threads=threads, merge_on_swap=False)
    runner.swap(folder / "adapter.onnx_adapter")
    runner.decode(runner.prefill([1, 2, 3]))
    return {"start": start, "loaded": rss_mb(), "merged": []}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="16,128,512")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--memory-of", type=Path, help=argparse.SUPPRESS)   # the child process
    parser.add_argument("--branches", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        print(json.dumps((branches_memory if args.branches else memory)(args.memory_of, args.threads)))
        return 0
    import platform

    import llama_cpp
    import onnxruntime

    from edge_lora.base import resolve_base, smollm2_gguf_path
    from edge_lora.runtimes.llamacpp import LlamaCppRunner, peft_to_gguf_lora
    from edge_lora.runtimes.ort_cpu import OrtCpuRunner

    started = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    folders = {label: build(label, overrides) for label, overrides in EXPORTS.items()}
    lora_gguf = WORK / "date-iso-r16.gguf"
    if not lora_gguf.is_file():
        peft_to_gguf_lora(ADAPTER, resolve_base("smollm2"), lora_gguf)
    lengths = [int(x) for x in args.lengths.split(",")]
    runners = {"llama.cpp Q4_1 + GGUF LoRA (unmerged)":
               (LlamaCppRunner(smollm2_gguf_path(), threads=args.threads, n_ctx=max(lengths) + args.decode + 8),
                lora_gguf)}
    runners.update({f"ORT fused {label}, merge on swap": (OrtCpuRunner(f, threads=args.threads),
                                                          f / "adapter.onnx_adapter")
                    for label, f in folders.items()})
    samples = speed(runners, lengths, args.decode, args.rounds)
    for runner, _ in runners.values():
        runner.close()
    del runners
    mem = {}
    for label, folder in folders.items():
        for branches in (True, False):
            log(f"memory {label}{' (branches)' if branches else ''}")
            child = subprocess.run([sys.executable, __file__, "--memory-of", str(folder), "--threads",
                                    str(args.threads)] + (["--branches"] if branches else []),
                                   capture_output=True, text=True, check=True)
            key = f"{label}, {'LoRA branches only' if branches else 'merge on swap'}"
            mem[key] = json.loads(child.stdout.strip().splitlines()[-1])
    result = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "rounds": args.rounds,
              "threads": args.threads, "decode": args.decode, "lengths": lengths, "ort": onnxruntime.__version__,
              "llama_cpp": llama_cpp.__version__,
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "samples": json.loads(json.dumps(samples)), "memory": mem, "seconds": time.time() - started}
    (WORK / "result.json").write_text(json.dumps(result, indent=1))
    command = "python tools/bench_merge_swap.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = render(result, command.strip())
    if args.no_write:
        print(body)
    else:
        write_section("Merge on swap", body)
        log("wrote BENCHMARKS.md ## Merge on swap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
