"""The demo task and its metric: rewrite a date into ISO form (``YYYY-MM-DD``).

Every stage that produces a model (PyTorch reference, ONNX Runtime, quantized, compressed) is scored by
:func:`score` with the same examples and the same normalisation; only the ``generate_fn`` differs.

The prompt is the date and an arrow, nothing else (``"14 March 2021 =>"``): with no instruction the base model
has no way to know the expected format, so it scores near zero and the task metric measures the adapter.
Numeric surface forms are only ones with a single reading (``14.03.2021`` is day.month.year, ``2021/03/14``
is year/month/day); slash forms with the year last are left out because they are ambiguous.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

FIRST_DAY = dt.date(1950, 1, 1)
LAST_DAY = dt.date(2049, 12, 31)
HELD_OUT_PERCENT = 20
SPLITS = ("train", "test")
ARROW = " =>"

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Each form renders a date one way. The name travels with the example so failures can be grouped by form.
FORMS: dict[str, Callable[[dt.date], str]] = {
    "month_d_y": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "d_month_y": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "mon_d_y": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    "d_mon_y": lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    "dd_mon_yyyy": lambda d: f"{d.day:02d}-{MONTHS[d.month - 1][:3]}-{d.year}",
    "the_dth_of_month": lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    "month_dth_y": lambda d: f"{MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",
    "weekday_month_d_y": lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    "y_month_d": lambda d: f"{d.year}, {MONTHS[d.month - 1]} {d.day}",
    "upper_month_d_y": lambda d: f"{MONTHS[d.month - 1].upper()} {d.day} {d.year}",
    "dd.mm.yyyy": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    "yyyy/mm/dd": lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
}


@dataclass(frozen=True)
class DateExample:
    date: dt.date
    form: str
    surface: str

    @property
    def prompt(self) -> str:
        return self.surface + ARROW

    @property
    def target(self) -> str:
        # The leading space is how the tokenizer sees text after ``=>``.
        return " " + self.date.isoformat()


def split_of(date: dt.date) -> str:
    """Which split a calendar date belongs to, by a hash of the date: a held-out date never appears in
    training in any surface form, and the assignment does not depend on seeds or on n."""
    bucket = int.from_bytes(hashlib.sha256(date.isoformat().encode()).digest()[:4], "big") % 100
    return "test" if bucket < HELD_OUT_PERCENT else "train"


def make_examples(n: int, seed: int = 0, split: str = "train") -> list[DateExample]:
    """``n`` distinct (date, form) examples of one split, the same for the same arguments on any machine."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    # A string seed goes through sha512 in `random`, so it is stable across runs and Python versions,
    # unlike hash() of a tuple.
    rng = random.Random(f"date-iso:{split}:{seed}")
    span = (LAST_DAY - FIRST_DAY).days + 1
    forms = sorted(FORMS)
    seen: set[tuple[dt.date, str]] = set()
    out: list[DateExample] = []
    while len(out) < n:
        date = FIRST_DAY + dt.timedelta(days=rng.randrange(span))
        form = forms[rng.randrange(len(forms))]
        if split_of(date) != split or (date, form) in seen:
            continue
        seen.add((date, form))
        out.append(DateExample(date, form, FORMS[form](date)))
    return out


def prompt_text(example) -> str:
    """The prompt of any task's example (this module's dates, ``edge_lora.tasks``' suite)."""
    return example.prompt


def target_text(example) -> str:
    """The completion after the prompt, with its leading space; training appends :data:`STOP` so the model
    learns to end the line."""
    return example.target


STOP = "\n"
DEFAULT_EOS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


def normalize(text: str, eos: Sequence[str] = DEFAULT_EOS) -> str:
    """Cut at the first newline or end-of-sequence marker, then strip surrounding whitespace.

    Generation loops may run past the answer (batched decoding, a missed stop token); what counts is the
    first line only, so every runtime is judged the same however it stops.
    """
    for marker in ("\n", *eos):
        text = text.split(marker, 1)[0]
    return text.strip()


def exact_match(predictions: Sequence[str], targets: Sequence[str], eos: Sequence[str] = DEFAULT_EOS) -> float:
    """Fraction of predictions equal to their target after :func:`normalize` on both sides."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        return 0.0
    hits = sum(normalize(p, eos) == normalize(t, eos) for p, t in zip(predictions, targets))
    return hits / len(targets)


GenerateFn = Callable[[list[str]], list[str]]


def score(generate_fn: GenerateFn, examples: Sequence[DateExample], batch_size: int = 32,
          max_failures: int = 10) -> dict:
    """Run ``generate_fn`` over the prompts in batches and score exact match.

    ``generate_fn(prompts) -> completions`` is any generation loop (PyTorch, ONNX Runtime, ...); it returns the
    text after each prompt, not including the prompt.
    """
    predictions: list[str] = []
    for i in range(0, len(examples), batch_size):
        prompts = [prompt_text(e) for e in examples[i:i + batch_size]]
        completions = list(generate_fn(prompts))
        if len(completions) != len(prompts):
            raise ValueError(f"generate_fn returned {len(completions)} completions for {len(prompts)} prompts")
        predictions.extend(completions)
    targets = [target_text(e) for e in examples]
    failures = [
        {"prompt": prompt_text(e), "target": normalize(t), "prediction": normalize(p), "form": e.form}
        for e, p, t in zip(examples, predictions, targets)
        if normalize(p) != normalize(t)
    ]
    by_form: dict[str, list[int]] = {}
    for e, p, t in zip(examples, predictions, targets):
        by_form.setdefault(e.form, []).append(int(normalize(p) == normalize(t)))
    return {
        "exact_match": exact_match(predictions, targets),
        "n": len(examples),
        "by_form": {f: sum(v) / len(v) for f, v in sorted(by_form.items())},
        "failures": failures[:max_failures],
        "n_failures": len(failures),
    }


def stop_token_ids(tokenizer) -> set[int]:
    """Token ids that end a completion: the tokenizer's EOS and the chat/document end markers it knows.

    The SmolLM2 tokenizer converted from GGUF names ``<|im_start|>`` as EOS, so the real end markers are added
    by name rather than trusting ``eos_token_id`` alone.
    """
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in DEFAULT_EOS if t in vocab)
    return ids


def torch_greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    """Batched greedy decoding with left padding; each row stops at a newline or a stop token.

    Written as an explicit loop (not ``model.generate``) so the ONNX Runtime loop can mirror it step for step:
    position ids come from the attention mask, so left padding does not shift the rotary positions.
    """
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id or 0
    stops = stop_token_ids(tokenizer)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    input_ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    past = None
    step_ids = input_ids
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True)
            past = out.past_key_values
            next_ids = out.logits[:, -1, :].argmax(-1)
            for row, tok in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                if tok in stops:
                    done[row] = True
                    continue
                generated[row].append(tok)
                if "\n" in tokenizer.decode([tok]):
                    done[row] = True
            if all(done):
                break
            step_ids = next_ids[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
