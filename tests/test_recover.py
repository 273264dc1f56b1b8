"""Recovery (stages/recover.py): scale distillation keeps every code and byte count, and lowers the held-out KL
to the original adapter, measured independently with PEFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_lora.config import AllocateConfig
from edge_lora.errors import ConfigError
from edge_lora.stages import allocate as al
from edge_lora.stages import recover as rc


@pytest.fixture(scope="module", params=["llama-all7", "llama-lora-bias"])
def setup(request, tmp_path_factory):
    from edge_lora.adapter import load_peft
    from edge_lora.base import load_base, tiny_model
    from tests.conftest import ADAPTER_TABLE, make_peft_adapter
    from tests.test_cli import with_tokenizer

    tmp = tmp_path_factory.mktemp("recover")
    kind, kwargs = ADAPTER_TABLE[request.param]
    make_peft_adapter(kind, kwargs, tmp / "adapter")
    tiny_model(kind).save_pretrained(tmp / "base0")
    base = with_tokenizer(tmp / "base0", tmp / "base")
    model, tok = load_base(base)
    adapter = load_peft(tmp / "adapter")
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 120, 200)) for _ in range(8)]
    metric = al.measure_output_metric(model, tok, texts, list(adapter.modules), 2048, "test")
    q, _ = al.allocate(adapter, metric, AllocateConfig(target_error=0.3, group_size=8))
    return tmp, model, tok, adapter, texts, q


def _kl_with_peft(tmp, model, tok, texts, q) -> float:
    """KL(original ‖ quantized) on recovery's held-out chunks: PEFT runs the original, the quantized factors are
    merged into a copy of the base."""
    import copy

    from peft import PeftModel

    held = rc._chunks(tok, texts, 4096)[3::4]
    student = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in q.expanded.modules.items():
            layer = student.get_submodule(n)
            layer.weight += m.B @ m.A
            if m.bias is not None:   # lora_bias, scale folded in (the base layers here have no bias of their own)
                layer.bias = torch.nn.Parameter(m.bias.clone() + (layer.bias if layer.bias is not None else 0))
    teacher = PeftModel.from_pretrained(copy.deepcopy(model), tmp / "adapter").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for c in held:
            t = torch.log_softmax(teacher(input_ids=c[None]).logits.float(), -1)
            s = torch.log_softmax(student(input_ids=c[None]).logits.float(), -1)
            total += float((t.exp() * (t - s)).sum())
            count += len(c)
    return total / count


def test_recovery_keeps_the_codes_and_lowers_the_held_out_kl(setup):
    tmp, model, tok, adapter, texts, q = setup
    grads = [p.requires_grad for p in model.parameters()]
    out, report = rc.recover(q, adapter, model, tok, texts, steps=30)
    m = report.metrics
    assert out.payload_bits() == q.payload_bits()
    for n, mod in q.modules.items():
        for a, b in ((mod.B_rows, out.modules[n].B_rows), (mod.A_rows, out.modules[n].A_rows)):
            assert np.array_equal(a.bits, b.bits)
            assert all(np.array_equal(x, y) for x, y in zip(a.codes, b.codes))
    assert m["held_out_kl_after"] < m["held_out_kl_before"] and m["best_step"] > 0
    # the KL recovery reports is the KL an independent PEFT run measures, before and after
    assert m["held_out_kl_before"] == pytest.approx(_kl_with_peft(tmp, model, tok, texts, q), rel=1e-3)
    assert m["held_out_kl_after"] == pytest.approx(_kl_with_peft(tmp, model, tok, texts, out), rel=1e-2)
    assert [p.requires_grad for p in model.parameters()] == grads   # the caller's model is left as it was


def test_recovery_needs_enough_text(setup):
    _, model, tok, adapter, _, q = setup
    with pytest.raises(ConfigError, match="Give more text"):
        rc.recover(q, adapter, model, tok, ["w1 w2 w3"], steps=5)
    with pytest.raises(ConfigError, match="steps"):
        rc.recover(q, adapter, model, tok, ["w1 w2 w3"], steps=0)


def test_complete_appends_what_peft_generates_and_leaves_the_base_alone(setup):
    """Calibration prompts completed by the adapter (edge_lora.calibration.complete): the completion is PEFT's own
    greedy answer with the original adapter, and the base computes as before afterwards."""
    import copy

    from peft import PeftModel

    from edge_lora.calibration import complete
    from edge_lora.eval import torch_greedy_generate

    tmp, model, tok, adapter, _, _ = setup
    prompts = ["w1 w2 w3", "w40 w7", "w99 w98 w97 w96"]
    ids = tok(prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp / "adapter").eval()
    expected = torch_greedy_generate(peft, tok, prompts, 6)
    plain = torch_greedy_generate(model, tok, prompts, 6)
    got = complete(model, tok, adapter, prompts, 6, batch_size=2)
    assert got == [p + c.rstrip("\n") for p, c in zip(prompts, expected)]
    assert expected != plain   # the adapter changes the answers, so the test can tell them apart
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
