"""Decode speed and quality of the fused decoder graph against llama.cpp, in one interleaved run; writes the
``## Decode`` section of BENCHMARKS.md.

    python tools/bench_decode.py [--work ~/.cache/edge_lora/bench/decode] [--rounds 5] [--threads 2,1]
                                 [--lengths 16,128,512] [--decode 32] [--examples 500] [--no-write]
                                 [--quality-only | --skip-quality]

SmolLM2-135M-Instruct with the ``date-iso-r16`` adapter. What it builds once (cached in --work):

- merged exports on the fused graph (export.graph = "fused") at every precision tried (``PRECISIONS``), and the
  status quo: optimum's graph at the cpu-int4 recipe;
- hot-swap exports of the plain base on the fused graph with merge on swap (``HOTSWAP``), with ORT adapter files
  for the date adapter and for the demo suite's adapters (tools/train_demo_adapter.py).

Quality, per precision, against the fp32 PyTorch reference (base + adapter): top-1 agreement over 256 positions
of a general English paragraph (edge_lora.calibration.TEXTS) and of the validation text (held-out date lines,
what `validate` reads for this adapter); task retention = (candidate − base) / (reference − base): the date task on
128 held-out examples for merged exports (reference and base scored here with PyTorch), the demo suite's tasks on
their 500 held-out examples for hot-swap exports (reference and base from each adapter's metrics.json, same
examples and loop), once on the LoRA branches and once on the weights merged on swap.

Speed: llama.cpp Q4_1 (the packaged GGUF; with and without the adapter as an unmerged GGUF LoRA) and every ORT
variant run in turn within each round (A B C … A B C …), after one warm-up round, at each thread count. A turn
prefills each prompt length and decodes ``--decode`` greedy tokens after it; a hot-swap "+ adapter" turn first
swaps the adapter in (timed: read the file, bind its tensors) and a "no adapter" turn swaps it out. Each hot-swap
export runs twice: on the LoRA branches only (``merge_on_swap=False``), and with merge on swap, where a turn waits
for the background merge (timed as "merge s", from the swap) before it prefills. Decode figures
are medians over rounds of each turn's median ms/token; ratios to llama.cpp are per-round ratios (same round), as
median and range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmarks_md import write_section  # noqa: E402

ADAPTER = "date-iso-r16"
SUITE = ("add-r16", "count-r16", "reverse-r16", "roman-r16", "vote-r16")
INT4_RECIPE = dict(base="int4", int8_modules=["down_proj", "v_proj"], lm_head="int8", embedding="int4")
INT8_FAST = dict(base="int8", lm_head="int8", block_size=128, symmetric=False)
# label -> QuantizeConfig fields (None: fp32)
PRECISIONS = {
    "fp32": None,
    "int8": dict(base="int8", lm_head="int8"),
    # what int8 compute (the activations quantized per block, accuracy_level 4) costs in quality, and buys in speed
    "int8, fp32 compute": dict(base="int8", lm_head="int8", accuracy_level=0),
    "int8, blocks of 64, asymmetric": dict(base="int8", lm_head="int8", block_size=64, symmetric=False),
    "int8, blocks of 128, asymmetric": INT8_FAST,
    "int8, blocks of 128": dict(base="int8", lm_head="int8", block_size=128),
    "int4 RTN, head/down/v int8 (cpu-int4 recipe)": INT4_RECIPE,
    "int4 HQQ, head/down/v int8": dict(INT4_RECIPE, method="hqq"),
    "int4 RTN, head int8": dict(base="int4", lm_head="int8"),
    "int4 HQQ, head int8": dict(base="int4", lm_head="int8", method="hqq"),
}
# merged precisions left out of the speed rounds: HQQ's nodes run ~5x slower (measured), the second HQQ row adds
# nothing to the first
NOT_TIMED = ("fp32", "int4 HQQ, head int8")
HOTSWAP = ("int8", "int8, fp32 compute", "int8, blocks of 128, asymmetric",
           "int4 RTN, head/down/v int8 (cpu-int4 recipe)")
BAR = {"general": 0.93, "validation": 0.97, "retention": 0.99}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def adapter_dir(name: str) -> Path:
    return Path.home() / ".cache" / "edge_lora" / "adapters" / name


# ------------------------------------------------------------------------------------------ building
def _quantize(folder: Path, fields) -> None:
    from edge_lora.config import QuantizeConfig
    from edge_lora.stages.quantize_base import quantize_base

    if fields:
        quantize_base(folder / "model.onnx", QuantizeConfig(**fields))


def build_merged(work: Path, graph: str, label: str, fields) -> Path:
    from edge_lora.adapter import load_peft
    from edge_lora.base import load_base
    from edge_lora.config import ExportConfig
    from edge_lora.stages.export_onnx import export_merged
    from edge_lora.stages.merge import merge

    folder = work / f"merged-{graph}-{slug(label)}"
    if (folder / "edge_lora.json").is_file():
        return folder
    log(f"export merged {graph} {label}")
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model, tokenizer = load_base("smollm2")
    export_merged(merge(model, load_peft(adapter_dir(ADAPTER)))[0], tokenizer, tmp, ExportConfig(graph=graph))
    _quantize(tmp, fields)
    tmp.rename(folder)
    return folder


def build_hotswap(work: Path, label: str, fields) -> Path:
    from edge_lora.adapter import load_peft
    from edge_lora.base import load_base
    from edge_lora.config import ExportConfig
    from edge_lora.stages.export_onnx import export_hotswap, read_meta, write_ort_adapter

    folder = work / f"hotswap-fused-{slug(label)}"
    if (folder / "edge_lora.json").is_file() and read_meta(folder).merge_on_swap is None:
        import shutil

        shutil.rmtree(folder)   # built before merge on swap existed
    if not (folder / "edge_lora.json").is_file():
        log(f"export hot-swap fused {label}")
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model, tokenizer = load_base("smollm2")
        export_hotswap(model, tokenizer, load_peft(adapter_dir(ADAPTER)), tmp,
                       ExportConfig(mode="hotswap", graph="fused", merge_on_swap=True))
        _quantize(tmp, fields)
        tmp.rename(folder)
    meta = read_meta(folder)
    for name in SUITE:
        path = folder / f"{name}.onnx_adapter"
        if not path.is_file():
            write_ort_adapter(load_peft(adapter_dir(name)), path, meta)
    return folder


# ------------------------------------------------------------------------------------------ quality
def texts(tokenizer, vocab: int):
    import numpy as np

    from edge_lora.calibration import TEXTS
    from edge_lora.stages.validate import eval_ids

    general = np.array([tokenizer("\n".join(TEXTS))["input_ids"][:256]], dtype=np.int64)
    return {"general": general, "validation": eval_ids(tokenizer, 256, vocab, "date-iso")}


def quality(work: Path, merged: dict, hotswap: dict, n_examples: int) -> dict:
    import numpy as np
    import torch
    from peft import PeftModel

    from edge_lora import eval as date_task
    from edge_lora import tasks as suite
    from edge_lora.base import load_base
    from edge_lora.runtimes.hotswap import HotswapSession
    from edge_lora.runtimes.merge_swap import MergeOnSwap
    from edge_lora.runtimes.ort_generate import OrtCausalLM
    from edge_lora.runtimes.ort_session import load_session
    from edge_lora.stages.export_onnx import read_meta

    cache = work / f"quality-{n_examples}.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    base, tokenizer = load_base("smollm2")
    ref = PeftModel.from_pretrained(base, str(adapter_dir(ADAPTER))).eval()
    ids = texts(tokenizer, base.config.vocab_size)
    if "reference" not in done:
        log("PyTorch reference and base on the date task")
        with torch.no_grad():
            logits = {k: ref(input_ids=torch.from_numpy(v)).logits[0].argmax(-1).numpy().tolist()
                      for k, v in ids.items()}
        examples = date_task.make_examples(128, seed=0, split="test")
        ref_em = date_task.score(lambda p: date_task.torch_greedy_generate(ref, tokenizer, p, 16), examples,
                                 32)["exact_match"]
        with ref.disable_adapter():
            base_em = date_task.score(lambda p: date_task.torch_greedy_generate(ref, tokenizer, p, 16), examples,
                                      32)["exact_match"]
        done["reference"] = {"top1": logits, "date_reference": ref_em, "date_base": base_em}
        cache.write_text(json.dumps(done))
    reference = done["reference"]

    def top1(session, lora=None) -> dict:
        lm = OrtCausalLM(session, tokenizer, lora=lora)
        return {k: float(np.mean(lm.logits(v)[0].argmax(-1) == np.array(reference["top1"][k])))
                for k, v in ids.items()}

    span = reference["date_reference"] - reference["date_base"]
    for key, folder in merged.items():
        if key in done:
            continue
        log(f"quality {key}")
        session = load_session(folder, threads=2)
        row = top1(session)
        lm = OrtCausalLM(session, tokenizer)
        em = date_task.score(lm.generate_fn(16), date_task.make_examples(128, seed=0, split="test"), 32)
        row["date_exact_match"] = em["exact_match"]
        row["retention"] = {"date-iso": (em["exact_match"] - reference["date_base"]) / span}
        done[key] = row
        cache.write_text(json.dumps(done))
    for key, folder in hotswap.items():
        if f"{key} (branches)" in done and f"{key} (merged on swap)" in done:
            continue
        log(f"quality {key}")
        meta = read_meta(folder)
        hot = HotswapSession(folder, threads=2)
        merger = MergeOnSwap(folder, meta.path("merge_on_swap"), meta.lora_groups, threads=2)
        rows = {"branches": {"retention": {}}, "merged on swap": {"retention": {}, "merge_s": []}}

        def sessions(name: str):
            """(path, session, lora feeds) for the adapter loaded as ``name``: on the branches, merged on swap."""
            lora = hot.lora_feeds(name)
            t = time.perf_counter()
            merger.start(lora)
            merger.wait()
            rows["merged on swap"]["merge_s"].append(time.perf_counter() - t)
            return (("branches", hot.session, lora), ("merged on swap", merger.session, None))

        hot.load_adapter("date", folder / "adapter.onnx_adapter")
        for path, session, lora in sessions("date"):
            rows[path].update(top1(session, lora))
        hot.unload_adapter("date")
        for name in SUITE:
            adapter_file = folder / f"{name}.onnx_adapter"
            info = json.loads((adapter_dir(name) / "metrics.json").read_text())
            hot.load_adapter(name, adapter_file)
            examples = suite.make_examples(info["task"], n_examples, seed=0, split="test")
            for path, session, lora in sessions(name):
                lm = OrtCausalLM(session, tokenizer, lora=lora)
                em = date_task.score(lm.generate_fn(suite.task(info["task"]).max_new_tokens), examples, 50)
                rows[path]["retention"][name] = ((em["exact_match"] - info["base_exact_match"])
                                                 / (info["adapter_exact_match"] - info["base_exact_match"]))
                log(f"  {name} {path}: retention {rows[path]['retention'][name]:.3f}")
            hot.unload_adapter(name)
        for path, row in rows.items():
            done[f"{key} ({path})"] = row
        cache.write_text(json.dumps(done))
    return done


# ------------------------------------------------------------------------------------------ speed
def speed(variants: list[tuple[str, object]], lengths: list[int], decode: int, rounds: int, vocab: int) -> dict:
    """variants: (label, make_runner); each label's runner, swap path: see module docstring."""
    from edge_lora.runtimes.ort_session import probe_ids

    prompts = {n: probe_ids(min(vocab, 32000), n, seed=n)[0].tolist() for n in lengths}
    runners = {}
    for label, make in variants:
        log(f"load {label}")
        runners[label] = make()
    samples = {label: {"decode": {n: [] for n in lengths}, "prefill": {n: [] for n in lengths}, "swap": [],
                       "merge_s": []} for label, _ in variants}
    try:
        for r in range(rounds + 1):
            log(f"round {r + 1}/{rounds + 1}" + (" (warm-up)" if r == 0 else ""))
            for label, _ in variants:
                runner, swap = runners[label]
                if swap is not False:
                    t = time.perf_counter()
                    runner.swap(swap)
                    swap_ms = 1e3 * (time.perf_counter() - t)
                    if r and swap is not None:
                        samples[label]["swap"].append(swap_ms)
                    merger = getattr(runner, "merger", None)
                    if merger is not None:   # merge on swap: decode once the merged session is ready
                        merger.wait()
                        if r and swap is not None:
                            samples[label]["merge_s"].append(time.perf_counter() - t)
                for n in lengths:
                    t = time.perf_counter()
                    token = runner.prefill(prompts[n])
                    prefill = 1e3 * (time.perf_counter() - t)
                    steps = []
                    for _ in range(decode):
                        t = time.perf_counter()
                        token = runner.decode(token)
                        steps.append(1e3 * (time.perf_counter() - t))
                    if r:
                        samples[label]["prefill"][n].append(prefill)
                        samples[label]["decode"][n].append(statistics.median(steps))
    finally:
        for runner, _ in {id(v[0]): v for v in runners.values()}.values():
            runner.close()
    return samples


