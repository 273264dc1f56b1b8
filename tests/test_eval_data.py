"""The user's evaluation data (edge_lora/eval_data.py and ``--eval-data``): the reader refuses what it cannot use
with the file and line named, the metrics are the usual ones, and an export scores the user's own examples."""

from __future__ import annotations

import json

import pytest

from edge_lora.eval_data import EvalDataError, load_eval_data, line_scores, normalized, score, token_f1


def write(tmp_path, text: str, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_plain_text_are_told_apart_and_hashed(tmp_path):
    lines = [{"prompt": "w1 w2 =>", "completion": " w3"}, {"prompt": "w4 =>", "completion": " w5 w6",
                                                          "metric": "f1"}]
    data = load_eval_data(write(tmp_path, "\n".join(json.dumps(x) for x in lines) + "\n\n"))
    assert data.kind == "examples" and [e.line for e in data.examples] == [1, 2]
    assert [e.metric for e in data.examples] == ["exact", "f1"]
    assert data.text == "w1 w2 => w3\nw4 => w5 w6" and len(data.sha256) == 64
    text = load_eval_data(write(tmp_path, "Just some prose.\n{not json}\n", "notes.txt"))
    assert text.kind == "text" and text.examples == () and text.text.startswith("Just")
    assert text.sha256 != data.sha256


@pytest.mark.parametrize("content, words", [
    ('{"prompt": "a", "completion": "b"}\nnot json\n', ["line 2", "not valid JSON"]),
    ('{"prompt": "a"}\n', ["line 1", "missing \"completion\""]),
    ('{"completion": "b"}\n', ["line 1", "missing \"prompt\""]),
    ('{"prompt": "a", "completion": "b", "answer": "c"}\n', ["line 1", "unknown key", "answer"]),
    ('{"prompt": "a", "completion": 3}\n', ["line 1", "\"completion\" is a int"]),
    ('{"prompt": " ", "completion": "b"}\n', ["line 1", "\"prompt\" is empty"]),
    ('{"prompt": "a", "completion": "b", "metric": "bleu"}\n', ["line 1", "bleu", "exact, normalized, f1"]),
    ('{"prompt": "a", "completion": "b"}\n[1, 2]\n', ["line 2", "a JSON list"]),
    ("   \n\n", ["is empty"]),
])
def test_bad_eval_data_names_the_file_and_line(tmp_path, content, words):
    path = write(tmp_path, content)
    with pytest.raises(EvalDataError) as err:
        load_eval_data(path)
    for word in [str(path), *words]:
        assert word in str(err.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(EvalDataError, match="no such file"):
        load_eval_data(tmp_path / "nope.jsonl")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(EvalDataError, match="not UTF-8"):
        load_eval_data(bad)


def test_metrics():
    assert normalized("  The Answer, is: 42!\nmore") == "answer is 42"
    assert line_scores(" 2021-03-14\n", "2021-03-14") == {"exact": 1.0, "normalized": 1.0, "f1": 1.0}
    assert line_scores("the Paris", "Paris") == {"exact": 0.0, "normalized": 1.0, "f1": 1.0}
    assert token_f1("red green blue", "red blue yellow") == pytest.approx(2 / 3)
    assert token_f1("", "x") == 0.0


def test_score_uses_each_lines_own_metric(tmp_path):
    path = write(tmp_path, "\n".join(json.dumps(x) for x in [
        {"prompt": "p1", "completion": " Paris"},
        {"prompt": "p2", "completion": " Paris", "metric": "normalized"},
        {"prompt": "p3", "completion": " red blue yellow", "metric": "f1"}]))
    answers = {"p1": " the Paris", "p2": " the Paris", "p3": " red green blue"}
    out = score(lambda prompts: [answers[p] for p in prompts], load_eval_data(path).examples, batch_size=2)
    assert out["exact_match"] == 0.0
    assert out["normalized_match"] == pytest.approx(2 / 3)
    assert out["task_score"] == pytest.approx((0 + 1 + 2 / 3) / 3)
    assert [f["line"] for f in out["failures"]] == [1, 3]


# ---------------------------------------------------------------------------------------------- through the CLI
def test_export_and_validate_score_the_users_examples(tmp_path):
    from conftest import ADAPTER_TABLE, make_peft_adapter
    from test_cli import assert_clean_error, run_cli, with_tokenizer

    from edge_lora.base import tiny_model

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    tiny_model(kind).save_pretrained(tmp_path / "base0")
    base = with_tokenizer(tmp_path / "base0", tmp_path / "base")
    lines = [{"prompt": " ".join(f"w{(3 * i + j) % 120}" for j in range(5)), "completion": f" w{i}",
              "metric": ["exact", "normalized", "f1"][i % 3]} for i in range(12)]
    data = write(tmp_path, "\n".join(json.dumps(x) for x in lines) + "\n")
    out = run_cli("export", "--base", base, "--adapter", tmp_path / "adapter", "--out", tmp_path / "out", "--quiet",
                  "--eval-data", data)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    v = next(s for s in report["stages"] if s["stage"] == "validate")["metrics"]
    assert v["eval_data"]["sha256"] == load_eval_data(data).sha256 and v["eval_data"]["examples"] == 12
    assert v["eval_text"].startswith(f"--eval-data {data}")
    assert v["task"] == "eval-data" and v["task_examples"] == 12
    # fp32 merged: the candidate answers as the reference does, whatever the (random) adapter answers
    assert v["task_score_candidate"] == v["task_score_reference"] and v["task_score_drop"] == 0
    assert "task_score_base" in v and "retention" in v
    again = run_cli("validate", tmp_path / "out", "--quiet", "--eval-data", write(tmp_path, "w1 w2 w3 w4 " * 20,
                                                                                   "prose.txt"))
    # plain text leaves the task budget nothing to measure: an error unless task = none says so on purpose (the
    # error itself is checked below, on export, where it comes before any work)
    from edge_lora.errors import ConfigError
    from edge_lora.pipeline import run_export, run_validate

    prose = write(tmp_path, "w1 w2 w3 w4 " * 20, "prose.txt")
    run_validate(tmp_path / "out", ["validate.task=none"], show_progress=False, eval_data=prose)
    v = next(s for s in json.loads((tmp_path / "out" / "report.json").read_text())["stages"]
             if s["stage"] == "validate")
    assert v["metrics"]["eval_data"]["kind"] == "text" and "task" not in v["metrics"]
    # without --eval-data, an adapter that names no task: an error before anything is exported (in process from
    # here on: the CLI's exit path is the first call's; these save its start-up)
    with pytest.raises(ConfigError, match="no task to measure.*no --eval-data was given.*validate.task=none"):
        run_export(base, tmp_path / "adapter", "cpu-fp32", tmp_path / "plain", show_progress=False)
    assert not (tmp_path / "plain").exists()
    # bad data fails before anything is exported
    long = write(tmp_path, json.dumps({"prompt": " ".join(["w1"] * 70), "completion": " w2"}) + "\n", "long.jsonl")
    with pytest.raises(EvalDataError, match=f"--eval-data {long}, line 1.*exceeds the model's 64 positions"):
        run_export(base, tmp_path / "adapter", "cpu-fp32", tmp_path / "bad", show_progress=False, eval_data=long)
    broken = write(tmp_path, '{"prompt": "w1", "completion": " w2"}\n{"prompt": \n', "broken.jsonl")
    out = run_cli("export", "--base", base, "--adapter", tmp_path / "adapter", "--out", tmp_path / "bad", "--quiet",
                  "--eval-data", broken)
    assert_clean_error(out, f"--eval-data {broken}, line 2", "not valid JSON")
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]   # no temporary folder left either


def test_compress_calibrates_on_the_same_jsonl(tmp_path):
    from edge_lora.stages.compress import calibration_texts

    path = write(tmp_path, json.dumps({"prompt": "w1 w2 =>", "completion": " w3"}) + "\n")
    assert calibration_texts(path) == ["w1 w2 => w3"]
    bad = write(tmp_path, '{"prompt": "w1"}\n', "bad.jsonl")
    with pytest.raises(EvalDataError, match=f"--calibration-text {bad}, line 1"):
        calibration_texts(bad)


def test_without_eval_data_validation_runs_on_neutral_text_and_says_no_task_was_measured(tmp_path):
    """In process (no CLI start-up): task = none, a tokenizer, an adapter naming no task."""
    from conftest import ADAPTER_TABLE, make_peft_adapter
    from test_cli import with_tokenizer

    from edge_lora.base import tiny_model
    from edge_lora.config import ValidateConfig
    from edge_lora.pipeline import reference_model
    from edge_lora.base import load_base
    from edge_lora.stages.export_onnx import export_merged
    from edge_lora.stages.merge import merge
    from edge_lora.adapter import load_peft
    from edge_lora.stages.validate import validate

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    tiny_model(kind).save_pretrained(tmp_path / "base0")
    base = with_tokenizer(tmp_path / "base0", tmp_path / "base")
    _, tokenizer = load_base(base)
    (tmp_path / "onnx").mkdir()
    export_merged(merge(tiny_model(kind), load_peft(tmp_path / "adapter"))[0], None, tmp_path / "onnx")
    metrics, report = validate(tmp_path / "onnx", reference_model(base, tmp_path / "adapter"), tokenizer,
                               ValidateConfig(task="none"))
    assert metrics["eval_text"].startswith("the built-in neutral text") and "task" not in metrics
    assert any("none measured" in s for s in report.skipped)
