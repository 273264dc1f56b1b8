"""Accuracy of an exported model against the reference: the PyTorch base with the original PEFT adapter.

Causal LMs, on an evaluation text of ``eval_tokens`` tokens: max/mean |logit error|, mean KL(ref ‖ cand) of the
next-token distributions, top-1 agreement, perplexity of base, reference and candidate; greedy agreement over
``generate_tokens`` new tokens (KV-cache loop in ONNX Runtime vs PyTorch); and the demo task's exact match
through ``edge_lora.eval.score`` when the adapter has that task. Encoders: relative error and cosine of the
hidden states. Hot-swap exports are also run with no adapter and compared to the PyTorch base.

The stage never raises on a budget miss: it returns the misses in ``metrics["budget_failures"]`` so the
pipeline can write the report first and then fail the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_lora.config import ValidateConfig
from edge_lora.report import StageReport
from edge_lora.runtimes.ort_session import full_feeds, load_session
from edge_lora.files import write_text_atomic
from edge_lora.formats.export_meta import ExportMeta
from edge_lora.tasks import TASKS


# ------------------------------------------------------------------------------------------ inputs
def eval_ids(tokenizer, n_tokens: int, vocab_size: int, task: str | None = "date-iso",
             text: str | None = None) -> np.ndarray:
    """1 × n evaluation ids: ``text`` (the user's --eval-data) if given; else held-out lines of the adapter's own
    ``task`` (date → ISO by default); with no task, the neutral built-in text of edge_lora.calibration. Fixed
    random ids without a tokenizer."""
    if tokenizer is None:
        return np.random.default_rng(1234).integers(0, vocab_size, size=(1, n_tokens), dtype=np.int64)
    if text is None and task is None:
        from edge_lora.calibration import TEXTS

        text = "\n".join(TEXTS)
    if text is not None:
        return np.array([tokenizer(text)["input_ids"][:n_tokens]], dtype=np.int64)
    from edge_lora import eval as date_task
    from edge_lora import tasks as suite

    examples = (date_task.make_examples(200, seed=7, split="test") if task == "date-iso"
                else suite.make_examples(task, 200, seed=7, split="test"))
    lines, ids = [], []
    for example in examples:
        lines.append(date_task.prompt_text(example) + date_task.target_text(example))
        ids = tokenizer("\n".join(lines))["input_ids"]
        if len(ids) >= n_tokens:
            break
    return np.array([ids[:n_tokens]], dtype=np.int64)


def check_eval_data(data, tokenizer, max_positions: int, config: ValidateConfig) -> None:
    """Refuse --eval-data the model cannot run: no tokenizer to read it, or a prompt longer than the context."""
    from edge_lora.eval_data import EvalDataError

    if data is None:
        return
    if tokenizer is None:
        raise EvalDataError(f"--eval-data {data.path}: the base has no tokenizer files, so text cannot be encoded; "
                            "pass a base folder with tokenizer.json / tokenizer_config.json.")
    max_new_tokens = answer_tokens(data, tokenizer, config)
    for e in data.examples:
        n = len(tokenizer(e.prompt)["input_ids"])
        if n + max_new_tokens > max_positions:
            raise EvalDataError(f"--eval-data {data.path}, line {e.line}: the prompt is {n} tokens; with "
                                f"{max_new_tokens} tokens of answer it exceeds the model's {max_positions} "
                                "positions. Shorten the prompt or drop the line.")


def require_task_metric(config: ValidateConfig, task: str | None, eval_data, causal: bool, tokenizer) -> None:
    """A causal LM with a tokenizer is judged on a task or explicitly not: with task = "auto", an adapter that names
    no task of its own and no --eval-data examples would leave the profile's task budget unmeasured, silently."""
    from edge_lora.errors import ConfigError

    if config.task != "auto" or task is not None or not causal or tokenizer is None:
        return
    if eval_data is not None and eval_data.examples:
        return
    given = f"--eval-data {eval_data.path} is plain text" if eval_data is not None else "no --eval-data was given"
    raise ConfigError(f"validation has no task to measure the profile's task budget (validate.max_exact_match_drop "
                      f"= {config.max_exact_match_drop:g}) on: the adapter names no task of its own and {given}. "
                      "Pass --eval-data FILE (JSONL, one {\"prompt\", \"completion\"} per line) with your own "
                      "examples, or --set validate.task=none to validate on the logit metrics only.")


def answer_tokens(data, tokenizer, config: ValidateConfig) -> int:
    """New tokens to generate for --eval-data: the profile's task_max_new_tokens, or more for long answers."""
    longest = max((len(tokenizer(e.target)["input_ids"]) for e in data.examples), default=0)
    return max(config.task_max_new_tokens, longest + 2)


def _max_positions(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512)


def adapter_task(adapter_source: str | None) -> str | None:
    """The task an adapter was trained for, from the metrics.json tools/train_demo_adapter.py writes."""
    if not adapter_source:
        return None
    path = Path(adapter_source) / "metrics.json"
    try:
        return json.loads(path.read_text()).get("task") if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------ metrics
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logits_metrics(ref: np.ndarray, cand: np.ndarray, base: np.ndarray, ids: np.ndarray) -> dict:
    """ref/cand/base: T × V logits of one sequence; ids: its T tokens."""
    lp_ref, lp_cand, lp_base = _log_softmax(ref), _log_softmax(cand), _log_softmax(base)
    kl = (np.exp(lp_ref) * (lp_ref - lp_cand)).sum(-1)
    target = ids[1:]

    def ppl(lp):
        return float(np.exp(-lp[np.arange(len(target)), target].mean()))

    err = np.abs(ref.astype(np.float64) - cand)
    return {
        "tokens": len(ids),
        "max_abs_logit_error": float(err.max()),
        "mean_abs_logit_error": float(err.mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
        "reference_vs_base_top1_agreement": float((ref.argmax(-1) == base.argmax(-1)).mean()),
        "perplexity_base": ppl(lp_base[:-1]),
        "perplexity_reference": ppl(lp_ref[:-1]),
        "perplexity_candidate": ppl(lp_cand[:-1]),
    }


def hidden_metrics(ref: np.ndarray, cand: np.ndarray, base: np.ndarray) -> dict:
    ref, cand, base = (a.astype(np.float64).reshape(-1, a.shape[-1]) for a in (ref, cand, base))
    cos = (ref * cand).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1))
    return {
        "tokens": int(ref.shape[0]),
        "max_abs_error": float(np.abs(ref - cand).max()),
        "hidden_rel_error": float(np.linalg.norm(ref - cand) / np.linalg.norm(ref)),
        "min_cosine": float(cos.min()),
        "reference_vs_base_rel_diff": float(np.linalg.norm(ref - base) / np.linalg.norm(ref)),
    }


