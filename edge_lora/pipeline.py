"""The export pipeline: load → (merge) → export → validate, as the profile says, into one output folder.

Each stage module in ``edge_lora.stages`` has a plain ``run(input, config) -> (output, StageReport)``; the runners
here build each stage's input from a shared :class:`RunContext` and keep its output there. :func:`run_export`
is the sequence: load, quantize_adapter, then the profile's ``[profile] stages`` in order (:data:`STAGES`).

Everything is built in a temporary folder beside the target and renamed into place at the end, so a crash
never leaves a folder that looks finished. ``report.json`` and ``report.md`` are written even when validation
misses a budget; the run then fails with BudgetError (exit code 3) and the report says FAILED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_lora.adapter.load import AnyAdapter, adapter_hash, expanded, load_adapter
from edge_lora.files import replace_folder, temp_folder_beside, write_text_atomic
from edge_lora.formats.export_meta import FILE as META_FILE, ExportMeta, relative_path
from edge_lora.errors import BudgetError, CompatibilityError, EdgeLoraError
from edge_lora.config import Profile, load_profile
from edge_lora.report import StageReport
from edge_lora.stages import export_onnx, merge, quantize_base, validate
from edge_lora.stages import profile as profiling

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class RunContext:
    """What stages share. Stages read what earlier ones produced and set what later ones need."""

    profile: Profile
    base_spec: str
    adapter_path: Path
    work_dir: Path                     # the temporary output folder (renamed to the target at the end)
    base_path: Path | None = None
    base_sha256: str | None = None
    adapter_sha256: str | None = None
    adapter: AnyAdapter | None = None  # as loaded (PEFT, compress output), then as the quantize_adapter step left it
    reference_adapter: Path | None = None   # the PEFT folder validation compares against (the original)
    model: Any = None                  # torch model (merged in place by the merge stage)
    tokenizer: Any = None
    export_meta: ExportMeta | None = None    # set by export, updated by quantize
    meta_on_disk: ExportMeta | None = None   # the ExportMeta last written to work_dir (the pipeline writes changes)
    reports: list[StageReport] = field(default_factory=list)
    progress: Callable[[str], None] = lambda text: None
    eval_data: Any = None              # edge_lora.eval_data.EvalData (--eval-data), read before anything is written

    def relative(self, path) -> str | None:
        """``path`` relative to the export folder (the same before and after its rename: same parent)."""
        return None if path is None else relative_path(path, self.work_dir)

    def provenance(self) -> export_onnx.Provenance:
        """Where the export came from, as edge_lora.json and the report record it (validate re-loads from it).
        Paths are relative to the export folder; ``base`` stays a demo name ('smollm2') when it is one."""
        from edge_lora.base import DEMO_BASES

        base = self.base_spec
        if base not in DEMO_BASES and Path(base).exists():
            base = self.relative(base)
        reference = self.reference_adapter if self.reference_adapter != self.adapter_path else None
        return export_onnx.Provenance(
            base=base, base_path=self.relative(self.base_path), base_sha256=self.base_sha256,
            adapter_source=self.relative(self.adapter_path), adapter_sha256=self.adapter_sha256,
            reference_adapter=self.relative(reference), profile=self.profile.name)


# ------------------------------------------------------------------------------------------ stages
def _load(ctx: RunContext) -> StageReport:
    """Adapter, base and their compatibility: every user mistake here fails before any export work."""
    from edge_lora.adapter import check_compatible
    from edge_lora.base import base_content_hash, load_base, resolve_base

    start = time.perf_counter()
    # DoRA is not a low-rank update: only a merged export without adapter quantization can take it exactly
    merged_only = (ctx.profile.config("export").mode == "merged"
                   and ("quantize" not in ctx.profile.stages or ctx.profile.config("quantize").adapter == "fp32"))
    ctx.adapter, ctx.reference_adapter = load_adapter(ctx.adapter_path, allow_dora=merged_only)
    ctx.base_path = resolve_base(ctx.base_spec).resolve()
    ctx.model, ctx.tokenizer = load_base(ctx.base_path)
    if "export" in ctx.profile.stages:
        export_onnx.check_exportable(ctx.model, export_onnx.resolve_task(ctx.model, ctx.profile.config("export")))
    check_compatible(expanded(ctx.adapter), ctx.model)
    ctx.base_sha256 = base_content_hash(ctx.base_path)
    ctx.adapter_sha256 = adapter_hash(ctx.adapter_path)
    return StageReport(stage="load", seconds=time.perf_counter() - start,
                       input_hash=ctx.adapter_sha256, output_hash=ctx.base_sha256,
                       metrics={"base": ctx.relative(ctx.base_path), "adapter": ctx.relative(ctx.adapter_path),
                                "modules": len(expanded(ctx.adapter).modules), "adapter_params": ctx.adapter.params,
                                "model_type": ctx.model.config.model_type})


def _quantize_adapter(ctx: RunContext) -> StageReport | None:
    """The profile's ``quantize.adapter`` (the one factor quantizer), in memory, before the adapter is merged or
    exported: a hot-swap export then ships exactly these codes, a merged one folds in their expansion. An adapter
    that ``compress --bits`` already quantized is shipped as it is."""
    from edge_lora.adapter.quantized import QuantizedAdapter
    from edge_lora.stages.quantize_factors import adapter_quant_config, quantize_adapter

    if "quantize" not in ctx.profile.stages:
        return None
    config = ctx.profile.config("quantize")
    cfg = adapter_quant_config(config.adapter, config.adapter_block_size)
    if cfg is None:
        return None
    if isinstance(ctx.adapter, QuantizedAdapter):
        return StageReport(stage="quantize_adapter", input_hash=ctx.adapter_sha256, output_hash=ctx.adapter_sha256,
                           skipped=[f"quantize.adapter = {config.adapter!r} not applied: {ctx.adapter_path.name} is "
                                    f"already quantized by compress --bits ({ctx.adapter.config.label}, groups of "
                                    f"{ctx.adapter.config.group_size}); its codes ship as they are."])
    # sizes and errors are measured against the original PEFT adapter: the input itself, or (a compress folder)
    # the adapter its header names
    original = ctx.adapter if ctx.reference_adapter == ctx.adapter_path else load_peft_reference(ctx)
    ctx.adapter, report = quantize_adapter(original, expanded(ctx.adapter), cfg)
    report.stage = "quantize_adapter"
    report.metrics.pop("summary", None)
    report.input_hash = ctx.adapter_sha256
    report.output_hash = quantized_hash(ctx.adapter)
    return report


def quantized_hash(adapter) -> str:
    """sha256 of a quantized adapter's encoded codes and settings (its source path left out: the same codes
    hash the same on every machine)."""
    from edge_lora.formats.quantized_factors import to_bytes

    return hashlib.sha256(to_bytes(dataclasses.replace(adapter.to_format(), source=None))).hexdigest()


def load_peft_reference(ctx: RunContext):
    from edge_lora.adapter import load_peft

    return load_peft(ctx.reference_adapter or ctx.adapter_path)


def _merge(ctx: RunContext, config) -> StageReport:
    from edge_lora.base import base_content_hash

    ctx.model, report = merge.run(merge.MergeInput(ctx.model, expanded(ctx.adapter)), config)
    report.input_hash = ctx.adapter_sha256
    report.output_hash = base_content_hash(ctx.model)
    return report


def _export(ctx: RunContext, config) -> StageReport:
    inp = export_onnx.ExportInput(ctx.model, ctx.tokenizer, ctx.adapter, ctx.work_dir, ctx.provenance())
    ctx.export_meta, report = export_onnx.run(inp, config)
    ctx.meta_on_disk = ctx.export_meta   # the export stage writes its folder's edge_lora.json itself
    report.input_hash = ctx.reports[-1].output_hash if ctx.reports else None
    # The exported (merged or wrapped) torch model is done with; validation loads a clean reference, so free
    # this one first rather than hold two copies of the weights.
    ctx.model = None
    gc.collect()
    return report


def _quantize(ctx: RunContext, config) -> StageReport:
    ctx.export_meta, report = quantize_base.run(quantize_base.ExportFolder(ctx.work_dir, ctx.export_meta), config)
    report.input_hash = ctx.reports[-1].output_hash if ctx.reports else None
    return report


def _validate(ctx: RunContext, config) -> StageReport:
    reference = reference_model(ctx.base_path, ctx.reference_adapter or ctx.adapter_path)
    inp = validate.ValidateInput(ctx.work_dir, reference, ctx.tokenizer, ctx.export_meta, ctx.progress,
                                 ctx.eval_data)
    _, report = validate.run(inp, config)
    report.input_hash = ctx.reports[-1].output_hash if ctx.reports else None
    return report


def _profiling(ctx: RunContext, config) -> StageReport:
    return profiling.run(profiling.ProfilingInput(ctx.work_dir, ctx.progress), config)[1]


def reference_model(base_path, adapter_path):
    """The PyTorch base with the original PEFT adapter: the reference every export is judged against."""
    from peft import PeftModel

    from edge_lora.base import load_base

    base, _ = load_base(base_path)
    return PeftModel.from_pretrained(base, str(adapter_path)).eval()


# What each name in a profile's ``[profile] stages`` runs (their configs: edge_lora.config.STAGE_CONFIGS). Before
# them, always: load (adapter, base, compatibility), then quantize_adapter (when ``quantize.adapter`` is set).
STAGES: dict[str, Callable[[RunContext, Any], StageReport]] = {
    "merge": _merge, "export": _export, "quantize": _quantize, "validate": _validate, "profiling": _profiling,
}


# ------------------------------------------------------------------------------------------ running
@contextlib.contextmanager
def _progress_display(enabled: bool):
    """A rich spinner line per stage on stderr; yields ``start(stage)`` and ``say(text)`` callables."""
    if not enabled:
        yield (lambda stage: None), (lambda text: None)
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(finished_text=" "), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        state = {"task": None, "stage": ""}

        def start(stage):
            if state["task"] is not None:
                bar.update(state["task"], description=f"[green]✓[/] {state['stage']}", total=1, completed=1)
            state["stage"] = stage
            state["task"] = bar.add_task(stage, total=None) if stage else None

        def say(text):
            if state["task"] is not None:
                bar.update(state["task"], description=f"{state['stage']}: {text}")

        yield start, say
        start("")


def _run_stage(ctx: RunContext, name: str, fn: Callable[[], StageReport]) -> StageReport:
    before = [r.stage for r in ctx.reports]
    try:
        report = fn()
    except EdgeLoraError as exc:
        after = f" (after {', '.join(before)})" if before else " (first stage)"
        raise type(exc)(f"stage '{name}' failed{after}: {exc}") from exc
    except Exception as exc:   # a bug: keep the traceback, say where it happened
        exc.add_note(f"edge_lora: raised in pipeline stage '{name}', after {', '.join(before) or 'nothing'}")
        raise
    if report is not None:   # None: a step the profile does not ask for
        ctx.reports.append(report)
    if ctx.export_meta is not None and ctx.export_meta != ctx.meta_on_disk:
        # a stage returned an updated ExportMeta (quantize): the pipeline, not the stage, writes it
        ctx.export_meta = ctx.meta_on_disk = ctx.export_meta.write(ctx.work_dir)
    return report


def _atomic_folder(out: Path, force: bool):
    if out.exists() and not force:
        raise EdgeLoraError(f"output folder {out} already exists; choose another --out or pass --force to "
                            "replace it.")
    return temp_folder_beside(out)


def _commit(tmp: Path, out: Path) -> None:
    replace_folder(tmp, out)


def run_export(base: str, adapter: str | os.PathLike, profile: str | Profile, out: str | os.PathLike,
               force: bool = False, overrides: list[str] | None = None, show_progress: bool = True,
               eval_data: str | os.PathLike | None = None) -> dict:
    """Run the profile's stages; returns the report dict. Raises BudgetError (after writing) on a miss.
    ``eval_data``: the user's evaluation file (edge_lora.eval_data) that validation scores on."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile, overrides)
    data = _eval_data(eval_data, profile)
    out = Path(out)
    tmp = _atomic_folder(out, force)
    ctx = RunContext(profile=profile, base_spec=str(base), adapter_path=Path(adapter).resolve(), work_dir=tmp,
                     eval_data=data)
    started = time.perf_counter()
    try:
        with _progress_display(show_progress) as (start, say):
            ctx.progress = say
            start("load adapter + base")
            _run_stage(ctx, "load", lambda: _load(ctx))
            _check_eval_data(ctx)
            _run_stage(ctx, "quantize_adapter", lambda: _quantize_adapter(ctx))
            for name in profile.stages:
                start(name)
                _run_stage(ctx, name, lambda name=name: STAGES[name](ctx, profile.config(name)))
        report = build_report(ctx, time.perf_counter() - started)
        write_report(tmp, report)
        _commit(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _raise_on_budget_miss(report, out)
    return report


def _eval_data(path, profile: Profile):
    if path is None:
        return None
    from edge_lora.eval_data import EvalDataError, load_eval_data

    if "validate" not in profile.stages:
        raise EvalDataError(f"--eval-data {path}: profile {profile.name!r} has no validate stage to use it.")
    return load_eval_data(path)


def _check_eval_data(ctx: RunContext) -> None:
    """Prompts that do not fit the model, or a task budget with nothing to measure it on, fail here, before
    anything is exported."""
    if "validate" not in ctx.profile.stages:
        return
    from edge_lora.base import is_causal_lm
    from edge_lora.stages.validate import _max_positions, adapter_task, check_eval_data, require_task_metric

    config = ctx.profile.config("validate")
    check_eval_data(ctx.eval_data, ctx.tokenizer, _max_positions(ctx.model.config), config)
    causal = is_causal_lm(ctx.model.config)
    own = adapter_task(str(ctx.reference_adapter or ctx.adapter_path))
    require_task_metric(config, own, ctx.eval_data, causal, ctx.tokenizer)


def _raise_on_budget_miss(report: dict, out: Path) -> None:
    if report["status"] == "FAILED":
        misses = "; ".join(report["budget_failures"])
        stages = sorted({r["stage"] for r in report["stages"] if r["metrics"].get("budget_failures")})
        raise BudgetError(f"{'/'.join(stages)} budget missed: {misses}. The artifacts and the report are in {out} "
                          f"({REPORT_MD}, marked FAILED); do not ship them.")


def build_report(ctx: RunContext, seconds: float) -> dict:
    failures = [f for r in ctx.reports for f in r.metrics.get("budget_failures", [])]
    validated = any(r.stage == "validate" for r in ctx.reports)
    profile = ctx.profile.to_dict()
    profile["source"] = _profile_source(profile.get("source"), ctx)
    return {"status": "FAILED" if failures else ("PASSED" if validated else "NOT VALIDATED"),
            "budget_failures": failures, "seconds": seconds, **dataclasses.asdict(ctx.provenance()), "profile": profile,
            "stages": [r.to_dict() for r in ctx.reports]}


def _profile_source(source: str | None, ctx: RunContext) -> str | None:
    """How the report names its profile file, never by a build machine's path: ``export_profiles/NAME.toml`` for
    one shipped with edge_lora, a user's file relative to the export folder (a relative source, such as one read
    back from a report by run_validate, is kept)."""
    from edge_lora.config import profile_dirs

    if not source:
        return source
    shipped = profile_dirs()[-1].resolve()   # the last place --profile NAME looks: the shipped folder
    path = Path(source).resolve()
    if path.is_relative_to(shipped):
        return f"{shipped.name}/{path.relative_to(shipped).as_posix()}"
    return ctx.relative(source) if os.path.isabs(source) else source


def write_report(folder: Path, report: dict) -> None:
    write_text_atomic(folder / REPORT_JSON, json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomic(folder / REPORT_MD, render_markdown(report))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value, default=str)
        return text if len(text) < 120 else text[:117] + "..."
    return str(value)


def render_markdown(report: dict) -> str:
    lines = [f"# edge_lora export: {report['status']}", "",
             f"- profile: `{report['profile']['name']}` ({report['profile']['source']})",
             f"- base: `{report['base']}` sha256 `{(report['base_sha256'] or '')[:16]}`",
             f"- adapter: `{report['adapter_source']}` sha256 `{(report['adapter_sha256'] or '')[:16]}`",
             f"- total: {report['seconds']:.1f} s", ""]
    if report["budget_failures"]:
        lines += ["**FAILED budgets:**", ""] + [f"- {f}" for f in report["budget_failures"]] + [""]
    lines += ["| stage | seconds | input | output |", "|---|---:|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['seconds']:.2f} | {(s['input_hash'] or '')[:12]} | "
                     f"{(s['output_hash'] or '')[:12]} |")
    for s in report["stages"]:
        lines += ["", f"## {s['stage']}", ""]
        if s["metrics"]:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in s["metrics"].items()]
        if s["config"]:
            lines += ["", "config: `" + json.dumps(s["config"], default=str) + "`"]
        for note in s["skipped"]:
            lines.append(f"- skipped: {note}")
    return "\n".join(lines) + "\n"


