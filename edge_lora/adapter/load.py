"""Any adapter folder the pipeline takes: a PEFT folder, or a folder written by ``compress`` (with or without
``--bits``), read into its typed in-memory form, with the original PEFT adapter it must be validated against.

=================================  =====================  ==================================================
the folder holds                   in memory              the device receives
=================================  =====================  ==================================================
adapter_config.json + safetensors  ``Adapter`` (peft)     float factors (or the quantize stage's codes)
compressed.safetensors             ``CompressedAdapter``  shared factors as single inputs, the rest float
quantized.safetensors (+ the       ``QuantizedAdapter``   exactly these codes (hot-swap), or their
compressed file it came from)                             expansion folded in (merged)
=================================  =====================  ==================================================
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

from edge_lora.adapter.compressed import FILE_NAME as COMPRESSED_FILE
from edge_lora.adapter.compressed import CompressedAdapter
from edge_lora.adapter.peft import CONFIG_NAME, WEIGHTS_NAME, Adapter, load_peft
from edge_lora.adapter.quantized import QuantizedAdapter
from edge_lora.errors import CompatibilityError
from edge_lora.formats.quantized_factors import FILE_NAME as QUANTIZED_FILE

AnyAdapter = Union[Adapter, CompressedAdapter, QuantizedAdapter]


def expanded(adapter: AnyAdapter) -> Adapter:
    """The per-module LoRA form (one ΔW per module) of any adapter; computed once for compressed and quantized."""
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, (CompressedAdapter, QuantizedAdapter)):
        return adapter.expanded
    raise TypeError(f"not an adapter: {type(adapter).__name__}")


def adapter_hash(folder: str | os.PathLike) -> str:
    """sha256 over the files an adapter folder is read from (PEFT config and weights; compress's outputs)."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME, COMPRESSED_FILE, QUANTIZED_FILE):
        path = Path(folder) / name
        if name in (COMPRESSED_FILE, QUANTIZED_FILE) and not path.is_file():
            continue   # PEFT folders hash as they always did
        h.update(name.encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def load_adapter(folder: str | os.PathLike, allow_dora: bool = False) -> tuple[AnyAdapter, Path]:
    """(adapter, reference PEFT folder). A PEFT folder is its own reference. A ``compress`` folder is taken as it
    is (quantized.safetensors if ``--bits`` wrote one, else compressed.safetensors) and validated against the
    original adapter it came from (the ``source`` in its header): the reference is always the uncompressed one."""
    folder = Path(folder)
    if (folder / QUANTIZED_FILE).is_file():
        adapter = QuantizedAdapter.load(folder / QUANTIZED_FILE)
        where = folder / QUANTIZED_FILE
    elif (folder / COMPRESSED_FILE).is_file():
        adapter = CompressedAdapter.load(folder)
        where = folder / COMPRESSED_FILE
    else:
        return load_peft(folder, allow_dora=allow_dora), folder
    source = Path(adapter.source) if adapter.source else None
    if source is not None and not source.is_absolute():
        source = (folder / source).resolve()
    if source is None or not (source / CONFIG_NAME).is_file():
        raise CompatibilityError(f"{where} was made from {adapter.source!r}, which is not a PEFT folder here; "
                                 "validation needs the original adapter. Restore it, or export the PEFT expansion "
                                 "(compress --as-peft DIR) instead.")
    return adapter, source