def _torch_out(model, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().numpy()


def torch_greedy_ids(model, prompt: np.ndarray, n: int) -> np.ndarray:
    """n greedy tokens after each row of ``prompt`` (equal-length rows, no stopping), with the KV cache."""
    ids, past, out_ids = torch.from_numpy(prompt), None, []
    step = ids
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(n):
            out = model(input_ids=step, attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            step = out.logits[:, -1, :].argmax(-1, keepdim=True)
            out_ids.append(step)
            mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
    return torch.cat(out_ids, dim=-1).numpy()


# ------------------------------------------------------------------------------------------ candidate
class Candidate:
    """The exported model as validation runs it: a session plus, for hot-swap, its active adapter."""

    def __init__(self, folder: Path, meta: ExportMeta, threads: int = 0):
        self.folder, self.meta = folder, meta
        self.hotswap = None
        if meta.hotswap:
            from edge_lora.runtimes.hotswap import HotswapSession

            self.hotswap = HotswapSession(folder, threads=threads)
            self.session = self.hotswap.session
            if meta.adapter_file:
                self.hotswap.load_adapter("export", Path(folder) / meta.adapter_file)
            active = "export" if self.hotswap.adapters else None
            self.run_options = self.hotswap.run_options(active)
            self.lora = self.hotswap.lora_feeds(active)   # the tensors, for plain LoRA inputs and IO binding
        else:
            self.session = load_session(folder, threads=threads)
            self.run_options, self.lora = None, {}

    def forward(self, ids: np.ndarray, base: bool = False) -> np.ndarray:
        options, lora = (None, {}) if base else (self.run_options, self.lora)
        return self.session.run(None, full_feeds(self.session, ids, lora=lora), options)[0]

    def causal_lm(self, tokenizer):
        from edge_lora.runtimes.ort_generate import OrtCausalLM

        return OrtCausalLM(self.session, tokenizer, self.run_options, lora=self.lora)


# ------------------------------------------------------------------------------------------ stage
def budget_failures(metrics: dict, config: ValidateConfig) -> list[str]:
    fails = []

    def check(key, ok, budget, text):
        if key in metrics and not ok(metrics[key]):
            fails.append(f"{text}: {metrics[key]:.6g} (budget {budget:g})")

    check("top1_agreement", lambda v: v >= config.min_top1_agreement, config.min_top1_agreement,
          "top-1 agreement below budget")
    check("top1_agreement_general", lambda v: v >= config.min_top1_general, config.min_top1_general,
          "top-1 agreement on the general text below budget")
    check("mean_kl", lambda v: v <= config.max_mean_kl, config.max_mean_kl, "mean KL above budget")
    check("generation_agreement", lambda v: v >= config.min_generation_agreement, config.min_generation_agreement,
          "greedy generation agreement below budget")
    check("exact_match_drop", lambda v: v <= config.max_exact_match_drop, config.max_exact_match_drop,
          "task exact-match drop above budget")
    check("task_score_drop", lambda v: v <= config.max_exact_match_drop, config.max_exact_match_drop,
          "--eval-data task score drop above budget (max_exact_match_drop)")
    check("hidden_rel_error", lambda v: v <= config.max_hidden_rel_error, config.max_hidden_rel_error,
          "hidden-state relative error above budget")
    return fails


def validate(export_dir: str | Path, reference, tokenizer, config: ValidateConfig = ValidateConfig(),
             progress=None, meta: ExportMeta | None = None, eval_data=None) -> tuple[dict, StageReport]:
    """Compare the export in ``export_dir`` with ``reference`` (a PeftModel on the PyTorch base).

    Returns (metrics, report); ``metrics["budget_failures"]`` lists every missed budget (empty = passed).
    ``progress(text)`` is called before each step, for the pipeline's progress display. ``meta``: the export's
    ExportMeta when the caller holds it (the pipeline); else it is read from ``export_dir``. ``eval_data``: the
    user's data (edge_lora.eval_data.EvalData): its text replaces the built-in evaluation text, and its examples
    replace the built-in task.
    """
    start = time.perf_counter()
    folder = Path(export_dir)
    meta = ExportMeta.read(folder) if meta is None else replace(meta, folder=folder)
    steps: dict[str, float] = {}
    clock = {"step": "setup", "t": start}

    def say(text: str) -> None:   # times each step for the report, and shows it on the progress line
        now = time.perf_counter()
        steps[clock["step"]] = round(now - clock["t"], 2)
        clock.update(step=text, t=now)
        if progress:
            progress(text)

    model_config = reference.get_base_model().config
    causal = meta.task.startswith("text-generation")
    n = min(config.eval_tokens, _max_positions(model_config))
    skipped: list[str] = []
    examples = eval_data is not None and bool(eval_data.examples)
    task = None if examples else _task_of(config, meta, causal, tokenizer, skipped)
    require_task_metric(config, task, eval_data, causal, tokenizer)
    check_eval_data(eval_data, tokenizer, _max_positions(model_config), config)
    ids = eval_ids(tokenizer, n, model_config.vocab_size, task, eval_data.text if eval_data is not None else None)
    shortened = ids.shape[1] < n
    n = ids.shape[1]
    candidate = Candidate(folder, meta)
    metrics_source = (f"--eval-data {eval_data.describe()}" if eval_data is not None else
                      "random token ids" if tokenizer is None else
                      f"held-out lines of the adapter's task {task!r}" if task is not None else
                      "the built-in neutral text (edge_lora.calibration)")
    if tokenizer is None:
        skipped.append(f"evaluation text: validation used {n} fixed random token ids (seeded), not text, because "
                       "the base has no tokenizer files")
    if n < config.eval_tokens:
        skipped.append(f"evaluation text shortened to {n} tokens: " + ("the --eval-data text is that long"
                       if shortened else "the model's maximum positions"))

    say("reference and candidate forward passes")
    ref = _torch_out(reference, ids)[0]
    with reference.disable_adapter():
        base = _torch_out(reference, ids)[0]
    cand = candidate.forward(ids)[0]
    metrics = logits_metrics(ref, cand, base, ids[0]) if causal else hidden_metrics(ref, cand, base)
    metrics["eval_text"] = metrics_source
    metrics["eval_text_tokens"] = int(n)
    if eval_data is not None:
        metrics["eval_data"] = {"path": eval_data.path, "sha256": eval_data.sha256, "kind": eval_data.kind,
                                "examples": len(eval_data.examples)}

    if causal and config.min_top1_general > 0 and tokenizer is not None:
        from edge_lora.calibration import TEXTS

        general = eval_ids(tokenizer, n, model_config.vocab_size, None, "\n".join(TEXTS))
        say("reference and candidate on the general text")
        metrics["top1_agreement_general"] = float(
            (_torch_out(reference, general)[0].argmax(-1) == candidate.forward(general)[0].argmax(-1)).mean())

    if candidate.hotswap is not None:
        plain = candidate.forward(ids, base=True)[0]
        metrics["no_adapter_vs_base_max_abs_error"] = float(np.abs(plain.astype(np.float64) - base).max())
        if causal:
            metrics["no_adapter_vs_base_top1_agreement"] = float((plain.argmax(-1) == base.argmax(-1)).mean())

    if causal:
        say(f"greedy generation, {config.generate_tokens} tokens")
        prompts = np.stack([ids[0, :16], ids[0, n // 2:n // 2 + 16]]) if n >= n // 2 + 16 else ids[:, :16]
        ref_gen = torch_greedy_ids(reference, prompts, config.generate_tokens)
        cand_gen = np.array(candidate.causal_lm(tokenizer).greedy_ids(prompts.tolist(), config.generate_tokens))
        metrics["generation_tokens"] = int(ref_gen.size)
        metrics["generation_agreement"] = float((ref_gen == cand_gen).mean())
        # the first divergence matters more than later ones (after it, the two continue from different text)
        diverged = np.nonzero((ref_gen != cand_gen).any(0))[0]
        metrics["generation_first_divergence"] = int(diverged[0]) if len(diverged) else None

    if examples and causal:
        metrics.update(_user_task_metrics(reference, tokenizer, candidate, config, say, eval_data))
    elif examples:
        skipped.append(f"task metric: --eval-data {eval_data.path} has prompt/completion examples but the model "
                       "is not a causal LM, so only the hidden-state metrics were measured")
    elif task is not None:
        key = reference_cache_key(meta, config, task) if config.cache_reference else None
        metrics.update(_task_metrics(reference, tokenizer, candidate, config, say, key, task))

    say("done")
    metrics["seconds_by_step"] = steps
    failures = budget_failures(metrics, config)
    metrics["budget_failures"] = failures
    metrics["passed"] = not failures
    report = StageReport(stage="validate", config=asdict(config), metrics=metrics, skipped=skipped,
                         seconds=time.perf_counter() - start)
    return metrics, report


def _task_of(config: ValidateConfig, meta: ExportMeta, causal: bool, tokenizer, skipped: list[str]) -> str | None:
    """The built-in task to score (the adapter's own, from its metrics.json, with task = "auto"), or None."""
    if config.task == "none":
        skipped.append("task metric: none measured (validate.task = \"none\"); the logit and generation metrics "
                       "only")
        return None
    task = config.task
    if task == "auto":
        source = meta.path("reference_adapter") or meta.path("adapter_source")   # the original knows its task
        task = adapter_task(source) if causal and tokenizer is not None else None
        if task is None:
            skipped.append("task metric: none measured. The adapter names no task (metrics.json) or the model is "
                           "not a causal LM with a tokenizer; pass --eval-data FILE (JSONL of prompt/completion) "
                           "to score it on your own examples")
    if task is not None and task not in TASKS:
        skipped.append(f"task metric: the adapter's task {task!r} is not one edge_lora knows ({', '.join(TASKS)})")
        task = None
    if task is not None and (tokenizer is None or not causal):
        skipped.append(f"task metric {task}: needs a causal LM with a tokenizer")
        task = None
    return task


def reference_cache_key(meta: ExportMeta, config: ValidateConfig, task_name: str = "date-iso") -> str | None:
    """The reference's task score depends only on base, adapter, task settings and the task code: key on all
    four, so the merged and hot-swap exports of one adapter score the PyTorch reference once."""
    import hashlib

    from edge_lora import eval as task
    from edge_lora import tasks as suite

    if not meta.base_sha256 or not meta.adapter_sha256:
        return None
    h = hashlib.sha256()
    parts = [meta.base_sha256, meta.adapter_sha256, config.task_examples, config.task_batch_size,
             config.task_max_new_tokens, Path(task.__file__).read_bytes(), torch.__version__]
    if task_name != "date-iso":   # the date task's keys stay as they were (cached references remain valid)
        parts += [task_name, Path(suite.__file__).read_bytes()]
    for part in parts:
        h.update(str(part).encode() if not isinstance(part, bytes) else part)
    return h.hexdigest()


def _cached(key: str | None, compute):
    from edge_lora.base import cache_dir

    path = cache_dir() / "validation" / f"reference-{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            return {**json.loads(path.read_text()), "cached": True}
        except (OSError, json.JSONDecodeError):
            pass
    result = compute()
    if path is not None:
        write_text_atomic(path, json.dumps(result))
    return result


def _task_metrics(reference, tokenizer, candidate: Candidate, config: ValidateConfig, say,
                  cache_key: str | None = None, task_name: str = "date-iso") -> dict:
    from edge_lora import eval as task
    from edge_lora import tasks as suite

    examples = suite.make_examples(task_name, config.task_examples, seed=0, split="test")
    say(f"task exact match, reference (PyTorch), {len(examples)} examples")
    ref = _cached(cache_key, lambda: task.score(
        lambda p: task.torch_greedy_generate(reference, tokenizer, p, config.task_max_new_tokens),
        examples, config.task_batch_size))
    say(f"task exact match, candidate (ONNX Runtime), {len(examples)} examples")
    cand = task.score(candidate.causal_lm(tokenizer).generate_fn(config.task_max_new_tokens), examples,
                      config.task_batch_size)
    out = {"task": task_name, "task_examples": len(examples), "reference_from_cache": bool(ref.get("cached")),
           "exact_match_reference": ref["exact_match"], "exact_match_candidate": cand["exact_match"],
           "exact_match_drop": ref["exact_match"] - cand["exact_match"],
           "task_failures_candidate": cand["failures"][:5]}
    if config.task_base:
        say("task exact match, base (PyTorch)")
        with reference.disable_adapter():
            base = task.score(lambda p: task.torch_greedy_generate(reference, tokenizer, p,
                                                                   config.task_max_new_tokens),
                              examples, config.task_batch_size)
        out["exact_match_base"] = base["exact_match"]
        span = ref["exact_match"] - base["exact_match"]
        out["retention"] = (cand["exact_match"] - base["exact_match"]) / span if span else None
    return out


def _user_task_metrics(reference, tokenizer, candidate: Candidate, config: ValidateConfig, say, data) -> dict:
    """The --eval-data examples: reference (PyTorch + PEFT), candidate (ONNX Runtime) and the base; the task
    score is each line's own metric, its drop is judged by max_exact_match_drop."""
    from edge_lora import eval as task
    from edge_lora import eval_data

    examples = list(data.examples)
    new = answer_tokens(data, tokenizer, config)
    say(f"--eval-data, reference (PyTorch), {len(examples)} examples")
    ref = eval_data.score(lambda p: task.torch_greedy_generate(reference, tokenizer, p, new), examples,
                          config.task_batch_size)
    say(f"--eval-data, candidate (ONNX Runtime), {len(examples)} examples")
    cand = eval_data.score(candidate.causal_lm(tokenizer).generate_fn(new), examples, config.task_batch_size)
    out = {"task": "eval-data", "task_examples": len(examples), "task_max_new_tokens": new}
    for key in ("exact_match", "normalized_match", "token_f1", "task_score"):
        out[f"{key}_reference"], out[f"{key}_candidate"] = ref[key], cand[key]
    out["task_score_drop"] = ref["task_score"] - cand["task_score"]
    out["task_failures_candidate"] = cand["failures"]
    # always (not only with task_base): retention is the figure a user's own data is for
    say("--eval-data, base (PyTorch)")
    with reference.disable_adapter():
        base = eval_data.score(lambda p: task.torch_greedy_generate(reference, tokenizer, p, new), examples,
                               config.task_batch_size)
    out["task_score_base"] = base["task_score"]
    span = ref["task_score"] - base["task_score"]
    out["retention"] = (cand["task_score"] - base["task_score"]) / span if span else None
    return out


@dataclass(frozen=True)
class ValidateInput:
    folder: Path                 # the export folder
    reference: Any               # the PyTorch base + the ORIGINAL PEFT adapter (a PeftModel)
    tokenizer: Any | None        # None: fixed ids (a weights-only base); the report says so
    meta: ExportMeta | None = None   # the export's ExportMeta when the caller holds it (else read from folder)
    progress: Callable[[str], None] | None = None
    eval_data: Any = None        # edge_lora.eval_data.EvalData: the user's --eval-data, or None


@dataclass(frozen=True)
class Validation:
    passed: bool
    budget_failures: tuple[str, ...]
    metrics: Mapping[str, Any]


def run(inp: ValidateInput, config: ValidateConfig = ValidateConfig()) -> tuple[Validation, StageReport]:
    """The stage entry (every stage module has one: ``run(input, config) -> (output, StageReport)``)."""
    metrics, report = validate(inp.folder, inp.reference, inp.tokenizer, config, inp.progress, meta=inp.meta,
                               eval_data=inp.eval_data)
    return Validation(passed=not metrics["budget_failures"], budget_failures=tuple(metrics["budget_failures"]),
                      metrics=metrics), report
