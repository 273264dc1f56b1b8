"""llama.cpp as a peer runtime (edge_lora.runtimes.llamacpp).

The error-path tests always run. The real-model tests are ``slow`` and need the optional runtime
(``bash tools/build_llamacpp.sh``); without it they skip with that instruction.

What "matches PyTorch" means here, honestly:
- The fp32 HF folder of SmolLM2 *is* the packaged Q4_1 GGUF de-quantized, so an F32 GGUF made by llama.cpp from
  that Q4_1 holds the same weights bit for bit. With an fp32 KV cache, llama.cpp then reproduces PyTorch's logits
  to float rounding, and greedy continuations must be identical.
- The Q4_1 GGUF also holds those weights, but llama.cpp multiplies them with activations quantized to 8 bits
  (Q8_1/Q8_0 dot products), which moves logits by up to ~1-2. Greedy text then diverges wherever PyTorch's top
  two tokens are nearly tied (seen: margins of 0.003-0.03 logits, first divergence after 9-21 tokens). So the
  Q4_1 test is teacher-forced on PyTorch's continuation and requires the same argmax wherever PyTorch's top-2
  margin is at least 0.5 logits, rather than an identical free-running continuation.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_lora.errors import AdapterError, ModelError
from edge_lora.runtimes import llamacpp as lc

ROOT = Path(__file__).resolve().parents[1]
SKIP_REASON = "peer runtime not installed: bash tools/build_llamacpp.sh"
PROMPTS = ["The capital of France is", "Once upon a time, there was a little robot who", "def fibonacci(n):"]
MARGIN = 0.5  # logits; see the module docstring


# ------------------------------------------------------------------------------------------ always run
def test_missing_llama_cpp_says_how_to_install(monkeypatch):
    # A None entry in sys.modules makes `import llama_cpp` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(lc.LlamaCppUnavailable, match="tools/build_llamacpp.sh"):
        lc.require_llama_cpp()
    with pytest.raises(lc.LlamaCppUnavailable, match="tools/build_llamacpp.sh"):
        lc.LlamaCppRunner("model.gguf")
    with pytest.raises(lc.LlamaCppUnavailable):
        lc.quantize_gguf("model.gguf", "out.gguf", "Q8_0")
    # The profiler reports a RuntimeUnavailableError as "runtime missing" and goes on with the other runtimes.
    from edge_lora.runtimes import RuntimeUnavailableError, open_runner

    assert issubclass(lc.LlamaCppUnavailable, RuntimeUnavailableError)
    with pytest.raises(RuntimeUnavailableError, match="tools/build_llamacpp.sh"):
        open_runner("llamacpp", "model.gguf", threads=2)


def test_missing_converters_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_LORA_LLAMACPP_SRC", str(tmp_path))
    with pytest.raises(lc.LlamaCppUnavailable, match="tools/build_llamacpp.sh"):
        lc.converters_dir()


@pytest.mark.parametrize("case,feature", [("llama-lora-bias", "lora_bias"), ("llama-embedding", "embedding")])
def test_lora_features_llamacpp_cannot_hold_are_refused(tmp_path, case, feature):
    # Refused before any converter runs: llama.cpp would otherwise drop them (or crash) and the benchmark would
    # time a different adapter than the one ONNX Runtime runs.
    from conftest import ADAPTER_TABLE, make_peft_adapter

    kind, kwargs = ADAPTER_TABLE[case]
    peft_model = make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    peft_model.get_base_model().config.save_pretrained(tmp_path / "base")
    with pytest.raises(AdapterError, match=feature):
        lc.peft_to_gguf_lora(tmp_path / "adapter", tmp_path / "base", tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()


# ------------------------------------------------------------------------------------------ real models
@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason=SKIP_REASON)


@pytest.fixture(scope="module")
def smollm2():
    from edge_lora.base import load_base

    torch.set_num_threads(2)
    return load_base("smollm2")


@pytest.fixture(scope="module")
def ggufs(llama_cpp, tmp_path_factory):
    """The packaged Q4_1 and llama.cpp's own F32 de-quantization of it (= the weights of our fp32 HF folder)."""
    from edge_lora.base import smollm2_gguf_path

    q41 = smollm2_gguf_path()
    f32 = lc.quantize_gguf(q41, tmp_path_factory.mktemp("gguf") / "smollm2-F32.gguf", "F32")
    return {"Q4_1": q41, "F32": f32}


