"""The quantized adapter in memory: the codes of :mod:`edge_lora.formats.quantized_factors` plus the settings of
the one factor quantizer (``stages/quantize_factors.py``), and their float expansion, computed once.

``compress --bits`` writes it to ``quantized.safetensors``; an export takes it as its adapter (hot-swap exports
ship its codes in the ORT adapter file, merged exports fold its expansion in); the quantize stage of a profile
with ``quantize.adapter`` set makes one in memory from the original adapter.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from edge_lora.adapter.peft import Adapter, LoraModule
from edge_lora.errors import BudgetError, ProfileError
from edge_lora.formats import quantized_factors as fmt
from edge_lora.formats.export_meta import loaded_source, stored_source
from edge_lora.formats.quantized_factors import SUPPORTED_BITS, ModuleCodes

MIXED_CHOICES = (0,) + SUPPORTED_BITS


def mixed_choices(symmetric: bool) -> tuple[int, ...]:
    """Widths a mixed allocation picks from: 1 bit (sign × scale) exists only in the symmetric code."""
    return MIXED_CHOICES if symmetric else tuple(b for b in MIXED_CHOICES if b != 1)


class QuantizeError(ProfileError):
    """A factor-quantization setting is out of range (a setting to change: exit 2)."""


class BitBudgetError(QuantizeError, BudgetError):
    """A mixed bit budget below what one 2-bit component costs. Exit 2, not BudgetError's 3: the minimum is known
    before any work from the adapter's shapes, so this is a setting to change, not a target the data missed."""

    exit_code = 2


def parse_bits(text: str) -> dict:
    """``8|4|3|2`` or ``mixed:AVG_BITS`` (``compress --bits``, ``quantize.adapter``) → FactorQuantConfig keywords."""
    text = str(text).strip()
    uniform = ", ".join(map(str, sorted(SUPPORTED_BITS, reverse=True)))
    if text.lower().startswith("mixed:"):
        value = text.split(":", 1)[1]
        try:
            avg = float(value)
        except ValueError:
            avg = float("nan")
        if not math.isfinite(avg) or avg <= 0:
            raise QuantizeError(f"--bits {text}: after 'mixed:' give the average bit budget per parameter as a "
                                f"positive number, e.g. mixed:3.0 (got {value!r}).")
        return {"bits": None, "mixed_avg_bits": avg}
    if text.isdigit() and int(text) in SUPPORTED_BITS:
        return {"bits": int(text), "mixed_avg_bits": None}
    raise QuantizeError(f"--bits {text} is not supported: use a uniform width ({uniform}) or mixed:AVG_BITS "
                        "(per-component widths from {0, 1, 2, 3, 4, 8} within an average budget, e.g. mixed:2.5).")


@dataclass(frozen=True)
class FactorQuantConfig:
    bits: int | None = 4                 # uniform width (1, 2, 3, 4 or 8); None when mixed_avg_bits is given
    mixed_avg_bits: float | None = None  # total budget in bits per original factor parameter, all overheads in
    group_size: int = 64
    symmetric: bool = True

    def __post_init__(self):
        if (self.bits is None) == (self.mixed_avg_bits is None):
            raise QuantizeError("give exactly one of bits (uniform: 1, 2, 3, 4 or 8) or mixed_avg_bits (a budget in "
                                "bits per parameter, e.g. 3.5).")
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise QuantizeError(f"bits={self.bits!r} is not supported; choose one of {SUPPORTED_BITS} "
                                "(or mixed:AVG_BITS for mixed precision).")
        if self.bits == 1 and not self.symmetric:
            raise QuantizeError("1-bit codes are sign × scale, a symmetric code; drop --asymmetric or use 2 bits.")
        if self.mixed_avg_bits is not None and not (isinstance(self.mixed_avg_bits, (int, float))
                                                    and math.isfinite(self.mixed_avg_bits) and self.mixed_avg_bits > 0):
            raise QuantizeError(f"mixed_avg_bits={self.mixed_avg_bits!r} must be a positive number of bits per "
                                "parameter, e.g. 3.0.")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 8:
            raise QuantizeError(f"group_size={self.group_size!r} must be an integer ≥ 8 (scales cost 16 bits "
                                "per group; tiny groups cost more than they save).")

    def validate(self) -> None:
        """Kept for callers of the old API: a FactorQuantConfig is validated when it is made."""

    @property
    def label(self) -> str:
        return f"int{self.bits}" if self.bits is not None else f"mixed:{self.mixed_avg_bits:g}"


