"""Output-aware allocation: every component's rank and bit width chosen jointly, against the error in each layer's
output on calibration text, not against ‖ΔW − ΔŴ‖.

    metric = measure_output_metric(model, tokenizer, texts, list(adapter.modules))
    quantized, report = allocate(adapter, metric, AllocateConfig(target_error=0.15))

Three steps, each exact where it can be:

1. **Whitened canonical form.** With C = XᵀX of a module's inputs (plus a 1% ridge, so directions the calibration
   text never visits still count a little), the SVD of ΔW·L (C = L·Lᵀ) gives factors B' = U·S^½ and
   A' = S^½·V'ᵀ·L⁻¹ with the same product ΔW, whose components are orthogonal in the output metric: dropping
   component i costs exactly s_i² of ‖ΔW·X‖², and keeping the top k is the best rank-k fit of the layer's output.
2. **Measured errors.** Every component is quantized at every width {1, 2, 3, 4, 8}: B' by rounding, A' by
   error-compensating rounding through C (``quantize_rows_gptq``: each input column's rounding error is pushed
   onto the columns not yet coded, so what is lost is what the layer's inputs cannot see), and its output error
   is computed from the codes with the rank-1 identity through C (``quantize_factors.rank1_error``).
3. **One greedy path** over all components of all modules buys the upgrade with the most (weighted) error removed
   per bit, from nothing up: stopped at the error budget (``target_error``) or the size budget (``target_bits``).
   The path itself is the size-versus-error curve the report plots.

Weighting (``weighting``): ``layer`` (default) divides each module's error by the energy of its base layer's output
‖W·X‖², so a perturbation counts by how large it is next to what the layer already computes; ``adapter`` adds the
raw output errors. The estimate is relative: sqrt(Σ weighted error² / Σ weighted ‖ΔW·X‖²), 1 = the adapter dropped.

The result is an ordinary QuantizedAdapter (quantized.safetensors): rows are the whitened components, each with
its width; the device decodes and runs B'·A' exactly as any other quantized adapter.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from edge_lora.adapter import Adapter, LoraModule
from edge_lora.adapter.quantized import FactorQuantConfig, QuantizedAdapter, QuantizedModule, mixed_choices
from edge_lora.config import AllocateConfig
from edge_lora.errors import AdapterError, CompatibilityError, ConfigError
from edge_lora.report import StageReport
from edge_lora.formats.quantized_factors import QuantizedRows
from edge_lora.stages import quantize_factors as qf

RIDGE = 0.01   # C + RIDGE · mean eigenvalue · I: unseen input directions keep 1% of the average weight


@dataclass(frozen=True)
class OutputMetric:
    """What output errors are measured with: per module, C = XᵀX over its inputs (d_in × d_in, float64) and
    the energy ‖W·X‖² of the base layer's output on the same tokens."""

    grams: dict[str, torch.Tensor]
    output_energy: dict[str, float]
    tokens: int
    source: str        # where the calibration text came from (for the report)
    # Σ_t g_t² per output channel, g = ∂(next-token loss)/∂(layer output): how much the model's predictions move
    # per unit of error in each output channel (the diagonal Fisher of the outputs); None unless measured.
    output_fisher: dict[str, torch.Tensor] | None = None

    def ridged(self, name: str) -> torch.Tensor:
        C = self.grams[name].double()
        d = C.shape[0]
        return C + RIDGE * float(torch.trace(C)) / d * torch.eye(d, dtype=C.dtype)

    def ridged_fisher(self, name: str) -> torch.Tensor | None:
        if self.output_fisher is None:
            return None
        D = self.output_fisher[name].double()
        return D + RIDGE * float(D.mean())


