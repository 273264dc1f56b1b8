"""Timing one runner: a variant's turn in a round (swap, prefill, decode or encode), and the fresh process
that takes one variant's load time and peak RSS.

Kept apart from the profiling stage so that the fresh process imports only the runtime (not the pipeline and
the other stages): whatever it imports counts in its RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_lora.errors import EdgeLoraError

ORT_RUNTIMES = ("ort_cpu", "ort_cuda", "mobile")


@dataclass(frozen=True)
class Variant:
    label: str
    runtime: str
    path: str                          # export folder (a model file for runtimes such as llamacpp)
    threads: int
    hotswap: bool = False
    adapter: str | None = None         # hot-swap: the adapter file active for this variant; None = plain base
    options: tuple = ()                # (key, value) pairs passed to the runner, e.g. (("lora_path", "x.gguf"),)

    @property
    def runner_key(self) -> tuple:     # variants with the same key share one runner (one session)
        return (self.runtime, self.path, self.threads, tuple(self.options))


def ms_since(start: int) -> float:
    return (time.perf_counter_ns() - start) / 1e6


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (the kernel's, not a sample).

    On Linux, VmHWM of /proc/self/status: getrusage's ru_maxrss survives exec, so a fresh child started from a
    big parent would report the parent's peak (seen here: 292 MB for a 1 MB model)."""
    import resource

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB on Linux


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def open_variant(v: Variant, precision: str | None = None):
    from edge_lora.runtimes import open_runner

    options = {"precision": precision} if precision and v.runtime in ORT_RUNTIMES else {}
    return open_runner(v.runtime, v.path, threads=v.threads, **dict(v.options), **options)


def turn(runner, v: Variant, decode_tokens: int, plan: dict) -> dict:
    """One variant's share of a round: swap (hot-swap), then prefill at every length and decode, or encode."""
    rec: dict = {}
    if v.hotswap:
        t = time.perf_counter_ns()
        runner.swap(v.adapter)
        rec["swap_ms"] = ms_since(t)
    if plan["encoder"]:
        rec["encode"] = {}
        for key, batch in plan["batches"].items():
            t = time.perf_counter_ns()
            runner.encode(batch)
            rec["encode"][key] = ms_since(t)
        return rec
    # Every variant's first run of its turn (right after the swap for hot-swap variants) is timed apart: it
    # carries any cost of a just-activated adapter and of caches the other variants evicted.
    t = time.perf_counter_ns()
    runner.prefill(plan["prompts"][min(plan["prompts"])])
    rec["first_prefill_ms"] = ms_since(t)
    rec["prefill"] = {}
    for length in sorted(plan["prompts"], reverse=True):   # the shortest last: decode continues from it
        t = time.perf_counter_ns()
        token = runner.prefill(plan["prompts"][length])
        rec["prefill"][length] = ms_since(t)
    rec["decode"] = []
    for _ in range(decode_tokens):
        t = time.perf_counter_ns()
        token = runner.decode(token)
        rec["decode"].append(ms_since(t))
    return rec


def measure_isolated(v: Variant, decode_tokens: int, plan: dict, precision: str | None) -> dict:
    """Load time and peak RSS of one variant in a fresh Python process (load, swap, one full turn)."""
    spec = {"variant": asdict(v), "decode_tokens": decode_tokens, "plan": plan, "precision": precision}
    proc = subprocess.run([sys.executable, "-c", "from edge_lora.runtimes.timing import child_main; child_main()"],
                          input=json.dumps(spec), capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if result is None:   # it died before reporting: a crash in the runtime, or killed (out of memory)
        how = (f"was killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
               else f"exited with code {proc.returncode} and no result")
        lines = proc.stderr.strip().splitlines()
        last = lines[-1].strip() if lines else "nothing on stderr"   # the exception line, not the child's stack
        raise EdgeLoraError(f"measuring {v.label} ({v.runtime}, {v.path}) in a fresh process failed: the process "
                            f"{how} ({last}). Check that the variant loads on its own, or profile without the "
                            "fresh process (--no-isolate, or profiling.isolate = false; peak RSS is then this "
                            "process's).")
    if "error" in result:
        raise EdgeLoraError(f"measuring {v.label} in a fresh process failed: {result['error']}")
    return result


def child_main() -> None:
    """Entry of the fresh process: import the runtime, note the RSS, then load and run one turn."""
    spec = json.loads(sys.stdin.read())
    v = Variant(**{**spec["variant"], "options": tuple(map(tuple, spec["variant"]["options"]))})
    plan = spec["plan"]
    plan["prompts"] = {int(k): ids for k, ids in plan["prompts"].items()}
    try:
        from edge_lora.runtimes import runner_class

        runner_class(v.runtime)    # the runtime's imports belong to the baseline, not to the model
        baseline = rss_mb()
        t = time.perf_counter_ns()
        runner = open_variant(v, spec["precision"])
        load_s = ms_since(t) / 1e3
        after_load = rss_mb()
        turn(runner, v, spec["decode_tokens"], plan)
        out = {"load_s": load_s, "baseline_rss_mb": baseline, "rss_after_load_mb": after_load,
               "peak_rss_mb": peak_rss_mb(), "torch_loaded": "torch" in sys.modules}
        runner.close()
    except EdgeLoraError as exc:
        out = {"error": str(exc)}
    print(json.dumps(out))
