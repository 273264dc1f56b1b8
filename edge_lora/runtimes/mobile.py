"""Mobile-class emulation: ONNX Runtime on the ORT format with 1-2 threads and a phone build's session options.

This is an emulation of a phone's CPU, not a phone: the same graph, format and settings an Android/iOS app
would use, run on this machine's cores. Every label this runner produces says so.

* The ORT-format model (``model.ort``) is made the way ``python -m onnxruntime.tools.convert_onnx_models_to_ort``
  makes it for an ARM target (all graph optimizations except the x86-only NCHWc layout, saved as ORT format),
  once per model.onnx, and cached beside it (or in a temp folder when the export folder is read-only), written
  atomically; a stamp of model.onnx's size and mtime invalidates it.
* Session: intra-op threads 1 or 2, inter-op 1, no spinning (a phone app must not burn a core while idle).
  The CPU memory arena and memory patterns stay on (ORT's defaults): turning the arena off, the usual advice
  for memory-bound apps, measured worse here: SmolLM2 int4 after a 512-token prefill held 1013 MB RSS without
  the arena (freed blocks stay with the C allocator) against 551 MB with it, peak 1109 MB against 633 MB.
* Memory: loading an ORT-format file by path holds the file's bytes and the initializers made from them at the
  same time, so the peak RSS at load is about twice the model (SmolLM2 fp32: 1.46 GB peak, 0.73 GB after
  load). An app that hands ORT its own buffer with ``session.use_ort_model_bytes_directly`` and
  ``..._for_initializers`` avoids that copy; from Python it cannot: the binding copies the bytes into a
  temporary that ORT then points into (NaN outputs on a tiny model, a segfault on SmolLM2). So the runner
  reports both, and its notes say which to read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from edge_lora.errors import ModelError, ProfileError
from edge_lora.files import atomic_file, write_text_atomic
from edge_lora.runtimes.ort_cpu import OrtCpuRunner
from edge_lora.runtimes.ort_session import MODEL_FILE, session_options

ORT_FILE = "model.ort"
NOTE = "emulation of a phone CPU, not a phone"
LOAD_NOTE = ("mobile emulation: peak RSS includes the ORT-format file's bytes held while its initializers are "
             "built (about 2x the model at load; an app passing its own buffer with "
             "session.use_ort_model_bytes_directly avoids it, Python cannot); 'after load' is the steady state.")


def _stamp(onnx_path: Path) -> dict:
    st = onnx_path.stat()
    return {"source": onnx_path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_dir(folder: Path) -> Path:
    if os.access(folder, os.W_OK):
        return folder
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "edge_lora_ort" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def convert_to_ort(folder: str | os.PathLike) -> Path:
    """model.ort for the export in ``folder`` (converted once, then reused while model.onnx is unchanged)."""
    import onnxruntime as ort

    folder = Path(folder)
    source = folder / MODEL_FILE
    cache = _cache_dir(folder)
    target, stamp_file = cache / ORT_FILE, cache / f"{ORT_FILE}.json"
    stamp = _stamp(source)
    if target.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target
    opts = session_options(threads=1)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.save_model_format", "ORT")
    try:
        with atomic_file(target) as tmp:
            opts.optimized_model_filepath = str(tmp)
            ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=["NchwcTransformer"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime could not convert {source} to ORT format: {exc}") from exc
    write_text_atomic(stamp_file, json.dumps(stamp))
    return target


def mobile_session_options(threads: int):
    opts = session_options(threads=threads, spinning=False)
    opts.enable_cpu_mem_arena = True    # see the module docstring: lower peak and steady RSS than without
    opts.enable_mem_pattern = True
    opts.add_session_config_entry("session.load_model_format", "ORT")
    return opts


class MobileRunner(OrtCpuRunner):
    runtime = "mobile"

    def __init__(self, folder: str | os.PathLike, threads: int = 2, spinning: bool = False,
                 precision: str | None = None):
        if threads not in (1, 2):
            raise ProfileError(f"the mobile emulation runs with 1 or 2 threads (a phone's big cores), not "
                               f"{threads}; use --threads 1 or 2, or runtime ort_cpu for other thread counts.")
        if spinning:
            raise ProfileError("the mobile emulation runs with spinning off, as a phone app does.")
        super().__init__(folder, threads=threads, spinning=False, precision=precision)
        self.name = f"mobile ort-format {threads}t {self.info['precision']} ({NOTE})"
        self.info.update(format="ORT", note=NOTE, notes=[LOAD_NOTE], arena=True, mem_pattern=True)

    @property
    def model_path(self) -> Path:
        return self._ort_path

    def _make_session(self, threads: int, spinning: bool):
        import onnxruntime as ort

        self._ort_path = convert_to_ort(self.folder)
        try:
            return ort.InferenceSession(str(self._ort_path), mobile_session_options(threads),
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load {self._ort_path}: {str(exc).rstrip('.')}"
                             f"{_four_bit_hint(self.folder)}") from exc


def _four_bit_hint(folder: Path) -> str:
    """ORT writes int4/uint4 tensors into an ORT-format file but (1.32) cannot read them back: say which."""
    import onnx

    proto = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    four_bit = [t.name for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)]
    if not four_bit:
        return ""
    return (f". The graph has 4-bit tensors ({', '.join(four_bit[:3])}), which this ONNX Runtime cannot load from "
            "the ORT format; keep them out of mobile exports (e.g. [quantize] embedding = \"fp32\": MatMulNBits "
            "int4 weights are packed in uint8 and are fine), or use runtime ort_cpu.")
