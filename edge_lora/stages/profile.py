"""Latency and memory profiling of export folders: ``python -m edge_lora profile`` and the ``profiling`` stage.

What is measured, per variant (one export folder, on one runtime, with one adapter active or none):
  load time, prefill latency at several prompt lengths (= time to first token: the first token is the argmax
  of the prefill's logits; tokenization is not timed), decode ms/token (p50/p90/p99) and tokens/s with the KV
  cache, adapter swap time (hot-swap: read the adapter file and make it active on the live session), encoder
  latency per batch (feature-extraction exports), and peak RSS. Each variant's turn starts with one prefill of
  the shortest prompt timed apart (``first_prefill_ms``: right after a swap, the cost of a just-activated adapter).

How: every runner is opened first; then each variant's peak RSS and load time are taken in a fresh process
(RSS is process-wide, so a shared process would mix variants). Then ``warmup`` unrecorded rounds and ``runs``
recorded rounds, each running every variant in turn (A B A B ...), so drift and other load on the machine hit
all variants alike; comparisons are per-round ratios against the first variant, reported as median and IQR.
Raw samples stay in the result. Budgets (0 = none) are checked at the end: a miss is listed in
``budget_failures``; the pipeline and the CLI write the report, then fail with BudgetError (exit code 3).

The stage is named ``profiling`` (table ``[profiling]``): ``[profile]`` is already the head table of every
profile file (description, stages).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_lora.errors import AdapterError, BudgetError, EdgeLoraError, ProfileError
from edge_lora.config import ProfileConfig
from edge_lora.report import StageReport
from edge_lora.runtimes.timing import (
    ORT_RUNTIMES,
    Variant,
    measure_isolated,
    ms_since,
    open_variant,
    peak_rss_mb,
    turn,
)

STAGE = "profiling"




def folder_variants(folder, runtime: str, threads: int, adapters: list[str] | None = None,
                    name: str | None = None, tag: str = "") -> list[Variant]:
    """One variant for a merged export; for a hot-swap export, the plain base and then one per adapter file
    (default: the export's own adapter file, if it has one)."""
    from edge_lora.runtimes.ort_cpu import export_meta

    folder = Path(folder)
    name = name or folder.name
    if runtime not in ORT_RUNTIMES:
        return [Variant(name + tag, runtime, str(folder), threads)]
    meta = export_meta(folder)
    if not meta.hotswap:
        if adapters:
            raise ProfileError(f"--adapters needs a hot-swap export; {folder} is a {meta.mode} export (the "
                               "adapter is merged into its weights).")
        return [Variant(name + tag, runtime, str(folder), threads)]
    if adapters is None:
        adapters = [str(meta.path("adapter_file"))] if meta.adapter_file else []
    variants = [Variant(f"{name} no adapter{tag}", runtime, str(folder), threads, hotswap=True)]
    for path, short in zip(adapters, _distinct_names(adapters)):
        if not Path(path).is_file():
            raise AdapterError(f"adapter file {path} does not exist; pass ORT adapter files (.onnx_adapter) "
                               "written for this hot-swap export.")
        variants.append(Variant(f"{name} + {short}{tag}", runtime, str(folder), threads, hotswap=True,
                                adapter=str(path)))
    return variants


def _distinct_names(paths: list[str]) -> list[str]:
    """The shortest path tails that tell the files apart: installed adapters are all ``adapter.onnx_adapter``,
    under ROOT/<id>/versions/<n>/, so their labels need the folders above."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# ------------------------------------------------------------------------------------------ statistics
def summarize(samples) -> dict:
    import numpy as np

    a = np.asarray(samples, dtype=float).ravel()
    if a.size == 0:
        return {"n": 0}
    p10, p25, p50, p75, p90, p99 = (float(x) for x in np.percentile(a, [10, 25, 50, 75, 90, 99]))
    return {"n": int(a.size), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "p10": p10,
            "p25": p25, "p50": p50, "p75": p75, "p90": p90, "p99": p99, "iqr": p75 - p25}


def ratio_summary(per_round: list[float]) -> dict:
    s = summarize(per_round)
    return {"per_round": per_round, "median": s["p50"], "p25": s["p25"], "p75": s["p75"], "iqr": s["iqr"]}


def _load_average() -> list[float] | None:
    """1/5/15-minute load average: how busy the machine was (absent on Windows)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(threads: int) -> dict:
    import onnxruntime as ort
    import psutil

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "physical_cores": psutil.cpu_count(logical=False), "logical_cores": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "ort_providers": ort.get_available_providers(), "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "load_average_start": _load_average()}


# ------------------------------------------------------------------------------------------ measuring
def _limits(runner) -> tuple[int | None, int]:
    """(vocab size or None, max positions) from the runner's info; n_ctx counts as max positions."""
    info = runner.info
    vocab = info.get("vocab_size") or info.get("n_vocab")
    return (int(vocab) if vocab else None), int(info.get("max_positions") or info.get("n_ctx") or 1 << 20)


def _plan(runners: dict, config: ProfileConfig, notes: list[str]) -> dict:
    """Token ids every variant gets: fixed random ids, prompt lengths capped by the smallest max positions."""
    from edge_lora.runtimes.ort_session import probe_ids

    kinds = {bool(getattr(r, "is_encoder", False)) for r in runners.values()}
    if len(kinds) > 1:
        raise ProfileError("cannot compare an encoder export with a causal LM export; profile them apart.")
    encoder = kinds.pop()
    limits = [_limits(r) for r in runners.values()]
    vocabs = [v for v, _ in limits if v]
    if not vocabs:
        raise ProfileError("no runner gives its vocab_size in .info; the profiler needs it to choose token ids "
                           "every variant accepts.")
    vocab = min(vocabs)
    cap = min(p for _, p in limits) - (0 if encoder else config.decode_tokens + 1)
    if cap < 1:
        raise ProfileError(f"the model's max positions leave no room for a prompt plus {config.decode_tokens} "
                           f"decode tokens; lower {STAGE}.decode_tokens.")
    lengths = sorted({min(n, cap) for n in config.prompt_lengths})
    if lengths != sorted(set(config.prompt_lengths)):
        why = "" if encoder else f" and each round decodes {config.decode_tokens} tokens after the prompt"
        notes.append(f"prompt lengths {config.prompt_lengths} capped to {lengths}: the model has "
                     f"{cap + (0 if encoder else config.decode_tokens + 1)} positions{why}")
    prompts = {n: probe_ids(vocab, n, seed=n)[0].tolist() for n in lengths}
    plan = {"encoder": encoder, "prompts": prompts, "lengths": lengths}
    if encoder:
        plan["batches"] = {f"{b}x{n}": [prompts[n]] * b for b in config.encoder_batch_sizes for n in lengths}
    return plan


def run_profile(variants: list[Variant], config: ProfileConfig, progress=lambda text: None) -> dict:
    """Measure every variant (see the module docstring); returns the result with raw samples and summaries."""
    if not variants:
        raise ProfileError("nothing to profile: no variants.")
    if len({v.label for v in variants}) != len(variants):
        raise ProfileError(f"variant labels must be unique: {[v.label for v in variants]}.")
    started = time.time()
    machine = machine_info(config.threads)
    notes: list[str] = []
    runners, load_in_process = {}, {}
    rounds: dict[str, list[dict]] = {v.label: [] for v in variants}
    schedule = []
    try:
        for v in variants:
            if v.runner_key not in runners:
                progress(f"loading {v.label}")
                t = time.perf_counter_ns()
                runners[v.runner_key] = open_variant(v)
                load_in_process[v.runner_key] = ms_since(t) / 1e3
        plan = _plan(runners, config, notes)
        notes += sorted({n for r in runners.values() for n in r.info.get("notes", [])})
        for v in variants:   # the first load of each adapter file is checked on a probe: not part of a swap
            if v.hotswap:
                runners[v.runner_key].swap(v.adapter)
        isolated = {}
        if config.isolate:
            for v in variants:
                progress(f"memory of {v.label} (fresh process)")
                precision = runners[v.runner_key].info.get("precision")
                isolated[v.label] = measure_isolated(v, config.decode_tokens, plan, precision)
        for r in range(config.warmup + config.runs):
            progress(f"round {r + 1}/{config.warmup + config.runs}" + (" (warm-up)" if r < config.warmup else ""))
            for v in variants:
                rec = turn(runners[v.runner_key], v, config.decode_tokens, plan)
                if r >= config.warmup:
                    rounds[v.label].append(rec)
                    schedule.append({"round": r - config.warmup, "variant": v.label})
        process_peak = peak_rss_mb()
    finally:
        for runner in runners.values():
            runner.close()
    if not config.isolate:
        notes.append("isolate = false: peak RSS is this process's high-water mark with every variant loaded, "
                     "not any one variant's.")
    machine["load_average_end"] = _load_average()
    result = {"kind": "encoder" if plan["encoder"] else "causal-lm", "created": time.strftime(
              "%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "seconds": time.time() - started,
              "machine": machine, "config": asdict(config), "prompt_lengths": plan["lengths"], "notes": notes,
              "skipped": [],
              "schedule": schedule, "process_peak_rss_mb": process_peak,
              "variants": [_variant_result(v, runners[v.runner_key], rounds[v.label], isolated.get(v.label),
                                           load_in_process[v.runner_key], process_peak) for v in variants]}
    result["comparisons"] = comparisons(result["variants"], rounds, plan)
    result["budget_failures"] = budget_failures(result, config)
    return result


def _variant_result(v: Variant, runner, recs: list[dict], isolated: dict | None, load_s: float,
                    process_peak: float) -> dict:
    info = dict(runner.info)
    if "model_file_mb" not in info and Path(v.path).is_file():
        info["model_file_mb"] = Path(v.path).stat().st_size / 2**20
    out = {"label": v.label, "runner": runner.name, "info": info, "path": v.path, "adapter": v.adapter,
           "adapter_file_mb": Path(v.adapter).stat().st_size / 2**20 if v.adapter else None,
           "load_s": {"in_process": load_s, "fresh_process": isolated["load_s"] if isolated else None},
           "memory": {**(isolated or {}), "measured": "fresh process" if isolated else "shared process"}}
    out["memory"]["peak_rss_mb"] = isolated["peak_rss_mb"] if isolated else process_peak
    out["memory"].pop("load_s", None)
    if v.hotswap:
        samples = [r["swap_ms"] for r in recs]
        out["swap_ms"] = {"samples": samples, **summarize(samples)}
    if recs and "encode" in recs[0]:
        cells = {k: [r["encode"][k] for r in recs] for k in recs[0]["encode"]}
        out["encode_ms"] = {k: {"samples": samples, **summarize(samples)} for k, samples in cells.items()}
        return out
    lengths = sorted(recs[0]["prefill"]) if recs else []
    out["prefill_ms"] = {str(n): {"samples": [r["prefill"][n] for r in recs],
                                  **summarize([r["prefill"][n] for r in recs])} for n in lengths}
    out["ttft_ms"] = {str(n): out["prefill_ms"][str(n)]["p50"] for n in lengths}   # = prefill, see docstring
    first = [r["first_prefill_ms"] for r in recs]
    out["first_prefill_ms"] = {"prompt_length": min(lengths), "samples": first, **summarize(first)}
    decode = [r["decode"] for r in recs]
    out["decode_ms"] = {"samples": decode, "context": f"{min(lengths)}-token prompt + decode", **summarize(decode)}
    out["tokens_per_s"] = 1e3 / out["decode_ms"]["mean"]
    return out


def comparisons(variants: list[dict], rounds: dict, plan: dict) -> list[dict]:
    """Every variant against the first, as per-round ratios (both ran in the same round, close in time)."""
    import numpy as np

    ref = variants[0]["label"]
    out = []
    for v in variants[1:]:
        a, b = rounds[ref], rounds[v["label"]]
        entry = {"variant": v["label"], "reference": ref}
        if plan["encoder"]:
            entry["encode_ratio"] = {k: ratio_summary([y["encode"][k] / x["encode"][k] for x, y in zip(a, b)])
                                     for k in plan["batches"]}
        else:
            entry["decode_ratio"] = ratio_summary([float(np.median(y["decode"]) / np.median(x["decode"]))
                                                   for x, y in zip(a, b)])
            entry["prefill_ratio"] = {
                str(n): ratio_summary([y["prefill"][n] / x["prefill"][n] for x, y in zip(a, b)])
                for n in plan["lengths"]}
        out.append(entry)
    return out


def budget_failures(result: dict, config: ProfileConfig) -> list[str]:
    fails = []
    for v in result["variants"]:
        who = f"{v['label']} ({v['runner']})"
        decode = v["decode_ms"]["p50"] if "decode_ms" in v else 0.0
        if config.max_decode_ms_per_token and decode > config.max_decode_ms_per_token:
            fails.append(f"{who}: decode {v['decode_ms']['p50']:.2f} ms/token (p50) above the budget "
                         f"{config.max_decode_ms_per_token:g} ms")
        peak = v["memory"]["peak_rss_mb"]
        if config.max_peak_rss_mb and peak > config.max_peak_rss_mb:
            fails.append(f"{who}: peak RSS {peak:.0f} MB ({v['memory']['measured']}) above the budget "
                         f"{config.max_peak_rss_mb:g} MB")
        size = v["adapter_file_mb"]
        if config.max_adapter_file_mb and size is not None and size > config.max_adapter_file_mb:
            fails.append(f"{who}: adapter file {size:.2f} MB above the budget {config.max_adapter_file_mb:g} MB")
        load = v["load_s"]["fresh_process"] or v["load_s"]["in_process"]
        if config.max_load_seconds and load > config.max_load_seconds:
            fails.append(f"{who}: load {load:.2f} s above the budget {config.max_load_seconds:g} s")
    if config.max_decode_ms_per_token and result["kind"] == "encoder":
        result["skipped"].append("max_decode_ms_per_token does not apply to an encoder export; not checked.")
    return fails


# ------------------------------------------------------------------------------------------ pipeline stage
def stage_metrics(result: dict) -> dict:
    """The headline numbers for report.json (the full result, raw samples included, is profile/profile.json)."""
    metrics = {}
    for v in result["variants"]:
        pre = f"{v['label']}: "
        metrics[pre + "runner"] = v["runner"]
        metrics[pre + "peak_rss_mb"] = v["memory"]["peak_rss_mb"]
        metrics[pre + "load_s"] = v["load_s"]["fresh_process"] or v["load_s"]["in_process"]
        if "decode_ms" in v:
            for p in ("p50", "p90", "p99"):
                metrics[pre + f"decode_ms_{p}"] = v["decode_ms"][p]
            metrics[pre + "tokens_per_s"] = v["tokens_per_s"]
            metrics[pre + "prefill_ms_p50"] = {n: s["p50"] for n, s in v["prefill_ms"].items()}
        for key, s in v.get("encode_ms", {}).items():
            metrics[pre + f"encode_ms_p50[{key}]"] = s["p50"]
        if "swap_ms" in v and v["adapter"]:
            metrics[pre + "swap_ms_p50"] = v["swap_ms"]["p50"]
        if v["adapter_file_mb"] is not None:
            metrics[pre + "adapter_file_mb"] = v["adapter_file_mb"]
    for c in result["comparisons"]:
        ratio = c.get("decode_ratio") or next(iter(c["encode_ratio"].values()))
        metrics[f"{c['variant']} / {c['reference']}"] = (f"×{ratio['median']:.3f} (IQR {ratio['p25']:.3f}–"
                                                         f"{ratio['p75']:.3f})")
    metrics["notes"] = result["notes"]
    metrics["budget_failures"] = result["budget_failures"]
    return metrics


@dataclass(frozen=True)
class ProfilingInput:
    folder: Path                                   # the export folder (its report goes to FOLDER/profile)
    progress: Callable[[str], None] = lambda text: None


def run(inp: ProfilingInput, config: ProfileConfig) -> tuple[dict, StageReport]:
    """The stage entry (every stage module has one: ``run(input, config) -> (output, StageReport)``): the export
    and, for a hot-swap export, its own adapter file, interleaved; the full result (profile.json's content) is
    returned and written to FOLDER/profile."""
    from edge_lora.stages.profile_report import write_report

    if config.runtime not in ORT_RUNTIMES:
        raise ProfileError(f"the {STAGE} stage measures the ONNX export, so {STAGE}.runtime must be one of "
                           f"{', '.join(ORT_RUNTIMES)}, not {config.runtime!r}; profile other runtimes with "
                           "tools/bench_profile.py.")
    start = time.perf_counter()
    variants = folder_variants(inp.folder, config.runtime, config.threads, name="export")
    result = run_profile(variants, config, inp.progress)
    write_report(inp.folder / "profile", result, replace=True)
    return result, StageReport(stage=STAGE, config=asdict(config), metrics=stage_metrics(result),
                               seconds=time.perf_counter() - start, input_hash=None, skipped=result["skipped"])


# ------------------------------------------------------------------------------------------ export folders
def profile_config(overrides: list[str] | None = None, runtime: str | None = None,
                   settings: dict | None = None) -> tuple[ProfileConfig, list[str]]:
    """The config of ``python -m edge_lora profile``: ``--set profiling.KEY=VALUE`` items, then ``settings``
    (the flags given, by [profiling] key), and ``runtime`` ("ort_cpu" or a comma list to compare). Returns the
    config of the first runtime and every runtime name (each checked)."""
    from edge_lora.config import build_config, parse_overrides

    overrides = list(overrides or [])
    bad = [o for o in overrides if not o.startswith(f"{STAGE}.")]
    if bad:
        raise ProfileError(f"--set {bad[0]!r}: profile only takes {STAGE}.KEY=VALUE keys.")
    table = parse_overrides(overrides).pop(STAGE, {})
    table.update(settings or {})
    runtimes = [r.strip() for r in (runtime or table.get("runtime", "ort_cpu")).split(",") if r.strip()]
    table["runtime"] = runtimes[0] if runtimes else ""
    config = build_config(STAGE, table, "command line")
    for r in runtimes[1:]:   # check every runtime name, not just the first
        build_config(STAGE, {**table, "runtime": r}, "command line")
    return config, runtimes


def _short_names(folders: list[str]) -> list[str]:
    """Folder names as labels; with parents where two folders share a name."""
    paths = [Path(f).resolve() for f in folders]
    for depth in range(1, 6):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def profile_folders(folders: list[str], runtime: str | None = None, overrides: list[str] | None = None,
                    settings: dict | None = None, adapters: list[str] | None = None, out=None, force: bool = False,
                    progress: Callable[[str], None] = lambda text: None) -> dict:
    """``python -m edge_lora profile``: every export folder in ``folders`` (the first one with ``adapters``, for a
    hot-swap export) on every runtime, interleaved; the report goes to ``out`` (profile.json, profile.md, plots;
    an existing folder is replaced only with ``force``). Returns the result; a budget miss is in its
    ``budget_failures`` (:func:`check_budgets` raises on it), the report is written either way."""
    from edge_lora.stages.profile_report import write_report

    config, runtimes = profile_config(overrides, runtime, settings)
    if out and Path(out).exists() and not force:
        raise EdgeLoraError(f"output folder {out} already exists; choose another --out or pass --force.")
    names = _short_names(folders)
    variants = []
    for rt in runtimes:
        tag = f" [{rt}]" if len(runtimes) > 1 else ""
        for i, folder in enumerate(folders):
            variants += folder_variants(folder, rt, config.threads, adapters if i == 0 else None, names[i], tag)
    result = run_profile(variants, config, progress)
    if out:
        write_report(out, result, replace=True)
    return result


def check_budgets(result: dict, out=None) -> None:
    """BudgetError (exit 3) listing every budget :func:`profile_folders` found missed."""
    if result["budget_failures"]:
        where = f"; the report is in {out}" if out else ""
        raise BudgetError("profile budget missed: " + "; ".join(result["budget_failures"]) + where + ".")