def _ort(folder: Path, threads: int, merge_on_swap: bool = True):
    from edge_lora.runtimes.ort_cpu import OrtCpuRunner

    return OrtCpuRunner(folder, threads=threads, merge_on_swap=merge_on_swap)


# ------------------------------------------------------------------------------------------ report
def _med(values) -> float:
    return statistics.median(values) if values else float("nan")


def _ratio(samples: dict, label: str, ref: str, n: int) -> tuple[float, float, float]:
    """tokens/s of ``label`` over ``ref``'s at prompt length n, per round (same round): median, min, max."""
    per_round = [b / a for a, b in zip(samples[label]["decode"][n], samples[ref]["decode"][n])]
    return _med(per_round), min(per_round), max(per_round)


def meets_bar(row: dict) -> bool:
    return (row["general"] >= BAR["general"] and row["validation"] >= BAR["validation"]
            and all(v >= BAR["retention"] for v in row["retention"].values()))


def fastest_summary(result: dict) -> list[str]:
    """The fastest merged precision that meets the quality bar, against llama.cpp at every thread count and
    length."""
    lengths = result["lengths"]
    first = next(iter(result["speed"].values()))
    ok = [f"ORT {k.removeprefix('merged ')}, merged" for k, row in result["quality"].items()
          if k.startswith("merged fused") and meets_bar(row)]
    ok = [label for label in ok if label in first]
    if not ok:
        return ["No fused merged precision meets the quality bar."]
    best = min(ok, key=lambda label: _med(first[label]["decode"][lengths[len(lengths) // 2]]))
    out = [f"Fastest merged precision that meets the quality bar: **{best.removeprefix('ORT ')}**, "
           "tokens/s × llama.cpp Q4_1 (median over rounds, range):", ""]
    for threads, samples in result["speed"].items():
        ref = next(label for label in samples if label.startswith("llama.cpp Q4_1") and "adapter" not in label)
        cells = [f"@{n}: {_ratio(samples, best, ref, n)[0]:.2f}× ({_ratio(samples, best, ref, n)[1]:.2f}–"
                 f"{_ratio(samples, best, ref, n)[2]:.2f})" for n in lengths]
        out.append(f"- {threads} thread{'s' if threads != '1' else ''}: " + ", ".join(cells))
    return out + [""]


def render(result: dict, command: str) -> str:
    lines = [f"Command: `{command}` ({result['created']}, {result['seconds'] / 60:.0f} min)", "",
             f"SmolLM2-135M-Instruct + `{ADAPTER}`; {result['machine']}; ONNX Runtime {result['ort']}, "
             f"llama-cpp-python {result['llama_cpp']}. Batch 1, greedy. Decode = median over {result['rounds']} "
             f"rounds of each turn's median ms/token over {result['decode']} tokens after the prompt; "
             "× llama.cpp = its ms/token over ours in the same round (>1: faster than llama.cpp), median and "
             "range over rounds. Fused = edge_lora's fused decoder graph (export.graph = \"fused\"), KV cache in "
             "shared buffers (IO binding); optimum = optimum's graph, KV copied every step. TTFT = prefill of the "
             "prompt to the first token.", ""]
    lines += fastest_summary(result)
    lengths = result["lengths"]
    for threads, samples in result["speed"].items():
        ref = next(label for label in samples if label.startswith("llama.cpp Q4_1") and "adapter" not in label)
        lines += [f"### {threads} thread{'s' if threads != '1' else ''}", "",
                  "| variant | " + " | ".join(f"decode @{n} ms/tok | × llama.cpp @{n}" for n in lengths)
                  + " | TTFT @128 ms | TTFT @512 ms | swap ms | merge s |",
                  "|---|" + "---:|---:|" * len(lengths) + "---:|---:|---:|---:|"]
        for label, s in samples.items():
            cells = []
            for n in lengths:
                med, lo, hi = _ratio(samples, label, ref, n)
                cells += [f"{_med(s['decode'][n]):.2f}", f"{med:.2f} ({lo:.2f}–{hi:.2f})"]
            pre = [f"{_med(s['prefill'][n]):.0f}" if n in s["prefill"] else "–" for n in (128, 512)]
            swap = f"{_med(s['swap']):.1f}" if s["swap"] else "–"
            merge = f"{_med(s['merge_s']):.2f}" if s.get("merge_s") else "–"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {' | '.join(pre)} | {swap} | {merge} |")
        lines += ["", f"Adapter overhead at {threads} thread{'s' if threads != '1' else ''}: ms/token with the adapter "
                  "over the same runner without it, per round, minus 1 (median, range).", "",
                  "| with adapter | against | " + " | ".join(f"overhead @{n}" for n in lengths) + " |",
                  "|---|---|" + "---:|" * len(lengths)]
        for with_adapter, without in result["pairs"]:
            if with_adapter not in samples or without not in samples:
                continue
            cells = []
            for n in lengths:
                per_round = [a / b - 1 for a, b in zip(samples[with_adapter]["decode"][n], samples[without]["decode"][n])]
                cells.append(f"{100 * _med(per_round):+.1f}% ({100 * min(per_round):+.1f}…{100 * max(per_round):+.1f})")
            lines.append(f"| {with_adapter} | {without} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Quality", "",
              f"Top-1 agreement with the fp32 PyTorch reference over 256 positions; bar: general ≥ {BAR['general']}, "
              f"validation ≥ {BAR['validation']}, retention ≥ {BAR['retention']} on every task. Merged exports: "
              "retention on the adapter's date task (128 examples); hot-swap: the demo suite's adapters (500 "
              "examples each) through one base export.", "",
              "| export | top-1 general | top-1 validation | retention | meets the bar |", "|---|---:|---:|---|---|"]
    for key, row in result["quality"].items():
        if key == "reference":
            continue
        ret = ", ".join(f"{k} {v:.3f}" for k, v in row["retention"].items())
        ok = meets_bar(row)
        lines.append(f"| {key} | {row['general']:.3f} | {row['validation']:.3f} | {ret} | {'yes' if ok else 'no'} |")
    ref = result["quality"]["reference"]
    lines += ["", f"Date task, PyTorch: reference {ref['date_reference']:.3f}, base {ref['date_base']:.3f}."]
    lines += ["", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edge_lora" / "bench" / "decode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--lengths", default="16,128,512")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--skip-quality", action="store_true", help="reuse the cached quality results")
    parser.add_argument("--quality-only", action="store_true",
                        help="build and score, no speed rounds (they need an otherwise idle machine)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import onnxruntime
    import platform

    started = time.time()
    missing = [n for n in (ADAPTER, *SUITE) if not (adapter_dir(n) / "metrics.json").is_file()]
    if missing:
        parser.error(f"adapters not trained: {', '.join(missing)}; train each with python "
                     f"tools/train_demo_adapter.py [--task TASK] (date-iso-r16: no --task)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    notes = []
    merged = {f"merged fused {k}": build_merged(work, "fused", k, v) for k, v in PRECISIONS.items()}
    optimum = build_merged(work, "optimum", "int4 RTN, head/down/v int8 (cpu-int4 recipe)", INT4_RECIPE)
    hotswap = {f"hot-swap fused {k}": build_hotswap(work, k, PRECISIONS[k]) for k in HOTSWAP}
    result = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "rounds": args.rounds,
              "decode": args.decode, "lengths": [int(x) for x in args.lengths.split(",")],
              "ort": onnxruntime.__version__, "machine": f"{platform.processor() or platform.machine()}, "
              f"{__import__('os').cpu_count()} cores", "notes": notes}
    quality_file = work / f"quality-{args.examples}.json"
    result["quality"] = (json.loads(quality_file.read_text()) if args.skip_quality and quality_file.is_file()
                         else quality(work, {**merged, "merged optimum int4 recipe": optimum}, hotswap,
                                      args.examples))
    if args.quality_only:
        return 0
    if args.skip_quality:
        notes.append(f"Quality from the cached run of `python tools/bench_decode.py --quality-only --examples "
                     f"{args.examples}` ({quality_file.name}), speed from this one.")

    import llama_cpp

    from edge_lora.base import resolve_base, smollm2_gguf_path
    from edge_lora.runtimes.llamacpp import LlamaCppRunner, peft_to_gguf_lora

    result["llama_cpp"] = llama_cpp.__version__
    lora_gguf = work / f"{ADAPTER}.gguf"
    if not lora_gguf.is_file():
        peft_to_gguf_lora(adapter_dir(ADAPTER), resolve_base("smollm2"), lora_gguf)
    for key, folder in hotswap.items():
        weights = folder / "merge_on_swap" / "weights.safetensors"
        notes.append(f"{key}: merge on swap keeps fp16 weights of the adapted projections beside the base, "
                     f"{weights.stat().st_size / 2**20:.0f} MB on disk and in memory.")
    notes.append("GPTQ (onnxruntime's matmul_nbits_quantizer, GPTQWeightOnlyQuantConfig, blocks of 32, 5 calibration "
                 "sequences of 128 tokens, head fp32, every other MatMul int4), tried once outside this tool: top-1 "
                 "0.648 general / 0.820 validation, below round-to-nearest int4 with an int8 head; 242 s to quantize.")
    notes.append("llama.cpp loads with use_extra_bufts = False (its AMX / repack buffer types crash in "
                 "llama_decode on some VMs); the row marked 'extra bufts' loads with them, for comparison.")
    result["speed"] = {}
    result["pairs"] = [("llama.cpp Q4_1 + adapter (GGUF LoRA, unmerged)", "llama.cpp Q4_1")]
    for threads in [int(t) for t in args.threads.split(",")]:
        gguf = smollm2_gguf_path()
        ctx = max(result["lengths"]) + args.decode + 8
        llama = LlamaCppRunner(gguf, threads=threads, n_ctx=ctx)
        variants = [
            ("llama.cpp Q4_1", lambda: (llama, None)),
            ("llama.cpp Q4_1 + adapter (GGUF LoRA, unmerged)", lambda: (llama, lora_gguf)),
            ("llama.cpp Q4_1, extra bufts", lambda: (LlamaCppRunner(gguf, threads=threads, n_ctx=ctx,
                                                                    extra_bufts=True), False)),
            ("ORT optimum int4 recipe, merged (status quo)", lambda: (_ort(optimum, threads), False)),
            *[(f"ORT {k.removeprefix('merged ')}, merged", lambda f=f: (_ort(f, threads), False))
              for k, f in merged.items() if k.removeprefix("merged fused ") not in NOT_TIMED],
        ]
        for key, folder in hotswap.items():
            name = key.removeprefix("hot-swap fused ")
            adapter = folder / "adapter.onnx_adapter"
            branches = _ort(folder, threads, merge_on_swap=False)
            swapping = _ort(folder, threads)
            rows = [(f"ORT fused {name} hot-swap, {what}", lambda r=runner, a=path: (r, a)) for what, runner, path in (
                ("no adapter (LoRA branches, rank 0)", branches, None),
                ("+ adapter on the LoRA branches", branches, adapter),
                ("no adapter (branch-free base)", swapping, None),
                ("+ adapter merged on swap", swapping, adapter))]
            variants += rows
            for pair in ((rows[1][0], rows[0][0]), (rows[3][0], rows[2][0])):
                if pair not in result["pairs"]:
                    result["pairs"].append(pair)
        # llama.cpp's base and adapter rows share one runner: its swap(None) / swap(lora) is timed like ORT's
        result["speed"][str(threads)] = speed(variants, result["lengths"], args.decode, args.rounds, 49152)
        (work / "result.json").write_text(json.dumps(result, indent=1, default=str))
    result["seconds"] = time.time() - started
    (work / "result.json").write_text(json.dumps(result, indent=1, default=str))
    command = "python tools/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = render(result, command.strip())
    if args.no_write:
        print(body)
    else:
        write_section("Decode", body)
        log("wrote BENCHMARKS.md ## Decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
