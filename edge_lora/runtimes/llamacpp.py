"""llama.cpp as a peer runtime: the same greedy prefill/decode protocol as the ONNX Runtime runners.

Optional: ``llama_cpp`` (llama-cpp-python) is not a dependency of edge_lora. Install it with
``bash tools/build_llamacpp.sh`` (it compiles the sdist once into the cache). Without it, building a runner
raises :class:`LlamaCppUnavailable` (a ``RuntimeUnavailableError``); edge_lora imports this module only when
the ``llamacpp`` runtime is asked for (``edge_lora.runtimes.open_runner("llamacpp", gguf, threads=2)``).

- :class:`LlamaCppRunner` loads a GGUF (optionally with a GGUF LoRA) and runs greedy steps: ``prefill(ids)``
  resets the KV cache and evaluates the prompt, ``decode(token)`` does one KV-cache step; both return the
  argmax of the last logits. No llama.cpp sampler is involved, so a step costs what the model costs plus one
  numpy argmax over the vocabulary, like the ORT runners.
- :func:`peft_to_gguf_lora` converts a PEFT adapter with llama.cpp's own ``convert_lora_to_gguf.py``.
- :func:`hf_to_gguf` and :func:`quantize_gguf` make same-weights GGUFs (f32/f16 from our HF folder, Q8_0/Q4_0
  from those) so fp32 ORT can be compared with f32/f16 llama.cpp, not only with the packaged Q4_1.

Token ids in and out: tokenization is the caller's (the HF tokenizer), so every runtime sees the same ids.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_lora.errors import AdapterError, EdgeLoraError, ModelError
from edge_lora.files import atomic_file
from edge_lora.runtimes import RuntimeUnavailableError

BUILD_HINT = "bash tools/build_llamacpp.sh"
# ggml_type values for the KV cache (ggml.h); llama.cpp's default is f16.
_KV_TYPES = {"f16": 1, "f32": 0}
# Target types for quantize_gguf: names as llama.cpp's `llama-quantize` spells them.
QUANT_FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


@contextlib.contextmanager
def _model_params(llama_cpp, **fields):
    """Make ``Llama()`` load with these ``llama_model_params`` fields (it takes no argument for them: it starts
    from ``llama_model_default_params()``, so that function is wrapped for the duration of the load).

    Used for ``use_extra_bufts = False``: llama.cpp's extra CPU buffer types (the AMX and weight-repacking
    buffers) crash inside ``llama_decode`` on some virtual machines (the AMX ``ldtilecfg`` instruction faults in
    the one this project is built on), and for SmolLM2's Q4_1 they measured no faster. Pass
    ``extra_bufts=True`` to the runner on hardware where they work."""
    module = llama_cpp.llama_cpp if hasattr(llama_cpp, "llama_cpp") else llama_cpp
    original = module.llama_model_default_params

    def params():
        p = original()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = original


class LlamaCppError(EdgeLoraError):
    """llama.cpp refused an input or failed while running a model."""


class LlamaCppUnavailable(LlamaCppError, RuntimeUnavailableError):
    """The optional peer runtime (llama-cpp-python) is not installed or cannot load its library.
    A RuntimeUnavailableError, so the profiler reports the runtime as missing and goes on."""


def require_llama_cpp():
    """Import ``llama_cpp`` or say how to get it. Returns the module."""
    # llama.cpp's threads are an OpenMP pool (libgomp reads OMP_WAIT_POLICY once, when the library loads). Under
    # PASSIVE, edge_lora's default for torch, they sleep between ops: decode measured 3.2× slower (31.5 vs 9.95
    # ms/token on SmolLM2 Q4_1, 2 threads). Load it under libgomp's default (spin briefly, then sleep) instead.
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" and "llama_cpp" not in sys.modules
    if passive:
        del os.environ["OMP_WAIT_POLICY"]
    try:
        import llama_cpp
    except ImportError as exc:  # also what `sys.modules["llama_cpp"] = None` raises
        raise LlamaCppUnavailable(
            "The llama.cpp peer runtime is not installed: the Python package llama_cpp (llama-cpp-python) "
            f"cannot be imported ({exc}). It is optional and only used for benchmarks; build and install it "
            f"with: {BUILD_HINT}"
        ) from exc
    except (OSError, RuntimeError) as exc:  # llama_cpp raises these when libllama.so fails to load
        raise LlamaCppUnavailable(
            f"llama_cpp is installed but its native library failed to load ({exc}). The cached wheel is built "
            f"for the CPU it was compiled on; rebuild it on this machine with: FORCE=1 {BUILD_HINT}"
        ) from exc
    finally:
        if passive:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return llama_cpp


@contextlib.contextmanager
def _llama_log_level(level: int):
    """llama_cpp forwards llama.cpp's log lines to stderr when they reach its Python logger's level."""
    log = logging.getLogger("llama-cpp-python")
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


def _ftype_name(llama_cpp, ftype: int) -> str:
    names = {getattr(llama_cpp, n): n for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_")}
    name = names.get(ftype & ~getattr(llama_cpp, "LLAMA_FTYPE_GUESSED", 1024), f"ftype{ftype}")
    return name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")


class LlamaCppRunner:
    """Greedy prefill/decode on a GGUF model with llama.cpp, on one sequence (a ``SwapRunner``).

    ``threads`` is used for both the prompt (``n_threads_batch``) and single-token steps (``n_threads``).
    ``lora_path`` is a GGUF LoRA (see :func:`peft_to_gguf_lora`), active from the start; it is applied unmerged
    at ``lora_scale``, as PEFT and the ORT hot-swap export do. :meth:`swap` loads another adapter file on the
    live context (or none), like the ORT hot-swap runner; :meth:`use_lora` switches the loaded one off/on
    without touching the file. ``kv_type="f32"`` keeps the KV cache in fp32 (llama.cpp's default is f16) for
    same-precision checks against fp32 references; benchmarks of llama.cpp as users run it keep the default.
    """

    runtime = "llamacpp"

    def __init__(self, gguf_path: str | os.PathLike, threads: int = 2, n_ctx: int = 1024,
                 lora_path: str | os.PathLike | None = None, *, lora_scale: float = 1.0,
                 flash_attn: bool = False, kv_type: str = "f16", extra_bufts: bool = False):
        llama_cpp = require_llama_cpp()
        self._lib = llama_cpp
        self._llm = None
        self._adapter = None
        self._n_past: int | None = None
        gguf_path = Path(gguf_path)
        if not gguf_path.is_file():
            raise ModelError(f"GGUF model {gguf_path} does not exist. Pass a .gguf file (the packaged SmolLM2 is "
                             "edge_lora.base.smollm2_gguf_path()).")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise LlamaCppError(f"threads must be a positive integer, not {threads!r}.")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 2:
            raise LlamaCppError(f"n_ctx must be an integer >= 2 (prompt plus generated tokens), not {n_ctx!r}.")
        if kv_type not in _KV_TYPES:
            raise LlamaCppError(f"kv_type must be one of {sorted(_KV_TYPES)}, not {kv_type!r}.")
        self.threads = threads
        self.n_ctx = n_ctx
        self.gguf_path = gguf_path
        try:
            # n_batch = n_ctx: any prompt that fits the context is one llama_decode call (llama_decode rejects
            # batches larger than n_batch). Adapters are loaded by _load_adapter, not Llama(lora_path=...),
            # because that path also turns mmap off, which would make base and LoRA loads differ.
            with _model_params(llama_cpp, use_extra_bufts=extra_bufts):
                self._llm = llama_cpp.Llama(
                    model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(512, n_ctx),
                    n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn, logits_all=False,
                    type_k=_KV_TYPES[kv_type], type_v=_KV_TYPES[kv_type], verbose=False)
        except ValueError as exc:  # llama_cpp's "Failed to load model from file"
            raise ModelError(f"llama.cpp could not load {gguf_path}: {exc}. Check that it is a GGUF model of an "
                             "architecture this llama.cpp build supports (see runner.info['version']).") from exc
        self._ctx = self._llm.ctx
        self._n_vocab = self._llm.n_vocab()
        self._scales = (ctypes.c_float * 1)(lora_scale)
        # One reusable single-token batch: llama_batch_get_one only records the pointer, and llama_decode
        # takes the batch by value, so refilling _one[0] is all a decode step needs.
        self._one = (llama_cpp.llama_token * 1)()
        self._one_batch = llama_cpp.llama_batch_get_one(self._one, 1)

        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._llm.model, buf, len(buf))
        quant = _ftype_name(llama_cpp, llama_cpp.llama_model_ftype(self._llm.model))
        self._base_name = f"llama.cpp {threads}t {quant}"
        self.name = self._base_name
        self.info = {
            "runtime": "llama.cpp",
            "version": f"llama-cpp-python {llama_cpp.__version__}",
            "threads": threads,
            "model": str(gguf_path),
            "model_file_mb": gguf_path.stat().st_size / 2**20,
            "quant": quant,
            "precision": quant,
            "model_desc": buf.value.decode(errors="replace"),
            "lora": None,
            "lora_scale": lora_scale,
            "lora_active": False,
            # what the profiler needs to pick token ids and prompt lengths every variant accepts
            "vocab_size": self._n_vocab,
            "max_positions": n_ctx,
            "n_ctx": n_ctx,
            "kv_cache": kv_type,
            "flash_attn": flash_attn,
            "extra_bufts": extra_bufts,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            "notes": [(f"llama.cpp keeps its KV cache in {kv_type}; its threads are OpenMP threads, so "
                       "OMP_WAIT_POLICY applies to them")],
        }
        if lora_path is not None:
            try:
                self.swap(lora_path)
            except EdgeLoraError:
                self.close()
                raise

    # ------------------------------------------------------------------------------------------ protocol
    def prefill(self, ids: list[int]) -> int:
        """Reset the KV cache, evaluate the prompt, return the greedy next token id."""
        ids = [int(t) for t in ids]
        if not ids:
            raise LlamaCppError("prefill needs at least one token id.")
        if len(ids) >= self.n_ctx:
            raise LlamaCppError(f"The prompt has {len(ids)} tokens but the context holds {self.n_ctx}; build the "
                                "runner with a larger n_ctx.")
        bad = [t for t in ids if not 0 <= t < self._n_vocab]
        if bad:
            raise LlamaCppError(f"Token ids {bad[:5]} are outside the model's vocabulary (0..{self._n_vocab - 1}); "
                                "were they made by another model's tokenizer?")
        lib = self._lib
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        self._n_past = None
        tokens = (lib.llama_token * len(ids))(*ids)
        self._decode(lib.llama_batch_get_one(tokens, len(ids)), len(ids))
        self._n_past = len(ids)
        return self._argmax()

    def decode(self, token: int) -> int:
        """Append one token to the KV cache, return the greedy next token id."""
        if self._n_past is None:
            raise LlamaCppError("decode() before prefill(): call prefill(prompt_ids) first (also after use_lora).")
        if self._n_past >= self.n_ctx:
            raise LlamaCppError(f"The context of {self.n_ctx} tokens is full; build the runner with a larger n_ctx.")
        if not 0 <= token < self._n_vocab:
            raise LlamaCppError(f"Token id {token} is outside the model's vocabulary (0..{self._n_vocab - 1}).")
        self._one[0] = token
        self._decode(self._one_batch, 1)
        self._n_past += 1
        return self._argmax()

    def close(self) -> None:
        """Free the adapter, context and model. Safe to call twice."""
        if self._llm is not None:
            self._free_adapter()
            self._llm.close()
            self._llm = None
        self._n_past = None

    # ------------------------------------------------------------------------------------------ adapters
    def swap(self, adapter_path: str | os.PathLike | None) -> None:
        """Load a GGUF LoRA file and make it active on the live context (None: the plain base).

        The file is read on every call and the previous adapter freed, as the ORT hot-swap runner does, so a
        swap's time includes loading the file. Invalidates the KV cache: the next call must be prefill()."""
        self._set_active(False)
        self._free_adapter()
        if adapter_path is not None:
            self._adapter = self._load_adapter(Path(adapter_path))
            self.info["lora"] = str(adapter_path)
            self._set_active(True)

    def use_lora(self, enabled: bool) -> None:
        """Attach or detach the already loaded adapter (no file read). Invalidates the KV cache."""
        if enabled and self._adapter is None:
            raise AdapterError("This runner has no adapter loaded (no lora_path, or swap(None)); there is nothing "
                               "to switch on. Load one with swap(path).")
        self._set_active(enabled)

    def _load_adapter(self, path: Path):
        if not path.is_file():
            raise AdapterError(f"LoRA file {path} does not exist. llama.cpp needs a GGUF LoRA; convert a PEFT "
                               "folder with edge_lora.runtimes.llamacpp.peft_to_gguf_lora().")
        # On repacked (Q4_0) bases llama.cpp logs one "cannot use buft CPU_REPACK" line per tensor at error
        # level although the fallback is normal; a failed load still shows up as a NULL adapter below.
        with _llama_log_level(logging.CRITICAL):
            adapter = self._lib.llama_adapter_lora_init(self._llm.model, str(path).encode())
        if not adapter:
            raise AdapterError(f"llama.cpp could not load the LoRA {path}: it must be a GGUF LoRA made for this "
                               f"base ({self.gguf_path.name}); convert the PEFT folder with peft_to_gguf_lora().")
        return adapter

    def _free_adapter(self) -> None:
        if self._adapter is not None:
            self._lib.llama_set_adapters_lora(self._ctx, None, 0, None)  # detach before freeing
            self._lib.llama_adapter_lora_free(self._adapter)
            self._adapter = None
            self.info["lora"] = None

    def _set_active(self, enabled: bool) -> None:
        if enabled:
            adapters = (self._lib.llama_adapter_lora_p_ctypes * 1)(self._adapter)
            rc = self._lib.llama_set_adapters_lora(self._ctx, adapters, 1, self._scales)
        else:
            rc = self._lib.llama_set_adapters_lora(self._ctx, None, 0, None)
        if rc != 0:
            raise LlamaCppError(f"llama_set_adapters_lora returned {rc}.")
        # The name says what actually runs, so a benchmark row is right after a switch too.
        self.name = self._base_name + (" +LoRA" if enabled else "")
        self.info["lora_active"] = bool(enabled)
        self._n_past = None

    # ------------------------------------------------------------------------------------------ extras
    def last_logits(self):
        """A copy of the logits of the last evaluated position (numpy float32, vocab-sized)."""
        import numpy as np

        return np.array(self._logits_view(), copy=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _decode(self, batch, n: int) -> None:
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            self._n_past = None
            # 1: no KV slot (context full); <0: an error inside llama.cpp (bad batch, allocation failure).
            raise LlamaCppError(f"llama_decode of {n} token(s) returned {rc}"
                                + ("; the KV cache has no room: use a larger n_ctx." if rc == 1 else "."))

    def _logits_view(self):
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise LlamaCppError("llama.cpp returned no logits for the last position.")
        # The pointer can move when llama.cpp reallocates its output buffer, so it is fetched every step.
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _argmax(self) -> int:
        return int(self._logits_view().argmax())


# ---------------------------------------------------------------------------------------------- conversion
def converters_dir() -> Path:
    """The vendored llama.cpp converters that tools/build_llamacpp.sh unpacked (same llama.cpp as the wheel).
    ``$EDGE_LORA_LLAMACPP_SRC`` may point at another llama.cpp checkout instead."""
    from edge_lora.base import cache_dir

    env = os.environ.get("EDGE_LORA_LLAMACPP_SRC")
    if env:
        candidates = [Path(env)]
    else:
        root = cache_dir() / "llama.cpp"
        try:
            import llama_cpp

            candidates = [root / llama_cpp.__version__]
        except (ImportError, OSError, RuntimeError):  # converters work without the runtime: any unpacked one
            candidates = sorted(root.glob("*"), reverse=True)
    for c in candidates:
        if (c / "convert_lora_to_gguf.py").is_file() and (c / "convert_hf_to_gguf.py").is_file():
            return c
    looked = ", ".join(map(str, candidates)) or str(root)
    raise LlamaCppUnavailable(f"llama.cpp's converters were not found (looked in {looked}). Unpack them with: "
                              f"{BUILD_HINT}")


@contextlib.contextmanager
def _output_file(out: Path):
    """Yield a temp path beside ``out``; renamed to ``out`` when the block succeeds, removed otherwise, so an
    interrupted conversion never leaves a file that looks done (edge_lora.files.atomic_file)."""
    with atomic_file(out) as tmp:
        yield str(tmp)


def _run_converter(script: str, args: list[str], out: Path, what: str, error_cls) -> Path:
    out = Path(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with _output_file(out) as tmp:
        proc = subprocess.run([sys.executable, str(converters_dir() / script), *args, "--outfile", tmp],
                              check=False, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
            raise error_cls(f"llama.cpp's {script} failed converting {what} (exit {proc.returncode}):\n{tail}")
    return out


def peft_to_gguf_lora(adapter_dir: str | os.PathLike, base_hf_dir: str | os.PathLike,
                      out_path: str | os.PathLike, outtype: str = "f32") -> Path:
    """Convert a PEFT LoRA folder into a llama.cpp GGUF LoRA with the vendored ``convert_lora_to_gguf.py``.

    llama.cpp scales every module by ``alpha / rank`` with one global alpha. Adapters whose PEFT scales follow
    that rule (plain LoRA, any rank_pattern) are converted as they are. rsLoRA and alpha_pattern do not: for
    those, each module's PEFT scale is folded into lora_B of a temporary copy and alpha is written as 0, which
    llama.cpp reads as "scale 1". Features llama.cpp's LoRA cannot express (LoRA on embeddings, lora_bias,
    modules_to_save, DoRA) are refused rather than silently dropped.
    """
    import torch
    from safetensors.torch import save_file

    from edge_lora.adapter import PEFT_PREFIX, load_peft

    adapter_dir, base_hf_dir = Path(adapter_dir), Path(base_hf_dir)
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise AdapterError(f"outtype must be f32, f16, bf16 or q8_0, not {outtype!r}.")
    if not (base_hf_dir / "config.json").is_file():
        raise ModelError(f"{base_hf_dir} has no config.json; pass the base model's HF folder "
                         "(edge_lora.base.resolve_base('smollm2')).")
    adapter = load_peft(adapter_dir)  # validates the folder and rejects DoRA and other unsupported variants
    problems = [f"{m.name}: LoRA on an embedding" for m in adapter.modules.values() if m.kind != "linear"]
    problems += [f"{m.name}: lora_bias" for m in adapter.modules.values() if m.bias is not None]
    problems += [f"{k}: a full tensor (modules_to_save / trained bias)" for k in adapter.extra_tensors]
    if problems:
        raise AdapterError(f"{adapter_dir} uses features llama.cpp's LoRA format cannot hold: "
                           f"{'; '.join(problems[:5])}. Compare these adapters on ONNX Runtime only.")
    alpha = float(adapter.config.get("lora_alpha", 8))
    plain = all(math.isclose(m.scale, alpha / m.rank, rel_tol=1e-6) for m in adapter.modules.values())
    if plain:
        return _run_converter("convert_lora_to_gguf.py", ["--outtype", outtype, "--base", str(base_hf_dir),
                                                          str(adapter_dir)], Path(out_path), str(adapter_dir),
                              AdapterError)
    with tempfile.TemporaryDirectory(prefix="edge_lora_gguf_lora_") as tmp:
        tensors = {}
        for m in adapter.modules.values():
            tensors[f"{PEFT_PREFIX}{m.name}.lora_A.weight"] = m.A.contiguous()
            tensors[f"{PEFT_PREFIX}{m.name}.lora_B.weight"] = (m.B.double() * m.scale).to(torch.float32).contiguous()
        save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"))
        config = dict(adapter.config, lora_alpha=0, use_rslora=False, alpha_pattern={})
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(config, indent=2))
        return _run_converter("convert_lora_to_gguf.py", ["--outtype", outtype, "--base", str(base_hf_dir), tmp],
                              Path(out_path), f"{adapter_dir} (scales folded into lora_B)", AdapterError)


def hf_to_gguf(hf_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f32") -> Path:
    """An HF folder as a GGUF with the vendored ``convert_hf_to_gguf.py`` (f32 / f16 / bf16 / q8_0).

    On ``resolve_base("smollm2")`` this gives llama.cpp exactly the weights our fp32 ONNX exports hold (the
    folder is the packaged Q4_1 de-quantized), so runtimes can be compared on the same weights."""
    hf_dir = Path(hf_dir)
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise ModelError(f"outtype must be f32, f16, bf16 or q8_0, not {outtype!r}.")
    if not (hf_dir / "config.json").is_file():
        raise ModelError(f"{hf_dir} is not an HF model folder (no config.json).")
    return _run_converter("convert_hf_to_gguf.py", ["--outtype", outtype, str(hf_dir)], Path(out_path),
                          str(hf_dir), ModelError)


def quantize_gguf(src: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "Q8_0",
                  threads: int = 2) -> Path:
    """Re-type a GGUF with llama.cpp's quantizer (``llama_model_quantize``): F32, F16, Q8_0, Q4_0 or Q4_1.

    Quantized inputs are allowed (de-quantized first), so ``Q4_1 -> F32`` gives llama.cpp's own de-quantization
    of the packaged model. Quantizing from an already-quantized file compounds the errors: make Q8_0/Q4_0 from
    an F32 GGUF (:func:`hf_to_gguf`)."""
    llama_cpp = require_llama_cpp()
    src, out = Path(src), Path(out_path)
    if qtype not in QUANT_FTYPES:
        raise ModelError(f"qtype must be one of {', '.join(QUANT_FTYPES)}, not {qtype!r}.")
    if not src.is_file():
        raise ModelError(f"GGUF model {src} does not exist.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[qtype])
    params.nthread = threads
    params.allow_requantize = True
    with _output_file(out) as tmp:
        # llama.cpp logs every tensor at INFO through llama_cpp's log callback; keep only errors, as Llama does.
        with _llama_log_level(logging.ERROR):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise ModelError(f"llama.cpp could not quantize {src} to {qtype} (llama_model_quantize returned {rc}).")
    return out