def measure_output_metric(model, tokenizer, texts: list[str], module_names: list[str], max_tokens: int = 2048,
                          source: str = "", fisher: bool = False) -> OutputMetric:
    """One pass of the base over ``texts`` (up to ``max_tokens`` tokens) with forward hooks on every named Linear;
    with ``fisher``, a backward pass of the next-token loss too, for the output-side Fisher weights."""
    grams: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    grads: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name):
        def accumulate(g):
            g = g.detach().reshape(-1, g.shape[-1]).double()
            grads[name] = grads.get(name, 0) + g.pow(2).sum(0)

        def hook(_module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
            energy[name] = energy.get(name, 0.0) + float(output.detach().double().pow(2).sum())
            if fisher and output.requires_grad:
                output.register_hook(accumulate)
        return hook

    for name in module_names:
        try:
            layer = model.get_submodule(name)
        except AttributeError as exc:
            raise CompatibilityError(f"calibration: the base has no module {name!r} that the adapter adapts; is "
                                     "this the adapter's base model?") from exc
        layer = getattr(layer, "base_layer", layer)
        if not isinstance(layer, torch.nn.Linear):
            raise AdapterError(f"{name}: output-aware allocation covers Linear layers; this one is "
                               f"{type(layer).__name__}. Quantize this adapter with --bits instead.")
        hooks.append(layer.register_forward_hook(hook_for(name)))
    seen = 0
    try:
        with torch.enable_grad() if fisher else torch.inference_mode():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens - seen]
                if ids.numel() == 0:
                    break
                out = model(input_ids=ids, labels=ids if fisher else None)
                if fisher and ids.shape[1] > 1:
                    # summed, not averaged, so every token weighs the same whatever its text's length
                    (out.loss * (ids.shape[1] - 1)).backward()
                    model.zero_grad(set_to_none=True)
                seen += ids.shape[1]
                if seen >= max_tokens:
                    break
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ConfigError("calibration text is empty after tokenization; give a few hundred tokens of text.")
    return OutputMetric(grams=grams, output_energy=energy, tokens=seen, source=source,
                        output_fisher={n: grads[n] for n in grams} if fisher else None)


def whiten_module(m: LoraModule, C: torch.Tensor, D: torch.Tensor | None = None) -> LoraModule:
    """(B', A') with B'·A' = scale·B·A, B' = U·S^½ (orthogonal columns) and A' = S^½·V'ᵀ·L⁻¹ (rows orthogonal
    through C = L·Lᵀ): the canonical form of the output metric. ``singular_values`` are those of ΔW·L. With ``D``
    (output-side diagonal weights) the SVD is of D^½·ΔW·L and B' = D^-½·U·S^½."""
    L = torch.linalg.cholesky(C.double())
    root_d = D.double().sqrt()[:, None] if D is not None else None
    Bs, AL = m.B.double() * m.scale, m.A.double() @ L
    if root_d is not None:
        Bs = Bs * root_d
    Qb, Rb = torch.linalg.qr(Bs)
    Qa, Ra = torch.linalg.qr(AL.T)
    Y, S, Zt = torch.linalg.svd(Rb @ Ra.T)
    root = S.sqrt()
    B = (Qb @ Y) * root
    if root_d is not None:
        B = B / root_d
    A = torch.linalg.solve_triangular(L, root[:, None] * (Qa @ Zt.T).T, upper=False, left=False)
    bias = m.bias * m.scale if m.bias is not None else None
    return LoraModule(name=m.name, kind=m.kind, A=A.float().contiguous(), B=B.float().contiguous(), scale=1.0,
                      alpha=float(S.shape[0]), bias=bias, singular_values=S.float())


def whiten(adapter: Adapter, metric: OutputMetric, fisher: bool = False) -> Adapter:
    missing = [n for n in adapter.modules if n not in metric.grams]
    if missing:
        raise CompatibilityError(f"calibration has no inputs for {missing[:3]}; measure it on the adapter's own "
                                 "base model over every adapted module.")
    for n, m in adapter.modules.items():
        if metric.grams[n].shape != (m.d_in, m.d_in):
            raise CompatibilityError(f"{n}: calibration inputs are {tuple(metric.grams[n].shape)}, the adapter "
                                     f"expects {m.d_in} inputs: the calibration came from another base model.")
    return adapter.replace_modules({n: whiten_module(m, metric.ridged(n), metric.ridged_fisher(n) if fisher else None)
                                    for n, m in adapter.modules.items()}, form="whitened")


