"""Export profiles: ``export_profiles/NAME.toml`` → one config dataclass per stage.

A profile says which stages run (``[profile] stages``) and configures each one in its own table. Every key is
checked against the stage's dataclass: an unknown key or a value of the wrong type is a ProfileError that
lists the valid keys. ``--set stage.key=value`` overrides one key, typed by the dataclass field.

Every stage's config lives here (torchao style: a frozen dataclass, validated in ``__post_init__``, paired with
the stage's plain ``run(input, config)``), so a profile parses in any process without importing the stages.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any

import tomllib

from edge_lora.errors import ConfigError, ProfileError
from edge_lora.runtimes import RUNNERS

PROFILE_DIR_ENV = "EDGE_LORA_PROFILES"


@dataclass(frozen=True)
class MergeConfig:
    """Fold ΔW = scale·B·A into the base weights (mode "merged")."""

    compute_dtype: str = "float32"   # precision of B·A (float64 for very large updates; float32 is 1e-7 relative)
    check_finite: bool = True        # refuse to commit NaN/Inf weights

    def __post_init__(self):
        _choice("merge", "compute_dtype", self.compute_dtype, MERGE_DTYPES)
        _flag("merge", "check_finite", self.check_finite)


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
    # "fused": causal LMs of the architectures edge_lora.stages.export_fused covers are written with ONNX
    # Runtime's fused decoder ops (GroupQueryAttention, SkipSimplifiedLayerNormalization): ~9x fewer kernels per
    # decode step. Other models fall back to optimum's graph; edge_lora.json and the report say which ran.
    graph: str = "optimum"
    # Hot-swap on the fused graph: also ship the adapted projections' fp16 weights (merge_on_swap/), so a runtime
    # can merge each new adapter into the weights in the background and decode at the base's speed
    # (edge_lora.runtimes.merge_swap). Costs those weights on the device (2 bytes per projection parameter).
    merge_on_swap: bool = False

    def __post_init__(self):
        _choice("export", "mode", self.mode, ("merged", "hotswap"))
        _choice("export", "graph", self.graph, ("optimum", "fused"))
        _flag("export", "merge_on_swap", self.merge_on_swap)
        _choice("export", "external_data", self.external_data, ("auto", "always"))
        _integer("export", "opset", self.opset, 0, "0 (optimum's default) or an ONNX opset such as 17")
        _names("export", "hotswap_targets", self.hotswap_targets, "module names such as 'lm_head'")
        _flag("export", "fuse_projections", self.fuse_projections)


@dataclass(frozen=True)
class ValidateConfig:
    """Accuracy of the exported model against the PyTorch base + original PEFT adapter."""

    eval_tokens: int = 256           # length of the evaluation text (capped by the model's max positions)
    generate_tokens: int = 32        # greedy tokens compared between reference and candidate
    task: str = "auto"               # "auto": the task the adapter's metrics.json names; a task name; "none"
    task_examples: int = 128
    task_batch_size: int = 32
    task_max_new_tokens: int = 16
    task_base: bool = False          # also score the plain base (for retention); costs one more pass
    cache_reference: bool = True     # reuse the PyTorch reference's task score (keyed by base, adapter, task)
    # Budgets. A miss writes the report, marks it FAILED and exits with BudgetError (exit code 3).
    min_top1_agreement: float = 0.999
    # Top-1 agreement on the built-in general text (edge_lora.calibration), besides the evaluation text: a
    # quantized base may keep the adapter's own text and still lose general language. 0 = not measured.
    min_top1_general: float = 0.0
    max_mean_kl: float = 1e-4
    min_generation_agreement: float = 0.95
    max_exact_match_drop: float = 0.01   # fraction: 0.01 = one point below the reference
    max_hidden_rel_error: float = 1e-4   # encoders: ‖h_cand − h_ref‖ / ‖h_ref‖

    def __post_init__(self):
        from edge_lora.tasks import TASKS   # torch-free, like this module

        _choice("validate", "task", self.task, ("auto", "none", *TASKS))
        _integer("validate", "eval_tokens", self.eval_tokens, 8)
        for key in ("generate_tokens", "task_examples", "task_batch_size", "task_max_new_tokens"):
            _integer("validate", key, getattr(self, key), 1)
        for key in ("task_base", "cache_reference"):
            _flag("validate", key, getattr(self, key))
        for key in ("min_top1_agreement", "min_top1_general", "max_mean_kl", "min_generation_agreement",
                    "max_exact_match_drop", "max_hidden_rel_error"):   # any number: an unmeetable budget is a (tested) budget miss
            _number("validate", key, getattr(self, key), -math.inf, "a number")


# ------------------------------------------------------------------------------------------ checks
# One message for every bad setting, from a profile, --set or a flag alike: "stage.key = value is not valid; use
# <what is>". A ConfigError (exit 2): a setting to change, never a missed budget.
MERGE_DTYPES = ("float32", "float64")


def _invalid(stage: str, key: str, value, use: str) -> ConfigError:
    return ConfigError(f"{stage}.{key} = {value!r} is not valid; use {use}.")


def _choice(stage: str, key: str, value, allowed) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise _invalid(stage, key, value, f"one of {', '.join(map(repr, allowed))}")


def _flag(stage: str, key: str, value) -> None:
    if not isinstance(value, bool):
        raise _invalid(stage, key, value, "true or false")


def _integer(stage: str, key: str, value, low: int, use: str | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _invalid(stage, key, value, use or f"an integer ≥ {low}")


def _number(stage: str, key: str, value, low: float, use: str | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) and value >= low
    if not ok:
        raise _invalid(stage, key, value, use or f"a number ≥ {low:g}")


def _names(stage: str, key: str, value, what: str) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m for m in value):
        raise _invalid(stage, key, value, f"a list of {what}")


# ------------------------------------------------------------------------------------------ quantize
BASE_CHOICES = ("none", "int8", "int4")
METHODS = ("weight_only", "hqq", "dynamic")
HEAD_CHOICES = ("fp32", "int8", "int4")
EMBEDDING_CHOICES = ("fp32", "int4")
ADAPTER_CHOICES = ("fp32", "int8", "int4", "int3", "int2", "mixed:AVG_BITS")


QuantizeConfigError = ConfigError   # the older name of a bad [quantize] setting


@dataclass(frozen=True)
class QuantizeConfig:
    """Weight quantization of the exported base (see the module docstring for the measured trade-offs)."""

    base: str = "none"               # "none", "int8", "int4"
    # "weight_only": MatMulNBits, round-to-nearest scales; "hqq": the 4-bit MatMuls by onnxruntime's data-free HQQ
    # quantizer (half-quadratic search of scale and zero point per block; 8-bit ones stay round-to-nearest);
    # "dynamic": quantize_dynamic (int8 only)
    method: str = "weight_only"
    block_size: int = 32             # weights per scale, along the input dimension (power of 2, ≥ 16)
    symmetric: bool = True           # False adds a zero point per block
    accuracy_level: int = 4          # MatMulNBits compute type: 4 = int8 activations (fast), 0 = fp32
    int8_modules: list = field(default_factory=list)   # int4 base: MatMuls whose name contains one stay int8
    lm_head: str = "int8"            # precision of the LM head: "fp32", "int8", "int4"
    # weights per scale in the LM head alone (None: block_size). The head is the widest MatMul (N = vocabulary),
    # the one where MatMulNBits' time depends most on the block size (SmolLM2's head alone, int8, 2 threads, two
    # runs: 0.40–0.58 ms at 128 against 0.82–1.22 ms at 32)
    lm_head_block_size: int | None = None
    embedding: str = "fp32"          # the input embedding table: "fp32" or "int4" (GatherBlockQuantized)
    # The adapter's factors, quantized by the one factor quantizer (stages/quantize_factors.py, as `compress
    # --bits`) before the export: "int8".."int2" uniform widths, "mixed:AVG_BITS" per-component widths within an
    # average budget, one fp16 scale per adapter_block_size values. A hot-swap export ships the codes in its
    # adapter file (the graph stays float; the runtime expands them once at load, so decode runs at float-LoRA
    # speed); a merged export folds their expansion in. An adapter from `compress --bits` ships as it is.
    adapter: str = "fp32"
    adapter_block_size: int = 32

    def __post_init__(self):
        _choice("quantize", "base", self.base, BASE_CHOICES)
        _choice("quantize", "method", self.method, METHODS)
        _choice("quantize", "lm_head", self.lm_head, HEAD_CHOICES)
        _choice("quantize", "embedding", self.embedding, EMBEDDING_CHOICES)
        _flag("quantize", "symmetric", self.symmetric)
        if not _adapter_setting_ok(self.adapter):
            raise _invalid("quantize", "adapter", self.adapter,
                           f"one of {', '.join(map(repr, ADAPTER_CHOICES))} (e.g. 'mixed:2.5')")
        _integer("quantize", "adapter_block_size", self.adapter_block_size, 8,
                 "an integer ≥ 8, best a power of two (32 keeps the most accuracy; each block costs one fp16 scale)")
        block = self.block_size
        if not isinstance(block, int) or isinstance(block, bool) or block < 16 or block & (block - 1):
            raise _invalid("quantize", "block_size", block, "a power of 2 ≥ 16, as MatMulNBits needs (32 keeps the "
                           "most accuracy, 128 the smallest scales)")
        head_block = self.lm_head_block_size
        if head_block is not None and (not isinstance(head_block, int) or isinstance(head_block, bool)
                                       or head_block < 16 or head_block & (head_block - 1)):
            raise _invalid("quantize", "lm_head_block_size", head_block, "a power of 2 ≥ 16 (or leave it out: "
                           "block_size), as MatMulNBits needs")
        _choice("quantize", "accuracy_level", self.accuracy_level, (0, 1, 2, 3, 4))
        if self.method == "dynamic" and (self.base != "int8" or self.lm_head == "int4"):
            raise _invalid("quantize", "method", self.method, f"'weight_only' with base = {self.base!r} and "
                           f"lm_head = {self.lm_head!r}: 'dynamic' exists for base = 'int8' (and lm_head 'int8' or "
                           "'fp32') only; int4 is weight-only (MatMulNBits)")
        _names("quantize", "int8_modules", self.int8_modules, "module-name parts such as 'down_proj'")

def _adapter_setting_ok(value) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith("mixed:"):
        try:
            avg = float(value[len("mixed:"):])
        except ValueError:
            return False
        return 0 < avg < 64
    return value in ADAPTER_CHOICES[:-1]


# ------------------------------------------------------------------------------------------ profiling
@dataclass(frozen=True)
class ProfileConfig:
    """Latency and memory of the export on one runtime; budgets 0 = no budget."""

    runtime: str = "ort_cpu"           # ort_cpu, ort_cuda, mobile (ORT format, 1-2 threads), llamacpp
    threads: int = 2                   # intra-op threads; 0 = the runtime's default (all cores)
    prompt_lengths: list = field(default_factory=lambda: [16, 128, 512])   # capped by the model's max positions
    decode_tokens: int = 32            # decode steps per round, after the shortest prompt
    runs: int = 5                      # recorded rounds (each runs every variant once, in turn)
    warmup: int = 1                    # unrecorded rounds first
    encoder_batch_sizes: list = field(default_factory=lambda: [1, 8])
    isolate: bool = True               # load time and peak RSS of each variant in a fresh process
    max_decode_ms_per_token: float = 0.0   # on every variant's median (p50) ms/token
    max_peak_rss_mb: float = 0.0           # peak RSS of the fresh process (python + runtime + model)
    max_adapter_file_mb: float = 0.0
    max_load_seconds: float = 0.0

    def __post_init__(self):
        _choice("profiling", "runtime", self.runtime, tuple(RUNNERS))
        for key in ("prompt_lengths", "encoder_batch_sizes"):
            raw = getattr(self, key)
            try:   # --set gives strings: "16,128" -> ["16", "128"]
                values = [int(v) for v in raw]
            except (TypeError, ValueError):
                values = []
            if not values or min(values) < 1:
                raise _invalid("profiling", key, raw, "a non-empty list of positive integers, e.g. [16, 128]")
            object.__setattr__(self, key, values)
        _integer("profiling", "threads", self.threads, 0, "0 (the runtime's default: all cores) or more")
        _integer("profiling", "decode_tokens", self.decode_tokens, 1)
        _integer("profiling", "runs", self.runs, 1)
        _integer("profiling", "warmup", self.warmup, 0)
        _flag("profiling", "isolate", self.isolate)
        for key in ("max_decode_ms_per_token", "max_peak_rss_mb", "max_adapter_file_mb", "max_load_seconds"):
            _number("profiling", key, getattr(self, key), 0.0, "a number ≥ 0 (0 = no budget)")


# ------------------------------------------------------------------------------------------ compress
# Not a profile table: `python -m edge_lora compress` sets it from its flags. Here so that the CLI knows the valid
# values without importing the stage (and torch).
COMPRESS_SCOPES = ("group", "module", "global")
COMPRESS_STRUCTURES = ("svd", "shared-out", "tucker2", "cp", "tt")   # what stages/tensorize.py can fit
OUTPUT_STRUCTURES = ("svd", "shared-out")   # the ones whose input side stays per layer (output-error budgets)
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class CompressConfig:
    """Rank truncation and cross-layer tensorization within an error budget (stages/compress.py)."""

    budget: float = 0.05                 # relative Frobenius error allowed (see scope)
    energy: float | None = None          # alternatively: keep this fraction of the energy (budget = sqrt(1-energy))
    scope: str = "group"                 # group | module | global
    structure: str = "auto"              # auto | svd | shared-out | tucker2 | cp | tt
    candidates: tuple[str, ...] = COMPRESS_STRUCTURES   # what auto may choose from
    max_rank: int | None = None          # upper bound on every rank chosen (k_l, r_u, r_v, CP rank, TT ranks)
    hooi_iters: int = 3                  # HOOI sweeps (tensorly) refining the chosen Tucker-2 fit
    cp_auto_max_rank: int = 96           # auto skips CP fits above this rank bound (ALS cost; see search_cp)
    storage_dtype: str = "float16"       # factors are stored (and sizes counted) in this dtype
    verify: bool = True                  # recompute every module's error from the stored factors
    # "weight": budgets on ‖ΔW−ΔŴ‖_F / ‖ΔW‖_F. "output": on ‖(ΔW−ΔŴ)X‖_F / ‖ΔW X‖_F over calibration inputs
    # (C = XXᵀ per module, required); then only per-layer input factors are possible (svd, shared-out), since a
    # basis shared across layers cannot stay shared once each layer's A is whitened by its own C.
    error_metric: str = "weight"
    curves: bool = False                 # keep error-versus-size curves in the report (for plots)
    # Torch intra-op threads while the stage runs (None: leave as is). Nearly all the work is QR/SVD/eigh of
    # tall-skinny or r-sized matrices, where MKL's threaded LAPACK is slower than one thread, and 100-300×
    # slower when other processes hold the cores (measured: 0.47 s vs 1.6 ms for one 11008×16 QR on 2 busy cores).
    threads: int | None = 1

    def __post_init__(self):
        if self.energy is not None:
            ok = isinstance(self.energy, (int, float)) and not isinstance(self.energy, bool) and 0.0 < self.energy <= 1.0
            if not ok:
                raise _invalid("compress", "energy", self.energy, "a fraction in (0, 1], e.g. 0.99")
        else:
            _number("compress", "budget", self.budget, 0.0, "a relative error ≥ 0, e.g. 0.05")
            if math.isinf(self.budget):
                raise _invalid("compress", "budget", self.budget, "a finite relative error ≥ 0, e.g. 0.05")
        _choice("compress", "scope", self.scope, COMPRESS_SCOPES)
        _choice("compress", "structure", self.structure, ("auto",) + COMPRESS_STRUCTURES)
        unknown = sorted(set(self.candidates) - set(COMPRESS_STRUCTURES))
        if unknown or not self.candidates:
            raise _invalid("compress", "candidates", self.candidates,
                           f"a non-empty list of {', '.join(map(repr, COMPRESS_STRUCTURES))}")
        _choice("compress", "error_metric", self.error_metric, ("weight", "output"))
        if self.error_metric == "output" and self.structure not in ("auto",) + OUTPUT_STRUCTURES:
            raise _invalid("compress", "structure", self.structure,
                           f"{' or '.join(map(repr, OUTPUT_STRUCTURES))} (or error_metric 'weight'): it shares an "
                           "input basis across layers, which an output-error budget cannot keep (each layer's "
                           "inputs differ)")
        if self.max_rank is not None:
            _integer("compress", "max_rank", self.max_rank, 0, "an integer ≥ 0, or none for no bound")
        _integer("compress", "hooi_iters", self.hooi_iters, 0)
        _integer("compress", "cp_auto_max_rank", self.cp_auto_max_rank, 1)
        _choice("compress", "storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        _flag("compress", "verify", self.verify)
        _flag("compress", "curves", self.curves)
        if self.threads is not None:
            _integer("compress", "threads", self.threads, 0, "an integer ≥ 0 (0 or none: leave torch's setting)")

    def relative_budget(self) -> float:
        return math.sqrt(max(1.0 - self.energy, 0.0)) if self.energy is not None else self.budget


# The default error budget of `compress` with no flags: an estimated relative output error (stages/allocate.py).
# Measured on the demo suite (BENCHMARKS "Compression on the demo suite", six adapters): 0.01 kept ≥ 99.7% task
# retention on every adapter, at 2.7-5.3× smaller than fp16 PEFT (int8: 1.9×); 0.02 fell to 0.984 on roman
# attention-only and 0.05 to 0.850. Smaller points that hold ≥ 99% exist per adapter but not for all at once.
DEFAULT_TARGET_ERROR = 0.01
ALLOCATE_WEIGHTINGS = ("layer", "adapter", "fisher")


@dataclass(frozen=True)
class AllocateConfig:
    """Output-aware joint rank and bit allocation (stages/allocate.py): one of an error or a size budget."""

    target_error: float | None = DEFAULT_TARGET_ERROR   # estimated relative output error allowed
    target_bits: float | None = None     # instead: bits per original parameter (then target_error is None)
    group_size: int = 64                 # values per fp16 scale along each factor row
    # layer: each module's error relative to its base layer's output energy; adapter: raw output errors; fisher:
    # each output channel weighted by how much the next-token loss moves with it (one backward pass)
    weighting: str = "layer"
    calibration_tokens: int = 2048       # tokens of calibration text the metric is measured on
    # after allocation, distil the fp16 scales against the original adapter for this many steps (stages/recover.py;
    # 0: off). Same codes, same size; about 5 s per step for SmolLM2-135M on 2 cores (measured).
    recover_steps: int = 0
    # treat each calibration text as a prompt and append the original adapter's greedy completion of up to this
    # many tokens before measuring (0: off): the error then counts where the adapter answers, not only where it reads
    complete_tokens: int = 0

    def __post_init__(self):
        if (self.target_error is None) == (self.target_bits is None):
            raise ConfigError("allocate: give exactly one of target_error (an estimated relative output error, "
                              "e.g. 0.1) or target_bits (bits per original parameter, e.g. 1.0).")
        if self.target_error is not None:
            _number("allocate", "target_error", self.target_error, 0.0, "a relative output error in (0, 1], e.g. 0.1")
            if not 0 < self.target_error <= 1:
                raise _invalid("allocate", "target_error", self.target_error, "a relative output error in (0, 1]")
        if self.target_bits is not None:
            _number("allocate", "target_bits", self.target_bits, 0.0, "bits per parameter > 0, e.g. 1.0")
            if not 0 < self.target_bits < 64:
                raise _invalid("allocate", "target_bits", self.target_bits, "bits per parameter in (0, 64)")
        _integer("allocate", "group_size", self.group_size, 8)
        _choice("allocate", "weighting", self.weighting, ALLOCATE_WEIGHTINGS)
        _integer("allocate", "calibration_tokens", self.calibration_tokens, 16)
        _integer("allocate", "recover_steps", self.recover_steps, 0)
        _integer("allocate", "complete_tokens", self.complete_tokens, 0)


# The profile file's tables, one per stage, in the order a profile runs them. A literal: a stage's config is
# known wherever a profile is parsed, without importing the stage.
STAGE_CONFIGS: dict[str, type] = {"merge": MergeConfig, "export": ExportConfig, "quantize": QuantizeConfig,
                                  "validate": ValidateConfig, "profiling": ProfileConfig}


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


def _optional(expected) -> tuple[Any, bool]:
    """``int | None`` → (int, True); ``int`` → (int, False)."""
    if typing.get_origin(expected) in (typing.Union, UnionType):
        members = typing.get_args(expected)
        return next(m for m in members if m is not type(None)), type(None) in members
    return expected, False


def _check_type(where: str, value, expected) -> Any:
    expected, nullable = _optional(expected)
    if value is None and nullable:
        return value
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
    if not stages:
        raise ProfileError(f"{where}: [profile] stages is empty; a profile runs at least one of "
                           f"{', '.join(STAGE_CONFIGS)}.")
    twice = sorted({s for s in stages if stages.count(s) > 1})
    if twice:
        raise ProfileError(f"{where}: stage(s) {twice} appear more than once in [profile] stages (a second merge "
                           "would apply the adapter twice); list each stage once.")
    order = list(STAGE_CONFIGS)
    if all(s in STAGE_CONFIGS for s in stages) and stages != sorted(stages, key=order.index):
        raise ProfileError(f"{where}: [profile] stages {stages} are out of order; stages run in the order "
                           f"{', '.join(order)}.")
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
    expected, nullable = _optional(expected)
    if nullable and raw.lower() == "none":
        return None
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
