"""Many adapters on one base: shared bases (compress-many) against each adapter compressed alone and against PCA of
the raw factors (the vlora / lorashare approach), at the same budgets, scored by task retention through ONNX Runtime.

    python tools/bench_many.py [--budgets 0.2,0.35] [--examples 200] [--work ~/.cache/edge_lora/bench/many]

For each budget:
1. ``compress_many`` over all the adapters (module scope: every module of every adapter within the budget);
2. the same adapters truncated one at a time to the same budget (``separate_truncation``);
3. raw-factor PCA with the rank per module whose total parameters match the shared bases' (same bytes);
each adapter of each method is written as the ONNX Runtime adapter file of one fp32 hot-swap export of SmolLM2
(fused graph, LoRA factors as inputs with dynamic ranks) and scored by exact match on its task's held-out split
(the first N examples of seed 0). Retention = (score − base) / (original − base), the original and the base
(no adapter) scored on the same session and examples. Bytes are fp16 (2 bytes per stored parameter); the PEFT
baseline is the adapters' fp16 size. Writes the "## Many adapters" section of BENCHMARKS.md and WORK/results.json.
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

ADAPTERS = ("add-r16", "add-r16-s1", "count-r16", "reverse-r16", "reverse-r16-s1", "roman-r16", "roman-r16-attn",
            "roman-r64", "vote-r16", "date-iso-r16")
# pairs whose shared bases are set beside their separate truncation in weight space (bytes only, no scoring): the
# same task trained twice (other seed), two tasks, one task at two ranks
PAIRS = (("add-r16", "add-r16-s1"), ("reverse-r16", "reverse-r16-s1"), ("add-r16", "reverse-r16"),
         ("roman-r16", "roman-r64"))
TRAIN = {"add-r16-s1": "--task add --seed 1 --name add-r16-s1", "reverse-r16-s1": "--task reverse --seed 1 --name "
         "reverse-r16-s1", "roman-r16-attn": "--task roman --targets attention", "roman-r64": "--task roman --rank 64",
         "date-iso-r16": ""}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def adapter_dir(name: str) -> Path:
    return Path.home() / ".cache" / "edge_lora" / "adapters" / name


def base_export(work: Path, any_adapter: str) -> Path:
    from edge_lora.adapter import load_peft
    from edge_lora.base import load_base
    from edge_lora.config import ExportConfig
    from edge_lora.files import atomic_folder
    from edge_lora.stages.export_onnx import export_hotswap

    out = work / "hotswap-fused-fp32"
    if not (out / "edge_lora.json").is_file():
        log("export the fp32 fused hot-swap base (once)")
        model, tokenizer = load_base("smollm2")
        with atomic_folder(out) as tmp:
            export_hotswap(model, tokenizer, load_peft(adapter_dir(any_adapter)), tmp,
                           ExportConfig(mode="hotswap", graph="fused"))
    return out


class Scorer:
    """One hot-swap session; ``score(name, adapter)`` writes the adapter file, loads it, returns exact match."""

    def __init__(self, export: Path, work: Path, n: int):
        from edge_lora.base import load_base
        from edge_lora.formats.export_meta import ExportMeta
        from edge_lora.runtimes.hotswap import HotswapSession

        self.meta = ExportMeta.read(export)
        self.hot = HotswapSession(export, threads=2, spinning=False)
        self.tokenizer = load_base("smollm2")[1]
        self.work, self.n = work, n

    def score_base(self, task_name: str) -> float:
        """The base alone (the LoRA inputs at their rank-0 defaults) on the same session and examples."""
        from edge_lora import eval as scorer
        from edge_lora import tasks as suite
        from edge_lora.runtimes.ort_generate import OrtCausalLM

        lm = OrtCausalLM(self.hot.session, self.tokenizer)
        examples = suite.make_examples(task_name, self.n, seed=0, split="test")
        return scorer.score(lm.generate_fn(suite.task(task_name).max_new_tokens), examples, 50)["exact_match"]

    def score(self, task_name: str, adapter) -> float:
        from edge_lora import eval as scorer
        from edge_lora import tasks as suite
        from edge_lora.runtimes.ort_generate import OrtCausalLM
        from edge_lora.stages.export_onnx import write_ort_adapter

        path = self.work / "scored.onnx_adapter"
        write_ort_adapter(adapter, path, self.meta)
        self.hot.load_adapter("x", path)
        try:
            lm = OrtCausalLM(self.hot.session, self.tokenizer, lora=self.hot.lora_feeds("x"))
            examples = suite.make_examples(task_name, self.n, seed=0, split="test")
            return scorer.score(lm.generate_fn(suite.task(task_name).max_new_tokens), examples, 50)["exact_match"]
        finally:
            self.hot.unload_adapter("x")


def pca_rank_for(adapters: dict, target_params: int) -> int:
    """The raw-factor PCA rank per module whose stored parameters come closest to ``target_params`` from below."""
    from edge_lora.stages.compress_many import raw_factor_pca

    lo, hi = 1, max(sum(a.modules[m].rank for a in adapters.values() if m in a.modules)
                    for m in next(iter(adapters.values())).modules)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if raw_factor_pca(adapters, mid)[1] <= target_params:
            lo = mid
        else:
            hi = mid - 1
    return lo


def run(names, budgets, n_examples: int, work: Path) -> dict:
    import torch

    from edge_lora.adapter import load_peft
    from edge_lora.stages.compress_many import (ManyConfig, compress_many, peft_fp16_bytes, raw_factor_pca,
                                                relative_error, separate_truncation)

    torch.set_num_threads(2)
    work.mkdir(parents=True, exist_ok=True)
    adapters = {n: load_peft(adapter_dir(n)) for n in names}
    info = {n: json.loads((adapter_dir(n) / "metrics.json").read_text()) for n in names}
    task_of = {n: info[n].get("task", "date-iso") for n in names}
    scorer = Scorer(base_export(work, names[0]), work, n_examples)
    cache_file = work / f"results-{n_examples}.json"
    results = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    stamps = {n: (adapter_dir(n) / "adapter_model.safetensors").stat().st_mtime_ns for n in names}
    if results.get("stamps") != stamps:   # another set of adapters, or one retrained: start again
        results = {"stamps": stamps}
    results.setdefault("original", {})
    results["examples"] = n_examples
    results["peft_fp16_bytes"] = {n: peft_fp16_bytes(a) for n, a in adapters.items()}

    def save():
        cache_file.write_text(json.dumps(results, indent=1) + "\n")

    for n in names:
        if n not in results["original"]:
            results["original"][n] = {"exact_match": scorer.score(task_of[n], adapters[n])}
        if "base_on_session" not in results["original"][n]:
            results["original"][n]["base_exact_match"] = scorer.score_base(task_of[n])
            results["original"][n]["base_on_session"] = True
        log(f"original {n}: {results['original'][n]['exact_match']:.3f}, base "
            f"{results['original'][n]['base_exact_match']:.3f}")
        save()

    def retention(n, em):
        o, b = results["original"][n]["exact_match"], results["original"][n]["base_exact_match"]
        return (em - b) / (o - b) if o != b else float("nan")

    for point in results.get("points", {}).values():   # cached rows, against the base scored here
        for row in point["methods"].values():
            for n, r in row["adapters"].items():
                r["retention"] = retention(n, r["exact_match"])

    for budget in budgets:
        key = f"{budget:g}"
        point = results.setdefault("points", {}).setdefault(key, {"methods": {}})
        wanted = METHODS
        def done(method):
            return any(k == method or (method == "raw-factor PCA" and k.startswith(method)) for k in point["methods"])

        if all(done(w) for w in wanted):
            continue
        fitted = {}

        def fit():
            if not fitted:
                t = time.perf_counter()
                fitted["shared"], report = compress_many(adapters, ManyConfig(budget=budget))
                m = report.metrics
                point.update(fit_s=time.perf_counter() - t, shared_bytes=m["total_bytes"],
                             basis_bytes=m["basis_bytes"], rank_median=m["rank_median"], rank_max=m["rank_max"])
            return fitted["shared"]

        def made(method):
            if method == "shared bases":
                return {n: fit().adapter(n) for n in names}, point["shared_bytes"]
            if method == "each alone":
                alone = separate_truncation(adapters, budget)
                return alone, 2 * sum(a.params for a in alone.values())
            rank = pca_rank_for(adapters, point["shared_bytes"] // 2)
            pca, pca_params = raw_factor_pca(adapters, rank)
            point["pca_rank"] = rank
            return pca, 2 * pca_params

        for method in wanted:
            label = method
            if done(method):
                continue
            ads, total = made(method)
            if method == "raw-factor PCA":
                label = f"raw-factor PCA (rank {point['pca_rank']})"
            rows = {}
            for n in names:
                em = scorer.score(task_of[n], ads[n])
                rows[n] = {"exact_match": em, "retention": retention(n, em),
                           "error": relative_error(adapters[n], ads[n])}
                log(f"budget {key} {label:32s} {n:16s} retention {rows[n]['retention']:.3f} "
                    f"(error {rows[n]['error']:.3f})")
            point["methods"][label] = {"total_bytes": total, "adapters": rows}
            save()
    results["pairs"] = []
    for pair in PAIRS:
        if not set(pair) <= set(names):
            continue
        for budget in budgets:
            m = compress_many({n: adapters[n] for n in pair}, ManyConfig(budget=budget))[1].metrics
            results["pairs"].append({"pair": list(pair), "budget": budget, "shared_bytes": m["total_bytes"],
                                     "alone_bytes": m["separate_truncation_total_bytes"]})
    save()
    return results


METHODS = ("shared bases", "each alone", "raw-factor PCA")


def _ordered(methods: dict) -> list[tuple[str, dict]]:
    return sorted(methods.items(), key=lambda kv: next(i for i, m in enumerate(METHODS)
                                                       if kv[0] == m or (i == 2 and kv[0].startswith(m))))


def render(results: dict, command: str, names) -> str:
    fp16 = sum(results["peft_fp16_bytes"][n] for n in names)
    lines = [f"Command: `{command}` ({results['created']}, {results['seconds'] / 60:.0f} min)", "",
             f"{len(names)} trained adapters of SmolLM2-135M-Instruct ({', '.join(names)})"
             + (": six tasks, two of them trained twice (seed 1: other data, other initialisation), ranks 16 and 64, "
                "all projections or attention only" if tuple(names) == ADAPTERS else "")
             + f"; {fp16 / 1e6:.1f} MB as fp16 PEFT files. Each method at the same weight-space budget "
             "(every module of every adapter within it: relative Frobenius error of ΔW); raw-factor PCA at the "
             "rank whose bytes match the shared bases'. Retention through ONNX Runtime (one fp32 fused hot-swap "
             f"export), {results['examples']} held-out examples per task, against the original and the base on the "
             "same session and examples. "
             "Bytes: fp16, 2 per stored parameter.", "",
             "| budget | method | total MB | × smaller than fp16 PEFT | median retention | worst retention (adapter) "
             "| median ΔW error |", "|---|---|---:|---:|---:|---|---:|"]
    for key, point in results["points"].items():
        for method, row in _ordered(point["methods"]):
            rets = {n: r["retention"] for n, r in row["adapters"].items()}
            worst = min(rets, key=rets.get)
            lines.append(f"| {key} | {method} | {row['total_bytes'] / 1e6:.2f} | {fp16 / row['total_bytes']:.1f} | "
                         f"{statistics.median(rets.values()):.3f} | {rets[worst]:.3f} ({worst}) | "
                         f"{statistics.median(r['error'] for r in row['adapters'].values()):.3f} |")
    lines += ["", "Shared bases per budget: " + "; ".join(
        f"{k}: basis {p['basis_bytes'] / 1e6:.2f} MB of {p['shared_bytes'] / 1e6:.2f}, module rank median "
        f"{p['rank_median']} (max {p['rank_max']}), fit {p['fit_s']:.0f} s" for k, p in results["points"].items())
        + ".", ""]
    rows = [(k, m, row) for k, p in results["points"].items() for m, row in _ordered(p["methods"])]

    def worst(row):
        return min(r["retention"] for r in row["adapters"].values())

    lines.append("At about the same total bytes (each shared-bases point against the other methods' point closest in "
                 "bytes), worst / median retention:")
    lines.append("")
    for k, m, row in rows:
        if m != "shared bases":
            continue
        for other in ("each alone", "raw-factor PCA"):
            k2, m2, r2 = min(((k2, m2, r2) for k2, m2, r2 in rows if m2.startswith(other)),
                             key=lambda t: abs(t[2]["total_bytes"] - row["total_bytes"]))
            lines.append(f"- shared bases at {k} ({row['total_bytes'] / 1e6:.1f} MB): {worst(row):.3f} / "
                         f"{statistics.median(r['retention'] for r in row['adapters'].values()):.3f}; {m2} at {k2} "
                         f"({r2['total_bytes'] / 1e6:.1f} MB): {worst(r2):.3f} / "
                         f"{statistics.median(r['retention'] for r in r2['adapters'].values()):.3f}")
    if results.get("pairs"):
        budgets = sorted({p["budget"] for p in results["pairs"]})
        lines += ["", "Pairs, bytes of the shared bases over the two truncated alone at the same budget (weight space; "
                  "1.00: the bases hold the sum of the two, nothing is shared):", "",
                  "| pair | " + " | ".join(f"budget {b:g}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
        for pair in dict.fromkeys(tuple(p["pair"]) for p in results["pairs"]):
            cells = [f"{p['shared_bytes'] / p['alone_bytes']:.2f}" for p in sorted(
                (p for p in results["pairs"] if tuple(p["pair"]) == pair), key=lambda p: p["budget"])]
            lines.append(f"| {' + '.join(pair)} | " + " | ".join(cells) + " |")
    lines += ["", "Per adapter, retention by method in the order of the first table:", "",
              "| adapter | original EM | " + " | ".join(f"budget {k}" for k in results["points"]) + " |",
              "|---|---:|" + "---|" * len(results["points"])]
    for n in names:
        cells = []
        for point in results["points"].values():
            cells.append(" / ".join(f"{row['adapters'][n]['retention']:.3f}" for _, row in _ordered(point["methods"])))
        lines.append(f"| {n} | {results['original'][n]['exact_match']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", default=",".join(ADAPTERS))
    ap.add_argument("--budgets", default="0.2,0.35")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edge_lora" / "bench" / "many")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    names = args.adapters.split(",")
    missing = [n for n in names if not (adapter_dir(n) / "metrics.json").is_file()]
    if missing:
        ap.error("adapters not trained: " + "; ".join(f"{n} (python tools/train_demo_adapter.py "
                                                      f"{TRAIN.get(n, '--task ' + n.split('-r')[0])})"
                                                      for n in missing))
    started = time.time()
    results = run(names, [float(b) for b in args.budgets.split(",")], args.examples, args.work)
    # a resumed run adds its time to the first run's
    results.setdefault("created", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)))
    results["seconds"] = results.get("seconds", 0) + time.time() - started
    (args.work / f"results-{args.examples}.json").write_text(json.dumps(results, indent=1) + "\n")
    command = "python tools/bench_many.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = render(results, command.strip(), names)
    if args.no_write:
        print(body)
    else:
        write_section("Many adapters", body)
        log("wrote BENCHMARKS.md ## Many adapters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