@pytest.fixture(scope="module")
def adapter_dir():
    from edge_lora.base import cache_dir

    folder = cache_dir() / "adapters" / "date-iso-r16"
    if not (folder / "adapter_model.safetensors").is_file():  # trains once (~15 min), as test_real_models does
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "train_demo_adapter.py"), "--variant",
                              "standard"], capture_output=True, text=True, check=True)
        folder = Path(out.stdout.strip().splitlines()[-1])
    return folder


@pytest.fixture(scope="module")
def gguf_lora(llama_cpp, adapter_dir, tmp_path_factory):
    from edge_lora.base import resolve_base

    return lc.peft_to_gguf_lora(adapter_dir, resolve_base("smollm2"), tmp_path_factory.mktemp("lora") / "r16.gguf")


def torch_continuation(model, ids: list[int], n: int):
    """PyTorch greedy ids, the logits at each step, and the top-1/top-2 margin at each step."""
    out, logits, margins = [], [], []
    with torch.inference_mode():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            last = res.logits[0, -1].float()
            top = last.topk(2).values
            logits.append(last.numpy().copy())
            margins.append(float(top[0] - top[1]))
            out.append(int(last.argmax()))
            res = model(torch.tensor([[out[-1]]]), past_key_values=res.past_key_values, use_cache=True)
    return out, logits, margins


def runner_continuation(runner, ids: list[int], n: int) -> list[int]:
    out = [runner.prefill(ids)]
    while len(out) < n:
        out.append(runner.decode(out[-1]))
    return out


