"""``python -m edge_lora profile``: latency and memory of export folders (stages/profile.py)."""

from __future__ import annotations

import argparse
import sys

TABLE = "profiling"   # the profile files' table of the profiling stage, as in --set profiling.KEY=VALUE


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 16,128,512")
    return values


def add_profile(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="latency and memory of an export folder (prefill, decode ms/token, load, swap, peak RSS)",
        description="Profile an export folder written by `python -m edge_lora export`: load time, prefill at "
                    "several prompt lengths (= time to first token), decode ms/token p50/p90/p99 and tokens/s, "
                    "adapter swap time (hot-swap), encoder latency per batch (feature-extraction), peak RSS of a "
                    "fresh process per variant. Variants (hot-swap: no adapter and each adapter; --vs folders; "
                    "--runtime lists) run in turn A B A B after warm-up; ratios against the first are per-round "
                    "medians with their IQR. --out gets profile.json (raw samples), profile.md and plots. Exit 3 "
                    "if a budget (--set profiling.max_...) is missed; the report is still written.",
    )
    p.add_argument("dir", help="export folder (merged or hot-swap, any precision)")
    p.add_argument("--vs", action="append", default=[], metavar="OTHER_DIR",
                   help="another export folder to compare against, interleaved (repeatable)")
    p.add_argument("--adapters", metavar="X,Y", help="hot-swap DIR: adapter files to compare with no adapter on "
                   "one session (default: DIR's own adapter file)")
    p.add_argument("--runtime", default=None, metavar="R[,R2]",
                   help="ort_cpu (default), ort_cuda, mobile (ORT format, 1-2 threads: an emulation of a phone "
                        "CPU, not a phone), llamacpp; a comma list compares runtimes")
    p.add_argument("--threads", type=int, help="intra-op threads (default 2; 0 = all cores)")
    p.add_argument("--prompt-lengths", type=_ints, help="default 16,128,512 (capped by the model's positions)")
    p.add_argument("--decode-tokens", type=int, help="decode steps per round (default 32)")
    p.add_argument("--runs", type=int, help="recorded rounds (default 5)")
    p.add_argument("--warmup", type=int, help="unrecorded rounds first (default 1)")
    p.add_argument("--batch-sizes", type=_ints, help="encoder exports: batch sizes (default 1,8)")
    p.add_argument("--no-isolate", action="store_true",
                   help="skip the fresh process per variant (peak RSS is then this process's, all variants)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar=f"{TABLE}.KEY=VALUE",
                   help=f"any [{TABLE}] key, e.g. --set {TABLE}.max_decode_ms_per_token=40 (repeatable)")
    p.add_argument("--out", help="write profile.json, profile.md and plots here")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_profile)


def _profile(args) -> int:
    from edge_lora.stages.profile import check_budgets, profile_folders
    from edge_lora.stages.profile_report import print_summary

    flags = {"threads": args.threads, "prompt_lengths": args.prompt_lengths, "decode_tokens": args.decode_tokens,
             "runs": args.runs, "warmup": args.warmup, "encoder_batch_sizes": args.batch_sizes,
             "isolate": False if args.no_isolate else None}
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()] if args.adapters else None
    progress = (lambda text: None) if args.quiet else (lambda text: print(f"profile: {text}", file=sys.stderr))
    result = profile_folders([args.dir, *args.vs], runtime=args.runtime, overrides=args.overrides,
                             settings={k: v for k, v in flags.items() if v is not None}, adapters=adapters,
                             out=args.out, force=args.force, progress=progress)
    print_summary(result, args.out)
    check_budgets(result, args.out)   # after the summary: a miss exits 3, the report is written
    return 0
