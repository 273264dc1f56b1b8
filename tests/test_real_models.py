"""End-to-end on the real models and the trained demo adapters (``pytest -m slow``).

The demo adapters are trained by tools/train_demo_adapter.py on first use (about 15 minutes on 2 cores) and
cached; later runs reuse them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_lora.adapter import check_compatible, load_peft, save_peft
from edge_lora.base import base_content_hash, load_base, materialize_smollm2, minilm_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def demo_adapter(variant: str) -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "train_demo_adapter.py"), "--variant", variant],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smollm2():
    return load_base("smollm2")


def test_smollm2_materialises_and_hashes_consistently(smollm2):
    model, tokenizer = smollm2
    folder = materialize_smollm2()
    assert (folder / "config.json").is_file() and model.config.num_hidden_layers == 30
    assert base_content_hash(folder) == base_content_hash(model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_minilm_gives_meaningful_embeddings():
    model, tokenizer = load_base("minilm")
    assert model.config.model_type == "bert"
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 > sim[0, 2]
    assert base_content_hash(minilm_path()) == base_content_hash(model)


@pytest.mark.parametrize("variant", ["standard", "patterns"])
def test_trained_adapter_imports_exactly_and_roundtrips_through_peft(smollm2, variant, tmp_path):
    from peft import PeftModel

    from edge_lora.base import load_base as fresh_base

    model, tokenizer = smollm2
    folder = demo_adapter(variant)
    adapter = load_peft(folder)
    check_compatible(adapter, model)
    assert len(adapter.modules) == 30 * 7 or variant == "patterns"

    reference = PeftModel.from_pretrained(fresh_base("smollm2")[0], str(folder)).eval()
    for name, module in list(adapter.modules.items())[::23]:
        delta = reference.base_model.model.get_submodule(name).get_delta_weight("default").double()
        torch.testing.assert_close(module.delta(), delta, rtol=1e-5, atol=1e-7)

    ids = tokenizer("March 14, 2021 =>", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        base_logits = model(input_ids=ids).logits
    saved = save_peft(adapter, tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(fresh_base("smollm2")[0], str(saved)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert (expected - base_logits).abs().max() > 0.1


def test_inspect_cli_on_the_demo_adapter():
    folder = demo_adapter("standard")
    out = subprocess.run([sys.executable, "-m", "edge_lora", "inspect", str(folder), "--base", "smollm2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Compatible" in out.stdout and "210 modules" in out.stdout


def test_eval_data_end_to_end_on_smollm2(tmp_path):
    """`export --eval-data` on SmolLM2 with the demo adapter and a JSONL the user wrote (dates in forms the demo
    task never uses, so this is the user's data, not the built-in task): the task score and retention are of
    those lines, and the report names the file and its sha256."""
    import hashlib
    import json

    lines = [{"prompt": f"{d} {m} {y} =>", "completion": f" {y}-{mi:02d}-{d:02d}"}
             for d, (m, mi), y in zip([3, 9, 12, 17, 21, 25, 28, 6], [("Jan.", 1), ("Feb.", 2), ("Mar.", 3),
                                                                     ("Apr.", 4), ("Aug.", 8), ("Sept.", 9),
                                                                     ("Oct.", 10), ("Dec.", 12)],
                                      [1961, 1977, 1984, 1999, 2003, 2011, 2020, 2042])]
    data = tmp_path / "dates.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = subprocess.run([sys.executable, "-m", "edge_lora", "export", "--base", "smollm2", "--adapter",
                          str(demo_adapter("standard")), "--profile", "cpu-fp32", "--out", str(tmp_path / "out"),
                          "--quiet", "--eval-data", str(data)], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    v = next(s for s in report["stages"] if s["stage"] == "validate")["metrics"]
    assert v["eval_data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert v["task"] == "eval-data" and v["task_examples"] == len(lines)
    assert v["task_score_reference"] > v["task_score_base"]   # the adapter does the user's task, the base less so
    assert v["task_score_drop"] <= 0.01 and v["retention"] >= 0.99 and v["top1_agreement"] >= 0.999
