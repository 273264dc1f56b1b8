"""Factor quantization on the trained demo adapters: the smallest (truncation + quantization) point that keeps the task.

    python tools/bench_quantize.py                     # grid on date-iso-r16 and date-iso-patterns, writes BENCHMARKS.md
    python tools/bench_quantize.py --examples 100 --budgets 0.2,0.4 --mixed 2.5,3.0 --no-write

Each point truncates the adapter with `compress` (per-module svd at a relative Frobenius budget; none = no
truncation), canonicalizes the per-module expansion and quantizes its balanced factors with mixed precision at an
average bit budget, then scores base + dequantized adapter exactly as tools/bench_compress.py scores compression:
exact match (EM) on held-out dates (greedy, PyTorch) and mean KL against base + original adapter.
Retention = (EM_candidate − EM_base) / (EM_adapter − EM_base). Size ratio = fp16 PEFT adapter bytes (2 bytes per
original parameter) / quantized payload bytes (codes, fp16 scales, zero points, per-row widths); the file ratio
uses the real save_quantized file (safetensors header and JSON metadata included).

    python tools/bench_quantize.py --hotswap tiny,smollm2    # hot-swap adapter files, writes its own block
    python tools/bench_quantize.py --hotswap tiny --rounds 2 --tokens 8 --no-write    # the quick check

``--hotswap``: one hot-swap export per base (a float graph) and its adapter as the files a device receives: the
export's float adapter file, and the one factor quantizer's codes (``quantize_adapter``, ``--hotswap-settings`` in
``quantize.adapter`` syntax: int8, int4, mixed:AVG) written by ``write_ort_adapter(q, path, read_meta(export))``.
Each file is loaded by ``HotswapSession.load_adapter`` (a quantized one is expanded to float in memory): file bytes,
swap time (file → active adapter in the running session), decode ms/token with each adapter active on one session
(interleaved one token at a time, with no adapter as the baseline), and top-1 / mean KL / logit error against the
float adapter. The retired in-graph layout (codes + DequantizeLinear in the graph) is not measured any more.

The script is modular so other parts (base-model quantization) can add their own tables: ``load_scorer`` loads the
base model and the held-out sets once, ``factor_table`` runs one adapter's grid, ``factor_markdown`` renders it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_compress import deltas_of, env_line, kl_texts, logprobs, mean_kl, merged_state  # noqa: E402
from benchmarks_md import write_section  # noqa: E402

from edge_lora.adapter import load_peft  # noqa: E402
from edge_lora.config import CompressConfig  # noqa: E402
from edge_lora.stages.canonicalize import canonicalize  # noqa: E402
from edge_lora.stages.compress import compress  # noqa: E402
from edge_lora.stages.quantize_factors import FactorQuantConfig, quantize_factors, save_quantized  # noqa: E402

ADAPTERS = ("date-iso-r16", "date-iso-patterns")
BUDGETS = (0.2, 0.3, 0.4)
MIXED = (2.0, 2.5, 3.0)
RETENTION_GOAL = 0.99
RATIO_GOAL = 16.0


@dataclass
class Scorer:
    """The base model and the held-out sets, loaded once and shared by every adapter and point."""

    model: object
    tokenizer: object
    base_state: dict
    examples: list
    texts: list
    batch: int
    em_base: float

    def em(self, state) -> float:
        from edge_lora import eval as task

        self.model.load_state_dict(state)
        gen = lambda prompts: task.torch_greedy_generate(self.model, self.tokenizer, prompts,  # noqa: E731
                                                         max_new_tokens=12)
        return task.score(gen, self.examples, batch_size=self.batch)["exact_match"]

    def logprobs(self, state):
        self.model.load_state_dict(state)
        return logprobs(self.model, self.tokenizer, self.texts)


def load_scorer(examples: int = 200, kl_examples: int = 24, batch: int = 50) -> Scorer:
    from edge_lora import eval as task
    from edge_lora.base import load_base

    model, tok = load_base("smollm2")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    s = Scorer(model=model, tokenizer=tok, base_state=base_state,
               examples=task.make_examples(examples, seed=0, split="test"),
               texts=kl_texts(task.make_examples(kl_examples, seed=1, split="test")), batch=batch, em_base=0.0)
    s.em_base = s.em(base_state)
    return s


def adapter_folder(name: str) -> Path:
    from edge_lora.base import cache_dir

    return Path(name) if Path(name).is_dir() else cache_dir() / "adapters" / name


def factor_table(scorer: Scorer, adapter_name: str, budgets=BUDGETS, mixed=MIXED, group_size: int = 64) -> dict:
    """Score every (svd budget, mixed bits) point of one adapter. Returns {adapter, params, em_ref, rows}."""
    folder = adapter_folder(adapter_name)
    adapter = load_peft(folder)
    fp16_bytes = adapter.params * 2
    ref_state = merged_state(scorer.base_state, deltas_of(adapter))
    ref_lp = scorer.logprobs(ref_state)
    em_ref = scorer.em(ref_state)
    print(f"{folder.name}: base EM {scorer.em_base:.3f}, adapter EM {em_ref:.3f}", flush=True)
    rows = []
    for budget in budgets:
        if budget is None:
            source, _ = canonicalize(adapter)
        else:
            # quantize_factors takes per-module factors: the svd result's expansion is exactly its B·A per module.
            result, _ = compress(adapter, CompressConfig(budget=budget, structure="svd"))
            source, _ = canonicalize(result.expanded)
        for avg in mixed:
            t = time.perf_counter()
            q, report = quantize_factors(source, FactorQuantConfig(bits=None, mixed_avg_bits=avg,
                                                                   group_size=group_size))
            with tempfile.TemporaryDirectory() as tmp:
                file_bytes = save_quantized(q, Path(tmp) / "q.safetensors").stat().st_size
            state = merged_state(scorer.base_state, deltas_of(q.dequantize(source)))
            kl = mean_kl(ref_lp, scorer.logprobs(state))
            e = scorer.em(state)
            payload = q.payload_bits() / 8
            label = (f"svd@{budget} + " if budget is not None else "") + f"mixed {avg}"
            rows.append(dict(label=label, budget=budget, mixed=avg, bits=payload * 8 / adapter.params,
                             ratio=fp16_bytes / payload, file_ratio=fp16_bytes / file_bytes, em=e,
                             retention=(e - scorer.em_base) / (em_ref - scorer.em_base) if em_ref != scorer.em_base
                             else float("nan"),
                             kl=kl, rel=report.metrics["rel_error_weighted"], secs=time.perf_counter() - t))
            print(f"  {rows[-1]}", flush=True)
    return dict(adapter=folder.name, params=adapter.params, fp16_bytes=fp16_bytes, em_ref=em_ref, rows=rows)


def best_row(rows: list[dict]) -> dict | None:
    keep = [r for r in rows if r["retention"] >= RETENTION_GOAL]
    return max(keep, key=lambda r: r["ratio"]) if keep else None


def factor_markdown(tables: list[dict], scorer: Scorer, group_size: int, env: str, command: str) -> str:
    lines = [
        (f"`{command}` on SmolLM2-135M-Instruct. Each point: per-module svd truncation at a relative Frobenius "
        f"budget (`compress --structure svd --budget B`), then mixed-precision quantization of the balanced "
        f"canonical factors at an average bit budget (groups of {group_size} along d, symmetric, fp16 scales). "
        f"Bits/param = quantized payload bits (codes + scales + per-row widths) / the ORIGINAL adapter's "
        f"parameters; size ratios are against the fp16 PEFT adapter (2 bytes per parameter): payload, and the "
        f"real quantized file (safetensors + JSON header). EM on {len(scorer.examples)} held-out dates (base "
        f"{scorer.em_base:.3f}); retention = (EM − base) / (adapter EM − base); KL = mean KL(reference ‖ "
        f"candidate) of next-token distributions over {len(scorer.texts)} held-out texts. {env}; the machine was "
        f"shared (these are accuracy numbers, not timings)."), "",
    ]
    for t in tables:
        lines += [(f"**{t['adapter']}** ({t['params']:,} params, {t['fp16_bytes'] / 1024:.0f} KiB as fp16; adapter "
                  f"EM {t['em_ref']:.3f})"), "",
                  ("| point | bits/param | payload vs fp16 PEFT | file vs fp16 PEFT | weighted rel. error | EM | "
                  "retention | mean KL |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        best = best_row(t["rows"])
        for r in t["rows"]:
            mark = " ◀ best" if r is best else ""
            lines.append(f"| {r['label']}{mark} | {r['bits']:.2f} | {r['ratio']:.1f}× | {r['file_ratio']:.1f}× | "
                         f"{r['rel']:.3f} | {r['em']:.3f} | {r['retention']:.3f} | {r['kl']:.4f} |")
        if best:
            lines += ["", (f"Smallest point with ≥{RETENTION_GOAL:.0%} retention: **{best['label']}**, "
                          f"{best['ratio']:.1f}× smaller than the fp16 PEFT adapter ({best['bits']:.2f} bits/param, "
                          f"KL {best['kl']:.4f}); goal ≥{RATIO_GOAL:.0f}×: "
                          f"{'met' if best['ratio'] >= RATIO_GOAL else 'missed'}."), ""]
        else:
            lines += ["", f"No point keeps ≥{RETENTION_GOAL:.0%} retention.", ""]
    lines.append(f"Resolution: one held-out example is {1 / len(scorer.examples):.1%} of EM, so retentions a "
                 "single example apart are within noise of each other; KL separates them better.")
    # One setting for every adapter: the smallest worst-case ratio among settings that hold on all of them.
    if len(tables) > 1:
        settings = {}
        for t in tables:
            for r in t["rows"]:
                settings.setdefault((r["budget"], r["mixed"]), []).append(r)
        common = [rs for rs in settings.values() if len(rs) == len(tables)
                  and all(r["retention"] >= RETENTION_GOAL for r in rs)]
        if common:
            rs = max(common, key=lambda rs: min(r["ratio"] for r in rs))
            ratios = " and ".join(f"{r['ratio']:.1f}×" for r in rs)
            lines.append(f"One setting for both adapters: **{rs[0]['label']}** keeps ≥{RETENTION_GOAL:.0%} on each, "
                         f"at {ratios} (worst KL {max(r['kl'] for r in rs):.4f}).")
    return "\n".join(lines).rstrip()


# ---------------------------------------------------------------------------------------------- hot-swap files
# The settings of the hot-swap part, in `quantize.adapter` syntax (edge_lora.stages.quantize_factors).
HOTSWAP_SETTINGS = ("int8", "int4", "mixed:3.0")


def _tiny_adapter(work: Path):
    """A tiny llama and a rank-8 adapter on all 7 module types (PEFT, random non-zero factors)."""
    from peft import LoraConfig, get_peft_model

    from edge_lora.base import tiny_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(
        r=8, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.03)
    peft_model.save_pretrained(str(work / "tiny-adapter"))
    return load_peft(work / "tiny-adapter")


def _decode_ms(session, run_options, prompt, n_tokens: int) -> list[float]:
    from edge_lora.runtimes.ort_generate import OrtCausalLM
    from edge_lora.runtimes.ort_session import empty_past

    lm = OrtCausalLM(session, None, run_options)
    mask = np.ones_like(prompt)
    logits, past = lm.step(prompt, mask, empty_past(session, 1))
    times = []
    for _ in range(n_tokens):
        ids = logits.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=-1)
        t = time.perf_counter()
        logits, past = lm.step(ids, mask, past)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _interleaved_steps(variants: dict, prompt, rounds: int, tokens: int) -> dict[str, list[float]]:
    """Per-round median ms/token, the variants' decode steps interleaved one token at a time (each keeps its own
    KV cache; the order rotates every step), so load from other processes hits every variant alike."""
    import statistics

    from edge_lora.runtimes.ort_generate import OrtCausalLM
    from edge_lora.runtimes.ort_session import empty_past

    names = list(variants)
    out = {k: [] for k in names}
    for _ in range(rounds):
        state, times = {}, {k: [] for k in names}
        for k, (sess, opts) in variants.items():
            lm = OrtCausalLM(sess, None, opts)
            mask = np.ones_like(prompt)
            logits, past = lm.step(prompt, mask, empty_past(sess, 1))
            state[k] = [lm, logits, past, mask]
        for t in range(tokens):
            for k in names[t % len(names):] + names[:t % len(names)]:
                lm, logits, past, mask = state[k]
                ids = logits.argmax(-1)[:, None].astype(np.int64)
                mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=-1)
                start = time.perf_counter()
                logits, past = lm.step(ids, mask, past)
                times[k].append((time.perf_counter() - start) * 1e3)
                state[k] = [lm, logits, past, mask]
        for k in names:
            out[k].append(statistics.median(times[k]))
    return out


def _sequences(tokenizer, vocab: int, kl_examples: int) -> tuple[list[np.ndarray], str]:
    """What agreement is measured on: held-out prompt + target texts (a real base), or fixed random ids."""
    if tokenizer is None:
        from edge_lora.runtimes.ort_session import probe_ids

        n = max(kl_examples // 6, 2)
        return [probe_ids(min(vocab, 1000), 64, seed=s) for s in range(n)], f"{n} random 64-token sequences"
    from edge_lora import eval as task

    texts = kl_texts(task.make_examples(kl_examples, seed=1, split="test"))
    return ([np.asarray(tokenizer(t)["input_ids"], dtype=np.int64)[None, :] for t in texts],
            f"{len(texts)} held-out prompt + target texts")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _agreement(session, options: dict, sequences) -> tuple[dict[str, dict], int]:
    """Next-token agreement of every adapter with the float one (``options["float"]``) over every position:
    top-1, mean KL(float ‖ candidate), logit error ‖L − L_float‖ / ‖L_float − L_base‖ (base: options["no
    adapter"]). One sequence at a time, so a 49k vocabulary does not hold every variant's logits at once."""
    from edge_lora.runtimes.ort_session import full_feeds

    first = [session.get_outputs()[0].name]
    sums = {k: {"kl": 0.0, "top1": 0, "err": 0.0} for k in options}
    den, n = 0.0, 0
    for ids in sequences:
        lg = {k: session.run(first, full_feeds(session, ids), o)[0][0].astype(np.float64)
              for k, o in options.items()}
        ref = _log_softmax(lg["float"])
        den += float(((lg["float"] - lg["no adapter"]) ** 2).sum())
        n += ref.shape[0]
        for k, x in lg.items():
            c = _log_softmax(x)
            sums[k]["kl"] += float((np.exp(ref) * (ref - c)).sum())
            sums[k]["top1"] += int((ref.argmax(-1) == c.argmax(-1)).sum())
            sums[k]["err"] += float(((x - lg["float"]) ** 2).sum())
    return {k: {"top1_vs_float": s["top1"] / n, "kl_vs_float": s["kl"] / n,
                "rel_error_vs_float": math.sqrt(s["err"] / max(den, 1e-300))} for k, s in sums.items()}, n


def hotswap_table(base: str, adapter_name: str | None, work: Path, settings=HOTSWAP_SETTINGS, threads: int = 1,
                  rounds: int = 6, tokens: int = 24, group_size: int = 64, kl_examples: int = 24) -> dict:
    """One hot-swap export (a float graph) and its adapter as files of the one factor quantizer: float (the
    export's own adapter file) and each of ``settings`` (``quantize.adapter`` syntax: int8, int4, mixed:AVG),
    written by write_ort_adapter for the export's layout and expanded to float by HotswapSession.load_adapter.
    Per file: bytes, swap time, decode ms/token with it active (interleaved with the others and with no adapter
    on one session), agreement with the float adapter."""
    import shutil
    import statistics

    from edge_lora.base import load_base, tiny_model
    from edge_lora.config import ExportConfig
    from edge_lora.runtimes.hotswap import HotswapSession
    from edge_lora.stages.export_onnx import ADAPTER_FILE, export_hotswap, read_meta, write_ort_adapter
    from edge_lora.stages.quantize_factors import QuantizeError, adapter_quant_config, quantize_adapter

    export = work / "export"
    reuse = (export / "model.onnx").is_file() and (export / ADAPTER_FILE).is_file()
    if not reuse:   # an earlier run's export in --work is reused (the export is most of the time)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    if base == "tiny":
        adapter, model, tok = _tiny_adapter(work), tiny_model("llama"), None
    else:
        adapter = load_peft(adapter_folder(adapter_name))
        model, tok = load_base(base)
    vocab = model.config.vocab_size
    if not reuse:
        export.mkdir()
        export_hotswap(model, tok, adapter, export, config=ExportConfig(mode="hotswap"))
    del model
    meta = read_meta(export)
    files = {"float": export / ADAPTER_FILE}
    factor = {"float": {"bits_per_param": 32.0, "rel_error": 0.0}}
    notes = []
    for setting in settings:
        cfg = adapter_quant_config(setting, group_size)
        if cfg is None:
            continue   # fp32: the export's own float file, always measured
        try:
            q, report = quantize_adapter(adapter, None, cfg, folder=work)
        except QuantizeError as exc:   # e.g. a mixed budget below the least this adapter can take
            notes.append(f"{setting}: {exc}")
            continue
        files[cfg.label] = work / f"{cfg.label.replace(':', '-')}.onnx_adapter"
        write_ort_adapter(q, files[cfg.label], meta)
        factor[cfg.label] = {"bits_per_param": report.metrics["bits_per_original_param"],
                             "rel_error": report.metrics["rel_error_vs_original_weighted"]}
    hot = HotswapSession(export, threads=threads)
    swap = {}
    for k, f in files.items():
        hot.load_adapter(k, f)   # checked once on a probe input: the adapter changes the output
        times = []
        for _ in range(max(rounds, 3)):   # then the swap alone, as a device does it: file → active adapter
            start = time.perf_counter()
            hot.load_adapter("swap", f, check=False)
            times.append((time.perf_counter() - start) * 1e3)
            hot.unload_adapter("swap")
        swap[k] = {"median_ms": statistics.median(times), "min_ms": min(times)}
    options = {"no adapter": None, **{k: hot.run_options(k) for k in files}}
    sequences, what = _sequences(tok, vocab, kl_examples)
    agreement, positions = _agreement(hot.session, options, sequences)
    variants = {k: (hot.session, o) for k, o in options.items()}
    prompt = (np.arange(32, dtype=np.int64)[None, :] * 7 + 100) % vocab
    for sess, opts in variants.values():   # warm-up
        _decode_ms(sess, opts, prompt, 4)
    per_round = _interleaved_steps(variants, prompt, rounds, tokens)
    timing = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in per_round.items()}
    for t in timing.values():
        t["vs_no_adapter"] = t["median_ms"] / timing["no adapter"]["median_ms"] - 1
    return {"base": base, "adapter": adapter_name or "tiny random r8", "params": adapter.params,
            "fp16_bytes": adapter.params * 2, "threads": threads, "rounds": rounds, "tokens": tokens,
            "group_size": group_size, "timing": timing, "swap": swap,
            "sizes": {k: f.stat().st_size for k, f in files.items()}, "factor": factor, "agreement": agreement,
            "positions": positions, "sequences": what, "notes": notes, "load": os.getloadavg()[0]}


def hotswap_markdown(results: list[dict], env: str) -> str:
    import onnxruntime as ort

    lines = [(f"Hot-swap adapter files of the one factor quantizer (`edge_lora/stages/quantize_factors.py`, the "
              f"settings of `quantize.adapter`) against the export's float adapter file. The codes travel in the "
              f"ONNX Runtime adapter file (`edge_lora/formats/ort_adapter.py`) and `HotswapSession.load_adapter` "
              f"expands them to float in memory, so every file runs on the same float hot-swap graph. Swap = "
              f"`load_adapter` of the file into the running session (read, decode, lay out for the export's LoRA "
              f"groups, ORT LoraAdapter; no probe check), median (min) of repeats. Decode, batch 1, 32-token "
              f"prompt then N tokens with the KV cache, ONNX Runtime {ort.__version__} CPUExecutionProvider, fp32 "
              f"base, one session: the variants' decode steps interleaved one token at a time (each with its own "
              f"KV cache, the order rotating every step, so every step runs another adapter than the step "
              f"before); median over rounds of the per-round median ms/token. Agreement with the float adapter "
              f"over every position: top-1, mean KL(float ‖ file), logit error ‖L − L_float‖ / ‖L_float − "
              f"L_base‖. Bits/param = payload bits / the original adapter's parameters (float: 32); factor error "
              f"= energy-weighted ‖ΔW − ΔŴ‖ / ‖ΔW‖ against the original adapter. The in-graph layout (int8/int4 "
              f"codes + DequantizeLinear inside the graph, the retired table above) is gone: it decoded 37-45% "
              f"slower with the adapter active. {env}; the machine was shared, so absolute ms are noisy; compare "
              f"within a table.")]
    for r in results:
        lines += ["", (f"**{r['base']}**, adapter {r['adapter']} ({r['params']:,} params, "
                       f"{r['fp16_bytes'] / 1024:.0f} KiB as fp16 PEFT), {r['threads']} threads, {r['rounds']} "
                       f"rounds × {r['tokens']} tokens, groups of {r['group_size']}; agreement over "
                       f"{r['positions']:,} positions of {r['sequences']}; for scale, no adapter against the "
                       f"float adapter: top-1 {r['agreement']['no adapter']['top1_vs_float']:.3f}, mean KL "
                       f"{r['agreement']['no adapter']['kl_vs_float']:.2e} (load average {r['load']:.1f} at the "
                       f"end):"), "",
                  ("| adapter file | bytes | vs float file | fp16 PEFT / file | bits/param | factor error | "
                   "swap ms (min) | top-1 vs float | mean KL vs float | logit error vs float |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, size in r["sizes"].items():
            f, s, a = r["factor"][k], r["swap"][k], r["agreement"][k]
            lines.append(f"| {k} | {size:,} | {size / r['sizes']['float']:.3f} | {r['fp16_bytes'] / size:.1f}× | "
                         f"{f['bits_per_param']:.2f} | {f['rel_error']:.4f} | {s['median_ms']:.1f} "
                         f"({s['min_ms']:.1f}) | {a['top1_vs_float']:.3f} | {a['kl_vs_float']:.2e} | "
                         f"{a['rel_error_vs_float']:.4f} |")
        lines += ["", "| active adapter | ms/token | min | max | vs no adapter |", "|---|---:|---:|---:|---:|"]
        for k, t in r["timing"].items():
            lines.append(f"| {k} | {t['median_ms']:.2f} | {t['min_ms']:.2f} | {t['max_ms']:.2f} | "
                         f"{t['vs_no_adapter'] * 100:+.1f}% |")
        for n in r["notes"]:
            lines += ["", f"Not measured: {n}"]
    return "\n".join(lines)


def _floats(text: str) -> tuple:
    return tuple(None if v.strip() == "none" else float(v) for v in text.split(","))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default=",".join(ADAPTERS), help="comma-separated names in the cache or folders")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                    help="svd truncation budgets, comma-separated ('none' = no truncation)")
    ap.add_argument("--mixed", default=",".join(map(str, MIXED)), help="mixed-precision average bits, comma-separated")
    ap.add_argument("--examples", "--n", type=int, default=200, dest="examples",
                    help="held-out examples for exact match")
    ap.add_argument("--kl-examples", type=int, default=24)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--hotswap", metavar="BASES", default=None,
                    help="instead of the factor grid: hot-swap adapter files (float vs --hotswap-settings) on these "
                         "bases (comma-separated: tiny, smollm2): bytes, swap time, decode ms/token, agreement "
                         "with the float adapter; smollm2 uses the first of --adapters")
    ap.add_argument("--hotswap-settings", default=",".join(HOTSWAP_SETTINGS),
                    help="--hotswap: adapter settings in quantize.adapter syntax, comma-separated "
                         "(int8, int4, int3, int2, mixed:AVG; default %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="ORT intra-op threads for --hotswap (1: least sensitive to other processes on shared cores)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--work", default=None, help="folder for the hot-swap exports and adapter files (default: a "
                                                 "temporary one; an export already there is reused)")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    env = env_line()
    if args.hotswap:
        from edge_lora.stages.quantize_factors import QuantizeError, adapter_quant_config

        settings = tuple(s.strip() for s in args.hotswap_settings.split(",") if s.strip())
        for s in settings:   # a typo fails here, before the export
            try:
                adapter_quant_config(s, args.group_size)
            except QuantizeError as exc:
                ap.error(f"--hotswap-settings: {exc}")
        work = Path(args.work or tempfile.mkdtemp(prefix="bench_hotswap_files-"))
        results = []
        for base in args.hotswap.split(","):
            results.append(hotswap_table(base, None if base == "tiny" else args.adapters.split(",")[0],
                                         work / base, settings, args.threads, args.rounds, args.tokens,
                                         args.group_size, args.kl_examples))
            print(results[-1], flush=True)
        text = hotswap_markdown(results, env)
        print(text)
        if not args.no_write:
            write_section("Factor quantization", text, block="hotswap-adapter-files")
        return 0
    scorer = load_scorer(args.examples, args.kl_examples, args.batch)
    tables = [factor_table(scorer, name, _floats(args.budgets), _floats(args.mixed), args.group_size)
              for name in args.adapters.split(",")]
    command = "python tools/bench_quantize.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                  if (argv if argv is not None else sys.argv[1:]) else "")
    text = factor_markdown(tables, scorer, args.group_size, env, command)
    print(text)
    if not args.no_write:
        write_section("Factor quantization", text, block="factor-grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