def module_weights(adapter: Adapter, metric: OutputMetric, weighting: str) -> dict[str, float]:
    if weighting == "fisher" and metric.output_fisher is None:
        raise ConfigError("weighting 'fisher' needs the output Fisher: measure_output_metric(..., fisher=True).")
    if weighting in ("adapter", "fisher"):   # fisher: the output-side weights carry the scale
        return {n: 1.0 for n in adapter.modules}
    return {n: 1.0 / max(metric.output_energy[n], 1e-30) for n in adapter.modules}


def output_errors(reference: Adapter, candidate: Adapter, metric: OutputMetric, fisher: bool = False
                  ) -> dict[str, tuple[float, float]]:
    """Per module (‖(ΔW − ΔŴ)X‖², ‖ΔW X‖²) through the ridged C (and with ``fisher`` the output-side weights D:
    ‖D^½(ΔW − ΔŴ)X‖²), from the factors (no dense ΔW)."""
    from edge_lora.stages.canonicalize import output_error_sq

    out = {}
    for n, m in reference.modules.items():
        C = metric.ridged(n)
        D = metric.ridged_fisher(n) if fisher else None
        row = D.sqrt()[:, None] if D is not None else 1.0
        c = candidate.modules.get(n)
        if c is None:
            ref = output_error_sq(m.B.double() * m.scale * row, m.A.double(), C)
            out[n] = (ref, ref)
            continue
        Bcat = torch.cat([m.B.double() * m.scale, -c.B.double() * c.scale], dim=1) * row
        Acat = torch.cat([m.A.double(), c.A.double()], dim=0)
        out[n] = (max(output_error_sq(Bcat, Acat, C), 0.0),
                  output_error_sq(m.B.double() * m.scale * row, m.A.double(), C))
    return out


@dataclass(frozen=True)
class ErrorTable:
    """Everything the greedy needs, computed once per (adapter, metric, group size, weighting): the whitened form,
    every module coded at every width, and every component's weighted output error per width. Several budgets
    on one adapter (a sweep, the Pareto plot) reuse one table."""

    white: Adapter
    coded: dict        # (module, bits) -> (B rows, A rows) coded at that width
    errors: dict       # (module, component) -> {bits: weighted error²}
    weights: dict[str, float]
    group_size: int
    weighting: str


def error_table(adapter: Adapter, metric: OutputMetric, config: AllocateConfig = AllocateConfig()) -> ErrorTable:
    if not adapter.modules:
        raise AdapterError("allocate: the adapter has no LoRA modules; there is nothing to quantize.")
    white = whiten(adapter, metric, fisher=config.weighting == "fisher")
    weights = module_weights(adapter, metric, config.weighting)
    widths = mixed_choices(True)[1:]
    coded: dict[tuple[str, int], tuple[QuantizedRows, QuantizedRows]] = {}
    errors = {}
    for name, m in white.modules.items():
        B, A = m.B.double().numpy(), m.A.double().numpy()
        C = metric.ridged(name).numpy()
        D = metric.ridged_fisher(name) if config.weighting == "fisher" else None
        Dc = D.numpy()[:, None] if D is not None else 1.0
        factor = qf.gptq_factor(C)
        CA = A @ C
        nb, na = (B * Dc * B).sum(axis=0), (A * CA).sum(axis=1)
        e = {0: nb * na}
        for bits in widths:
            coded[name, bits] = (qf.quantize_rows(B.T, [bits] * m.rank, config.group_size, True),
                                 qf.quantize_rows_gptq(A, bits, config.group_size, factor=factor))
            qB = coded[name, bits][0].dequantize().astype(np.float64).T    # d_out × r
            qA = coded[name, bits][1].dequantize().astype(np.float64)      # r × d_in
            CqA = qA @ C
            # the rank-1 identity (quantize_factors.rank1_error) for every component at once
            e[bits] = np.maximum(nb * na + (qB * Dc * qB).sum(axis=0) * (qA * CqA).sum(axis=1)
                                 - 2 * (B * Dc * qB).sum(axis=0) * (CA * qA).sum(axis=1), 0.0)
        for i in range(m.rank):
            errors[name, i] = {k: float(v[i]) * weights[name] for k, v in e.items()}
    return ErrorTable(white=white, coded=coded, errors=errors, weights=weights, group_size=config.group_size,
                      weighting=config.weighting)