def run_validate(folder: str | os.PathLike, overrides: list[str] | None = None, show_progress: bool = True,
                 eval_data: str | os.PathLike | None = None) -> dict:
    """Re-run validation of an existing export folder and update its report (same budgets, plus --set);
    ``eval_data``: the user's evaluation file, as for :func:`run_export`."""
    from edge_lora.base import DEMO_BASES
    from edge_lora.config import parse_overrides, parse_profile
    from edge_lora.errors import ExportMetaError

    folder = Path(folder)
    meta = ExportMeta.read(folder)
    old_profile, old_stages = _previous_report(folder)
    if old_profile:
        stored = {k: v for k, v in old_profile.items() if k not in ("name", "description", "stages", "source")}
        stored["profile"] = {"description": old_profile["description"], "stages": old_profile["stages"]}
        profile = parse_profile(stored, old_profile["name"], old_profile["source"], parse_overrides(overrides))
    else:
        profile = load_profile(meta.profile or "cpu-fp32", overrides)
    adapter_path, base_path = meta.path("adapter_source"), meta.path("base_path")
    if adapter_path is None or base_path is None:
        raise ExportMetaError(f"{folder / META_FILE} records no adapter_source or base_path: the folder was not "
                              "written by `python -m edge_lora export`, so there is no reference to validate "
                              "against. Export it with `python -m edge_lora export`.")
    if adapter_hash(adapter_path) != meta.adapter_sha256:
        raise CompatibilityError(f"the adapter at {adapter_path} changed since {folder} was exported (sha256 differs "
                                 "from edge_lora.json); re-export instead of re-validating.")
    base_spec = meta.base if meta.base is None or meta.base in DEMO_BASES else str(folder / meta.base)
    ctx = RunContext(profile=profile, base_spec=str(base_spec), adapter_path=adapter_path, work_dir=folder,
                     reference_adapter=meta.path("reference_adapter") or adapter_path,
                     base_path=base_path, base_sha256=meta.base_sha256, adapter_sha256=meta.adapter_sha256,
                     export_meta=meta, meta_on_disk=meta)
    ctx.eval_data = _eval_data(eval_data, profile) if eval_data is not None else None
    started = time.perf_counter()
    with _progress_display(show_progress) as (start, say):
        ctx.progress = say
        start("validate")
        ctx.tokenizer = _load_tokenizer(folder)
        ctx.reports = [s for s in old_stages if s.stage != "validate"]
        _run_stage(ctx, "validate", lambda: _validate(ctx, profile.config("validate")))
    report = build_report(ctx, time.perf_counter() - started)
    write_report(folder, report)
    _raise_on_budget_miss(report, folder)
    return report


