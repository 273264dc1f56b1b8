"""ONNX Runtime on the CPU execution provider: one export folder (merged or hot-swap, any precision) as a
:class:`~edge_lora.runtimes.Runner`. The CUDA and mobile runners differ only in how they make the session.

Causal LMs run batch 1 with the exported KV cache (``OrtCausalLM.step``); encoders (feature-extraction) have
``encode`` instead of prefill/decode. Hot-swap exports go through ``HotswapSession``, which keeps each loaded
adapter alive; ``swap`` re-reads the adapter file every time, so timing it is the cost of a real swap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edge_lora.errors import ModelError
# edge_lora.formats is torch-free: importing edge_lora.stages here would add ~220 MB (torch) to every runner
# process whose memory the profiler measures.
from edge_lora.formats.export_meta import FILE as META_FILE, ExportMeta
from edge_lora.runtimes.ort_generate import OrtCausalLM
from edge_lora.runtimes.ort_session import MODEL_FILE, empty_past, full_feeds, load_session

ENCODER_TASKS = ("feature-extraction",)


def export_meta(folder: str | os.PathLike) -> ExportMeta:
    """edge_lora.json of an export folder (ExportMeta.read, the same error as every other command), and the
    model file it names."""
    meta = ExportMeta.read(folder)
    if not (Path(folder) / meta.model_file).is_file():
        raise ModelError(f"{folder} has {META_FILE} but no {meta.model_file}; the export is incomplete: re-export "
                         "the folder with `python -m edge_lora export`.")
    return meta


def model_precision(folder: str | os.PathLike) -> str:
    """fp32 / fp16 / int8 / int4 of the base weights, derived from the graph: MatMulNBits' bit widths, else
    the element type holding most initializer bytes. Not op types alone: a quantized LoRA branch also has
    DequantizeLinear nodes on an fp32 base.

    Parses the graph (not external data): do it before a memory measurement, not inside one.
    """
    import math

    import onnx

    export_meta(folder)
    proto = onnx.load(str(Path(folder) / MODEL_FILE), load_external_data=False)
    bits = sorted({a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                   if a.name == "bits"})
    if bits:
        return "int" + "/".join(map(str, bits))
    weight_bytes: dict[int, int] = {}
    for t in proto.graph.initializer:
        size = math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        weight_bytes[t.data_type] = weight_bytes.get(t.data_type, 0) + size
    dominant = max(weight_bytes, key=weight_bytes.get) if weight_bytes else onnx.TensorProto.FLOAT
    names = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8", onnx.TensorProto.FLOAT16: "fp16",
             onnx.TensorProto.BFLOAT16: "bf16"}
    return names.get(dominant, "fp32")


def model_limits(folder: str | os.PathLike) -> tuple[int, int]:
    """(vocab size, max positions) from config.json; generous defaults when a field is absent."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    vocab = config.get("vocab_size", 1000)
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 1 << 20
    return int(vocab), int(positions)


