"""The package container: a fixed binary framing, parsed with hard limits before anything is allocated.

    offset  size  field
    0       8     magic  b"\\x89ELPKG\\r\\n"  (the \\x89 and \\r\\n catch 7-bit and newline-mangling transfers)
    8       2     container version, u16 big-endian (= 1)
    10      8     signer key id hint (first 8 bytes of sha256(raw public key)); must equal the signed manifest's
    18      4     manifest length M, u32 big-endian (<= limits.max_manifest_bytes)
    22      M     manifest.json, UTF-8 JSON
    22+M    64    Ed25519 signature over exactly the M manifest bytes
    86+M    4     entry count E, u32 big-endian (<= limits.max_entries)
    then E entries, each:
            1     type: 0 = regular file. 1 = symlink, 2 = hard link, 3 = directory exist only to be refused
            2     name length N, u16 big-endian (<= 128)
            N     name, UTF-8, flat (no separators), see ``check_name``
            8     data length D, u64 big-endian (<= limits.max_entry_bytes and <= the bytes left in the file)
            D     data (zstd frame, or a delta; the manifest says which)
    end of file right after the last entry: trailing bytes are an error.

Nothing here is trusted: every field is either checked against the signed manifest afterwards (key id, names,
lengths, sha256 of data) or only bounds an allocation. The container layer knows nothing about JSON schemas.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from edge_lora.files import fsync_dir, write_bytes_atomic  # noqa: F401  (fsync_dir: install.py)
from edge_lora.ota.errors import FormatError, SizeLimitError, UnsafeEntryError

MAGIC = b"\x89ELPKG\r\n"
CONTAINER_VERSION = 1
SIGNATURE_BYTES = 64
KEY_ID_BYTES = 8
MAX_NAME_BYTES = 128
ENTRY_TYPES = {0: "regular file", 1: "symbolic link", 2: "hard link", 3: "directory"}
RESERVED_NAMES = {"manifest.json", "manifest.sig", "current", "base.json"}
# PEFT falls back to torch.load for these when no safetensors file is present: never ship or install one
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class Limits:
    """Hard limits a device enforces before reading or decoding anything. Defaults fit adapters of LLMs up to a
    few billion parameters at rank 64; a device with less storage should pass smaller ones."""

    max_package_bytes: int = 2 << 30
    max_manifest_bytes: int = 4 << 20
    max_entries: int = 64
    max_entry_bytes: int = 1 << 30     # per entry, stored and decoded
    max_total_bytes: int = 2 << 30     # all decoded payload files together
    max_delta_ops: int = 1 << 20       # segments in a copy-ops delta

    def to_dict(self) -> dict:
        return dict(self.__dict__)


DEFAULT_LIMITS = Limits()


@dataclass
class RawEntry:
    type: int
    name: str
    data: bytes


@dataclass
class RawContainer:
    path: str
    key_id_hint: str
    manifest_bytes: bytes
    signature: bytes
    entries: list[RawEntry]


ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
# what an adapter id must not be, as the name of a folder beside ROOT/base.json on any file system a device uses
ROOT_RESERVED = {"base.json"}
_WINDOWS_DEVICES = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?", re.IGNORECASE)


def check_adapter_id(aid: object, where: str) -> str:
    """An adapter id names a folder in the install root: a plain, portable name that is none of the root's own
    files (compared without case: some device file systems ignore it) and no Windows device name."""
    if not isinstance(aid, str) or not re.fullmatch(ID_PATTERN, aid):
        raise UnsafeEntryError(f"{where}: adapter_id {str(aid)[:80]!r} must match {ID_PATTERN} (it names a "
                               "folder in the install root).")
    if aid.lower() in ROOT_RESERVED or _WINDOWS_DEVICES.fullmatch(aid) or aid.endswith("."):
        raise UnsafeEntryError(f"{where}: adapter_id {aid!r} is reserved (the install root's own "
                               f"{', '.join(sorted(ROOT_RESERVED))}, a Windows device name, or a trailing '.'); "
                               "choose another id.")
    return aid


def check_name(name: object, where: str) -> str:
    """Payload and entry names are flat file names. Raise UnsafeEntryError naming what is wrong."""
    if not isinstance(name, str) or not name:
        raise UnsafeEntryError(f"{where}: entry name {name!r} is empty or not a string.")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeEntryError(f"{where}: entry name {name!r} is an absolute path; package entries are plain "
                               "file names, installed inside the version folder. Rebuild the package.")
    parts = re.split(r"[/\\]", name)
    if any(p in ("..", ".") for p in parts):
        raise UnsafeEntryError(f"{where}: entry name {name!r} has a '..' or '.' path component (path "
                               "traversal); refusing it. Rebuild the package from a clean adapter folder.")
    if len(parts) > 1:
        raise UnsafeEntryError(f"{where}: entry name {name!r} contains a path separator; entries are flat file "
                               "names. Rebuild the package.")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES or not _NAME_RE.fullmatch(name):
        raise UnsafeEntryError(f"{where}: entry name {name!r} is longer than {MAX_NAME_BYTES} bytes or uses "
                               "characters outside [A-Za-z0-9._+-] (or starts with one of '._+-').")
    if name in RESERVED_NAMES:
        raise UnsafeEntryError(f"{where}: entry name {name!r} is reserved for the installer's own files.")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeEntryError(f"{where}: entry {name!r} is a pickled checkpoint; loading one can run any code, "
                               "so packages never carry them. Re-save the adapter with safe_serialization=True.")
    return name


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = memoryview(data), 0, path

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise FormatError(f"{self.path}: truncated: {what} needs {n} bytes at offset {self.pos} but only "
                              f"{self.left()} remain. Download the package again.")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]


HEAD_BYTES = len(MAGIC) + 2 + KEY_ID_BYTES + 4   # magic, version, key id hint, manifest length


def _head(r: "_Reader", path: str, limits: Limits) -> tuple[str, bytes, bytes]:
    magic = r.take(len(MAGIC), "the magic number")
    if magic != MAGIC:
        raise FormatError(f"{path} is not an edge_lora OTA package (bad magic {magic!r}). Build one with "
                          "`python -m edge_lora package`.")
    version = r.uint(">H", "the container version")
    if version != CONTAINER_VERSION:
        raise FormatError(f"{path}: container version {version} is not supported (this reader knows "
                          f"{CONTAINER_VERSION}); update edge_lora on the device.")
    key_hint = r.take(KEY_ID_BYTES, "the signer key id").hex()
    mlen = r.uint(">I", "the manifest length")
    if mlen > limits.max_manifest_bytes:
        raise SizeLimitError(f"{path}: manifest of {mlen} bytes exceeds the limit of "
                             f"{limits.max_manifest_bytes} bytes.")
    manifest = r.take(mlen, "the manifest")
    signature = r.take(SIGNATURE_BYTES, "the signature")
    return key_hint, manifest, signature


def read_container(source: str | os.PathLike | bytes, limits: Limits) -> RawContainer:
    """Parse the framing. ``source`` is a path or the package bytes."""
    if isinstance(source, (bytes, bytearray)):
        path, data = "<package bytes>", bytes(source)
        if len(data) > limits.max_package_bytes:
            raise SizeLimitError(f"{path}: {len(data)} bytes exceeds the package limit of "
                                 f"{limits.max_package_bytes} bytes.")
    else:
        path = str(source)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > limits.max_package_bytes:
                    raise SizeLimitError(f"{path}: {size} bytes exceeds the package limit of "
                                         f"{limits.max_package_bytes} bytes; refusing to read it.")
                data = f.read(limits.max_package_bytes + 1)
        except OSError as exc:
            raise FormatError(f"Cannot read package {path}: {exc.strerror or exc}.") from exc
        if len(data) > limits.max_package_bytes:
            raise SizeLimitError(f"{path} grew past the package limit while being read.")
    r = _Reader(data, path)
    key_hint, manifest, signature = _head(r, path, limits)
    count = r.uint(">I", "the entry count")
    if count > limits.max_entries:
        raise SizeLimitError(f"{path}: {count} entries exceeds the limit of {limits.max_entries}.")
    entries: list[RawEntry] = []
    seen: set[str] = set()
    for i in range(count):
        etype = r.uint(">B", f"entry {i}'s type")
        nlen = r.uint(">H", f"entry {i}'s name length")
        if nlen == 0 or nlen > MAX_NAME_BYTES:
            raise UnsafeEntryError(f"{path}: entry {i} has a name of {nlen} bytes; names are 1 to "
                                   f"{MAX_NAME_BYTES} bytes.")
        raw_name = r.take(nlen, f"entry {i}'s name")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnsafeEntryError(f"{path}: entry {i}'s name {raw_name!r} is not UTF-8.") from exc
        check_name(name, f"{path}: entry {i}")
        if etype != 0:
            kind = ENTRY_TYPES.get(etype, f"unknown type {etype}")
            raise UnsafeEntryError(f"{path}: entry {name!r} is a {kind}, not a regular file; packages carry "
                                   "regular files only (links could point outside the install root).")
        if name in seen:
            raise UnsafeEntryError(f"{path}: duplicate entry {name!r}; each file appears once.")
        seen.add(name)
        dlen = r.uint(">Q", f"entry {name!r}'s length")
        if dlen > limits.max_entry_bytes:
            raise SizeLimitError(f"{path}: entry {name!r} holds {dlen} bytes, over the per-entry limit of "
                                 f"{limits.max_entry_bytes} bytes.")
        entries.append(RawEntry(etype, name, r.take(dlen, f"entry {name!r}'s data")))
    if r.left():
        raise FormatError(f"{path}: {r.left()} unexpected bytes after the last entry (a package ends with its "
                          "last entry). The file was appended to or is not a package.")
    return RawContainer(path, key_hint, manifest, signature, entries)


def read_head(source: str | os.PathLike | bytes, limits: Limits) -> tuple[str, str, bytes, bytes]:
    """(path, key id hint, manifest bytes, signature): only the framing's head, so the signature can be checked
    before anything proportional to the file is read (an unsigned 2 GB file costs a few KB)."""
    if isinstance(source, (bytes, bytearray)):
        path, data = "<package bytes>", bytes(source[:HEAD_BYTES + limits.max_manifest_bytes + SIGNATURE_BYTES])
    else:
        path = str(source)
        try:
            with open(path, "rb") as f:
                data = f.read(HEAD_BYTES)
                if len(data) == HEAD_BYTES and data[:len(MAGIC)] == MAGIC:
                    mlen = struct.unpack(">I", data[HEAD_BYTES - 4:])[0]
                    data += f.read(min(mlen, limits.max_manifest_bytes + 1) + SIGNATURE_BYTES)
        except OSError as exc:
            raise FormatError(f"Cannot read package {path}: {exc.strerror or exc}.") from exc
    return (path, *_head(_Reader(data, path), path, limits))


def pack_container(manifest_bytes: bytes, signature: bytes, key_id_hex: str,
                   entries: list[tuple[str, bytes] | tuple[str, bytes, int]]) -> bytes:
    """The package bytes. Entries are (name, data) or (name, data, type); no checks (tests build bad ones)."""
    out = [MAGIC, struct.pack(">H", CONTAINER_VERSION), bytes.fromhex(key_id_hex)[:KEY_ID_BYTES].ljust(8, b"\0"),
           struct.pack(">I", len(manifest_bytes)), manifest_bytes, signature, struct.pack(">I", len(entries))]
    for e in entries:
        name, data = e[0], e[1]
        etype = e[2] if len(e) > 2 else 0
        raw = name.encode("utf-8")
        out += [struct.pack(">BH", etype, len(raw)), raw, struct.pack(">Q", len(data)), data]
    return b"".join(out)


# The atomic writers live in edge_lora.files (stdlib only, the one place); importable from here for ota callers.
write_atomic = write_bytes_atomic
