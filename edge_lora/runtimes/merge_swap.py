"""Merge on swap: an adapter is active at once on the LoRA branches, and decodes at the base's speed a few seconds
later on weights it was merged into.

Unmerged LoRA costs a fast base dearly at decode (four branches per layer, each two tiny MatMuls and an Add:
~360 kernels per step on SmolLM2 beside ~340 for the whole base), and merging into de-quantized int4 weights
washes most of an adapter out. So a hot-swap export with ``export.merge_on_swap`` ships, in ``merge_on_swap/``,
the fused graph without branches and the fp16 weights of every adapted (packed) projection. On ``swap``:

1. the adapter's tensors go to the branch session (``HotswapSession``): it is active within the swap itself;
   the branch-free graph is derived from the same model.onnx at load (edge_lora.passes.drop_lora), and every
   session (branches, branch-free base, merged) reads the base's weights from one set of OrtValues
   (``add_initializer``), so the device holds the base once, plus each session's pre-packed MatMulNBits weights
   and the memory-mapped fp16 weights (BENCHMARKS "Merge on swap" has the resident memory);
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


# what OrtValue.ortvalue_from_numpy takes
_ORT_VALUE_DTYPES = {np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16,
                                           np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.bool_)}


def _share_initializers(model, model_file: Path) -> dict:
    """Move the weights of ``model`` (onnx_ir, modified in place) into OrtValues that every session of it shares
    (``SessionOptions.add_initializer``: ORT uses the caller's memory instead of a copy of its own), so the base
    session and each merged one hold the base once, plus their own pre-packed MatMulNBits weights.

    Each moved initializer becomes an external-data reference into ``model_file`` of its own size (within the
    file): a placeholder that ORT validates (the file must exist beside the graph) and never reads, since an
    initializer given with add_initializer replaces the one in the graph. Small ones (shape inputs), those that
    only meet other constants, and any larger than the file stay in the graph."""
    import onnx_ir as ir
    import onnxruntime as ort

    limit = model_file.stat().st_size
    initializers = model.graph.initializers
    shared = {}
    for name, value in initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < 1024 or tensor.nbytes > limit:
            continue
        array = tensor.numpy()
        if array.dtype not in _ORT_VALUE_DTYPES:   # int4 tables (GatherBlockQuantized) are ml_dtypes arrays
            continue
        # ORT's constant folding reads the graph's own copy of a node whose inputs are all constant (a tied
        # head's Transpose of the embedding, measured: it read the placeholder): such initializers stay
        if any(all(i is None or i.name in initializers for i in node.inputs) for node, _ in value.uses()):
            continue
        shared[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
        value.const_value = ir.ExternalTensor(model_file.name, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                              name=name, base_dir=str(model_file.parent))
    return shared


def release_freed_memory() -> None:
    """Give the heap the merge's temporaries left back to the system (glibc keeps freed memory in its arenas).
    Measured on SmolLM2 int8 with shared weights: 1.05 GB resident after three merges with it, 1.32 GB without;
    the price is page faults on the next swap's fresh arrays (swap 33 ms against 19 ms without). A no-op where the
    C library has no malloc_trim."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def drop_pages(mapped: np.memmap) -> None:
    """Tell the kernel the merge is done with the memory-mapped fp16 weights (they stay in the page cache, so the
    next merge reads them back cheaply, but no longer count as this process's memory)."""
    import mmap

    if hasattr(mmap, "MADV_DONTNEED") and getattr(mapped, "_mmap", None) is not None:
        mapped._mmap.madvise(mmap.MADV_DONTNEED)


_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32}


def map_weights(path: Path) -> tuple[dict[str, np.ndarray], np.memmap]:
    """The tensors of merge_on_swap/weights.safetensors as read-only views of the memory-mapped file (returned
    too, for drop_pages): pages are read when a merge touches them, and the kernel may drop them again (clean file
    pages), so the fp16 weights cost no anonymous memory."""
    from edge_lora.files import SafetensorsHeaderError, read_safetensors_header

    try:
        header, _ = read_safetensors_header(path)
    except (SafetensorsHeaderError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc}); re-export the folder.") from None
    with path.open("rb") as fh:
        start = 8 + int.from_bytes(fh.read(8), "little")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        try:
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            dtype = None
        if dtype is None or not 0 <= begin <= end <= len(data) - start \
                or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ModelError(f"{path}: tensor {name!r} has an unusable dtype, shape or offsets ({info}); "
                             f"re-export the folder.")
        out[name] = data[start + begin:start + end].view(dtype).reshape(shape)
    return out, data


class MergeOnSwap:
    """The branch-free half of a merge-on-swap export: ``start(lora)`` merges in the background, ``ready()`` says
    when :attr:`session` (the merged session) can take over, ``base_session`` runs the plain base."""

    def __init__(self, export_dir: str | Path, weights_dir: str | Path, groups, threads: int = 0,
                 spinning: bool = True):
        import onnx_ir as ir

        from edge_lora.passes.drop_lora import DropLoraBranches

        self.groups = list(groups)
        self.threads, self.spinning = threads, spinning
        self.export_dir = Path(export_dir)
        weights = Path(weights_dir) / WEIGHTS
        if not weights.is_file():
            raise ModelError(f"{weights} does not exist; re-export with export.merge_on_swap = true.")
        model = ir.load(self.export_dir / MODEL_FILE)
        DropLoraBranches()(model)
        self.shared = _share_initializers(model, self.export_dir / MODEL_FILE)
        proto = ir.serde.serialize_model(model)
        del model
        self.plan = _quant_plan(proto)
        self.graph_bytes = proto.SerializeToString()   # the branch-free graph without its weights (self.shared)
        del proto
        self.weights, self._mapped = map_weights(weights)
        self.base_session = self._session({})
        release_freed_memory()
        self.session = None
        self.seconds: float | None = None   # how long the last merge took, swap to ready
        self.error: Exception | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0

    def _session(self, initializers: dict):
        """A session of the branch-free graph on the shared weights, ``initializers`` (the merged projections)
        in place of theirs."""
        import onnxruntime as ort

        opts = session_options(self.threads, self.spinning)
        # the graph's external references point into model.onnx (see _share_initializers): ORT checks the file
        # exists in this folder, and reads none of them, every one being supplied here
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.export_dir))
        keep = []
        for name, value in self.shared.items():
            if name not in initializers:
                opts.add_initializer(name, value)
        for name, array in initializers.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            opts.add_initializer(name, value)
            keep.append(value)
        session = ort.InferenceSession(self.graph_bytes, opts, providers=["CPUExecutionProvider"])
        # the session reads the initializers' memory, shared and merged: keep both alive with it
        session._edge_lora_keep = (keep, self.shared)
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
            drop_pages(self._mapped)
            release_freed_memory()

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
