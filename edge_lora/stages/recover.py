"""Recovery after allocation: a short distillation of the quantization scales against the original adapter.

    quantized, report = recover(quantized, adapter, model, tokenizer, texts, steps=100)

Allocation chooses every component's width from each layer's own output error; the errors of thirty layers then
add up through the network in ways no per-layer estimate sees. Recovery closes part of that gap BitDelta-style:
it keeps every code and width and tunes only the fp16 group scales (one multiplier per scale, started at 1), so
the artifact's size does not change by a byte. The teacher is the base with the original adapter, the student the
base with the quantized factors; the loss is the KL divergence of the student's next-token distribution from the
teacher's, on the calibration text, never the user's training data.

The text is cut into chunks of ``SEQ_LEN`` tokens; one chunk in four is held out, and the report gives the KL on
those before and after, so what recovery buys on text it did not tune on is visible. The result keeps the
multipliers of the step with the lowest held-out KL (it can only get better than the start).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from edge_lora.adapter import Adapter
from edge_lora.adapter.quantized import QuantizedAdapter, QuantizedModule
from edge_lora.errors import ConfigError
from edge_lora.formats.quantized_factors import QuantizedRows, dequantize_row
from edge_lora.report import StageReport

SEQ_LEN = 128     # tokens per chunk
BATCH = 4         # chunks per step
LR = 2e-3         # Adam on the scale multipliers (relative steps: 0.2% of a scale per step at most)
EVAL_EVERY = 10   # steps between held-out evaluations
FP16_MAX = 65504.0


@dataclass
class _Rows:
    """One QuantizedRows as torch tensors: centred codes of the live rows and their scales, plus the multipliers."""

    rows: QuantizedRows
    live: np.ndarray          # indices of live rows
    centred: torch.Tensor     # (k, d) float32: code − offset
    scales: torch.Tensor      # (k, n_groups) float32
    mult: torch.nn.Parameter  # (k, n_groups), started at 1

    @classmethod
    def of(cls, rows: QuantizedRows) -> "_Rows":
        live = np.flatnonzero(rows.bits > 0)
        if rows.zeros is not None:
            raise ConfigError("recovery tunes symmetric codes (what output-aware allocation writes); this adapter "
                              "has asymmetric zero points.")
        # the format's own decoder with unit scales gives code − offset
        ones = np.ones(rows.scales.shape[1], dtype=np.float32)
        centred = np.zeros((len(live), rows.d), dtype=np.float32)
        for j, i in enumerate(live):
            centred[j] = dequantize_row(rows.codes[i], ones, None, int(rows.bits[i]), rows.group_size)
        scales = torch.from_numpy(rows.scales[live].astype(np.float32))
        return cls(rows=rows, live=live, centred=torch.from_numpy(centred), scales=scales,
                   mult=torch.nn.Parameter(torch.ones_like(scales)))

    def matrix(self) -> torch.Tensor:
        g, d = self.rows.group_size, self.rows.d
        s = (self.scales * self.mult).repeat_interleave(g, dim=1)[:, :d]
        return self.centred * s

    def tuned(self, mult: torch.Tensor) -> QuantizedRows:
        scales = self.rows.scales.copy()
        new = (self.scales * mult).clamp(-FP16_MAX, FP16_MAX).numpy()
        scales[self.live] = new.astype(np.float16)
        return QuantizedRows(bits=self.rows.bits.copy(), codes=list(self.rows.codes), scales=scales, zeros=None,
                             d=self.rows.d, group_size=self.rows.group_size)


def _chunks(tokenizer, texts: list[str], max_tokens: int) -> list[torch.Tensor]:
    ids: list[int] = []
    for text in texts:   # one text per line, as they were given: short prompts must not run into each other
        ids += tokenizer(text + "\n")["input_ids"]
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    return [torch.tensor(ids[s:s + SEQ_LEN]) for s in range(0, len(ids) - SEQ_LEN // 2, SEQ_LEN)]


def recover(quantized: QuantizedAdapter, adapter: Adapter, model, tokenizer, texts: list[str], steps: int = 100,
            max_tokens: int = 4096) -> tuple[QuantizedAdapter, StageReport]:
    """Distil ``quantized``'s scales towards ``adapter`` (the original) on ``model`` (its base) for ``steps``
    steps over ``texts``; returns the tuned adapter (same codes, same size) and a "recover" report."""
    start = time.perf_counter()
    if steps < 1:
        raise ConfigError(f"recover: steps={steps!r} must be ≥ 1.")
    chunks = _chunks(tokenizer, texts, max_tokens)
    held, train = chunks[3::4], [c for i, c in enumerate(chunks) if i % 4 != 3]
    if not held or not train:
        raise ConfigError(f"recover: the calibration text gives {sum(len(c) for c in chunks)} tokens; recovery "
                          f"needs at least {4 * SEQ_LEN} (four chunks of {SEQ_LEN}). Give more text.")
    rows = {n: (_Rows.of(q.B_rows), _Rows.of(q.A_rows)) for n, q in quantized.modules.items()}
    # PEFT adds lora_bias as scale · bias; the quantized modules store it with the scale folded in
    teacher = {n: (m.B.float() * m.scale, m.A.float(), None if m.bias is None else m.bias.float() * m.scale)
               for n, m in adapter.modules.items()}
    missing = sorted(set(rows) - set(teacher))
    if missing:
        raise ConfigError(f"recover: the quantized adapter has modules the original lacks ({missing[:3]}); pass "
                          "the adapter it was made from.")
    mode = {"student": True}
    hooks = []

    def hook_for(name):
        qb, qa = rows[name]
        bias = quantized.modules[name].bias
        qbias = torch.from_numpy(bias.astype(np.float32)) if bias is not None else None

        def hook(_module, inputs, output):
            x = inputs[0]
            if mode["student"]:
                B, A, b = qb.matrix().T, qa.matrix(), qbias
            else:
                B, A, b = teacher[name]
            delta = (x @ A.T) @ B.T
            return output + (delta + b if b is not None else delta)
        return hook

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for name in rows:
        layer = model.get_submodule(name)
        hooks.append(getattr(layer, "base_layer", layer).register_forward_hook(hook_for(name)))
    params = [r.mult for pair in rows.values() for r in pair]
    opt = torch.optim.Adam(params, lr=LR)

    held_targets: dict[int, torch.Tensor] = {}   # the teacher on held-out batches, computed once

    def kl(batch: list[torch.Tensor], grad: bool, key: int | None = None) -> torch.Tensor:
        ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=0)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(c)) for c in batch], batch_first=True)
        target = held_targets.get(key) if key is not None else None
        if target is None:
            with torch.no_grad():
                mode["student"] = False
                target = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
                mode["student"] = True
            if key is not None:
                held_targets[key] = target
        with torch.enable_grad() if grad else torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            per_token = (target.exp() * (target - logp)).sum(-1)
            return (per_token * mask).sum() / mask.sum()

    def held_out_kl() -> float:
        # token-weighted over all held-out chunks
        sums = [(float(kl(held[i:i + BATCH], grad=False, key=i)), sum(len(c) for c in held[i:i + BATCH]))
                for i in range(0, len(held), BATCH)]
        return sum(k * n for k, n in sums) / sum(n for _, n in sums)

    try:
        before = best = held_out_kl()
        best_mult = [p.detach().clone() for p in params]
        best_step, history = 0, [(0, before)]
        order = np.random.default_rng(0)
        for step in range(1, steps + 1):
            pick = order.choice(len(train), size=min(BATCH, len(train)), replace=False)
            loss = kl([train[i] for i in pick], grad=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % EVAL_EVERY == 0 or step == steps:
                now = held_out_kl()
                history.append((step, now))
                if now < best:
                    best, best_step = now, step
                    best_mult = [p.detach().clone() for p in params]
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    it = iter(best_mult)
    modules = {}
    for name, q in quantized.modules.items():
        qb, qa = rows[name]
        modules[name] = QuantizedModule(name=q.name, kind=q.kind, B_rows=qb.tuned(next(it)), A_rows=qa.tuned(next(it)),
                                        bias=q.bias)
    out = QuantizedAdapter(modules=modules, config=quantized.config, source_config=quantized.source_config,
                           original_params=quantized.original_params, source=quantized.source)
    moved = float(torch.cat([(m - 1).abs().flatten() for m in best_mult]).max()) if best_mult else 0.0
    metrics = {"steps": steps, "best_step": best_step, "held_out_kl_before": before, "held_out_kl_after": best,
               "kl_ratio": best / before if before > 0 else 1.0, "train_tokens": sum(len(c) for c in train),
               "held_out_tokens": sum(len(c) for c in held), "scales_tuned": int(sum(p.numel() for p in params)),
               "max_scale_change": moved, "history": history, "lr": LR, "seq_len": SEQ_LEN, "batch": BATCH}
    return out, StageReport(stage="recover", config={"steps": steps, "max_tokens": max_tokens}, metrics=metrics,
                            seconds=time.perf_counter() - start)


def summary(report: StageReport) -> str:
    m = report.metrics
    return "\n".join([
        "## Recovery (scale distillation)", "",
        f"{m['scales_tuned']} fp16 scales tuned for {m['steps']} steps ({report.seconds:.0f} s) against the original "
        f"adapter on {m['train_tokens']} calibration tokens; the size is unchanged. KL to the original on "
        f"{m['held_out_tokens']} held-out tokens: {m['held_out_kl_before']:.5f} → {m['held_out_kl_after']:.5f} "
        f"({m['kl_ratio']:.2f}×, best at step {m['best_step']}).",
    ])