def allocate(adapter: Adapter, metric: OutputMetric, config: AllocateConfig = AllocateConfig(),
             table: ErrorTable | None = None) -> tuple[QuantizedAdapter, StageReport]:
    """Choose every component's width (0 = dropped) against the weighted output error, quantize, and report the
    whole size-versus-error curve and where on it the result sits. ``table``: from :func:`error_table` of the same
    adapter and metric, to skip the costly part."""
    start = time.perf_counter()
    if table is None or (table.group_size, table.weighting) != (config.group_size, config.weighting):
        table = error_table(adapter, metric, config)
    cfg = FactorQuantConfig(bits=None, mixed_avg_bits=1.0, group_size=config.group_size)   # widths come from alloc
    white, coded, errors, weights = table.white, table.coded, table.errors, table.weights
    reference_sq = sum(e[0] for e in errors.values())
    params = adapter.params
    if config.target_bits is not None:
        alloc = qf.greedy_allocation(white, cfg, errors, bit_budget=config.target_bits * params)
    else:
        alloc = qf.greedy_allocation(white, cfg, errors, error_target_sq=config.target_error ** 2 * reference_sq)
    full = qf.greedy_allocation(white, cfg, errors)   # the whole curve, for the report and the plot
    realized = FactorQuantConfig(bits=None, mixed_avg_bits=max(alloc.path[-1][0] / max(params, 1), 1e-6),
                                 group_size=config.group_size)
    modules = {}
    for name, m in white.modules.items():
        picks = alloc.bits[name]
        modules[name] = QuantizedModule(
            name=name, kind=m.kind, bias=m.bias.float().numpy() if m.bias is not None else None,
            B_rows=_pick_rows([coded.get((name, b), (None, None))[0] for b in picks], picks, m.d_out,
                              config.group_size),
            A_rows=_pick_rows([coded.get((name, b), (None, None))[1] for b in picks], picks, m.d_in,
                              config.group_size))
    q = QuantizedAdapter(modules=modules, config=realized, source_config=dict(adapter.config),
                         original_params=params, source=adapter.source)
    measured = output_errors(adapter, q.expanded, metric, fisher=config.weighting == "fisher")
    err_w = sum(weights[n] * e for n, (e, _) in measured.items())
    ref_w = sum(weights[n] * r for n, (_, r) in measured.items())
    estimated = math.sqrt(alloc.error_sq / reference_sq) if reference_sq > 0 else 0.0
    histogram: dict[int, int] = {}
    for widths in alloc.bits.values():
        for b in widths:
            histogram[b] = histogram.get(b, 0) + 1
    fp16_bytes = params * 2
    payload = q.payload_bits() / 8
    per_type: dict[str, list] = {}
    for n, widths in alloc.bits.items():
        kind = n.rsplit(".", 1)[-1]
        slot = per_type.setdefault(kind, [0, 0, 0])
        slot[0] += sum(1 for b in widths if b)
        slot[1] += len(widths)
        slot[2] += sum(b * (adapter.modules[n].d_out + adapter.modules[n].d_in) for b in widths)
    step = max(1, len(full.path) // 400)
    curve = [(int(b), math.sqrt(max(e, 0.0) / reference_sq) if reference_sq else 0.0)
             for b, e in full.path[::step] + (full.path[-1],)]
    metrics = {
        "target_error": config.target_error, "target_bits": config.target_bits, "weighting": config.weighting,
        "calibration_tokens": metric.tokens, "calibration": metric.source,
        "estimated_rel_error": estimated,
        "measured_rel_error": math.sqrt(err_w / ref_w) if ref_w > 0 else 0.0,
        "bits_per_original_param": q.payload_bits() / max(params, 1),
        "payload_bytes": payload, "fp16_peft_bytes": fp16_bytes,
        "size_ratio_vs_fp16_peft": fp16_bytes / max(payload, 1),
        "components_kept": sum(v for b, v in histogram.items() if b), "components": sum(histogram.values()),
        "component_bits_histogram": dict(sorted(histogram.items())),
        "per_module_type": {k: {"kept": v[0], "components": v[1], "code_bits": v[2]} for k, v in sorted(per_type.items())},
        "module_rel_error": {n: math.sqrt(e / r) if r > 0 else 0.0 for n, (e, r) in measured.items()},
        "curve": {"bits_per_param": [b / max(params, 1) for b, _ in curve], "rel_error": [e for _, e in curve]},
    }
    report = StageReport(stage="allocate", config=asdict(config), metrics=metrics,
                         seconds=time.perf_counter() - start)
    return q, report


def _pick_rows(sources: list, picks: list[int], d: int, group_size: int) -> QuantizedRows:
    """Row i of the result is row i of the width-``picks[i]`` coding (none for 0: the component is dropped)."""
    n_groups = math.ceil(d / group_size)
    scales = np.zeros((len(picks), n_groups), dtype=np.float16)
    codes = []
    for i, (rows, b) in enumerate(zip(sources, picks)):
        if b == 0:
            codes.append(np.zeros(0, dtype=np.uint8))
            continue
        codes.append(rows.codes[i])
        scales[i] = rows.scales[i]
    return QuantizedRows(bits=np.asarray(picks, dtype=np.uint8), codes=codes, scales=scales, zeros=None, d=d,
                         group_size=group_size)


def summary(report: StageReport) -> str:
    m = report.metrics
    how = (f"the smallest point on the curve whose estimated output error is ≤ {m['target_error']:g}"
           if m["target_bits"] is None else f"the lowest error within {m['target_bits']:g} bits per parameter")
    widths = ", ".join(f"{b} bits × {n}" for b, n in m["component_bits_histogram"].items())
    types = ", ".join(f"{k} {v['kept']}/{v['components']}" for k, v in m["per_module_type"].items())
    return "\n".join([
        "## Output-aware allocation", "",
        f"Chosen: {how} ({m['weighting']} weighting; calibration: {m['calibration']}, {m['calibration_tokens']} "
        "tokens).", "",
        f"Result: {m['bits_per_original_param']:.3f} bits per original parameter, payload "
        f"{m['payload_bytes'] / 1024:.1f} KiB, {m['size_ratio_vs_fp16_peft']:.1f}× smaller than the fp16 PEFT "
        f"adapter ({m['fp16_peft_bytes'] / 1024:.1f} KiB). Estimated output error {m['estimated_rel_error']:.4f} "
        f"(measured from the codes: {m['measured_rel_error']:.4f}).", "",
        f"Components kept: {m['components_kept']} of {m['components']} ({types}). Widths: {widths}.",
    ])


def write_plot(report: StageReport, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report.metrics
    x, y = np.array(m["curve"]["bits_per_param"]), np.array(m["curve"]["rel_error"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(16 / np.maximum(x, 1e-9), y, "-", lw=1.2, label="greedy path (every upgrade bought)")
    ax.plot(m["size_ratio_vs_fp16_peft"], m["estimated_rel_error"], "k*", ms=10, label="chosen")
    if m["target_error"] is not None and m["target_bits"] is None:
        ax.axhline(m["target_error"], color="grey", lw=0.7, ls="--", label=f"budget {m['target_error']:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1, max(200.0, m["size_ratio_vs_fp16_peft"] * 2))
    ax.set_ylim(max(float(y[y > 0].min()) if (y > 0).any() else 1e-4, 1e-4), 1.2)
    ax.invert_xaxis()
    ax.set_xlabel("× smaller than fp16 PEFT (payload)")
    ax.set_ylabel("estimated relative output error")
    ax.set_title("Size versus output error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- a folder
PLOT_FILE = "size_vs_error.png"


def base_for(adapter: Adapter, adapter_dir, base) -> str:
    """The base to measure output errors on: ``base`` if given, else the adapter's own base_model_name_or_path
    when it names a folder on this machine."""
    from pathlib import Path

    if base is not None:
        return str(base)
    recorded = adapter.config.get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        return str(recorded)
    raise ConfigError(f"compress {adapter_dir}: output-aware allocation measures each layer's output on the base "
                      f"model, and the adapter's base ({recorded!r}) is not a folder here. Pass --calibrate BASE "
                      "('smollm2', an HF folder or a .gguf file), or --budget/--bits for a weight-space compression "
                      "that needs no base.")


def allocate_folder(adapter_dir, out, config: AllocateConfig = AllocateConfig(), base=None, calibration_text=None,
                    as_peft=None, force: bool = False, recover_text=None):
    """``python -m edge_lora compress ADAPTER --out DIR`` (no --budget/--bits): measure the output metric on the
    base over the calibration text, allocate, and write DIR/quantized.safetensors, report.json, report.md and the
    size-versus-error plot, into a temporary folder renamed into place at the end (nothing half-written).
    ``recover_text``: a file of text (prompts, with ``complete_tokens``) for recovery only; default: the
    calibration text."""
    import json
    from pathlib import Path

    from edge_lora.adapter import load_peft, save_peft
    from edge_lora.base import load_base
    from edge_lora.errors import EdgeLoraError, ModelError
    from edge_lora.files import atomic_folder, write_text_atomic
    from edge_lora.stages.compress import QUANTIZED_FILE, CompressedFolder, calibration_texts
    from edge_lora.stages.quantize_factors import canonical_like

    out = Path(out)
    for folder, flag in ((out, "--out"), (as_peft, "--as-peft")):
        if folder is not None and Path(folder).exists() and not force:
            raise EdgeLoraError(f"{flag} {folder} already exists; choose another folder or pass --force to "
                                "replace it.")
    if config.complete_tokens and calibration_text is None and recover_text is None:
        raise ConfigError("--complete appends the adapter's answers to your prompts: give them with "
                          "--calibration-text FILE or --recover-text FILE (one prompt per line).")
    if recover_text is not None and not config.recover_steps:
        raise ConfigError("--recover-text is the text recovery tunes on; it needs --recover STEPS.")
    texts = calibration_texts(calibration_text)
    tuning = calibration_texts(recover_text, "--recover-text") if recover_text is not None else None
    adapter = load_peft(adapter_dir)
    base_spec = base_for(adapter, adapter_dir, base)
    model, tokenizer = load_base(base_spec)
    if tokenizer is None:
        raise ModelError(f"{base_spec}: the base has no tokenizer files to encode calibration text; pass the HF "
                         "folder that holds them (tokenizer.json / tokenizer_config.json).")
    source = f"{calibration_text}" if calibration_text else "built-in task-agnostic text (edge_lora.calibration)"
    if config.complete_tokens:
        from edge_lora.calibration import complete

        answered = f", each line completed by the adapter (≤ {config.complete_tokens} tokens)"
        if calibration_text is not None:
            texts = complete(model, tokenizer, adapter, texts, config.complete_tokens)
            source += answered
        if tuning is not None:
            tuning = complete(model, tokenizer, adapter, tuning, config.complete_tokens)
    metric = measure_output_metric(model, tokenizer, texts, list(adapter.modules), config.calibration_tokens,
                                   source, fisher=config.weighting == "fisher")
    q, report = allocate(adapter, metric, config)
    markdown = "# Compression report\n\n" + summary(report) + "\n"
    record = report.to_dict()
    if config.recover_steps:
        from edge_lora.stages import recover

        q, recovered = recover.recover(q, adapter, model, tokenizer, tuning if tuning is not None else texts,
                                       steps=config.recover_steps)
        record["recover"] = recovered.to_dict()
        record["recover"]["text"] = (str(recover_text) + (answered if config.complete_tokens else "")
                                     if recover_text is not None else source)
        markdown += "\n" + recover.summary(recovered) + "\n"
    del model
    with atomic_folder(out) as tmp:
        q.save(tmp / QUANTIZED_FILE)
        write_text_atomic(tmp / "report.json", json.dumps(record, indent=2) + "\n")
        write_text_atomic(tmp / "report.md", markdown)
        write_plot(report, tmp / PLOT_FILE)
        if as_peft is not None:
            save_peft(q.dequantize(canonical_like(adapter)), as_peft, overwrite=force)
    return CompressedFolder(out=out, report=report, markdown=markdown,
                            files=(QUANTIZED_FILE, "report.json", "report.md", PLOT_FILE),
                            as_peft=Path(as_peft) if as_peft is not None else None)
