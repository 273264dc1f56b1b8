"""Factor quantization on the trained demo adapter: honest bits per parameter against task retention and KL.

    python tools/bench_quantize.py            # writes the "## Factor quantization" section of BENCHMARKS.md

Each point quantizes the canonical (balanced) factors of date-iso-r16, alone or after `compress` (svd
truncation), then scores base + dequantized adapter exactly as tools/bench_compress.py scores compression:
exact match on held-out dates (greedy, PyTorch) and mean KL against base + original adapter. Size ratio =
fp16 PEFT adapter bytes / quantized payload bytes (codes, fp16 scales, zero points and per-row widths).
Base-model quantization (int8 / int4 ONNX) is not here yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_compress import deltas_of, env_line, kl_texts, logprobs, mean_kl, merged_state  # noqa: E402
from benchmarks_md import write_section  # noqa: E402

from edge_lora.adapter import load_peft  # noqa: E402
from edge_lora.stages.canonicalize import canonicalize  # noqa: E402
from edge_lora.stages.compress import CompressConfig, compress  # noqa: E402
from edge_lora.stages.quantize_factors import FactorQuantConfig, quantize_factors  # noqa: E402

# (label, svd budget or None, FactorQuantConfig kwargs)
POINTS = [
    ("int8", None, dict(bits=8)),
    ("int4", None, dict(bits=4)),
    ("int3", None, dict(bits=3)),
    ("int2", None, dict(bits=2)),
    ("int2 asym", None, dict(bits=2, symmetric=False)),
    ("mixed 3.0", None, dict(bits=None, mixed_avg_bits=3.0)),
    ("mixed 2.0", None, dict(bits=None, mixed_avg_bits=2.0)),
    ("svd@0.2 + int4", 0.2, dict(bits=4)),
    ("svd@0.2 + mixed 3.0", 0.2, dict(bits=None, mixed_avg_bits=3.0)),
    ("svd@0.4 + mixed 3.0", 0.4, dict(bits=None, mixed_avg_bits=3.0)),
]


def main(argv=None) -> int:
    from edge_lora import eval as task
    from edge_lora.models import cache_dir, load_base

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default="date-iso-r16")
    ap.add_argument("--n", type=int, default=200, help="held-out examples for exact match")
    ap.add_argument("--kl-examples", type=int, default=24)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    env = env_line()
    model, tok = load_base("smollm2")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    examples = task.make_examples(args.n, seed=0, split="test")
    texts = kl_texts(task.make_examples(args.kl_examples, seed=1, split="test"))

    def em(state) -> float:
        model.load_state_dict(state)
        gen = lambda prompts: task.torch_greedy_generate(model, tok, prompts, max_new_tokens=12)  # noqa: E731
        return task.score(gen, examples, batch_size=args.batch)["exact_match"]

    folder = Path(args.adapter) if Path(args.adapter).is_dir() else cache_dir() / "adapters" / args.adapter
    adapter = load_peft(folder)
    fp16_bytes = adapter.params * 2
    em_base = em(base_state)
    ref_state = merged_state(base_state, deltas_of(adapter))
    model.load_state_dict(ref_state)
    ref_lp = logprobs(model, tok, texts)
    em_ref = em(ref_state)
    print(f"base EM {em_base:.3f}, adapter EM {em_ref:.3f}", flush=True)
    canonical, _ = canonicalize(adapter)

    rows = []
    for label, budget, kwargs in POINTS:
        t = time.perf_counter()
        source = canonical
        if budget is not None:
            result, _ = compress(adapter, CompressConfig(budget=budget, structure="svd"))
            source, _ = canonicalize(result.to_adapter())
        q, report = quantize_factors(source, FactorQuantConfig(group_size=args.group_size, **kwargs))
        deq = q.dequantize(source)
        state = merged_state(base_state, deltas_of(deq))
        model.load_state_dict(state)
        kl = mean_kl(ref_lp, logprobs(model, tok, texts))
        e = em(state)
        payload = q.payload_bits() / 8
        rows.append(dict(label=label, bits=payload * 8 / adapter.params, ratio=fp16_bytes / payload, em=e,
                         retention=(e - em_base) / (em_ref - em_base), kl=kl,
                         rel=report.metrics["rel_error_weighted"], secs=time.perf_counter() - t))
        print(rows[-1], flush=True)

    lines = [
        f"`python tools/bench_quantize.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` — adapter "
        f"`{folder.name}` ({adapter.params:,} params, {fp16_bytes / 1024:.0f} KiB as fp16) on SmolLM2-135M-Instruct. "
        f"Factors: canonical balanced form, groups of {args.group_size} along d, symmetric unless marked, fp16 "
        f"scales. Bits/param = quantized payload bits (codes + scales + zero points + per-row widths) / the "
        f"original adapter's parameters. EM on {args.n} held-out dates (base {em_base:.3f}, adapter {em_ref:.3f}); "
        f"KL = mean KL(reference ‖ candidate) of next-token distributions over {args.kl_examples} held-out "
        f"texts. {env}.", "",
        "| point | bits/param | size vs fp16 PEFT | weighted rel. error | EM | retention | mean KL |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bits']:.2f} | {r['ratio']:.1f}× smaller | {r['rel']:.3f} | "
                     f"{r['em']:.3f} | {r['retention']:.3f} | {r['kl']:.4f} |")
    keep = [r for r in rows if r["retention"] >= 0.99]
    if keep:
        best = max(keep, key=lambda r: r["ratio"])
        lines += ["", f"Smallest point with ≥99% task retention: **{best['label']}**, {best['ratio']:.1f}× smaller "
                      f"than the fp16 PEFT adapter ({best['bits']:.2f} bits/param, KL {best['kl']:.4f}); goal ≥16×."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("Factor quantization", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
