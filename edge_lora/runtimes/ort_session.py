"""ONNX Runtime sessions for exported folders, and feeds built from a session's own input metadata."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge_lora.errors import ModelError

MODEL_FILE = "model.onnx"


def session_options(threads: int = 0, spinning: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Hot-swap graphs trigger one warning per LoRA input ("initializer appears in graph inputs"): intended.
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def load_session(folder_or_file: str | os.PathLike, threads: int = 0, spinning: bool = True,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), initializers: dict | None = None):
    """``initializers``: name → OrtValue used in place of the graph's own (memory shared with other sessions)."""
    import onnxruntime as ort

    path = Path(folder_or_file)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{path} does not exist; export the model first (python -m edge_lora export ...).")
    try:
        opts = session_options(threads, spinning)
        for name, value in (initializers or {}).items():
            opts.add_initializer(name, value)
        session = ort.InferenceSession(str(path), opts, providers=list(providers))
        session._edge_lora_keep = initializers   # ORT reads their memory: it lives as long as the session
        return session
    except Exception as exc:   # ORT raises its own exception types for corrupt or unsupported graphs
        raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from exc


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def user_inputs(session) -> list:
    """Inputs a caller must feed (ORT lists initializer-backed inputs such as LoRA factors too; skip those)."""
    return [i for i in session.get_inputs() if not i.name.startswith("lora.")]


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length KV cache for every past_key_values.* input: (batch, heads, 0, head_dim)."""
    feeds = {}
    for inp in user_inputs(session):
        if inp.name.startswith("past_key_values"):
            dims = [d if isinstance(d, int) else 0 for d in inp.shape]
            dims[0] = batch
            feeds[inp.name] = np.zeros(dims, dtype=_NP[inp.type])
    return feeds


def lora_graph_inputs(session) -> list:
    """LoRA factors that are plain graph inputs (the fused decoder graph): every run must feed them. Graphs of the
    optimum path give theirs rank-0 defaults instead (initializer-backed, not listed here)."""
    return [i for i in session.get_inputs() if i.name.startswith("lora.")]


def lora_feeds(session, arrays: dict | None) -> dict[str, np.ndarray]:
    """Feeds for the LoRA inputs: ``arrays`` (an adapter's tensors by input name; an initializer-backed input
    takes a feed too) and rank 0 for the plain inputs it leaves out."""
    arrays = arrays or {}
    known = {i.name for i in (*session.get_inputs(), *session.get_overridable_initializers())}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise ModelError(f"LoRA tensors {unknown[:3]} are not inputs of this graph; the adapter was laid out for "
                         "another export.")
    feeds = dict(arrays)
    for inp in lora_graph_inputs(session):
        if inp.name not in feeds:
            feeds[inp.name] = np.zeros([d if isinstance(d, int) else 0 for d in inp.shape], np.float32)
    return feeds


def full_feeds(session, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               lora: dict | None = None) -> dict[str, np.ndarray]:
    """Feeds for one forward pass over whole sequences, for causal LMs (empty past) and encoders alike. ``lora``:
    the adapter tensors for a graph whose LoRA factors are plain inputs ({} for the base); such a graph without it
    is an error, never a silent run of the base."""
    batch = input_ids.shape[0]
    if lora is None and lora_graph_inputs(session):
        raise ModelError("this graph takes its LoRA factors as plain inputs (the fused graph): pass lora= the "
                         "adapter's tensors (HotswapSession.lora_feeds(name)), or {} for the base.")
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    names = {i.name for i in user_inputs(session)}
    feeds = {"input_ids": input_ids.astype(np.int64)}
    if "attention_mask" in names:
        feeds["attention_mask"] = attention_mask.astype(np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.clip(attention_mask.cumsum(-1) - 1, 0, None).astype(np.int64)
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(input_ids, dtype=np.int64)
    feeds.update(empty_past(session, batch))
    feeds.update(lora_feeds(session, lora))
    unknown = names - set(feeds)
    if unknown:
        raise ModelError(f"the model has inputs edge_lora does not know how to feed: {sorted(unknown)}")
    return feeds


def probe_ids(vocab_size: int, length: int = 8, seed: int = 0) -> np.ndarray:
    """Fixed token ids for probes (load checks, OTA digests): the same on every machine."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(1, length), dtype=np.int64)
