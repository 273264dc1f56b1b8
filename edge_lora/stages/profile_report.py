"""The profile report: profile.json (raw samples, summaries, machine), profile.md (tables) and PNG plots,
written into a folder atomically; and the short summary the CLI prints."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edge_lora.files import atomic_folder
from edge_lora.formats.export_meta import relative_path

MOBILE_NOTE = "emulation of a phone CPU, not a phone"


def write_report(out: str | os.PathLike, result: dict, replace: bool = True) -> Path:
    out = Path(out)
    if out.exists() and not replace:
        raise FileExistsError(out)
    result = portable(result, out)
    with atomic_folder(out) as tmp:
        (tmp / "profile.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        plots = write_plots(tmp, result)
        (tmp / "profile.md").write_text(render_markdown(result, plots))
    return out


def portable(result: dict, folder: str | os.PathLike) -> dict:
    """``result`` with the paths it names (each variant's export folder and adapter file, its runner's model)
    relative to ``folder``, where the report goes: a report names no build machine's layout."""
    variants = []
    for v in result["variants"]:
        v = dict(v)
        for key in ("path", "adapter"):
            if v.get(key):
                v[key] = relative_path(v[key], folder)
        if v.get("info", {}).get("model"):
            v["info"] = {**v["info"], "model": relative_path(v["info"]["model"], folder)}
        variants.append(v)
    return {**result, "variants": variants}


