"""The hot-swap adapter file carrying the codes of the one factor quantizer, in real ONNX Runtime sessions: a
quantized file computes exactly its own dequantized factors, is close to the float adapter, swaps with float files
on one session, is smaller, and bad files are refused with clear errors."""

from __future__ import annotations

import gc
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ADAPTER_TABLE, make_peft_adapter
from onnx import TensorProto, helper

from edge_lora.adapter import Adapter, LoraModule, load_peft
from edge_lora.base import tiny_model
from edge_lora.config import ExportConfig
from edge_lora.errors import AdapterError, CompatibilityError
from edge_lora.formats import ort_adapter
from edge_lora.runtimes.hotswap import HotswapSession
from edge_lora.runtimes.ort_session import full_feeds
from edge_lora.stages.export_onnx import ADAPTER_FILE, export_hotswap, read_meta, write_ort_adapter
from edge_lora.stages.quantize_factors import FactorQuantConfig, quantize_adapter

IDS = np.random.default_rng(0).integers(0, 128, size=(2, 9))
G = 16
SETTINGS = {"int8": dict(bits=8), "int4": dict(bits=4), "mixed:3": dict(bits=None, mixed_avg_bits=3.0)}


def run(session: HotswapSession, adapter: str | None = None) -> np.ndarray:
    return session.session.run(None, full_feeds(session.session, IDS), session.run_options(adapter))[0]