@dataclass
class QuantizedModule(ModuleCodes):
    """One module's codes (see ModuleCodes); ``dequantize`` gives the float LoRA module the device runs."""

    def dequantize(self) -> LoraModule:
        B, A = self.factors()
        bias = torch.from_numpy(self.bias.astype(np.float32)) if self.bias is not None else None
        return LoraModule(name=self.name, kind=self.kind, A=torch.from_numpy(A), B=torch.from_numpy(B),
                          scale=1.0, alpha=float(A.shape[0]), bias=bias)


@dataclass(frozen=True, eq=False)
class QuantizedAdapter:
    """Codes of every module (file order), the quantizer's settings, and the adapter they came from.

    ``source`` is the original PEFT folder (what validation compares with), ``source_config`` its PEFT config,
    ``original_params`` its factor count (sizes are quoted per original parameter). ``expanded`` is the float
    per-module adapter the codes stand for, computed once."""

    modules: dict[str, QuantizedModule]
    config: FactorQuantConfig
    source_config: dict = field(default_factory=dict)
    original_params: int = 0
    source: str | None = None

    @cached_property
    def expanded(self) -> Adapter:
        modules = {n: q.dequantize() for n, q in self.modules.items()}
        return Adapter(modules=dict(sorted(modules.items())), config=dict(self.source_config), source=self.source,
                       storage_dtype="float16", form="quantized")

    def dequantize(self, like: Adapter) -> Adapter:
        """The float factors the device runs, on ``like``'s config and extra tensors (scoring, --as-peft)."""
        return like.replace_modules({n: q.dequantize() for n, q in self.modules.items()}, form="quantized")

    @property
    def params(self) -> int:
        return self.original_params

    def payload_bits(self) -> int:
        return sum(q.payload_bits() for q in self.modules.values())

    def bits_per_param(self) -> float:
        return self.payload_bits() / max(self.original_params, 1)

    # ------------------------------------------------------------------------------------------ the format
    def to_format(self, folder: str | os.PathLike | None = None) -> fmt.QuantizedFactors:
        """The format record; with ``folder`` (where its file goes) ``source`` is recorded relative to it."""
        source = self.source if folder is None else stored_source(self.source, folder)
        return fmt.QuantizedFactors(modules=dict(self.modules), settings=asdict(self.config),
                                    original_params=self.original_params, peft_config=self.source_config,
                                    source=source)

    @classmethod
    def from_format(cls, q: fmt.QuantizedFactors, folder: str | os.PathLike | None = None) -> "QuantizedAdapter":
        """``folder``: where the file was read from, so a relative ``source`` resolves against it."""
        try:
            config = FactorQuantConfig(**q.settings)
        except (TypeError, QuantizeError) as exc:
            raise fmt.AdapterError(f"quantized adapter settings {q.settings!r} are not valid ({exc}); write the "
                                   "file again.") from exc
        modules = {n: QuantizedModule(name=m.name, kind=m.kind, B_rows=m.B_rows, A_rows=m.A_rows, bias=m.bias)
                   for n, m in q.modules.items()}
        source = q.source if folder is None else loaded_source(q.source, folder)
        return cls(modules=modules, config=config, source_config=q.peft_config, original_params=q.original_params,
                   source=source)

    def save(self, path: str | os.PathLike) -> Path:
        return fmt.write_file(self.to_format(Path(path).parent), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantizedAdapter":
        return cls.from_format(fmt.read_file(path), Path(path).parent)