def runner_answer(runner, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy text with eval.torch_greedy_generate's stopping rule (stop token, or a newline)."""
    from edge_lora.eval import stop_token_ids

    stops, out = stop_token_ids(tokenizer), []
    tok = runner.prefill(tokenizer(prompt)["input_ids"])
    for _ in range(max_new_tokens):
        if tok in stops:
            break
        out.append(tok)
        if "\n" in tokenizer.decode([tok]):
            break
        tok = runner.decode(tok)
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.slow
def test_f32_gguf_reproduces_pytorch(ggufs, smollm2):
    model, tokenizer = smollm2
    with lc.LlamaCppRunner(ggufs["F32"], threads=2, kv_type="f32") as runner:
        assert runner.info["quant"] == "F32" and runner.info["runtime"] == "llama.cpp"
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            ref, ref_logits, _ = torch_continuation(model, ids, 24)
            assert runner_continuation(runner, ids, 24) == ref, prompt
            runner.prefill(ids)
            np.testing.assert_allclose(runner.last_logits(), ref_logits[0], atol=2e-3)


@pytest.mark.slow
def test_q41_agrees_with_pytorch_up_to_activation_quantization(ggufs, smollm2):
    model, tokenizer = smollm2
    with lc.LlamaCppRunner(ggufs["Q4_1"], threads=2) as runner:
        assert runner.name == "llama.cpp 2t Q4_1"
        agree = total = 0
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            ref, ref_logits, margins = torch_continuation(model, ids, 32)
            # Teacher-forced: llama.cpp sees PyTorch's tokens, so one near-tie does not derail the rest.
            got = [runner.prefill(ids)]
            worst = float(np.abs(runner.last_logits() - ref_logits[0]).max())
            for i, tok in enumerate(ref[:-1]):
                got.append(runner.decode(tok))
                worst = max(worst, float(np.abs(runner.last_logits() - ref_logits[i + 1]).max()))
            clear = [i for i, m in enumerate(margins) if m >= MARGIN]
            assert [got[i] for i in clear] == [ref[i] for i in clear], prompt
            assert worst < 4.0, f"{prompt}: logits differ by {worst:.2f}, far beyond 8-bit activation noise"
            agree += sum(g == r for g, r in zip(got, ref))
            total += len(ref)
        assert agree / total >= 0.9


@pytest.mark.slow
def test_gguf_lora_changes_the_answer_like_pytorch(ggufs, smollm2, adapter_dir, gguf_lora):
    from peft import PeftModel

    from edge_lora.eval import make_examples, normalize, prompt_text, target_text, torch_greedy_generate
    from edge_lora.base import load_base

    _, tokenizer = smollm2
    peft_model = PeftModel.from_pretrained(load_base("smollm2")[0], str(adapter_dir)).eval()
    example = make_examples(1, seed=0, split="test")[0]
    prompt = prompt_text(example)
    reference = normalize(torch_greedy_generate(peft_model, tokenizer, [prompt])[0])
    assert reference == normalize(target_text(example))

    ids = tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        ref_logits = peft_model(torch.tensor([ids])).logits[0, -1].numpy()
    with lc.LlamaCppRunner(ggufs["F32"], kv_type="f32", lora_path=gguf_lora) as runner:
        assert runner.name == "llama.cpp 2t F32 +LoRA" and runner.info["lora"] == str(gguf_lora)
        runner.prefill(ids)
        # Same weights, same adapter, applied unmerged on both sides: float rounding only.
        np.testing.assert_allclose(runner.last_logits(), ref_logits, atol=2e-3)
    from edge_lora.runtimes import Runner, SwapRunner, open_runner

    runner = open_runner("llamacpp", ggufs["Q4_1"], threads=2)
    try:
        assert isinstance(runner, Runner) and isinstance(runner, SwapRunner)
        base_answer = normalize(runner_answer(runner, tokenizer, prompt))
        assert base_answer != reference  # the base cannot do the task: the adapter is what answers
        runner.swap(gguf_lora)
        assert runner.name == "llama.cpp 2t Q4_1 +LoRA" and runner.info["lora"] == str(gguf_lora)
        assert normalize(runner_answer(runner, tokenizer, prompt)) == reference
        runner.use_lora(False)
        assert runner.name == "llama.cpp 2t Q4_1" and runner.info["lora_active"] is False
        assert normalize(runner_answer(runner, tokenizer, prompt)) == base_answer
        runner.use_lora(True)
        runner.swap(gguf_lora)  # reloading the same file on the live context changes nothing
        assert normalize(runner_answer(runner, tokenizer, prompt)) == reference
        runner.swap(None)
        assert runner.info["lora"] is None and normalize(runner_answer(runner, tokenizer, prompt)) == base_answer
    finally:
        runner.close()


@pytest.mark.slow
def test_runner_rejects_misuse(ggufs, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        lc.LlamaCppRunner(tmp_path / "missing.gguf")
    with pytest.raises(AdapterError, match="peft_to_gguf_lora"):
        lc.LlamaCppRunner(ggufs["Q4_1"], lora_path=tmp_path / "missing-lora.gguf")
    with pytest.raises(lc.LlamaCppError, match="threads"):
        lc.LlamaCppRunner(ggufs["Q4_1"], threads=0)
    runner = lc.LlamaCppRunner(ggufs["Q4_1"], n_ctx=8)
    with pytest.raises(lc.LlamaCppError, match="prefill"):
        runner.decode(5)
    with pytest.raises(lc.LlamaCppError, match="context holds 8"):
        runner.prefill(list(range(1, 10)))
    with pytest.raises(lc.LlamaCppError, match="vocabulary"):
        runner.prefill([1, 10**7])
    with pytest.raises(AdapterError, match="no adapter loaded"):
        runner.use_lora(True)
    with pytest.raises(AdapterError, match="could not load the LoRA"):
        runner.swap(ggufs["F32"])  # a model, not a LoRA
    assert runner.info["vocab_size"] == 49152 and runner.info["max_positions"] == 8
    tok = runner.prefill(np.array([1, 504, 3458]))  # numpy ids, as a tokenizer's return_tensors="np" gives
    with pytest.raises(lc.LlamaCppError, match="vocabulary"):
        runner.decode(-1)
    tok = runner.decode(np.int64(tok))
    for _ in range(4):
        tok = runner.decode(tok)
    with pytest.raises(lc.LlamaCppError, match="full"):
        runner.decode(tok)
    runner.close()
    runner.close()  # idempotent
