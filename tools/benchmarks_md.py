"""BENCHMARKS.md is shared by every tools/bench_*.py: each owns one '## Section' (or one marked block inside
it) and replaces only that, atomically. Home-directory paths are written as '~' so no machine path lands in git.
"""

from __future__ import annotations

import os
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def portable(text: str) -> str:
    return text.replace(str(Path.home()), "~")


def write_section(title: str, body: str, block: str | None = None, path: Path = PATH) -> Path:
    """Replace '## title' (up to the next '## ') with body; with ``block``, replace only the text between
    ``<!-- block -->`` and ``<!-- /block -->`` inside that section. Missing section or block: appended."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    head = f"## {title}"
    start = next((i for i, line in enumerate(lines) if line.strip() == head), None)
    if start is None:
        lines += ["", head, ""]
        start = len(lines) - 2
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = portable(body).strip("\n").rstrip().splitlines()
    if block is None:
        section = ["", *new, ""]
    else:
        section = lines[start + 1:end]
        open_mark, close_mark = f"<!-- {block} -->", f"<!-- /{block} -->"
        new = [open_mark, *new, close_mark]
        if open_mark in section and close_mark in section:
            a, b = section.index(open_mark), section.index(close_mark)
            section[a:b + 1] = new
        else:
            section += ["", *new, ""]
    lines[start + 1:end] = section
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path
