"""``python -m edge_lora inspect``: what an adapter holds, module by module, and whether it fits a base."""

from __future__ import annotations

import re
from collections import defaultdict

from edge_lora.adapter import compatibility_problems, load_peft
from edge_lora.stages.canonicalize import canonicalize, energy_ranks

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _module_type(name: str) -> str:
    """Group key across layers: the module path with layer numbers replaced, e.g. 'model.layers.*.mlp.up_proj'."""
    return re.sub(r"\.\d+\.", ".*.", name)


def inspect_adapter(path, base: str | None = None) -> dict:
    adapter = load_peft(path)
    canonical, _ = canonicalize(adapter)
    item_bytes = _BYTES.get(adapter.storage_dtype, 4)
    modules = []
    for name, m in adapter.modules.items():
        S = canonical.modules[name].singular_values
        modules.append({
            "name": name, "kind": m.kind, "rank": m.rank, "alpha": m.alpha, "scale": m.scale,
            "shape": [m.d_out, m.d_in], "params": m.params, "bytes": m.params * item_bytes,
            "singular_values": [round(float(s), 6) for s in S],
            "energy_rank": energy_ranks(S),
        })
    groups = defaultdict(lambda: {"modules": 0, "params": 0})
    for row in modules:
        g = groups[_module_type(row["name"])]
        g["modules"] += 1
        g["params"] += row["params"]
    config = adapter.config
    report = {
        "adapter": str(path),
        "peft_config": {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern",
                                                   "alpha_pattern", "target_modules", "fan_in_fan_out",
                                                   "lora_bias", "bias", "modules_to_save", "base_model_name_or_path")},
        "storage_dtype": adapter.storage_dtype,
        "modules": modules,
        "groups": dict(sorted(groups.items())),
        "extra_tensors": {k: list(v.shape) for k, v in adapter.extra_tensors.items()},
        "totals": {
            "modules": len(modules),
            "params": adapter.params,
            "bytes": adapter.params * item_bytes,
            "extra_params": sum(v.numel() for v in adapter.extra_tensors.values()),
        },
    }
    if base is not None:
        from edge_lora.base import base_content_hash, load_base, resolve_base

        path = resolve_base(base)
        model, _ = load_base(path)
        problems = compatibility_problems(adapter, model)
        report["base"] = {"spec": str(base), "path": str(path),
                          "content_hash": base_content_hash(model)}
        report["compatible"] = not problems
        report["problems"] = problems
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output gets rich's 80-column default, which folds module names into unreadable stubs.
    console = Console(width=None if Console().is_terminal else 150)
    table = Table(title=f"LoRA modules of {report['adapter']}", show_lines=False)
    for col in ("module", "kind", "rank", "scale", "out×in", "σ₁", "σ_r", "r@50%", "r@90%", "r@99%", "params"):
        table.add_column(col, justify="left" if col in ("module", "kind") else "right")
    for m in report["modules"]:
        S = m["singular_values"]
        e = m["energy_rank"]
        table.add_row(m["name"], m["kind"], str(m["rank"]), f"{m['scale']:.4g}", f"{m['shape'][0]}×{m['shape'][1]}",
                      f"{S[0]:.4g}" if S else "-", f"{S[-1]:.3g}" if S else "-",
                      str(e["50%"]), str(e["90%"]), str(e["99%"]), f"{m['params']:,}")
    console.print(table)
    groups = Table(title="Per module type (across layers)")
    for col in ("module type", "modules", "params"):
        groups.add_column(col, justify="left" if col == "module type" else "right")
    for name, g in report["groups"].items():
        groups.add_row(name, str(g["modules"]), f"{g['params']:,}")
    console.print(groups)
    t = report["totals"]
    console.print(f"[bold]Total[/bold]: {t['modules']} modules, {t['params']:,} params, "
                  f"{t['bytes'] / 1e6:.2f} MB as {report['storage_dtype']}"
                  + (f"; plus {t['extra_params']:,} params of full tensors ({', '.join(report['extra_tensors'])})"
                     if report["extra_tensors"] else ""))
    if "compatible" in report:
        b = report["base"]
        if report["compatible"]:
            console.print(f"[green]Compatible[/green] with base {b['spec']} ({b['path']}, content hash "
                          f"{b['content_hash'][:16]}…): every target module exists with matching shapes.")
        else:
            console.print(f"[red]NOT compatible[/red] with base {b['spec']} ({len(report['problems'])} problem(s)):")
            for p in report["problems"]:
                console.print(f"  - {p}")
