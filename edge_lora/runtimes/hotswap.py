"""Load a hot-swap export once, activate LoRA adapters per run.

ONNX Runtime's Python ``RunOptions.add_active_adapter`` does not keep the ``LoraAdapter`` alive: if the
adapter object is garbage-collected, the run silently uses the graph's defaults (the plain base). So this
class owns every loaded adapter and the RunOptions that point at it, and at load it checks on a probe input
that the adapter really changes the output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edge_lora.errors import AdapterError
from edge_lora.runtimes.ort_session import full_feeds, load_session, probe_ids


def adapter_parameter_names(path: str | os.PathLike) -> list[str]:
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:
        raise AdapterError(f"{path} is not an ONNX Runtime adapter file: {exc}") from exc
    return sorted(fmt.get_parameters())


class HotswapSession:
    """``HotswapSession(folder).load_adapter("x", path)``; then ``run(feeds, adapter="x")`` or
    ``run_options("x")`` for loops that call the session themselves (e.g. ``OrtCausalLM``)."""

    def __init__(self, folder: str | os.PathLike, threads: int = 0, spinning: bool = True, session=None):
        self.folder = Path(folder)
        self.session = session or load_session(self.folder, threads=threads, spinning=spinning)
        # ORT lists initializer-backed inputs apart from the plain ones: they are the overridable initializers.
        self.lora_inputs = sorted(i.name for i in self.session.get_overridable_initializers()
                                  if i.name.startswith("lora."))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._adapters: dict[str, object] = {}       # name -> LoraAdapter (kept alive on purpose)
        self._run_options: dict[str, object] = {}    # name -> RunOptions with that adapter active
        self._probe_base: np.ndarray | None = None

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _probe(self, run_options=None) -> np.ndarray:
        config = self.folder / "config.json"
        vocab = json.loads(config.read_text()).get("vocab_size", 100) if config.is_file() else 100
        ids = probe_ids(min(int(vocab), 1000))
        return self.session.run(self.output_names[:1], full_feeds(self.session, ids), run_options)[0]

    def load_adapter(self, name: str, path: str | os.PathLike, check: bool = True) -> None:
        import onnxruntime as ort

        params = adapter_parameter_names(path)
        unknown = sorted(set(params) - set(self.lora_inputs))
        if unknown:
            raise AdapterError(f"{path}: parameters {unknown[:3]} are not LoRA inputs of {self.folder}; the adapter "
                               "targets modules this base export has no branch for. Re-export the base with "
                               "those modules (export.hotswap_targets).")
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        if check:
            if self._probe_base is None:
                self._probe_base = self._probe()
            if np.array_equal(self._probe(options), self._probe_base):
                raise AdapterError(f"{path}: with this adapter active the model's output on a probe input equals "
                                   "the base's; the adapter is empty or was not applied.")
        self._adapters[name] = adapter
        self._run_options[name] = options

    def unload_adapter(self, name: str) -> None:
        self._run_options.pop(name, None)
        self._adapters.pop(name, None)

    def run_options(self, adapter: str | None):
        if adapter is None:
            return None
        if adapter not in self._run_options:
            raise AdapterError(f"adapter {adapter!r} is not loaded; loaded: {self.adapters or 'none'}.")
        return self._run_options[adapter]

    def run(self, feeds: dict, adapter: str | None = None, output_names: list[str] | None = None):
        return self.session.run(output_names or self.output_names, feeds, self.run_options(adapter))
