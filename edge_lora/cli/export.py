"""Export verbs: ``export`` (run an export profile's stages into a folder) and ``validate`` (re-run the
validation of an export folder)."""

from __future__ import annotations

VALIDATE_KEYS = ("top1_agreement", "mean_kl", "generation_agreement", "exact_match_reference",
                 "exact_match_candidate", "task_score_reference", "task_score_candidate", "hidden_rel_error")


def add_export(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="merge or hot-swap-export a PEFT LoRA adapter with its base to ONNX, then validate it",
        description="Run the stages of an export profile (export_profiles/NAME.toml): load the adapter and base "
                    "and check they fit, merge W' = W + scale·B·A (merged profiles) or keep the LoRA factors as "
                    "graph inputs (hot-swap profiles), export to ONNX with optimum (KV cache for causal LMs), "
                    "and validate against the PyTorch base + original PEFT adapter. Writes the model, "
                    "edge_lora.json, report.json and report.md into --out. Exit code 3 if a validation budget is "
                    "missed (the report is still written and says FAILED).",
    )
    p.add_argument("--base", required=True, help="base model: HF folder, .gguf file, 'smollm2' or 'minilm'")
    p.add_argument("--adapter", required=True, help="PEFT LoRA folder (adapter_config.json + safetensors)")
    p.add_argument("--profile", default="cpu-fp32",
                   help="profile name in export_profiles/ (cpu-fp32, cpu-hotswap, ...) or a .toml path "
                        "(default: cpu-fp32)")
    p.add_argument("--out", required=True, help="output folder; must not exist unless --force")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one profile key, e.g. --set validate.task_examples=64 (repeatable)")
    p.add_argument("--eval-data", metavar="FILE", help="your own evaluation data: JSONL of {\"prompt\", \"completion\"} (optional \"metric\": exact, "
                        "normalized or f1) for a task score against the reference, or plain text for the logit "
                        "metrics only; the report names the file and its sha256")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_export)


def add_validate(sub, name: str) -> None:
    v = sub.add_parser(
        name,
        help="re-run validation of an existing export folder against the PyTorch reference",
        description="Re-load the base and the original adapter recorded in DIR/edge_lora.json, run the "
                    "validation stage with the budgets the export used (plus --set overrides) and rewrite "
                    "DIR/report.json and DIR/report.md. Exit code 3 if a budget is missed.",
    )
    v.add_argument("dir", help="an export folder written by `python -m edge_lora export`")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="validate.KEY=VALUE",
                   help="override a validation key, e.g. --set validate.min_top1_agreement=0.99 (repeatable)")
    v.add_argument("--eval-data", metavar="FILE", help="your own evaluation data: JSONL of {\"prompt\", \"completion\"} (optional \"metric\": exact, "
                        "normalized or f1) for a task score against the reference, or plain text for the logit "
                        "metrics only; the report names the file and its sha256")
    v.add_argument("--quiet", action="store_true", help="no progress display")
    v.set_defaults(func=_validate)


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _summary(report: dict, out) -> None:
    print(f"{report['status']}: {out} ({report['seconds']:.1f} s)")
    for s in report["stages"]:
        if s["stage"] == "validate":
            print("  " + ", ".join(f"{k}={_fmt(s['metrics'][k])}" for k in VALIDATE_KEYS if k in s["metrics"]))


def _export(args) -> int:
    from edge_lora.pipeline import run_export

    report = run_export(args.base, args.adapter, args.profile, args.out, force=args.force,
                        overrides=args.overrides, show_progress=not args.quiet, eval_data=args.eval_data)
    _summary(report, args.out)
    return 0


def _validate(args) -> int:
    from edge_lora.pipeline import run_validate

    report = run_validate(args.dir, overrides=args.overrides, show_progress=not args.quiet,
                          eval_data=args.eval_data)
    _summary(report, args.dir)
    return 0
