"""Export profiles: ``export_profiles/NAME.toml`` → one config dataclass per stage.

A profile says which stages run (``[profile] stages``) and configures each one in its own table. Every key is
checked against the stage's dataclass: an unknown key or a value of the wrong type is a ProfileError that
lists the valid keys. ``--set stage.key=value`` overrides one key, typed by the dataclass field.

Later stages add their config class with :func:`register_stage_config` (torchao style: a frozen config
dataclass beside a plain function), so this module does not need to know them.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edge_lora.errors import ProfileError

PROFILE_DIR_ENV = "EDGE_LORA_PROFILES"


@dataclass(frozen=True)
class MergeConfig:
    """Fold ΔW = scale·B·A into the base weights (mode "merged")."""

    compute_dtype: str = "float32"   # precision of B·A (float64 for very large updates; float32 is 1e-7 relative)
    check_finite: bool = True        # refuse to commit NaN/Inf weights


@dataclass(frozen=True)
class ExportConfig:
    """optimum-onnx export of the merged model, or of the base with LoRA factors as graph inputs."""

    mode: str = "merged"             # "merged": one artifact per adapter; "hotswap": base + ORT adapter file
    task: str = "auto"               # "auto": text-generation-with-past for causal LMs, feature-extraction else
    opset: int = 0                   # 0: optimum's default for the architecture
    external_data: str = "auto"      # "auto": optimum/torch switch to external data above 2 GB; "always"
    hotswap_targets: list = field(default_factory=list)  # extra module names to give a LoRA branch (hotswap)
    # One MatMul + Split for projections that read one input (q/k/v, gate/up), and one LoRA branch per such
    # group in hot-swap graphs: fewer, larger kernels at decode; outputs unchanged.
    fuse_projections: bool = True

    def __post_init__(self):
        _choice("export", "mode", self.mode, ("merged", "hotswap"))
        _choice("export", "external_data", self.external_data, ("auto", "always"))
        if self.opset < 0:
            raise ProfileError(f"export.opset must be 0 (optimum's default) or an ONNX opset, not {self.opset}.")


@dataclass(frozen=True)
class ValidateConfig:
    """Accuracy of the exported model against the PyTorch base + original PEFT adapter."""

    eval_tokens: int = 256           # length of the evaluation text (capped by the model's max positions)
    generate_tokens: int = 32        # greedy tokens compared between reference and candidate
    task: str = "auto"               # "auto": the date task when the adapter says so; "date-iso"; "none"
    task_examples: int = 128
    task_batch_size: int = 32
    task_max_new_tokens: int = 16
    task_base: bool = False          # also score the plain base (for retention); costs one more pass
    cache_reference: bool = True     # reuse the PyTorch reference's task score (keyed by base, adapter, task)
    # Budgets. A miss writes the report, marks it FAILED and exits with BudgetError (exit code 3).
    min_top1_agreement: float = 0.999
    max_mean_kl: float = 1e-4
    min_generation_agreement: float = 0.95
    max_exact_match_drop: float = 0.01   # fraction: 0.01 = one point below the reference
    max_hidden_rel_error: float = 1e-4   # encoders: ‖h_cand − h_ref‖ / ‖h_ref‖

    def __post_init__(self):
        _choice("validate", "task", self.task, ("auto", "date-iso", "none"))
        if self.eval_tokens < 8 or self.generate_tokens < 1 or self.task_examples < 1:
            raise ProfileError("validate.eval_tokens must be ≥ 8, generate_tokens and task_examples ≥ 1.")


def _choice(stage: str, key: str, value, allowed) -> None:
    if value not in allowed:
        raise ProfileError(f"{stage}.{key} = {value!r} is not valid; use one of {', '.join(map(repr, allowed))}.")


STAGE_CONFIGS: dict[str, type] = {"merge": MergeConfig, "export": ExportConfig, "validate": ValidateConfig}


def register_stage_config(name: str, cls: type) -> None:
    """Let a later stage (compress, quantize, profile, package) own a table in the profile files."""
    STAGE_CONFIGS[name] = cls


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    stages: tuple[str, ...]
    configs: dict[str, Any]          # stage name -> config dataclass instance (every known stage)
    source: str | None = None

    def config(self, stage: str):
        return self.configs[stage]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "stages": list(self.stages),
                "source": self.source,
                **{s: dataclasses.asdict(c) for s, c in self.configs.items()}}


# ------------------------------------------------------------------------------------------ locating
def profile_dirs() -> list[Path]:
    """Where ``--profile NAME`` looks: $EDGE_LORA_PROFILES, then export_profiles/ of the source checkout."""
    dirs = []
    if os.environ.get(PROFILE_DIR_ENV):
        dirs.append(Path(os.environ[PROFILE_DIR_ENV]))
    dirs.append(Path(__file__).resolve().parents[1] / "export_profiles")
    return dirs


def available_profiles() -> list[str]:
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.toml")})


def find_profile(name_or_path: str | os.PathLike) -> Path:
    text = str(name_or_path)
    path = Path(text)
    if path.suffix == ".toml" or os.sep in text:
        if not path.is_file():
            raise ProfileError(f"Profile file {path} does not exist.")
        return path
    for d in profile_dirs():
        candidate = d / f"{text}.toml"
        if candidate.is_file():
            return candidate
    raise ProfileError(f"No profile named {text!r}. Available: {', '.join(available_profiles()) or '(none)'}; "
                       "or pass a path to a .toml file.")


# ------------------------------------------------------------------------------------------ parsing
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(where: str, value, expected) -> Any:
    origin = typing.get_origin(expected) or expected
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, list):
        return value
    if isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
        return value
    raise ProfileError(f"{where} must be {getattr(origin, '__name__', origin)}, got {value!r} "
                       f"({type(value).__name__}).")


def build_config(stage: str, table: dict, source: str = "profile") -> Any:
    cls = STAGE_CONFIGS[stage]
    types = _field_types(cls)
    unknown = sorted(set(table) - set(types))
    if unknown:
        raise ProfileError(f"{source}: unknown key(s) {', '.join(unknown)} in [{stage}]. Valid keys: "
                           f"{', '.join(types)}.")
    values = {k: _check_type(f"{source}: {stage}.{k}", v, types[k]) for k, v in table.items()}
    return cls(**values)


def parse_profile(data: dict, name: str, source: str | None = None,
                  overrides: dict[str, dict[str, Any]] | None = None) -> Profile:
    where = source or name
    data = dict(data)
    head = data.pop("profile", {})
    allowed_head = {"description", "stages"}
    if not isinstance(head, dict) or set(head) - allowed_head:
        raise ProfileError(f"{where}: unknown key(s) {sorted(set(head) - allowed_head)} in [profile]. Valid "
                           f"keys: {', '.join(sorted(allowed_head))}.")
    unknown = sorted(set(data) - set(STAGE_CONFIGS))
    if unknown:
        raise ProfileError(f"{where}: unknown table(s) {', '.join(unknown)}. Valid tables: profile, "
                           f"{', '.join(STAGE_CONFIGS)}.")
    stages = head.get("stages", ["merge", "export", "validate"])
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise ProfileError(f"{where}: [profile] stages must be a list of stage names.")
    bad = [s for s in stages if s not in STAGE_CONFIGS]
    if bad:
        raise ProfileError(f"{where}: unknown stage(s) {bad} in [profile] stages. Known: {', '.join(STAGE_CONFIGS)}.")
    tables = {s: dict(data.get(s, {})) for s in STAGE_CONFIGS}
    for stage, values in (overrides or {}).items():
        tables[stage].update(values)
    configs = {s: build_config(s, tables[s], where) for s in STAGE_CONFIGS}
    mode = configs["export"].mode
    if "export" in stages and mode == "merged" and "merge" not in stages:
        raise ProfileError(f"{where}: export.mode is 'merged' but 'merge' is not in [profile] stages.")
    if mode == "hotswap" and "merge" in stages:
        raise ProfileError(f"{where}: export.mode is 'hotswap' (the base stays unmerged) but 'merge' is in "
                           "[profile] stages; remove it.")
    return Profile(name=name, description=str(head.get("description", "")), stages=tuple(stages),
                   configs=configs, source=source)


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["validate.max_mean_kl=1e-3", ...]`` → {"validate": {"max_mean_kl": 0.001}}, typed by the field."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        stage, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ProfileError(f"--set {item!r}: expected stage.key=value, e.g. validate.max_mean_kl=1e-3.")
        if stage not in STAGE_CONFIGS:
            raise ProfileError(f"--set {item!r}: unknown stage {stage!r}. Known: {', '.join(STAGE_CONFIGS)}.")
        types = _field_types(STAGE_CONFIGS[stage])
        if name not in types:
            raise ProfileError(f"--set {item!r}: unknown key {name!r} in [{stage}]. Valid keys: {', '.join(types)}.")
        out.setdefault(stage, {})[name] = _parse_value(item, raw.strip(), types[name])
    return out


def _parse_value(item: str, raw: str, expected):
    origin = typing.get_origin(expected) or expected
    try:
        if origin is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if origin is int:
            return int(raw)
        if origin is float:
            return float(raw)
        if origin is list:
            return [s.strip() for s in raw.split(",") if s.strip()]
        return raw
    except ValueError:
        raise ProfileError(f"--set {item!r}: {raw!r} is not a valid {origin.__name__}.") from None


def load_profile(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> Profile:
    path = find_profile(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path} is not valid TOML: {exc}.") from exc
    return parse_profile(data, name=path.stem, source=str(path), overrides=parse_overrides(overrides))
