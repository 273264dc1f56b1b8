"""Graph passes (edge_lora.passes): each returns a PassResult with a typed record of what it did, a failing pass
is named in the error, and the runner saves the model in place only when a pass changed it."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass
from typing import ClassVar

import numpy as np
import pytest

from edge_lora import passes
from edge_lora.errors import AdapterError, ModelError
from edge_lora.passes import GraphPass, PassResult


def handmade(tmp_path, external: bool = False):
    """x → MatMul(x, W) → y0 and a tied head: MatMul(x, Transpose(E)) → y1 (one unnamed MatMul); a tag-like
    initializer T used twice (once through a duplicate copy), an unused one."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((8, 4)), "E": rng.standard_normal((16, 8)), "T": rng.standard_normal((8, 2)),
              "T_copy": None}
    arrays["T_copy"] = arrays["T"].copy()
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"], name="/model/proj/MatMul"),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Et"], ["y1"]),
             helper.make_node("MatMul", ["x", "T"], ["y2"], name="/a/MatMul"),
             helper.make_node("MatMul", ["x", "T_copy"], ["y3"], name="/b/MatMul")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(4)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    path = tmp_path / "model.onnx"
    if external:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx_data", size_threshold=0)
    else:
        onnx.save(proto, str(path))
    return path, {k: v.astype(np.float32) for k, v in arrays.items()}


def outputs(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@dataclass(frozen=True)
class Failing(GraphPass):
    error: Exception
    name: ClassVar[str] = "failing"

    def call(self, model):
        raise self.error


@dataclass(frozen=True)
class Nothing(GraphPass):
    name: ClassVar[str] = "nothing"

    def call(self, model):
        return PassResult(self.name, model, False, None)


def test_a_failing_pass_is_named(tmp_path):
    import onnx_ir as ir

    model = ir.load(handmade(tmp_path)[0])
    with pytest.raises(AdapterError, match=r"^graph pass 'failing' failed: factor A is missing; write it again\.$"
                       ) as info:
        passes.run(model, Nothing(), Failing(AdapterError("factor A is missing; write it again.")))
    assert type(info.value) is AdapterError and isinstance(info.value.__cause__, AdapterError)
    bug = KeyError("node")
    with pytest.raises(KeyError) as info:
        Failing(bug)(model)
    assert info.value is bug and "edge_lora: raised in graph pass 'failing'" in bug.__notes__


def test_untie_head_and_name_matmuls(tmp_path):
    import onnx_ir as ir

    from edge_lora.passes.untie_head import NameMatMuls, NamingDetails, UntieDetails, UntieHead

    path, _ = handmade(tmp_path)
    model = ir.load(path)
    untie, naming = passes.run(model, UntieHead(), NameMatMuls())
    assert untie == PassResult("untie_head", model, True, UntieDetails(("E",), ("E.untied_T",)))
    assert naming.name == "name_matmuls" and naming.details == NamingDetails(1) and naming.modified
    assert all(n.name for n in model.graph if n.op_type == "MatMul")
    assert not any(n.op_type == "Transpose" for n in model.graph)
    with pytest.raises(FrozenInstanceError):
        untie.modified = False
    # a second time there is nothing left to do
    again = passes.run(model, UntieHead(), NameMatMuls())
    assert [r.modified for r in again] == [False, False] and again[0].details == UntieDetails()


@pytest.mark.parametrize("external", [False, True])
def test_apply_saves_in_place_and_only_when_modified(tmp_path, external):
    """The runner keeps external data external; a run that changes nothing leaves the file as it was."""
    from edge_lora.passes.lora_inputs import LiftDetails, LiftLoraInputs

    path, arrays = handmade(tmp_path, external)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    before = outputs(path, x)
    data = path.with_name("model.onnx_data")
    assert data.exists() == external
    stamp = path.read_bytes()
    assert passes.apply(path, Nothing()) == [PassResult("nothing", None, False, None)]
    assert path.read_bytes() == stamp
    tags = {"m.a": [("lora.m.a.A", arrays["T"], [8, "rank.m.a"])],
            "m.gone": [("lora.m.gone.A", np.ones((8, 2), np.float32), [8, "rank.m.gone"])]}
    (lift,) = passes.apply(path, LiftLoraInputs(tags))
    assert lift.model is None and lift.modified
    assert lift.details == LiftDetails({"m.a": ("lora.m.a.A",)}, ("m.gone",), duplicates=1)
    assert lift.details.found == ("m.a",)
    assert data.exists() == external and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.onnx"] + (["model.onnx_data"] if external else []))
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in proto.graph.input] == ["x", "lora.m.a.A"]
    # rank-0 default: the lifted branch now adds nothing, the rest of the graph computes what it did
    after = outputs(path, x)
    for i in (0, 1):
        np.testing.assert_allclose(after[i], before[i], rtol=1e-6)
    assert after[2].shape == (2, 0) and after[3].shape == (2, 0)


def test_onnx_ir_passes_run_beside_ours_and_a_half_found_branch_is_an_error(tmp_path):
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from edge_lora.passes.lora_inputs import lift_lora_inputs

    path, arrays = handmade(tmp_path)
    model = ir.load(path)
    (result,) = passes.run(model, RemoveUnusedNodesPass())
    assert result.name == "RemoveUnusedNodesPass" and result.model is model and result.details is None
    half = {"m.a": [("lora.m.a.A", arrays["T"], [8, "r"]), ("lora.m.a.B", np.ones((2, 3), np.float32), ["r", 3])]}
    with pytest.raises(ModelError, match="graph pass 'lift_lora_inputs' failed: hotswap export: only some"):
        lift_lora_inputs(model, half)