def scaled(adapter: Adapter, factor: float) -> Adapter:
    """conftest's factors (std 0.3) swamp the tiny model's weights: far from any trained adapter, a regime where
    the output amplifies a small factor error chaotically. A tenth of that still changes the logits by ~0.7."""
    return adapter.replace_modules({n: LoraModule(name=m.name, kind=m.kind, A=m.A, B=m.B * factor, scale=m.scale,
                                                  alpha=m.alpha, bias=m.bias) for n, m in adapter.modules.items()})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A float hot-swap export of tiny llama (all 7 module types: fused q/k/v and gate/up branches) with adapter
    X, a float file of adapter Y, and X quantized three ways by the one quantizer."""
    tmp = tmp_path_factory.mktemp("adapter-file")
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp / "x", seed=0)
    make_peft_adapter(kind, kwargs, tmp / "y", seed=5)
    x, y = scaled(load_peft(tmp / "x"), 0.1), scaled(load_peft(tmp / "y"), 0.1)
    (tmp / "float").mkdir()
    export_hotswap(tiny_model(kind), None, x, tmp / "float", config=ExportConfig(mode="hotswap"))
    meta = read_meta(tmp / "float")
    write_ort_adapter(y, tmp / "y.float", meta)
    out = {"tmp": tmp, "x": x, "y": y, "float": tmp / "float", "meta": meta, "q": {}, "reports": {}}
    for label, kw in SETTINGS.items():
        q, report = quantize_adapter(x, None, FactorQuantConfig(**kw, group_size=G))
        write_ort_adapter(q, tmp / f"x.{label}", meta)
        out["q"][label], out["reports"][label] = q, report
    return out


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch):
    """Where tempfile would put anything during the test (to check that loading leaves nothing on disk)."""
    folder = tmp_path / "tempdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize("label", sorted(SETTINGS))
def test_quantized_file_runs_exactly_its_dequantized_factors(setup, label, tmp_path, private_tmp):
    """Float graph + quantized file == float graph + the float file of the codes' expansion; the expansion is
    built in memory (nothing is left in the temp folder) and still runs after collection (ORT maps it)."""
    q = setup["q"][label]
    write_ort_adapter(q.expanded, tmp_path / "deq.float", setup["meta"])
    session = HotswapSession(setup["float"])
    session.load_adapter("q", setup["tmp"] / f"x.{label}")
    session.load_adapter("deq", tmp_path / "deq.float")
    assert list(private_tmp.iterdir()) == []
    gc.collect()
    np.testing.assert_allclose(run(session, "q"), run(session, "deq"), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(run(session, "q"), run(session))


def test_close_to_the_float_adapter_within_quantization_error(setup):
    session = HotswapSession(setup["float"])
    session.load_adapter("x", setup["float"] / ADAPTER_FILE)
    base, ref = run(session), run(session, "x")
    rel = {}
    for label in SETTINGS:
        session.load_adapter(label, setup["tmp"] / f"x.{label}")
        rel[label] = float(np.linalg.norm(run(session, label) - ref) / np.linalg.norm(ref - base))
    assert setup["reports"]["int8"].metrics["rel_error_worst"] < 0.01
    assert rel["int8"] < 0.03, rel
    assert rel["int8"] < rel["int4"] < 0.5, rel
    # random factors have flat spectra, the worst case for energy-allocated widths: it still keeps most of X
    assert rel["mixed:3"] < 0.8, rel


def test_swap_quantized_float_quantized_on_one_session(setup):
    session = HotswapSession(setup["float"])
    session.load_adapter("x", setup["tmp"] / "x.int4")
    session.load_adapter("y", setup["tmp"] / "y.float")
    reference = HotswapSession(setup["float"])
    reference.load_adapter("y", setup["tmp"] / "y.float")
    seen = {}
    for name in ["x", "y", None, "x"]:
        gc.collect()   # the session must keep each LoraAdapter alive itself
        out = run(session, name)
        if name == "y":
            np.testing.assert_array_equal(out, run(reference, "y"))
        if name is None:
            np.testing.assert_array_equal(out, run(reference))
        if name in seen:
            np.testing.assert_array_equal(out, seen[name])
        seen[name] = out
    assert not np.allclose(seen["x"], seen["y"])
    session.unload_adapter("x")
    gc.collect()
    np.testing.assert_array_equal(run(session, "y"), run(reference, "y"))


def test_files_are_smaller_and_cost_their_payload(setup):
    float_bytes = (setup["float"] / ADAPTER_FILE).stat().st_size
    size = {label: (setup["tmp"] / f"x.{label}").stat().st_size for label in SETTINGS}
    assert size["int8"] < 0.45 * float_bytes
    assert size["int4"] < 0.8 * size["int8"]   # the JSON header is a large share of so small a file
    assert size["mixed:3"] < size["int4"]
    for label, q in setup["q"].items():
        payload = q.payload_bits() / 8
        # the payload plus the JSON header and ORT's per-parameter framing, nothing per module
        assert payload < size[label] < payload + 200 * len(q.modules) + 4096, (label, payload, size[label])


def test_parameters_are_the_quantized_payload_and_feed_the_graph_inputs(setup):
    f = ort_adapter.read(setup["tmp"] / "x.int4")
    assert f.is_quantized
    assert sorted(f.parameters) == ["edge_lora.quantized.bits", "edge_lora.quantized.codes",
                                    "edge_lora.quantized.header", "edge_lora.quantized.scales"]
    arrays = f.float_arrays(HotswapSession(setup["float"])._groups())
    assert set(arrays) == set(HotswapSession(setup["float"]).lora_inputs)


def toy_model(path, d_in: int, d_out: int) -> None:
    """y = x + (x·A)·B with A, B graph inputs of rank-0 defaults, the way a hot-swap export has them."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, d_in])
    a = helper.make_tensor_value_info("lora.toy.A", TensorProto.FLOAT, [d_in, "rank"])
    b = helper.make_tensor_value_info("lora.toy.B", TensorProto.FLOAT, ["rank", d_out])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, d_out])
    nodes = [helper.make_node("MatMul", ["x", "lora.toy.A"], ["xa"]),
             helper.make_node("MatMul", ["xa", "lora.toy.B"], ["y"])]
    inits = [helper.make_tensor("lora.toy.A", TensorProto.FLOAT, [d_in, 0], []),
             helper.make_tensor("lora.toy.B", TensorProto.FLOAT, [0, d_out], [])]
    model = helper.make_model(helper.make_graph(nodes, "toy", [x, a, b], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("label", sorted(SETTINGS))
def test_odd_sizes_and_short_last_groups_in_a_real_session(tmp_path, label):
    """d_in = 35 and d_out = 21, not multiples of the group size (each last group keeps its own scale)."""
    d_in, d_out, r = 35, 21, 4
    g = torch.Generator().manual_seed(1)
    module = LoraModule(name="toy", kind="linear", A=torch.randn(r, d_in, generator=g),
                        B=torch.randn(d_out, r, generator=g), scale=0.5, alpha=2.0)
    adapter = Adapter(modules={"toy": module}, config={"peft_type": "LORA", "r": r, "lora_alpha": 2})
    q, _ = quantize_adapter(adapter, None, FactorQuantConfig(**SETTINGS[label], group_size=8))
    groups = [ort_adapter_group("toy", d_in, d_out)]
    ort_adapter.write_quantized(q.to_format(), tmp_path / "toy.q")
    toy_model(tmp_path / "toy.onnx", d_in, d_out)
    session = ort.InferenceSession(str(tmp_path / "toy.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, d_in)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.zeros((2, d_out), np.float32))
    lora, _ = ort_adapter.load(tmp_path / "toy.q", groups)
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    out = session.run(None, {"x": x}, options)[0]
    B, A = q.modules["toy"].factors()
    np.testing.assert_allclose(out, x @ A.T @ B.T, rtol=1e-4, atol=1e-4)
    if label != "mixed:3":   # mixed drops components of this flat random spectrum on purpose
        exact = x @ (0.5 * module.B @ module.A).numpy().T
        assert np.linalg.norm(out - exact) < 0.25 * np.linalg.norm(exact)


def ort_adapter_group(name, d_in, d_out):
    from edge_lora.formats.export_meta import LoraGroup

    return LoraGroup(name, (f"lora.{name}.A", f"lora.{name}.B"), (name,), d_in, (d_out,))


# ---------------------------------------------------------------------------------------------- bad files
def test_quantized_file_for_other_modules_is_refused(setup, tmp_path, private_tmp):
    module = LoraModule(name="model.not.a.module", kind="linear", A=torch.randn(2, 64), B=torch.randn(64, 2),
                        scale=1.0, alpha=2.0)
    q, _ = quantize_adapter(Adapter(modules={module.name: module}, config={"peft_type": "LORA"}), None,
                            FactorQuantConfig(bits=4, group_size=G))
    ort_adapter.write_quantized(q.to_format(), tmp_path / "x.q")
    with pytest.raises(CompatibilityError, match="no LoRA branch for"):
        HotswapSession(setup["float"]).load_adapter("x", tmp_path / "x.q")
    assert list(private_tmp.iterdir()) == []


def write_params(path, params: dict) -> None:
    ort_adapter._export({k: np.ascontiguousarray(v) for k, v in params.items()}, str(path))


def test_damaged_quantized_files_are_refused(setup, tmp_path):
    good = ort_adapter.quantized_parameters(setup["q"]["int4"].to_format())
    cases = {
        "truncated codes": {**good, "edge_lora.quantized.codes": good["edge_lora.quantized.codes"][:-5]},
        "header not JSON": {**good, "edge_lora.quantized.header": np.frombuffer(b"{nope", np.uint8).copy()},
        "no scales": {k: v for k, v in good.items() if k != "edge_lora.quantized.scales"},
        "unknown tensor": {**good, "edge_lora.quantized.extra": np.zeros(3, np.uint8)},
    }
    session = HotswapSession(setup["float"])
    for what, params in cases.items():
        write_params(tmp_path / "bad.q", params)
        with pytest.raises(AdapterError, match=str(tmp_path / "bad.q")):
            session.load_adapter("bad", tmp_path / "bad.q")
        assert "bad" not in session.adapters, what


def test_older_per_input_codes_are_refused_with_a_way_out(setup, tmp_path):
    name = "lora.model.layers.0.self_attn.o_proj.A"
    write_params(tmp_path / "old.q", {f"{name}.codes": np.zeros((32, 2), np.int8),
                                      f"{name}.scales": np.ones((2, 2), np.float32)})
    with pytest.raises(AdapterError, match="older edge_lora; export the adapter again"):
        HotswapSession(setup["float"]).load_adapter("old", tmp_path / "old.q")


def test_missing_and_non_adapter_files(setup, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        HotswapSession(setup["float"]).load_adapter("x", tmp_path / "missing.onnx_adapter")
    (tmp_path / "junk.onnx_adapter").write_bytes(b"not an adapter")
    with pytest.raises(AdapterError, match="not an ONNX Runtime adapter file"):
        HotswapSession(setup["float"]).load_adapter("x", tmp_path / "junk.onnx_adapter")
