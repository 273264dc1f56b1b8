"""The user's own evaluation data (``--eval-data FILE``): what validation scores an export on.

Two kinds of file, told apart by their first non-blank character:

- **JSONL** (a ``{`` first): one ``{"prompt": "...", "completion": "..."}`` object per line, optionally with
  ``"metric"``: ``"exact"`` (the default), ``"normalized"`` or ``"f1"``. Greedy answers are scored by all three
  (exact match after cutting at the first line, SQuAD-style normalised match, token F1); each line's own metric
  makes up the task score whose drop and retention validation reports. Unknown keys are refused, not ignored.
- **plain text**: anything else, UTF-8. Perplexity, KL, top-1 and greedy agreement only; no task metric.

    data = load_eval_data("my_prompts.jsonl")
    scores = score(generate_fn, data.examples)

Torch-free, so a file can be checked before any model is loaded (nothing is exported for bad data).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_lora.errors import ConfigError

METRICS = ("exact", "normalized", "f1")
KEYS = {"prompt", "completion", "metric"}
MAX_BYTES = 64 * 1024 * 1024   # an evaluation set, not a corpus: read whole, so bound it


class EvalDataError(ConfigError):
    """An --eval-data file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class EvalExample:
    prompt: str
    target: str          # the reference completion (what edge_lora.eval calls the target)
    metric: str          # one of METRICS: what this line's task score is
    line: int            # 1-based line in the file, for messages
    form: str = "user"   # edge_lora.eval.score groups by form

    @property
    def item(self) -> str:
        return self.prompt


@dataclass(frozen=True)
class EvalData:
    path: str
    sha256: str
    examples: tuple[EvalExample, ...]   # empty for a plain-text file
    text: str                           # what the logit metrics run on: the file's text, or prompt+completion lines

    @property
    def kind(self) -> str:
        return "examples" if self.examples else "text"

    def describe(self) -> str:
        what = f"{len(self.examples)} prompt/completion examples" if self.examples else "plain text"
        return f"{self.path} ({what}, sha256 {self.sha256[:16]}…)"


def load_eval_data(path, flag: str = "--eval-data") -> EvalData:
    """``flag``: the option the file came from, for the error messages."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{flag} {path}: no such file; pass a JSONL file of {{\"prompt\", \"completion\"}} "
                            "objects, one per line, or a plain UTF-8 text file.")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise EvalDataError(f"{flag} {path} is {size / 2**20:.0f} MiB; evaluation data is read whole and may be "
                            f"at most {MAX_BYTES // 2**20} MiB. Pass a sample of it.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"{flag} {path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8.") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if not text.strip():
        raise EvalDataError(f"{flag} {path} is empty; give prompt/completion lines or text to evaluate on.")
    if not text.lstrip().startswith("{"):
        return EvalData(path=str(path), sha256=digest, examples=(), text=text)
    examples = tuple(_example(path, n, line, flag) for n, line in enumerate(text.splitlines(), 1) if line.strip())
    joined = "\n".join(e.prompt + e.target for e in examples)
    return EvalData(path=str(path), sha256=digest, examples=examples, text=joined)


def _example(path: Path, n: int, line: str, flag: str) -> EvalExample:
    where = f"{flag} {path}, line {n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); a JSONL file holds one "
                            "{\"prompt\": ..., \"completion\": ...} object per line.") from exc
    if not isinstance(obj, dict):
        raise EvalDataError(f"{where}: a JSON {type(obj).__name__}, not an object with \"prompt\" and "
                            "\"completion\".")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise EvalDataError(f"{where}: unknown key(s) {unknown}; the keys are \"prompt\", \"completion\" and "
                            "optionally \"metric\".")
    for key in ("prompt", "completion"):
        if key not in obj:
            raise EvalDataError(f"{where}: missing \"{key}\"; every line needs \"prompt\" and \"completion\".")
        if not isinstance(obj[key], str):
            raise EvalDataError(f"{where}: \"{key}\" is a {type(obj[key]).__name__}; it must be a string.")
    if not obj["prompt"].strip():
        raise EvalDataError(f"{where}: \"prompt\" is empty; the model needs something to answer.")
    if not obj["completion"].strip():
        raise EvalDataError(f"{where}: \"completion\" is empty; give the answer the adapter should produce.")
    metric = obj.get("metric", "exact")
    if metric not in METRICS:
        raise EvalDataError(f"{where}: \"metric\" is {metric!r}; use one of {', '.join(METRICS)}.")
    return EvalExample(prompt=obj["prompt"], target=obj["completion"], metric=metric, line=n)


# ---------------------------------------------------------------------------------------------- metrics
def first_line(text: str) -> str:
    from edge_lora.eval import normalize

    return normalize(text)


def normalized(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = first_line(text).lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, target: str) -> float:
    p, t = normalized(prediction).split(), normalized(target).split()
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def line_scores(prediction: str, target: str) -> dict[str, float]:
    return {"exact": float(first_line(prediction) == first_line(target)),
            "normalized": float(normalized(prediction) == normalized(target)),
            "f1": token_f1(prediction, target)}


def score(generate_fn: Callable[[list[str]], Sequence[str]], examples: Sequence[EvalExample],
          batch_size: int = 32, max_failures: int = 5) -> dict:
    """Greedy answers of ``generate_fn`` to every prompt, scored by the three metrics and each line's own."""
    predictions: list[str] = []
    for i in range(0, len(examples), batch_size):
        batch = [e.prompt for e in examples[i:i + batch_size]]
        predictions += list(generate_fn(batch))
    per_line = [line_scores(p, e.target) for p, e in zip(predictions, examples)]
    n = max(len(examples), 1)
    failures = [{"line": e.line, "prompt": e.prompt, "target": first_line(e.target), "prediction": first_line(p)}
                for e, p, s in zip(examples, predictions, per_line) if s[e.metric] < 1.0]
    return {"n": len(examples),
            "exact_match": sum(s["exact"] for s in per_line) / n,
            "normalized_match": sum(s["normalized"] for s in per_line) / n,
            "token_f1": sum(s["f1"] for s in per_line) / n,
            "task_score": sum(s[e.metric] for s, e in zip(per_line, examples)) / n,
            "failures": failures[:max_failures], "n_failures": len(failures)}
