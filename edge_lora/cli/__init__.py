"""``python -m edge_lora``: argparse only. One module per verb family, each handler one library call plus
printing; the verbs are the literal list :data:`VERBS` below.

An EdgeLoraError becomes a short message on stderr and its exit code (2, or 3 for a missed budget); any other
exception is a bug and keeps its traceback.

A family module imports only light modules at the top (the standard library, ``edge_lora.config`` for the
valid values of flags, ``edge_lora.ota.codec`` for a default); a handler imports its library code when it runs.
So ``--help`` takes a tenth of a second, and ``install`` on a device does not load torch.
"""

from __future__ import annotations

import argparse
import sys

from edge_lora.cli import adapters, export, ota, profile
from edge_lora.errors import EdgeLoraError

# (verb, the function that adds its subparser), in the order --help lists them.
VERBS = (
    ("inspect", adapters.add_inspect),
    ("models", adapters.add_models),
    ("export", export.add_export),
    ("validate", export.add_validate),
    ("compress", adapters.add_compress),
    ("compress-many", adapters.add_compress_many),
    ("keygen", ota.add_keygen),
    ("package", ota.add_package),
    ("verify", ota.add_verify),
    ("install", ota.add_install),
    ("list", ota.add_list),
    ("rollback", ota.add_rollback),
    ("profile", profile.add_profile),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edge_lora",
        description="Take a trained PEFT LoRA adapter and its base model to small, fast, validated on-device "
                    "artifacts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, add in VERBS:
        add(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgeLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
