"""Compression on the demo suite: every adapter of the suite (tools/train_demo_adapter.py --task T), every setting,
scored through the artifact a device receives.

    python tools/bench_suite.py [--adapters add-r16,count-r16,...] [--examples 500] [--work /tmp/edge_lora-suite]

For each adapter and setting (uniform int8 / int4, weight-space mixed widths, output-aware allocation at several
error budgets, and the default of `compress` with no flags):

1. the compressed adapter is made by the library call its CLI flag makes (``quantize_adapter``; ``allocate``);
2. it is written as the ONNX Runtime adapter file of ONE fp32 hot-swap export of the base (``cpu-hotswap``,
   exported once and shared: ranks are dynamic inputs), and packaged as a signed OTA package for that export
   (``build_package``); both files' bytes are measured against the fp16 PEFT adapter (2 bytes per parameter);
3. that file is loaded into the running hot-swap session and scored by exact match on the task's held-out split
   (ONNX Runtime greedy loop, the same prompts and scorer as training's evaluation); retention =
   (candidate − base) / (reference − base), the reference and base being PyTorch + PEFT with the original adapter
   and with none, from the adapter's metrics.json (same examples, same loop);
4. the default point is cross-checked with PEFT itself on the dequantized expansion (``--as-peft``).

Writes the ``## Compression on the demo suite`` section of BENCHMARKS.md and the raw results to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SUITE_ADAPTERS = ("add-r16", "count-r16", "reverse-r16", "vote-r16", "roman-r16", "roman-r16-attn", "roman-r64")
# (label, kind, value): kind "uniform" = compress --bits B --budget 0; "mixed" = compress --bits mixed:X --budget 0
# (widths by weight-space error); "output" = compress --target-error E (output-aware, layer weighting); "fisher" =
# compress --target-error E --weighting fisher; "recover" = compress --target-error E --recover RECOVER_STEPS;
# "prompts" = compress --target-error E --recover PROMPT_RECOVER_STEPS --recover-text PROMPTS --complete N: the
# recovery tunes on the user's prompts answered by the adapter itself (PROMPTS_N prompts of the task's train split,
# never its held-out split, no labels; N = the task's answer length), the allocation stays on the built-in text;
# "default" = compress.
SETTINGS = (("int8", "uniform", 8), ("int4", "uniform", 4), ("mixed:2", "mixed", 2.0),
            ("output 0.01", "output", 0.01), ("output 0.02", "output", 0.02), ("output 0.03", "output", 0.03),
            ("output 0.05", "output", 0.05), ("output 0.1", "output", 0.1), ("output 0.2", "output", 0.2),
            ("fisher 0.03", "fisher", 0.03), ("output 0.1 + recover", "recover", 0.1),
            ("output 0.02 + recover on prompts", "prompts", 0.02), ("output 0.05 + recover on prompts", "prompts", 0.05))
RECOVER_STEPS = 30   # measured on roman-r16 at output 0.1: held-out KL 0.042 → 0.020 by step 30, 0.018 at 60
PROMPT_RECOVER_STEPS = 40   # measured on roman-r16 at output 0.1: task-text KL 0.110 → 0.048 at 40 (still falling)
PROMPTS_N = 400


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cli(*args) -> None:
    out = subprocess.run([sys.executable, "-m", "edge_lora", *map(str, args)], capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"python -m edge_lora {' '.join(map(str, args))} exited {out.returncode}:\n{out.stderr}")


def adapter_dir(name: str) -> Path:
    from edge_lora.base import cache_dir

    path = cache_dir() / "adapters" / name
    if not (path / "metrics.json").is_file():
        raise SystemExit(f"{path} is missing: train it first (tools/train_demo_adapter.py; see its --help).")
    return path


def base_export(work: Path, any_adapter: Path) -> Path:
    """One fp32 hot-swap export of SmolLM2 (the LoRA factors are inputs with dynamic ranks, so every adapter of
    the suite runs on it)."""
    out = work / "base-hotswap"
    if not (out / "edge_lora.json").is_file():
        log("exporting the fp32 hot-swap base (once)")
        cli("export", "--base", "smollm2", "--adapter", any_adapter, "--profile", "cpu-hotswap", "--out", out,
            "--quiet", "--set", "validate.task_examples=8", "--force")
    return out


def make(setting, original, metric, tables: dict, model=None, tokenizer=None, task_name=None):
    """The in-memory adapter a setting ships, via the call its CLI flag makes (``tables``: the output-aware error
    tables of this adapter per weighting, computed once for all its budgets; the result is the same without)."""
    from edge_lora.adapter.quantized import FactorQuantConfig
    from edge_lora.config import AllocateConfig
    from edge_lora.stages.allocate import allocate, error_table
    from edge_lora.stages.quantize_factors import quantize_adapter

    _, kind, value = setting
    if kind == "uniform":
        return quantize_adapter(original, cfg=FactorQuantConfig(bits=value, group_size=64))[0]
    if kind == "mixed":
        return quantize_adapter(original, cfg=FactorQuantConfig(bits=None, mixed_avg_bits=value, group_size=64))[0]
    config = AllocateConfig() if kind == "default" else AllocateConfig(
        target_error=value, weighting="fisher" if kind == "fisher" else "layer")
    if config.weighting not in tables:
        tables[config.weighting] = error_table(original, metric, config)
    q = allocate(original, metric, config, tables[config.weighting])[0]
    if kind == "recover":
        from edge_lora.stages.compress import calibration_texts
        from edge_lora.stages.recover import recover

        q = recover(q, original, model, tokenizer, calibration_texts(None), steps=RECOVER_STEPS)[0]
    if kind == "prompts":
        from edge_lora import tasks as suite
        from edge_lora.calibration import complete
        from edge_lora.stages.recover import recover

        prompts = [e.prompt for e in suite.make_examples(task_name, PROMPTS_N, seed=1, split="train")]
        texts = complete(model, tokenizer, original, prompts, suite.task(task_name).max_new_tokens)
        q = recover(q, original, model, tokenizer, texts, steps=PROMPT_RECOVER_STEPS)[0]
    return q


def score_ort(session, tokenizer, examples, max_new_tokens, batch_size=50) -> float:
    from edge_lora import eval as task
    from edge_lora.runtimes.ort_generate import OrtCausalLM

    lm = OrtCausalLM(session.session, tokenizer, session.run_options("x"))
    return task.score(lm.generate_fn(max_new_tokens), examples, batch_size)["exact_match"]


def score_peft(model_dir_peft: Path, tokenizer, examples, max_new_tokens) -> float:
    from peft import PeftModel

    from edge_lora import eval as task
    from edge_lora.base import load_base

    base, _ = load_base("smollm2")
    model = PeftModel.from_pretrained(base, str(model_dir_peft)).eval()
    return task.score(lambda p: task.torch_greedy_generate(model, tokenizer, p, max_new_tokens), examples,
                      50)["exact_match"]


def run(adapters, n_examples: int, work: Path, settings=SETTINGS) -> dict:
    import torch

    from edge_lora import tasks as suite
    from edge_lora.adapter import load_peft, save_peft
    from edge_lora.config import DEFAULT_TARGET_ERROR
    from edge_lora.base import base_content_hash, load_base, resolve_base
    from edge_lora.formats.export_meta import ExportMeta
    from edge_lora.ota.keys import PRIVATE_NAME, keygen
    from edge_lora.runtimes.hotswap import HotswapSession
    from edge_lora.stages.allocate import measure_output_metric
    from edge_lora.stages.compress import calibration_texts
    from edge_lora.stages.export_onnx import write_ort_adapter
    from edge_lora.stages.package import build_package
    from edge_lora.stages.quantize_factors import canonical_like

    torch.set_num_threads(2)
    work.mkdir(parents=True, exist_ok=True)
    export = base_export(work, adapter_dir(adapters[0]))
    meta = ExportMeta.read(export)
    session = HotswapSession(export, threads=2, spinning=False)
    model, tokenizer = load_base("smollm2")
    key = work / "keys" / PRIVATE_NAME
    if not key.is_file():
        keygen(work / "keys")
    base_hash = base_content_hash(resolve_base("smollm2"))
    results = {"examples": n_examples, "adapters": []}
    # Resumable: an adapter already measured in WORK with the same settings, examples and adapter files is kept
    # (a run over the suite takes about an hour on 2 cores; a crash or a newly trained adapter need not redo it).
    previous = {}
    if (work / "results.json").is_file():
        old = json.loads((work / "results.json").read_text())
        if old.get("examples") == n_examples:
            previous = {r["name"]: r for r in old["adapters"]}
    for name in adapters:
        folder = adapter_dir(name)
        stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns
        kept = previous.get(name) if previous.get(name, {}).get("stamp") == stamp else None
        kept_points = {p["setting"]: p for p in kept["points"]} if kept else {}
        info = json.loads((folder / "metrics.json").read_text())
        task_name = info["task"]
        t = suite.task(task_name)
        examples = suite.make_examples(task_name, n_examples, seed=0, split="test")
        reference, base = info["adapter_exact_match"], info["base_exact_match"]
        if info.get("held_out_n") != n_examples:
            log(f"{name}: metrics.json scored {info.get('held_out_n')} examples, not {n_examples}; rescoring the "
                "reference and the base is not implemented: use --examples {info.get('held_out_n')}")
            raise SystemExit(2)
        original = load_peft(folder)
        fp16 = original.params * 2
        tables: dict = {}
        metric = None

        def output_metric():
            nonlocal metric
            if metric is None:   # measured when a setting needs it (not for points kept from an earlier run)
                metric = measure_output_metric(model, tokenizer, calibration_texts(None), list(original.modules),
                                               2048, "built-in task-agnostic text", fisher=True)
            return metric

        row = {"name": name, "task": task_name, "rank": info.get("rank", 16), "targets": info.get("targets", "all"),
               "fp16_peft_bytes": fp16, "reference": reference, "base": base, "stamp": stamp, "points": []}
        log(f"{name}: reference {reference:.3f}, base {base:.3f}, fp16 PEFT {fp16 / 1e6:.2f} MB")
        scored: dict = {}
        for setting in settings:
            label = setting[0]
            stale = label == "default" and kept_points.get(label, {}).get("target_error") != DEFAULT_TARGET_ERROR
            if label in kept_points and not stale:   # measured before on these very adapter files
                row["points"].append(kept_points[label])
                scored[setting[1], setting[2]] = kept_points[label]
                log(f"  {label:12s} kept from {work / 'results.json'}")
                continue
            if setting[1] == "default" and ("output", DEFAULT_TARGET_ERROR) in scored:
                # the same call as `compress --target-error DEFAULT`: the same bytes, scored once
                point = {**scored["output", DEFAULT_TARGET_ERROR], "setting": "default", "kind": "default",
                         "target_error": DEFAULT_TARGET_ERROR}
                q = make(setting, original, output_metric(), tables)
                peft_dir = work / name / "default-as-peft"
                if peft_dir.exists():
                    shutil.rmtree(peft_dir)
                save_peft(q.dequantize(canonical_like(original)), peft_dir)
                span = reference - base
                point["exact_match_peft"] = score_peft(peft_dir, tokenizer, examples, t.max_new_tokens)
                point["retention_peft"] = (point["exact_match_peft"] - base) / span if span else None
                log(f"  default = output {DEFAULT_TARGET_ERROR:g}; PEFT on its expansion: EM "
                    f"{point['exact_match_peft']:.3f}")
                row["points"].append(point)
                continue
            t0 = time.perf_counter()
            q = make(setting, original, output_metric(), tables, model, tokenizer, task_name)
            make_s = time.perf_counter() - t0
            point_dir = work / name / re.sub(r"[^A-Za-z0-9._]+", "-", label)   # also a valid package id
            if point_dir.exists():
                shutil.rmtree(point_dir)
            point_dir.mkdir(parents=True)
            adapter_file = point_dir / "adapter.onnx_adapter"
            write_ort_adapter(q, adapter_file, meta)
            package = work / name / f"{point_dir.name}.elpkg"
            build_package(point_dir, key, 1, "smollm2", package, adapter_id=f"{name}-{point_dir.name}",
                          base_hash=base_hash, export=export, probes=("factors", "ort"))
            session.load_adapter("x", adapter_file)
            t0 = time.perf_counter()
            em = score_ort(session, tokenizer, examples, t.max_new_tokens)
            score_s = time.perf_counter() - t0
            session.unload_adapter("x")
            span = reference - base
            point = {"setting": label, "kind": setting[1], "adapter_file_bytes": adapter_file.stat().st_size,
                     "package_bytes": package.stat().st_size, "bits_per_param": q.bits_per_param(),
                     "exact_match_ort": em, "retention": (em - base) / span if span else None,
                     "make_seconds": make_s, "score_seconds": score_s}
            if setting[1] == "default":
                peft_dir = point_dir / "as-peft"
                save_peft(q.dequantize(canonical_like(original)), peft_dir)
                point["exact_match_peft"] = score_peft(peft_dir, tokenizer, examples, t.max_new_tokens)
                point["retention_peft"] = (point["exact_match_peft"] - base) / span if span else None
            log(f"  {label:12s} file {point['adapter_file_bytes'] / 1e6:.3f} MB ({fp16 / point['adapter_file_bytes']:.1f}×)"
                f" pkg {fp16 / point['package_bytes']:.1f}×  EM {em:.3f}  retention {point['retention']:.3f}"
                f"  ({make_s:.0f} s + {score_s:.0f} s)")
            row["points"].append(point)
            scored[setting[1], setting[2]] = point
        # the float original on the same session, so the runtime's own gap to PyTorch is visible
        if kept and "exact_match_ort_float" in kept:
            row["exact_match_ort_float"] = kept["exact_match_ort_float"]
        else:
            float_file = work / name / "float.onnx_adapter"
            write_ort_adapter(original, float_file, meta)
            session.load_adapter("x", float_file)
            row["exact_match_ort_float"] = score_ort(session, tokenizer, examples, t.max_new_tokens)
            session.unload_adapter("x")
        results["adapters"].append(row)
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


HOLD = 0.99


def section(results: dict, command: str) -> str:
    from edge_lora.config import DEFAULT_TARGET_ERROR

    lines = [
        f"Command: `{command}`. Adapters of the demo suite (`tools/train_demo_adapter.py --task T`; SmolLM2-135M-"
        "Instruct, rank 16 on all 7 projections unless named otherwise), each setting scored through the artifact "
        "a device receives: its ONNX Runtime adapter file, loaded into ONE fp32 hot-swap session of the base "
        f"(`cpu-hotswap`), greedy decoding over the task's {results['examples']} held-out examples. Retention = "
        "(candidate − base) / (reference − base), with the reference (PyTorch + PEFT, original adapter) and the base "
        "(PyTorch, no adapter) from training's evaluation of the same examples. Ratios are against the fp16 PEFT "
        "adapter (2 bytes per parameter): `file` = the adapter file, `package` = the signed OTA package of it. "
        "`int8`/`int4`/`mixed:X` = `compress --bits B --budget 0` (weight-space widths); `output E` = `compress "
        f"--target-error E` (output-aware);"
        + (f" `+ recover` adds `--recover {RECOVER_STEPS}` (scale distillation on the built-in calibration text);"
           if any(p["kind"] == "recover" for r in results["adapters"] for p in r["points"]) else "")
        + (f" `+ recover on prompts` adds `--recover {PROMPT_RECOVER_STEPS} --recover-text PROMPTS --complete N`: "
           f"recovery on {PROMPTS_N} prompts of the task's train split answered by the original adapter (no "
           "labels, none of the scored prompts), the allocation itself staying on the built-in text;"
           if any(p["kind"] == "prompts" for r in results["adapters"] for p in r["points"]) else "")
        + f" `default` = `compress` with no flags (target error "
        f"{DEFAULT_TARGET_ERROR:g}), cross-checked with PEFT on its `--as-peft` expansion.",
        "",
    ]
    best_all: dict[str, list[float]] = {}
    summary = []
    for row in results["adapters"]:
        fp16 = row["fp16_peft_bytes"]
        lines += [f"### {row['name']} (task {row['task']}, rank {row['rank']}, {row['targets']} projections)", "",
                  f"Reference {row['reference']:.3f}, base {row['base']:.3f}, the float original through ONNX "
                  f"Runtime {row['exact_match_ort_float']:.3f}; fp16 PEFT {fp16 / 1e6:.2f} MB.", "",
                  "| setting | bits/param | file | × fp16 | package | × fp16 | exact match | retention |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for pt in row["points"]:
            extra = ""
            if "exact_match_peft" in pt:
                extra = f" (PEFT: {pt['exact_match_peft']:.3f} / {pt['retention_peft']:.3f})"
            lines.append(f"| {pt['setting']} | {pt['bits_per_param']:.3f} | {pt['adapter_file_bytes'] / 1e6:.3f} MB | "
                         f"{fp16 / pt['adapter_file_bytes']:.1f}× | {pt['package_bytes'] / 1e6:.3f} MB | "
                         f"{fp16 / pt['package_bytes']:.1f}× | {pt['exact_match_ort']:.3f} | "
                         f"{pt['retention']:.3f}{extra} |")
            best_all.setdefault(pt["setting"], []).append(pt["retention"])
        held = [pt for pt in row["points"] if pt["retention"] >= HOLD]
        if held:
            top = max(held, key=lambda pt: fp16 / pt["adapter_file_bytes"])
            summary.append(f"| {row['name']} | {top['setting']} | {fp16 / top['adapter_file_bytes']:.1f}× | "
                           f"{fp16 / top['package_bytes']:.1f}× | {top['retention']:.3f} |")
        else:
            summary.append(f"| {row['name']} | none | – | – | – |")
        lines.append("")
    lines += ["### Smallest point at ≥ 99% retention, per adapter", "",
              "| adapter | setting | file × fp16 | package × fp16 | retention |", "|---|---|---:|---:|---:|", *summary, ""]
    holding = [k for k, v in best_all.items() if len(v) == len(results["adapters"]) and min(v) >= HOLD]
    lines.append("Settings that hold ≥ 99% on every adapter: " + (", ".join(holding) if holding else "none") + ".")
    worst = {k: min(v) for k, v in best_all.items() if len(v) == len(results["adapters"])}
    lines += ["", "Worst retention over the adapters, per setting: " + ", ".join(
        f"{k} {v:.3f}" for k, v in worst.items()) + "."]
    outside = [f"{r['name']} ({r['reference']:.3f})" for r in results["adapters"] if not 0.6 <= r["reference"] <= 0.95]
    lines += ["", "Caveats: one held-out example is 0.2% of exact match, so on an adapter scoring 0.5 one example is "
              "0.4% of retention; differences under ~1% are a few examples (paired: every setting runs the same "
              "prompts). Retention above 1 is such noise."
              + (f" Adapters outside the 60-95% window the suite aims for: {', '.join(outside)}." if outside else "")]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=",".join(SUITE_ADAPTERS))
    ap.add_argument("--settings", default=None, help="comma-separated labels of SETTINGS to run (default: all)")
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_lora-suite"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    settings = SETTINGS + (("default", "default", None),)
    if args.settings:
        wanted = args.settings.split(",")
        settings = tuple(s for s in settings if s[0] in wanted)
    results = run(args.adapters.split(","), args.examples, args.work, settings)
    command = "python tools/bench_suite.py" + (f" --adapters {args.adapters}" if args.adapters != ",".join(SUITE_ADAPTERS)
                                               else "") + (f" --settings '{args.settings}'" if args.settings else "")
    body = section(results, command)
    if args.no_write:
        print(body)
    else:
        from benchmarks_md import write_section

        write_section("Compression on the demo suite", body)
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
