"""Decode with the KV cache in preallocated buffers that past and present share (ONNX Runtime IO binding).

For the fused decoder graph (edge_lora.stages.export_fused): GroupQueryAttention appends the new keys and values
in place when its ``past_key`` and ``present_key`` are one buffer, so a step moves no cache at all, where the
plain loop (``OrtCausalLM.step``) feeds the past in and copies the grown present out every token.

The LoRA factors of a hot-swap graph are bound as ordinary inputs (``lora``: graph input name → array), never
through ``RunOptions``: ONNX Runtime 1.32's ``run_with_iobinding(io, run_options)`` silently ignores an adapter
active in ``run_options`` and returns the base model's output. This loop takes no run options at all, so an
adapter reaches it as bound tensors or not at all.

Rows of a batch must have one length (the graph counts positions from the attention mask; see export_fused).
"""

from __future__ import annotations

import numpy as np

from edge_lora.errors import ModelError
from edge_lora.runtimes.ort_session import lora_feeds

GRAPH_KEY = "edge_lora.graph"   # model metadata the fused graph carries; its value is "fused"


def is_fused(session) -> bool:
    """Whether ``session`` runs edge_lora's fused decoder graph (its past and present may share buffers)."""
    return session.get_modelmeta().custom_metadata_map.get(GRAPH_KEY) == "fused"


class SharedKV:
    """``SharedKV(session, capacity, batch, lora)``; ``step(ids)`` → last-position logits (batch × vocab).
    The first ``step`` after construction or :meth:`reset` is the prompt. The buffers hold ``capacity`` positions
    and double (one copy of what they hold) when a sequence outgrows them, up to ``max_length`` if given."""

    def __init__(self, session, capacity: int = 256, batch: int = 1, lora: dict[str, np.ndarray] | None = None,
                 max_length: int | None = None, follow: "SharedKV | None" = None):
        """``follow``: continue ``follow``'s sequence on ``session`` (another graph of the same model, e.g. the
        merged one of edge_lora.runtimes.merge_swap): its buffers and length, bound to this session."""
        if not is_fused(session):
            raise ModelError("shared KV buffers need edge_lora's fused decoder graph (export.graph = 'fused'); "
                             "this session runs another graph: decode it with OrtCausalLM.step.")
        self.session = session
        self.batch = int(batch)
        self.max_length = max_length
        self.length = 0
        self.io = session.io_binding()
        self._logits: dict[tuple, np.ndarray] = {}   # one output buffer per shape (prompt, then 1 token)
        self._vocab = next(o.shape[2] for o in session.get_outputs() if o.name == "logits")
        self._shapes = {i.name: (i.shape[1], i.shape[3]) for i in session.get_inputs()
                        if i.name.startswith("past_key_values")}
        self.buffers: dict[str, np.ndarray] = {}
        if follow is not None:
            self.batch, self.length, self.max_length = follow.batch, follow.length, follow.max_length
            self.buffers = follow.buffers
            if set(self.buffers) != set(self._shapes):
                raise ModelError("the two graphs do not have the same KV cache inputs; they are not one model.")
            self._allocate(follow.capacity)
        else:
            self._allocate(int(capacity))
        self._lora = []   # arrays bound by pointer must outlive the binding
        plain = {i.name for i in session.get_inputs()}
        backed = sorted(set(lora or {}) - plain)
        if backed:
            raise ModelError(f"LoRA inputs {backed[:3]} are not plain inputs of this graph; IO binding cannot "
                             "bind them.")
        for name, array in lora_feeds(session, lora).items():   # rank 0 for what the adapter leaves out
            array = np.ascontiguousarray(array, dtype=np.float32)
            self.io.bind_cpu_input(name, array)
            self._lora.append(array)

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2] if self.buffers else 0

    def _allocate(self, capacity: int) -> None:
        """(Re)bind every past/present pair to one numpy-backed buffer of ``capacity`` positions, keeping the
        first ``length`` of the old ones."""
        import onnxruntime as ort

        for name, (kv_heads, head_dim) in self._shapes.items():
            old = self.buffers.get(name)
            if old is not None and old.shape[2] == capacity:   # adopted from another session (follow)
                buffer = old
            else:
                buffer = np.zeros((self.batch, kv_heads, capacity, head_dim), np.float32)
                if old is not None and self.length:
                    buffer[:, :, :self.length] = old[:, :, :self.length]
            value = ort.OrtValue.ortvalue_from_numpy(buffer)   # shares the numpy memory
            self.io.bind_ortvalue_input(name, value)
            self.io.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
            self.buffers[name] = buffer

    def reset(self) -> None:
        """Start a new sequence (the buffers are reused; attention reads only the first ``length`` rows)."""
        self.length = 0

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ModelError(f"input_ids must be {self.batch} × tokens, got shape {ids.shape}.")
        total = self.length + ids.shape[1]
        if self.max_length is not None and total > self.max_length:
            raise ModelError(f"the sequence would be {total} tokens, over the model's {self.max_length} positions.")
        if total > self.capacity:
            self._allocate(max(total, 2 * self.capacity))
        mask = np.ones((self.batch, total), np.int64)
        self.io.bind_cpu_input("input_ids", ids)
        self.io.bind_cpu_input("attention_mask", mask)
        logits = self._logits_buffer(ids.shape[1])
        self.session.run_with_iobinding(self.io)
        self.length = total
        return logits[:, -1, :]

    def _logits_buffer(self, tokens: int) -> np.ndarray:
        """Bind (and keep) a logits buffer of this step's shape: a bound output must match the computed shape,
        and a decode step reuses one buffer instead of ORT allocating 1 × vocab floats every token."""
        import onnxruntime as ort

        shape = (self.batch, tokens, self._vocab)
        if shape not in self._logits:
            if tokens > 1:   # a prompt's buffer is used once; keep only the decode one
                self._logits = {k: v for k, v in self._logits.items() if k[1] == 1}
            self._logits[shape] = np.empty(shape, np.float32)
        buffer = self._logits[shape]
        self.io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(buffer))
        return buffer
