"""The fused decoder graph (edge_lora.stages.export_fused) and its shared-buffer KV loop (runtimes.kv_loop), in the
style of PEFT's merge tests over a table of tiny models: fused merged == fused hot-swap == PyTorch + PEFT, no
adapter == the base, greedy decoding through shared KV buffers == the copying loop == PEFT, int4 builds and
decodes; and the fallback to optimum's graph says why."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_lora.adapter import load_peft
from edge_lora.base import tiny_model
from edge_lora.config import ExportConfig
from edge_lora.errors import ModelError
from edge_lora.runtimes.hotswap import HotswapSession
from edge_lora.runtimes.kv_loop import SharedKV, is_fused
from edge_lora.runtimes.ort_generate import OrtCausalLM
from edge_lora.runtimes.ort_session import full_feeds, load_session
from edge_lora.stages.export_fused import ARCHITECTURES, fused_support
from edge_lora.stages.export_onnx import ADAPTER_FILE, export_hotswap, export_merged, read_meta
from edge_lora.stages.merge import merge

IDS = np.random.default_rng(1).integers(0, 128, size=(2, 9))
PROMPTS = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2], [42], [7, 7, 7]]
FUSED = ExportConfig(graph="fused")
FUSED_HOT = ExportConfig(mode="hotswap", graph="fused")


def _model(kind: str):
    return tiny_model(kind, head_dim=16)


def _peft(kind: str, folder, targets):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(_model(kind), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                   init_lora_weights=False))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft.eval()
    peft.save_pretrained(str(folder))
    return peft


def _exports(kind: str, tmp, targets="all-linear"):
    peft = _peft(kind, tmp / "adapter", targets)
    adapter = load_peft(tmp / "adapter")
    merged_dir, hot_dir = tmp / "merged", tmp / "hotswap"
    merged_dir.mkdir()
    hot_dir.mkdir()
    export_merged(merge(_model(kind), adapter)[0], None, merged_dir, FUSED)
    export_hotswap(_model(kind), None, adapter, hot_dir, config=FUSED_HOT)
    return kind, peft, merged_dir, hot_dir


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tmp_path_factory):
    return _exports(request.param, tmp_path_factory.mktemp(request.param))


def _logits(session, lora=None) -> np.ndarray:
    return session.run(["logits"], full_feeds(session, IDS, lora=lora if lora is not None else {}))[0]


def _peft_logits(peft, adapter: bool = True) -> np.ndarray:
    with torch.no_grad():
        if adapter:
            return peft(input_ids=torch.from_numpy(IDS)).logits.numpy()
        with peft.disable_adapter():
            return peft(input_ids=torch.from_numpy(IDS)).logits.numpy()


def _peft_greedy(peft, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(peft(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_the_fused_graph_is_what_ran_and_has_few_kernels(arch):
    kind, _, merged_dir, hot_dir = arch
    import onnx

    for folder in (merged_dir, hot_dir):
        assert read_meta(folder).graph == "fused", kind
        ops = [n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node]
        assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops and "Concat" not in ops, ops
        assert is_fused(load_session(folder))


def test_merged_equals_hotswap_equals_peft_and_no_adapter_is_the_base(arch):
    kind, peft, merged_dir, hot_dir = arch
    expected, base = _peft_logits(peft), _peft_logits(peft, adapter=False)
    assert not np.allclose(expected, base, atol=1e-3)   # the adapter changes the outputs, so this can fail
    np.testing.assert_allclose(_logits(load_session(merged_dir)), expected, rtol=1e-4, atol=2e-5, err_msg=kind)
    hot = HotswapSession(hot_dir)
    assert hot.plain_lora and hot.run_options(None) is None
    np.testing.assert_allclose(_logits(hot.session), base, rtol=1e-4, atol=2e-5, err_msg=kind)
    hot.load_adapter("x", hot_dir / ADAPTER_FILE)
    assert hot.run_options("x") is None    # the fused graph takes tensors, never a RunOptions adapter
    np.testing.assert_allclose(_logits(hot.session, hot.lora_feeds("x")), expected, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(hot.run(full_feeds(hot.session, IDS, lora={}), "x")[0], expected, rtol=1e-4,
                               atol=2e-5)


def test_shared_kv_decoding_equals_the_copying_loop_and_peft(arch):
    kind, peft, _, hot_dir = arch
    hot = HotswapSession(hot_dir)
    hot.load_adapter("x", hot_dir / ADAPTER_FILE)
    shared = OrtCausalLM(hot.session, lora=hot.lora_feeds("x"))
    copying = OrtCausalLM(hot.session, lora=hot.lora_feeds("x"))
    copying.fused = False
    assert shared.shared_kv and not copying.shared_kv
    expected = [_peft_greedy(peft, p, 6) for p in PROMPTS]
    assert shared.greedy_ids(PROMPTS, 6) == expected, kind
    assert copying.greedy_ids(PROMPTS, 6) == expected, kind
    with peft.disable_adapter():
        base = [_peft_greedy(peft, p, 6) for p in PROMPTS]
    assert OrtCausalLM(hot.session).greedy_ids(PROMPTS, 6) == base


def test_the_kv_buffers_grow_past_their_capacity_and_keep_what_they_hold(arch):
    kind, peft, merged_dir, _ = arch
    session = load_session(merged_dir)
    kv = SharedKV(session, capacity=4, max_length=64)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    token = int(kv.step(np.array([prompt]))[0].argmax())
    got = [token]
    for _ in range(11):
        got.append(int(kv.step(np.array([[got[-1]]]))[0].argmax()))
    assert kv.capacity >= 18 and kv.length == 18
    assert got == _peft_greedy(peft, prompt, 12), kind   # the merged export is the adapted model
    with pytest.raises(ModelError, match="over the model's 64 positions"):
        kv.step(np.zeros((1, 60), np.int64))


def test_int4_builds_and_decodes_through_shared_buffers(arch, tmp_path):
    import shutil

    from edge_lora.config import QuantizeConfig
    from edge_lora.stages.quantize_base import quantize_base

    kind, _, _, hot_dir = arch
    folder = tmp_path / "int4"
    shutil.copytree(hot_dir, folder)
    summary, _ = quantize_base(folder / "model.onnx", QuantizeConfig(base="int4", int8_modules=["down_proj",
                                                                                                 "v_proj"]))
    assert summary["ops_after"].get("MatMulNBits", 0) > 0, kind
    hot = HotswapSession(folder)
    assert is_fused(hot.session)   # the quantizer keeps the graph's marker
    hot.load_adapter("x", folder / ADAPTER_FILE)
    got = OrtCausalLM(hot.session, lora=hot.lora_feeds("x")).greedy_ids(PROMPTS, 4)
    assert [len(g) for g in got] == [4] * len(PROMPTS)


def test_an_adapter_on_some_of_a_packed_group_fills_the_others_with_rank_zero(tmp_path):
    kind, peft, _, hot_dir = _exports("llama", tmp_path, targets=["q_proj", "v_proj", "up_proj"])
    meta = read_meta(hot_dir)
    groups = {g.name.rpartition(".")[2]: g.modules for g in meta.lora_groups}
    assert set(groups) == {"q_proj+k_proj+v_proj", "gate_proj+up_proj"}
    hot = HotswapSession(hot_dir)
    hot.load_adapter("x", hot_dir / ADAPTER_FILE)
    np.testing.assert_allclose(_logits(hot.session, hot.lora_feeds("x")), _peft_logits(peft), rtol=1e-4, atol=2e-5)


def test_plain_lora_inputs_are_never_run_as_the_base_by_accident(arch):
    _, _, _, hot_dir = arch
    session = load_session(hot_dir)
    with pytest.raises(ModelError, match="plain inputs"):
        full_feeds(session, IDS)
    with pytest.raises(ModelError, match="not inputs of this graph"):
        full_feeds(session, IDS, lora={"lora.nothing.A": np.zeros((4, 1), np.float32)})


def test_shared_kv_refuses_a_graph_whose_cache_it_cannot_share(tmp_path):
    export_merged(tiny_model("llama"), None, tmp_path, ExportConfig())   # optimum's graph
    with pytest.raises(ModelError, match="fused decoder graph"):
        SharedKV(load_session(tmp_path))


@pytest.mark.parametrize("kind, config, why", [
    ("gemma", FUSED, "model type 'gemma'"),
    ("llama", FUSED, "head size 8"),
    ("llama", FUSED_HOT, "head size 8"),
])
def test_what_the_fused_graph_cannot_take_falls_back_to_optimum_and_says_why(kind, config, why, tmp_path):
    from conftest import make_peft_adapter

    model = tiny_model(kind)
    assert why in fused_support(model)
    (tmp_path / "out").mkdir()
    if config.mode == "hotswap":
        make_peft_adapter(kind, dict(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
        info, report = export_hotswap(model, None, load_peft(tmp_path / "adapter"), tmp_path / "out", config=config)
    else:
        info, report = export_merged(model, None, tmp_path / "out", config)
    assert info.graph == "optimum" and report.metrics["graph"] == "optimum"
    assert any("fell back to optimum's graph" in s and why in s for s in report.skipped), report.skipped


def test_lora_outside_the_decoder_projections_falls_back(tmp_path):
    model = _model("llama")
    assert "lm_head" in fused_support(model, ["lm_head"])
    assert fused_support(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]) is None


# ------------------------------------------------------------------------------------------ merge on swap
@pytest.fixture(scope="module")
def merging(tmp_path_factory):
    """A fused hot-swap export of tiny llama with merge_on_swap/, fp32 base, and its PEFT reference."""
    tmp = tmp_path_factory.mktemp("merge-on-swap")
    peft = _peft("llama", tmp / "adapter", "all-linear")
    folder = tmp / "export"
    folder.mkdir()
    export_hotswap(_model("llama"), None, load_peft(tmp / "adapter"), folder,
                   config=ExportConfig(mode="hotswap", graph="fused", merge_on_swap=True))
    return peft, folder


def test_dropping_the_branches_leaves_the_base_graph(merging):
    import onnx_ir as ir

    from edge_lora.passes.drop_lora import DropLoraBranches

    peft, folder = merging
    model = ir.load(folder / "model.onnx")
    result = DropLoraBranches()(model)
    assert result.details.branches == 8 and result.details.inputs == 16   # 2 layers × (qkv, o, gate/up, down)
    import onnxruntime as ort

    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    np.testing.assert_allclose(_logits(session), _peft_logits(peft, adapter=False), rtol=1e-4, atol=2e-5)


def test_merge_on_swap_serves_the_adapter_at_once_then_decodes_on_merged_weights(merging):
    from edge_lora.runtimes.ort_cpu import OrtCpuRunner

    peft, folder = merging
    assert read_meta(folder).merge_on_swap == "merge_on_swap"
    runner = OrtCpuRunner(folder, threads=1)
    prompt = [3, 1, 4, 1, 5, 9, 2]

    def greedy(n=6):
        out = [runner.prefill(prompt)]
        for _ in range(n - 1):
            out.append(runner.decode(out[-1]))
        return out

    with peft.disable_adapter():
        base = _peft_greedy(peft, prompt, 6)
    assert greedy() == base and runner.decoding_on == "merged"   # the base: the branch-free graph, no merge
    runner.swap(folder / ADAPTER_FILE)
    assert runner.decoding_on == "branches"                      # active at once, on the branches
    expected = _peft_greedy(peft, prompt, 6)
    assert greedy() == expected
    assert runner.merger.wait(60) and runner.merger.seconds > 0
    assert greedy() == expected and runner.decoding_on == "merged"
    runner.swap(None)
    assert greedy() == base
    runner.close()


def test_a_sequence_continues_across_the_switch_to_merged_weights(merging):
    from edge_lora.runtimes.ort_cpu import OrtCpuRunner

    peft, folder = merging
    runner = OrtCpuRunner(folder, threads=1)
    runner.swap(folder / ADAPTER_FILE)
    prompt = [5, 17, 99]
    out = [runner.prefill(prompt)]
    out.append(runner.decode(out[-1]))
    assert runner.decoding_on == "branches"
    runner.merger.wait(60)
    for _ in range(4):
        out.append(runner.decode(out[-1]))
    assert runner.decoding_on == "merged"
    assert out == _peft_greedy(peft, prompt, 6)
    runner.close()


def test_the_merge_sessions_share_one_copy_of_the_base_weights(merging):
    """The branch session, the branch-free base and every merged session read the same OrtValues (add_initializer);
    the branch-free graph the merger keeps holds no weights of its own."""
    from edge_lora.runtimes.ort_cpu import OrtCpuRunner

    peft, folder = merging
    runner = OrtCpuRunner(folder, threads=1)
    merger = runner.merger
    shared_bytes = sum(v.numpy().nbytes for v in merger.shared.values())
    assert merger.shared and len(merger.graph_bytes) < shared_bytes / 2
    assert runner.session._edge_lora_keep is merger.shared
    base = merger.base_session.run(["logits"], full_feeds(merger.base_session, IDS, lora={}))[0]
    branches = runner.session.run(["logits"], full_feeds(runner.session, IDS, lora={}))[0]
    np.testing.assert_allclose(base, branches, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(base, _peft_logits(peft, adapter=False), rtol=1e-4, atol=2e-5)
    runner.close()


def test_merge_on_swap_over_an_int4_base_with_an_int4_embedding_table(merging, tmp_path):
    """The int4 recipe's tables (GatherBlockQuantized, ml_dtypes int4 arrays) stay in the graph; the rest is
    shared, and the merged session computes (nearly) what the branches compute."""
    import shutil

    from edge_lora.config import QuantizeConfig
    from edge_lora.runtimes.ort_cpu import OrtCpuRunner
    from edge_lora.stages.quantize_base import quantize_base

    _, folder = merging
    copy = tmp_path / "int4"
    shutil.copytree(folder, copy)
    quantize_base(copy / "model.onnx", QuantizeConfig(base="int4", int8_modules=["down_proj", "v_proj"],
                                                      lm_head="int8", embedding="int4", block_size=16))
    runner = OrtCpuRunner(copy, threads=1)
    merger = runner.merger
    assert merger.shared
    runner.swap(copy / ADAPTER_FILE)
    assert merger.wait(60)

    def logits(session, lora):
        return session.run(["logits"], full_feeds(session, IDS, lora=lora))[0]

    branches = logits(runner.session, runner.lm.lora)
    merged, base = logits(merger.session, {}), logits(merger.base_session, {})
    # int4 re-quantization of W + ΔW rounds differently from int4 W plus a float branch: near, not equal
    assert np.abs(merged - branches).mean() < 0.5 * np.abs(base - branches).mean()
    runner.close()


@pytest.mark.parametrize("damage", ["truncated", "offsets", "dtype"])
def test_a_damaged_merge_weights_file_is_refused_by_name(merging, tmp_path, damage):
    import json
    import shutil

    from edge_lora.runtimes.ort_cpu import OrtCpuRunner

    _, folder = merging
    copy = tmp_path / "export"
    shutil.copytree(folder, copy)
    weights = copy / "merge_on_swap" / "weights.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    if damage == "truncated":
        weights.write_bytes(data[:8 + n + 10])
    else:
        header[name]["data_offsets" if damage == "offsets" else "dtype"] = \
            [0, len(data) * 2] if damage == "offsets" else "I64"
        head = json.dumps(header).encode()
        weights.write_bytes(len(head).to_bytes(8, "little") + head + data[8 + n:])
    with pytest.raises(ModelError, match="weights.safetensors.*re-export"):
        OrtCpuRunner(copy, threads=1)


def test_an_ota_package_of_a_fused_hotswap_export_installs_through_its_ort_probe(tmp_path):
    """The device's ort probe runs the plain-LoRA graph (the adapter's tensors as inputs): a package for the fused
    export installs, and one whose expectation the adapter does not meet is refused."""
    from package_fixtures import keygen, resign

    from edge_lora.base import base_content_hash
    from edge_lora.ota.errors import ProbeError
    from edge_lora.ota.install import install
    from edge_lora.ota.keys import load_private_key, load_public_key
    from edge_lora.stages.package import build_package

    base = tmp_path / "base"
    _model("llama").save_pretrained(str(base))
    base_hash = base_content_hash(base)
    _peft("llama", tmp_path / "x", "all-linear")
    export = tmp_path / "export"
    export.mkdir()
    export_hotswap(_model("llama"), None, load_peft(tmp_path / "x"), export, config=FUSED_HOT,
                   meta={"base_sha256": base_hash})
    assert read_meta(export).graph == "fused"
    priv_path, pub_path = keygen(tmp_path / "keys")
    priv, pub = load_private_key(priv_path), load_public_key(pub_path)
    pkg = tmp_path / "v1.elpkg"
    report = build_package(export, priv, 1, base, pkg, adapter_id="fused", base_hash=base_hash, level=3)
    assert report["probes"] == ["ort"]
    root = tmp_path / "root"
    root.mkdir()
    report = install(pkg, pub, root, base=base_hash, export=export)
    assert [(p["kind"], p["status"]) for p in report["probes"]] == [("ort", "passed")]

    def mm(m):
        m["version"] = 2
        m["probes"][0]["expected"][3][0] += 0.05

    bad = tmp_path / "v2.elpkg"
    bad.write_bytes(resign(pkg.read_bytes(), priv, mm))
    with pytest.raises(ProbeError, match="ort probe: position 3"):
        install(bad, pub, root)
