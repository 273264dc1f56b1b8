"""StageReport: what every stage returns beside its output, so a run can be audited afterwards."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageReport:
    stage: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    input_hash: str | None = None
    output_hash: str | None = None
    skipped: list[str] = field(default_factory=list)  # what was left out, and why, one sentence each

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
