"""Entry encodings: zstd, zstd with the previous file as a raw-content dictionary (``--patch-from`` style), and
copy-ops (a segment list: copy a byte range of the previous file, or insert literal bytes), planned per tensor
for safetensors files. Decoding is bounded: the declared size from the signed manifest caps every output.

copy-ops blob (before zstd):
    b"ELCOPS1\\n" | new size u64 BE | op count u32 BE | ops: (kind u8: 0 = old, 1 = literal; offset u64; length u64)
    | literal bytes
"""

from __future__ import annotations

import hashlib
import struct

from edge_lora.files import SafetensorsHeaderError, parse_safetensors_header
from edge_lora.ota.container import Limits
from edge_lora.ota.errors import DeltaError, FormatError, IntegrityError, SizeLimitError

COPY_OPS_MAGIC = b"ELCOPS1\n"
ZSTD_LEVEL = 19
_OP = struct.Struct(">BQQ")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _zstd():
    import zstandard

    return zstandard


def _window_log(total: int) -> int:
    return min(31, max(10, int(total).bit_length()))


def zstd_compress(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    return _zstd().ZstdCompressor(level=level, write_checksum=True).compress(data)


def zstd_patch_compress(data: bytes, old: bytes, level: int = ZSTD_LEVEL) -> bytes:
    """Compress ``data`` with ``old`` as a raw-content dictionary and a window covering both: matches anywhere
    in the previous version cost a few bytes, as with ``zstd --patch-from``."""
    z = _zstd()
    params = z.ZstdCompressionParameters.from_level(level, window_log=_window_log(len(old) + len(data)),
                                                    enable_ldm=True, source_size=len(data),
                                                    write_checksum=True)
    d = z.ZstdCompressionDict(old, dict_type=z.DICT_TYPE_RAWCONTENT)
    return z.ZstdCompressor(dict_data=d, compression_params=params).compress(data)


def zstd_decompress(data: bytes, size: int, where: str, limits: Limits, old: bytes | None = None) -> bytes:
    """Decode one zstd frame to exactly ``size`` bytes (the signed, declared size), never more."""
    z = _zstd()
    if size > limits.max_entry_bytes:
        raise SizeLimitError(f"{where}: declared decoded size {size} exceeds the per-entry limit of "
                             f"{limits.max_entry_bytes} bytes.")
    try:
        params = z.get_frame_parameters(data)
    except z.ZstdError as exc:
        raise FormatError(f"{where}: not a zstd frame ({exc}). The packager wrote a broken entry; rebuild "
                          "the package.") from exc
    if params.content_size and params.content_size != size and params.content_size != 2**64 - 1:
        cls = SizeLimitError if params.content_size > size else IntegrityError
        raise cls(f"{where}: the zstd frame says it holds {params.content_size} bytes but the manifest declares "
                  f"{size}; refusing to decode it (decompression bomb or inconsistent package).")
    max_window = 1 << _window_log(size + (len(old) if old is not None else 0))
    if params.window_size > max_window:
        raise SizeLimitError(f"{where}: the zstd frame asks for a {params.window_size}-byte window, more than "
                             f"the {max_window} bytes its declared size needs (memory exhaustion attempt).")
    kwargs = {"max_window_size": max_window}
    if old is not None:
        kwargs["dict_data"] = z.ZstdCompressionDict(old, dict_type=z.DICT_TYPE_RAWCONTENT)
    chunks, total = [], 0
    try:
        with z.ZstdDecompressor(**kwargs).stream_reader(data, read_across_frames=False) as reader:
            while True:
                chunk = reader.read(min(1 << 20, size + 1 - total))
                if not chunk:
                    break
                total += len(chunk)
                if total > size:
                    raise SizeLimitError(f"{where}: decompresses to more than the declared {size} bytes "
                                         "(zstd bomb); refusing it.")
                chunks.append(chunk)
    except z.ZstdError as exc:
        raise FormatError(f"{where}: zstd decoding failed ({exc}); the entry is corrupt. Rebuild the "
                          "package.") from exc
    out = b"".join(chunks)
    if len(out) != size:
        raise IntegrityError(f"{where}: decodes to {len(out)} bytes, the manifest declares {size}.")
    return out


# ------------------------------------------------------------------------------------------ copy-ops delta
def safetensors_layout(data: bytes) -> tuple[int, dict[str, tuple[str, tuple, int, int]]] | None:
    """(end of header, {tensor: (dtype, shape, start, end)}) with absolute offsets, or None if not safetensors."""
    try:
        n, header, _ = parse_safetensors_header(data)
    except SafetensorsHeaderError:
        return None
    out = {}
    for name, info in header.items():
        try:
            start, end = (int(x) for x in info["data_offsets"])
            out[name] = (str(info["dtype"]), tuple(info["shape"]), 8 + n + start, 8 + n + end)
        except (KeyError, TypeError, ValueError):
            return None
        if not 8 + n <= out[name][2] <= out[name][3] <= len(data):
            return None
    return 8 + n, out


def plan_tensor_delta(old: bytes, new: bytes) -> bytes | None:
    """A copy-ops blob that rebuilds ``new`` from ``old`` copying every tensor whose name, dtype, shape and
    bytes are unchanged; None when either file is not safetensors."""
    lo, ln = safetensors_layout(old), safetensors_layout(new)
    if lo is None or ln is None:
        return None
    old_t, (hend, new_t) = lo[1], ln
    ops: list[list[int]] = []
    literals = bytearray()

    def emit(kind: int, off: int, length: int) -> None:
        if length <= 0:
            return
        if ops and ops[-1][0] == kind and ops[-1][1] + ops[-1][2] == off:
            ops[-1][2] += length
        else:
            ops.append([kind, off, length])

    def literal(start: int, end: int) -> None:
        emit(1, len(literals), end - start)
        literals.extend(new[start:end])

    literal(0, hend)
    pos = hend
    for name, (dtype, shape, start, end) in sorted(new_t.items(), key=lambda kv: kv[1][2]):
        if start < pos:  # overlapping tensors: not a layout we plan for
            return None
        literal(pos, start)
        o = old_t.get(name)
        if o and o[0] == dtype and o[1] == shape and o[3] - o[2] == end - start \
                and old[o[2]:o[3]] == new[start:end]:
            emit(0, o[2], end - start)
        else:
            literal(start, end)
        pos = end
    literal(pos, len(new))
    head = COPY_OPS_MAGIC + struct.pack(">QI", len(new), len(ops))
    return head + b"".join(_OP.pack(*op) for op in ops) + bytes(literals)


def apply_copy_ops(blob: bytes, old: bytes, size: int, where: str, limits: Limits) -> bytes:
    """Rebuild a file from a copy-ops blob and the previous file, checking every bound."""
    if len(blob) < len(COPY_OPS_MAGIC) + 12 or not blob.startswith(COPY_OPS_MAGIC):
        raise DeltaError(f"{where}: not a copy-ops delta (bad magic or truncated header).")
    new_size, nops = struct.unpack(">QI", blob[8:20])
    if new_size != size:
        raise DeltaError(f"{where}: the delta rebuilds {new_size} bytes but the manifest declares {size}.")
    if nops > limits.max_delta_ops:
        raise SizeLimitError(f"{where}: {nops} delta segments exceed the limit of {limits.max_delta_ops}.")
    lit_start = 20 + nops * _OP.size
    if lit_start > len(blob):
        raise DeltaError(f"{where}: the delta's segment table is truncated.")
    literals = memoryview(blob)[lit_start:]
    out = bytearray()
    for i in range(nops):
        kind, off, length = _OP.unpack_from(blob, 20 + i * _OP.size)
        src = old if kind == 0 else literals if kind == 1 else None
        if src is None or length == 0 or off + length > len(src) or len(out) + length > size:
            raise DeltaError(f"{where}: delta segment {i} (kind {kind}, offset {off}, length {length}) is out of "
                             "bounds for the installed file or the literal section; the delta does not apply.")
        out += src[off:off + length]
    if len(out) != size:
        raise DeltaError(f"{where}: the delta rebuilds {len(out)} bytes, the manifest declares {size}.")
    return bytes(out)