# ------------------------------------------------------------------------------------------ markdown
def _f(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _load_average(machine: dict, when: str) -> str:
    value = machine.get(f"load_average_{when}")
    return f"{value[0]:.1f}" if value else "unknown"


def _status(result: dict) -> str:
    return "FAILED" if result["budget_failures"] else "PASSED"


def render_markdown(result: dict, plots: list[str] = ()) -> str:
    m, c = result["machine"], result["config"]
    lines = [f"# edge_lora profile: {_status(result)}", "",
             (f"- {result['created']}, {result['seconds']:.0f} s; {result['kind']}; {c['runs']} recorded rounds "
              f"after {c['warmup']} warm-up, variants interleaved A B A B within each round"),
             (f"- machine: {m['cpu']}, {m['physical_cores']} physical / {m['logical_cores']} logical cores, "
             f"{m['memory_gb']} GB; ONNX Runtime {m['onnxruntime']}; load average "
             f"{_load_average(m, 'start')} at start, {_load_average(m, 'end')} at the end"),
             "- every number names its runner: runtime, threads, precision"]
    if any(v["info"].get("runtime") == "mobile" for v in result["variants"]):
        lines.append(f"- rows on runtime `mobile` are an **{MOBILE_NOTE}**: ORT format, 1-2 threads, spinning off, "
                     "on this machine's cores")
    lines.append("")
    if result["budget_failures"]:
        lines += ["**FAILED budgets:**", ""] + [f"- {f}" for f in result["budget_failures"]] + [""]
    lines += (_encoder_table(result) if result["kind"] == "encoder" else _causal_table(result))
    lines += _comparison_table(result)
    lines += ["", "## Memory", "", ("Peak RSS is the kernel's high-water mark of the process (Python + runtime + "
              "model); baseline = after importing the runtime, before loading the model."), "",
              "| variant | model file MB | measured in | baseline MB | after load MB | peak MB |",
              "|---|---:|---|---:|---:|---:|"]
    for v in result["variants"]:
        mem = v["memory"]
        lines.append(f"| {v['label']} | {_f(v['info'].get('model_file_mb'), 0)} | {mem['measured']} | "
                     f"{_f(mem.get('baseline_rss_mb'), 0)} | {_f(mem.get('rss_after_load_mb'), 0)} | "
                     f"{_f(mem['peak_rss_mb'], 0)} |")
    notes = result["notes"] + [f"skipped: {n}" for n in result.get("skipped", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _load(v: dict) -> float:
    return v["load_s"]["fresh_process"] or v["load_s"]["in_process"]


def _causal_table(result: dict) -> list[str]:
    lengths = [str(n) for n in result["prompt_lengths"]]
    head = (["variant", "runner", "load s", "peak RSS MB"] + [f"prefill = TTFT @{n} ms" for n in lengths]
            + ["decode ms/tok p50", "p90", "p99", "tokens/s", "swap ms p50", "1st prefill after swap ms",
               "adapter MB"])
    lines = ["## Latency", "", (f"Prefill and decode with batch 1; decode continues a {lengths[0]}-token prompt "
             "with the KV cache. Medians (p50) over rounds; decode percentiles over every step of every round. "
             "Swap = read the adapter file and make it active; the first prefill after it (shortest prompt) is "
             "timed apart."), "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for v in result["variants"]:
        d = v["decode_ms"]
        swap = v["swap_ms"]["p50"] if "swap_ms" in v and v["adapter"] else None
        after_swap = v["first_prefill_ms"]["p50"] if swap is not None else None
        cells = ([v["label"], f"`{v['runner']}`", _f(_load(v)), _f(v["memory"]["peak_rss_mb"], 0)]
                 + [_f(v["prefill_ms"][n]["p50"]) for n in lengths]
                 + [_f(d["p50"]), _f(d["p90"]), _f(d["p99"]), _f(v["tokens_per_s"], 1), _f(swap),
                    _f(after_swap), _f(v["adapter_file_mb"])])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _encoder_table(result: dict) -> list[str]:
    keys = list(result["variants"][0]["encode_ms"])
    head = ["variant", "runner", "load s", "peak RSS MB"] + [f"batch×len {k} ms" for k in keys]
    lines = ["## Encoder latency", "", "One forward pass per batch (batch × tokens); p50 over rounds.", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for v in result["variants"]:
        cells = [v["label"], f"`{v['runner']}`", _f(_load(v)), _f(v["memory"]["peak_rss_mb"], 0)]
        lines.append("| " + " | ".join(cells + [_f(v["encode_ms"][k]["p50"]) for k in keys]) + " |")
    return lines


def _ratio(r: dict) -> str:
    return f"×{r['median']:.3f} ({r['p25']:.3f}–{r['p75']:.3f})"


def _comparison_table(result: dict) -> list[str]:
    if not result["comparisons"]:
        return []
    lines = ["", "## Interleaved comparisons", "", ("Ratio to the reference per round (both ran in the same "
             "round), median and interquartile range over rounds; ×1.05 = 5% slower."), ""]
    first = result["comparisons"][0]
    keys = list(first["encode_ratio"]) if "encode_ratio" in first else ["decode"] + list(first["prefill_ratio"])
    names = [f"encode {k}" for k in keys] if "encode_ratio" in first else (
        ["decode ms/token"] + [f"prefill @{k}" for k in keys[1:]])
    lines += ["| variant | reference | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for c in result["comparisons"]:
        if "encode_ratio" in c:
            cells = [_ratio(c["encode_ratio"][k]) for k in keys]
        else:
            cells = [_ratio(c["decode_ratio"])] + [_ratio(c["prefill_ratio"][k]) for k in keys[1:]]
        lines.append(f"| {c['variant']} | {c['reference']} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------ plots
def _horizontal() -> dict:
    import matplotlib

    # ``orientation`` arrived in matplotlib 3.10 and ``vert`` is deprecated since; the floor is 3.7.
    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def write_plots(folder: Path, result: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = [v["label"] for v in result["variants"]]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)

    if result["kind"] == "encoder":
        keys = list(result["variants"][0]["encode_ms"])
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.boxplot([[s for k in keys for s in v["encode_ms"][k]["samples"]] for v in result["variants"]],
                   tick_labels=labels, **_horizontal())
        ax.set_xlabel("ms per batch (all batch × length cells)")
        ax.set_title("Encoder latency distribution")
        save(fig, "encode_ms.png")
        return written

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.6 * len(labels) + 3))
    decode = [[s for rnd in v["decode_ms"]["samples"] for s in rnd] for v in result["variants"]]
    left.boxplot(decode, tick_labels=labels, whis=(1, 99), **_horizontal())
    left.set_xlabel("decode ms/token (whiskers p1–p99)")
    left.set_title("Decode latency per variant")
    for v in result["variants"]:
        right.plot([sorted(r)[len(r) // 2] for r in v["decode_ms"]["samples"]], marker="o", label=v["label"])
    right.set_xlabel("round")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set_ylabel("median ms/token in the round")
    right.set_title("Per round (interleaved)")
    right.legend(fontsize=7)
    save(fig, "decode_ms.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for v in result["variants"]:
        lengths = [int(n) for n in v["prefill_ms"]]
        p50 = [v["prefill_ms"][str(n)]["p50"] for n in lengths]
        lo = [p - v["prefill_ms"][str(n)]["p10"] for n, p in zip(lengths, p50)]
        hi = [v["prefill_ms"][str(n)]["p90"] - p for n, p in zip(lengths, p50)]
        ax.errorbar(lengths, p50, yerr=[lo, hi], marker="o", capsize=3, label=v["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["prompt_lengths"], [str(n) for n in result["prompt_lengths"]])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill = time to first token, ms (p50, p10–p90)")
    ax.set_title("Prefill vs prompt length")
    ax.legend(fontsize=7)
    save(fig, "prefill_ms.png")
    return written


# ------------------------------------------------------------------------------------------ console
def print_summary(result: dict, out=None) -> None:
    print(f"{_status(result)}: {len(result['variants'])} variant(s), {result['config']['runs']} rounds"
          + (f"; report in {out}" if out else ""))
    for v in result["variants"]:
        mem = f"peak RSS {v['memory']['peak_rss_mb']:.0f} MB, load {_load(v):.2f} s"
        if "decode_ms" in v:
            d = v["decode_ms"]
            pre = ", ".join(f"@{n} {s['p50']:.1f}" for n, s in v["prefill_ms"].items())
            line = (f"decode {d['p50']:.2f}/{d['p90']:.2f}/{d['p99']:.2f} ms/token (p50/p90/p99), "
                    f"{v['tokens_per_s']:.1f} tok/s; prefill ms {pre}")
        else:
            line = "encode ms " + ", ".join(f"{k} {s['p50']:.1f}" for k, s in v["encode_ms"].items())
        if v.get("adapter") and "swap_ms" in v:
            line += f"; swap {v['swap_ms']['p50']:.2f} ms"
        print(f"  {v['label']} [{v['runner']}]: {line}; {mem}")
    for c in result["comparisons"]:
        r = c.get("decode_ratio") or next(iter(c["encode_ratio"].values()))
        what = "decode" if "decode_ratio" in c else "encode"
        print(f"  {c['variant']} vs {c['reference']}: {what} {_ratio(r)} (median, IQR of per-round ratios)")
    for f in result["budget_failures"]:
        print(f"  FAILED budget: {f}")