def _previous_report(folder: Path) -> tuple[dict | None, list[StageReport]]:
    """The profile table and stage reports of FOLDER/report.json (None, [] without one), which run_validate
    keeps: a damaged file is an error naming it, not a traceback."""
    path = folder / REPORT_JSON
    if not path.is_file():
        return None, []
    fix = (f"re-export the folder, or delete {path} to validate with the profile named in "
           f"{folder / META_FILE}")
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeLoraError(f"{path} cannot be read as JSON ({exc}); {fix}.") from exc
    if not isinstance(old, dict):
        raise EdgeLoraError(f"{path} holds {type(old).__name__}, not a report object; {fix}.")
    profile = old.get("profile")
    if profile:
        missing = [k for k in ("name", "description", "stages", "source") if not isinstance(profile, dict)
                   or k not in profile]
        if missing:
            raise EdgeLoraError(f"{path}: its profile has no {', '.join(missing)}; {fix}.")
    known = {f.name for f in dataclasses.fields(StageReport)}
    stages = []
    for i, entry in enumerate(old.get("stages") or []):
        if not isinstance(entry, dict) or "stage" not in entry or set(entry) - known:
            raise EdgeLoraError(f"{path}: stages[{i}] is not a stage report (keys "
                                f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}; expected "
                                f"{', '.join(sorted(known))}); {fix}.")
        stages.append(StageReport(**entry))
    return profile or None, stages


def _load_tokenizer(folder: Path):
    """The export's tokenizer (saved beside the model), or None for an export of a weights-only base: validation
    then uses fixed ids and its report says so. Tokenizer files that do not load are a ModelError."""
    from edge_lora.base import load_tokenizer

    return load_tokenizer(folder)
