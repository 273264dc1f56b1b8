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
from edge_lora.formats import ort_adapter
from edge_lora.formats.export_meta import FILE as META_FILE, ExportMeta, LoraGroup
from edge_lora.runtimes.ort_session import full_feeds, load_session, lora_feeds, lora_graph_inputs, probe_ids


def adapter_parameter_names(path: str | os.PathLike) -> list[str]:
    return ort_adapter.parameter_names(path)


class HotswapSession:
    """``HotswapSession(folder).load_adapter("x", path)``; then ``run(feeds, adapter="x")`` or
    ``run_options("x")`` for loops that call the session themselves (e.g. ``OrtCausalLM``)."""

    def __init__(self, folder: str | os.PathLike, threads: int = 0, spinning: bool = True, session=None):
        self.folder = Path(folder)
        self.session = session or load_session(self.folder, threads=threads, spinning=spinning)
        # ORT lists initializer-backed inputs apart from the plain ones: they are the overridable initializers.
        # The fused graph's LoRA inputs are plain inputs instead (ort_session.lora_graph_inputs): its adapters are
        # fed as tensors, because RunOptions adapters cannot reach plain inputs nor an IO-binding loop.
        self.plain_lora = bool(lora_graph_inputs(self.session))
        self.lora_inputs = sorted(i.name for i in (*self.session.get_overridable_initializers(),
                                                   *lora_graph_inputs(self.session)) if i.name.startswith("lora."))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._adapters: dict[str, object] = {}       # name -> LoraAdapter (kept alive on purpose)
        self._run_options: dict[str, object] = {}    # name -> RunOptions with that adapter active
        self._arrays: dict[str, dict] = {}           # name -> its float arrays by graph input (IO-binding loops)
        self._probe_base: np.ndarray | None = None
        # The export's edge_lora.json, read once (a damaged one raises ExportMetaError); None for a bare model
        # folder. Every swap needs the layout, and a real export's file is ~100 KB of JSON.
        self.meta: ExportMeta | None = (ExportMeta.read(self.folder) if (self.folder / META_FILE).is_file()
                                        else None)

    def _groups(self) -> list[LoraGroup]:
        """The export's plain LoRA branches (edge_lora.json ``lora_groups``): what a quantized file is laid out
        for; empty when it records none."""
        meta = self.meta
        return list(meta.lora_groups) if meta is not None else []

    def _unreachable(self) -> list[str]:
        """Modules the export adapted whose output reaches no graph output (edge_lora.json ``lora_unreachable``)."""
        meta = self.meta
        return list(meta.lora_unreachable) if meta is not None else []

    def _fused_modules(self) -> set[str]:
        """Modules that share a LoRA branch with others in this export."""
        return {m for g in self._groups() if len(g.modules) > 1 for m in g.modules}

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _probe(self, run_options=None, lora: dict | None = None) -> np.ndarray:
        config = self.folder / "config.json"
        vocab = json.loads(config.read_text()).get("vocab_size", 100) if config.is_file() else 100
        ids = probe_ids(min(int(vocab), 1000))
        feeds = full_feeds(self.session, ids, lora=lora if self.plain_lora else None)
        return self.session.run(self.output_names[:1], feeds, run_options)[0]

    def load_adapter(self, name: str, path: str | os.PathLike, check: bool = True) -> None:
        import onnxruntime as ort

        # A quantized file (the codes of the one factor quantizer) is expanded to float in memory here, laid out
        # for this export's branches, so decode runs at float-LoRA speed; a float file is memory-mapped as it is.
        if self.plain_lora:   # tensors only: no ort.LoraAdapter (see __init__)
            adapter, params = None, ort_adapter.read(path).float_arrays(self._groups(), self._unreachable())
        else:
            adapter, params = ort_adapter.load(path, self._groups(), self._unreachable())
        unknown = sorted(set(params) - set(self.lora_inputs))
        fused = self._fused_modules()
        stale = [n for n in unknown if n.rpartition(".")[0].removeprefix("lora.") in fused]
        missing = [n for n in unknown if n not in stale]
        if missing:
            raise AdapterError(f"{path}: parameters {missing[:3]} are not LoRA inputs of {self.folder}; the adapter "
                               "targets modules this base export has no branch for. Re-export the base with "
                               "those modules (export.hotswap_targets).")
        if stale:
            raise AdapterError(f"{path}: parameters {stale[:3]} are per-module factors, but {self.folder} packs "
                               f"{stale[0].rpartition('.')[0].removeprefix('lora.')} into one LoRA branch with its "
                               "sibling projections (export.fuse_projections). Write the adapter file for this "
                               "export: write_ort_adapter(adapter, path, read_meta(folder)).")
        options = None
        if not self.plain_lora:
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
        if check:
            if self._probe_base is None:
                self._probe_base = self._probe(lora={})
            if np.array_equal(self._probe(options, lora=params), self._probe_base):
                raise AdapterError(f"{path}: with this adapter active the model's output on a probe input equals "
                                   "the base's; the adapter is empty or was not applied.")
        self._adapters[name] = adapter
        self._run_options[name] = options
        self._arrays[name] = params

    def unload_adapter(self, name: str) -> None:
        self._run_options.pop(name, None)
        self._adapters.pop(name, None)
        self._arrays.pop(name, None)

    def lora_feeds(self, adapter: str | None) -> dict:
        """The tensors to feed for ``adapter`` on a graph with plain LoRA inputs (the fused graph; loops that
        bind them, since IO binding ignores RunOptions' adapters); {} for the base and where
        :meth:`run_options` carries the adapter. Pass both on: exactly one of them holds it."""
        self.run_options(adapter)   # the same error for an adapter that is not loaded
        return self._arrays[adapter] if adapter is not None and self.plain_lora else {}

    def run_options(self, adapter: str | None):
        """RunOptions with ``adapter`` active; None for the base, and for a graph whose LoRA inputs are plain
        (feed :meth:`lora_feeds` there)."""
        if adapter is None:
            return None
        if adapter not in self._run_options:
            raise AdapterError(f"adapter {adapter!r} is not loaded; loaded: {self.adapters or 'none'}.")
        return self._run_options[adapter]

    def run(self, feeds: dict, adapter: str | None = None, output_names: list[str] | None = None):
        if self.plain_lora:
            feeds = {**feeds, **lora_feeds(self.session, self.lora_feeds(adapter))}
        return self.session.run(output_names or self.output_names, feeds, self.run_options(adapter))
