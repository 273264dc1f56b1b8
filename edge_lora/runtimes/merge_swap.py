"""Merge on swap: an adapter is active at once on the LoRA branches, and decodes at the base's speed a few seconds
later on weights it was merged into.

Unmerged LoRA costs a fast base dearly at decode (four branches per layer, each two tiny MatMuls and an Add:
~360 kernels per step on SmolLM2 beside ~340 for the whole base), and merging into de-quantized int4 weights
washes most of an adapter out. So a hot-swap export with ``export.merge_on_swap`` ships, in ``merge_on_swap/``,
the fused graph without branches and the fp16 weights of every adapted (packed) projection. On ``swap``:

1. the adapter's tensors go to the branch session (``HotswapSession``): it is active within the swap itself;
   the branch-free graph is derived from the same model.onnx at load (edge_lora.passes.drop_lora), so the
   device holds the base once, plus the fp16 weights;
2. a background thread adds ``A_cat·B_bd`` to each packed fp16 weight, quantizes it with the export's own
   MatMulNBits quantizer and settings (read from the graph's nodes, so the result is what the quantize stage would
   have written for a merged export), and opens a session of the branch-free graph with those weights
   (``SessionOptions.add_initializer``); it is checked on a probe (the adapter changes the output) before use;
3. the runner moves to it between two tokens: both graphs read the same shared KV buffers
   (:class:`~edge_lora.runtimes.kv_loop.SharedKV`), so a sequence continues across the switch.

Swapping again, or back to the base, drops the merged session and goes back to step 1 (the base: the branch-free
graph with its own weights, no merge).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from edge_lora.errors import AdapterError, ModelError
from edge_lora.runtimes.ort_session import MODEL_FILE, full_feeds, probe_ids, session_options

WEIGHTS = "weights.safetensors"


def _quant_plan(proto) -> dict[str, dict]:
    """``<group>.weight`` → the MatMulNBits settings and initializer names the quantize stage gave it."""
    plan = {}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        packed = node.input[1]
        weight = packed.rsplit("_Q", 1)[0]
        plan[weight] = {"bits": attrs["bits"], "block_size": attrs["block_size"],
                        "accuracy_level": attrs.get("accuracy_level", 0), "packed": packed, "scales": node.input[2],
                        "zero_points": node.input[3] if len(node.input) > 3 and node.input[3] else None}
    return plan


def merged_initializers(weights: dict[str, np.ndarray], lora: dict[str, np.ndarray], groups, plan: dict
                        ) -> dict[str, np.ndarray]:
    """The quantized initializers of every group the adapter touches, after ``W + A_cat·B_bd``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    quantizers: dict[tuple, object] = {}
    out = {}
    for g in groups:
        a, b = lora.get(g.inputs[0]), lora.get(g.inputs[1])
        if a is None or b is None or a.shape[1] == 0:
            continue
        name = f"{g.name}.weight"
        if name not in weights:
            raise ModelError(f"merge_on_swap/{WEIGHTS} has no {name}; re-export the folder.")
        w = weights[name].astype(np.float32) + a.astype(np.float32) @ b.astype(np.float32)
        if name not in plan:   # an fp32 base: the weight itself
            out[name] = w
            continue
        p = plan[name]
        key = (p["bits"], p["block_size"], p["zero_points"] is None, p["accuracy_level"])
        if key not in quantizers:
            quantizers[key] = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
                block_size=p["block_size"], is_symmetric=p["zero_points"] is None,
                accuracy_level=p["accuracy_level"] or None, bits=p["bits"]))
        packed, scales, zero_points = quantizers[key].qbits_block_quant(w)
        out[p["packed"]], out[p["scales"]] = packed, scales
        if p["zero_points"]:
            out[p["zero_points"]] = zero_points
    return out


class MergeOnSwap:
    """The branch-free half of a merge-on-swap export: ``start(lora)`` merges in the background, ``ready()`` says
    when :attr:`session` (the merged session) can take over, ``base_session`` runs the plain base."""

    def __init__(self, export_dir: str | Path, weights_dir: str | Path, groups, threads: int = 0,
                 spinning: bool = True):
        import onnx_ir as ir
        from safetensors.numpy import load_file

        from edge_lora.passes.drop_lora import DropLoraBranches

        self.groups = list(groups)
        self.threads, self.spinning = threads, spinning
        weights = Path(weights_dir) / WEIGHTS
        if not weights.is_file():
            raise ModelError(f"{weights} does not exist; re-export with export.merge_on_swap = true.")
        model = ir.load(Path(export_dir) / MODEL_FILE)
        DropLoraBranches()(model)
        proto = ir.serde.serialize_model(model)
        del model
        self.plan = _quant_plan(proto)
        self.graph_bytes = proto.SerializeToString()   # the branch-free graph: every merged session opens it
        del proto
        self.weights = load_file(str(weights))
        self.base_session = self._session({})
        self.session = None
        self.seconds: float | None = None   # how long the last merge took, swap to ready
        self.error: Exception | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0

    def _session(self, initializers: dict):
        import onnxruntime as ort

        opts = session_options(self.threads, self.spinning)
        keep = []
        for name, array in initializers.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            opts.add_initializer(name, value)
            keep.append(value)
        session = ort.InferenceSession(self.graph_bytes, opts, providers=["CPUExecutionProvider"])
        session._edge_lora_keep = keep   # the session reads the initializers' memory: keep it alive with it
        return session

    def start(self, lora: dict | None) -> None:
        """Drop the merged session; merge ``lora`` (None: the base, no merge) in a background thread."""
        self._generation += 1
        self.session, self.seconds, self.error = None, None, None
        if not lora:
            self.session, self.seconds = self.base_session, 0.0
            return
        generation, started = self._generation, time.perf_counter()

        def work():
            try:
                session = self._session(merged_initializers(self.weights, lora, self.groups, self.plan))
                vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == "logits")
                ids = probe_ids(min(int(vocab), 1000))
                out = session.run(["logits"], full_feeds(session, ids, lora={}))[0]
                base = self.base_session.run(["logits"], full_feeds(self.base_session, ids, lora={}))[0]
                if np.array_equal(out, base):
                    raise AdapterError("the merged weights give the base's output on a probe: the adapter was "
                                       "not merged.")
            except Exception as exc:   # reported by ready(); the branch session keeps serving
                if generation == self._generation:
                    self.error = exc
                return
            if generation == self._generation:   # a later swap supersedes this merge
                self.session, self.seconds = session, time.perf_counter() - started

        self._thread = threading.Thread(target=work, name="edge_lora-merge", daemon=True)
        self._thread.start()

    def ready(self) -> bool:
        return self.session is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the merge is done (or failed); True when the merged session is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.ready()