class OrtCpuRunner:
    runtime = "ort_cpu"
    provider = "CPUExecutionProvider"

    def __init__(self, folder: str | os.PathLike, threads: int = 2, spinning: bool = True,
                 precision: str | None = None, merge_on_swap: bool = True):
        """``merge_on_swap``: on an export that has merge_on_swap/ (edge_lora.runtimes.merge_swap), decode on the
        merged weights once a swap's background merge is done (False: always on the LoRA branches)."""
        self.folder = Path(folder)
        self.meta = export_meta(self.folder)
        self.task = self.meta.task
        self.is_encoder = self.task in ENCODER_TASKS
        self.merger = None
        if self.meta.merge_on_swap and merge_on_swap and self.meta.graph == "fused" and not self.is_encoder:
            from edge_lora.runtimes.merge_swap import MergeOnSwap

            # first, so that the branch session shares the base's weights with the merger's sessions
            self.merger = MergeOnSwap(self.folder, self.meta.path("merge_on_swap"), self.meta.lora_groups, threads,
                                      spinning)
        self.session = self._make_session(threads, spinning)
        self.hot = None
        if self.meta.hotswap:
            from edge_lora.runtimes.hotswap import HotswapSession

            self.hot = HotswapSession(self.folder, session=self.session)
        self._verified: set[str] = set()
        self.lm = None if self.is_encoder else OrtCausalLM(self.session)
        self._mask = self._past = None
        precision = precision or model_precision(self.folder)
        self.name = f"{self.runtime} {threads or 'all'}t {precision}"
        self.info = {"runtime": self.runtime, "provider": self.provider, "threads": threads, "spinning": spinning,
                     "precision": precision, "model": str(self.model_path), "mode": self.meta.mode,
                     "task": self.task, "graph": self.meta.graph}
        self.info["vocab_size"], self.info["max_positions"] = model_limits(self.folder)
        if self.merger is not None and not self.kv_fused():
            self.merger = None
        if self.merger is not None:
            from edge_lora.runtimes.merge_swap import release_freed_memory

            self.merger.start(None)
            release_freed_memory()   # ORT's parse of model.onnx
        self.info["merge_on_swap"] = self.merger is not None
        self.kv = self._shared_kv()
        self.info["kv_cache"] = "shared buffers (IO binding)" if self.kv is not None else "copied per step"
        # what ships: model.ort, or model.onnx plus its external data files (model.onnx_data, ...)
        files = [self.model_path]
        if self.model_path.name == MODEL_FILE:
            files += [p for p in self.folder.glob(f"{MODEL_FILE}?*") if p.is_file()]
        self.info["model_file_mb"] = sum(p.stat().st_size for p in files) / 2**20

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    def _make_session(self, threads: int, spinning: bool):
        shared = self.merger.shared if self.merger is not None else None
        return load_session(self.folder, threads=threads, spinning=spinning, providers=(self.provider,),
                            initializers=shared)

    # -------------------------------------------------------------------------------- causal LMs
    def prefill(self, ids: list[int]) -> int:
        input_ids = np.asarray([ids], dtype=np.int64)
        if self.kv is not None:
            self._follow_merge()
            self.kv.reset()
            return int(self.kv.step(input_ids)[0].argmax())
        self._mask = np.ones_like(input_ids)
        logits, self._past = self.lm.step(input_ids, self._mask, empty_past(self.session, 1))
        return int(logits[0].argmax())

    def decode(self, token: int) -> int:
        if self.kv is not None:
            self._follow_merge()
            return int(self.kv.step(np.array([[token]], dtype=np.int64))[0].argmax())
        self._mask = np.concatenate([self._mask, np.ones((1, 1), dtype=np.int64)], axis=-1)
        logits, self._past = self.lm.step(np.array([[token]], dtype=np.int64), self._mask, self._past)
        return int(logits[0].argmax())

    def kv_fused(self) -> bool:
        from edge_lora.runtimes.kv_loop import is_fused

        return not self.is_encoder and is_fused(self.session)

    def _follow_merge(self) -> None:
        """Move the sequence to the merged session as soon as the background merge has made it."""
        from edge_lora.runtimes.kv_loop import SharedKV

        merger = self.merger
        if merger is not None and merger.session is not None and self.kv.session is not merger.session:
            self.kv = SharedKV(merger.session, follow=self.kv)

    @property
    def decoding_on(self) -> str:
        """"merged" when steps run on merged weights (merge_on_swap), else "branches" (or "graph")."""
        if self.merger is not None and self.kv is not None and self.kv.session is self.merger.session:
            return "merged"
        return "branches" if self.hot is not None else "graph"

    def _shared_kv(self, follow=None):
        """Shared KV buffers (edge_lora.runtimes.kv_loop) for the fused graph, with the active adapter's tensors
        bound; None for other graphs. ``follow``: reuse its buffers (a swap; the next prefill starts over)."""
        from edge_lora.runtimes.kv_loop import SharedKV, is_fused

        if self.is_encoder or not is_fused(self.session):
            return None
        lora = self.hot.lora_feeds("active" if "active" in self.hot.adapters else None) if self.hot else None
        return SharedKV(self.session, 256, 1, lora, max_length=self.info["max_positions"], follow=follow)

    # -------------------------------------------------------------------------------- encoders
    def encode(self, batch: list[list[int]]) -> None:
        ids = np.asarray(batch, dtype=np.int64)
        lora = self.hot.lora_feeds("active" if "active" in self.hot.adapters else None) if self.hot else {}
        self.session.run(None, full_feeds(self.session, ids, lora=lora), self.active_run_options())

    # -------------------------------------------------------------------------------- hot-swap
    def swap(self, adapter_path: str | os.PathLike | None) -> None:
        """Load the adapter file and make it active (None: the plain base). The first load of each file is
        checked on a probe input (HotswapSession), later loads are not, so they time the swap alone."""
        if self.hot is None:
            raise ModelError(f"{self.folder} is a merged export; only hot-swap exports can swap adapters.")
        self.hot.unload_adapter("active")
        if adapter_path is not None:
            key = str(adapter_path)
            self.hot.load_adapter("active", adapter_path, check=key not in self._verified)
            self._verified.add(key)
        if self.lm is not None:
            self.lm.run_options = self.active_run_options()
            self.lm.lora = self.hot.lora_feeds("active" if "active" in self.hot.adapters else None)
            self.kv = self._shared_kv(follow=self.kv)
            if self.merger is not None:
                self.merger.start(self.lm.lora or None)

    def active_run_options(self):
        return self.hot.run_options("active") if self.hot is not None and "active" in self.hot.adapters else None

    def close(self) -> None:
        self.lm = self.hot = self.session = self._past = self.kv = self.merger = None
