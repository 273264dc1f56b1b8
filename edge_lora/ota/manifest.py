"""The signed manifest: its schema, strict parsing, and opening a package (signature, schema, entry hashes,
payload decoding with deltas). Nothing from the file is used before the signature over the manifest verifies,
and every entry is checked against the signed sizes and sha256 before it is decoded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from edge_lora.ota import codec
from edge_lora.ota.container import (
    DEFAULT_LIMITS,
    Limits,
    RawContainer,
    check_adapter_id,
    check_name,
    read_container,
    read_head,
)
from edge_lora.ota.errors import (
    DeltaError,
    FormatError,
    IntegrityError,
    SignatureError,
    SizeLimitError,
    UnsafeEntryError,
)

FORMAT = "edge-lora-ota"
FORMAT_VERSION = 1
ENCODINGS_FULL = {"zstd"}
ENCODINGS_DELTA = {"zstd", "zstd-patch", "copy-ops"}
MAX_VERSION = 2**53 - 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_TOP_KEYS = {"format", "format_version", "adapter_id", "version", "signer", "base", "requirements", "payload",
             "entries", "delta", "compression", "validation", "probes", "created_by"}


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def payload_digest(files: list[dict]) -> str:
    """sha256 over the canonical JSON of the payload file list (name, role, size, sha256 of every file)."""
    return hashlib.sha256(canonical_json(files)).hexdigest()


# ---------------------------------------------------------------------------------------------- schema
def _no_dupes(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r} in the manifest JSON")
        out[k] = v
    return out


def _bad_constant(name):
    raise FormatError(f"the manifest JSON holds {name}, which is not valid JSON")


def _get(d: dict, key: str, types, where: str, optional: bool = False):
    if key not in d:
        if optional:
            return None
        raise FormatError(f"{where}: required key {key!r} is missing.")
    v = d[key]
    if optional and v is None:
        return None
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise FormatError(f"{where}: key {key!r} must be {_tname(types)}, not a boolean.")
    if not isinstance(v, types):
        raise FormatError(f"{where}: key {key!r} must be {_tname(types)}, not {type(v).__name__}.")
    return v


def _tname(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({dict: "an object", list: "a list", str: "a string", int: "an integer",
                        float: "a number", bool: "a boolean"}.get(t, t.__name__) for t in types)


def _exact_keys(d: dict, allowed: set[str], where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise FormatError(f"{where}: unknown key(s) {sorted(extra)}; this reader knows {sorted(allowed)}. "
                          "A newer packager wrote it: update edge_lora on the device.")


def _size(d: dict, key: str, where: str, limit: int) -> int:
    v = _get(d, key, int, where)
    if v < 0:
        raise FormatError(f"{where}: {key} is negative ({v}).")
    if v > limit:
        raise SizeLimitError(f"{where}: {key} = {v} bytes exceeds the per-entry limit of {limit} bytes.")
    return v


def _hex(d: dict, key: str, where: str, pattern=_HEX64) -> str:
    v = _get(d, key, str, where)
    if not pattern.fullmatch(v):
        raise FormatError(f"{where}: {key} must be lowercase hex of the right length, got {v[:80]!r}.")
    return v


def parse_manifest(data: bytes, where: str, limits: Limits) -> dict:
    """Strict JSON (no duplicate keys, no NaN) and the schema every later step relies on."""
    try:
        m = json.loads(data.decode("utf-8"), object_pairs_hook=_no_dupes, parse_constant=_bad_constant)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: manifest is not valid UTF-8 JSON ({exc}).") from exc
    w = f"{where}: manifest"
    if not isinstance(m, dict):
        raise FormatError(f"{w} must be a JSON object.")
    if m.get("format") != FORMAT:
        raise FormatError(f"{w}: 'format' is {m.get('format')!r}, expected {FORMAT!r}.")
    fv = _get(m, "format_version", int, w)
    if fv != FORMAT_VERSION:
        raise FormatError(f"{w}: format_version {fv} is not supported (this reader knows {FORMAT_VERSION}); "
                          "update edge_lora on the device.")
    _exact_keys(m, _TOP_KEYS, w)
    check_adapter_id(_get(m, "adapter_id", str, w), w)
    version = _get(m, "version", int, w)
    if not 1 <= version <= MAX_VERSION:
        raise FormatError(f"{w}: version {version} must be an integer from 1 to {MAX_VERSION}.")
    _exact_keys(_get(m, "signer", dict, w), {"key_id"}, f"{w}.signer")
    _hex(m["signer"], "key_id", f"{w}.signer", _HEX16)
    _exact_keys(_get(m, "base", dict, w), {"content_hash", "name", "architecture"}, f"{w}.base")
    _hex(m["base"], "content_hash", f"{w}.base")
    for key in ("requirements", "compression", "validation"):
        _get(m, key, dict, w)

    payload = _get(m, "payload", dict, w)
    _exact_keys(payload, {"files", "total_bytes", "digest"}, f"{w}.payload")
    files = _get(payload, "files", list, f"{w}.payload")
    if not files or len(files) > limits.max_entries:
        raise FormatError(f"{w}.payload.files must list 1 to {limits.max_entries} files, not {len(files)}.")
    names, total = set(), 0
    for i, f in enumerate(files):
        fw = f"{w}.payload.files[{i}]"
        if not isinstance(f, dict):
            raise FormatError(f"{fw} must be an object.")
        _exact_keys(f, {"name", "role", "size", "sha256"}, fw)
        name = check_name(_get(f, "name", str, fw), fw)
        if name in names:
            raise UnsafeEntryError(f"{fw}: duplicate payload file name {name!r}.")
        names.add(name)
        if not re.fullmatch(r"[a-z0-9-]{1,32}", _get(f, "role", str, fw)):
            raise FormatError(f"{fw}: role must be a short lowercase word such as 'peft-weights'.")
        total += _size(f, "size", fw, limits.max_entry_bytes)
        _hex(f, "sha256", fw)
    if total > limits.max_total_bytes:
        raise SizeLimitError(f"{w}: the payload totals {total} bytes, over the limit of "
                             f"{limits.max_total_bytes} bytes.")
    if _get(payload, "total_bytes", int, f"{w}.payload") != total:
        raise FormatError(f"{w}.payload.total_bytes does not equal the sum of the file sizes ({total}).")
    if _hex(payload, "digest", f"{w}.payload") != payload_digest(files):
        raise IntegrityError(f"{w}.payload.digest does not match the payload file list.")

    delta = _get(m, "delta", dict, w, optional=True)
    unchanged: set[str] = set()
    if delta is not None:
        dw = f"{w}.delta"
        _exact_keys(delta, {"from_version", "from_payload_digest", "unchanged", "measured"}, dw)
        fv = _get(delta, "from_version", int, dw)
        if not 1 <= fv < version:
            raise DeltaError(f"{dw}: from_version {fv} must be at least 1 and below the package version {version}.")
        _hex(delta, "from_payload_digest", dw)
        for n in _get(delta, "unchanged", list, dw):
            if n not in names or n in unchanged:
                raise FormatError(f"{dw}.unchanged names {n!r}, which is not a payload file or is listed twice.")
            unchanged.add(n)
        _get(delta, "measured", dict, dw)

    entries = _get(m, "entries", list, w)
    if len(entries) > limits.max_entries:
        raise SizeLimitError(f"{w}: {len(entries)} entries exceed the limit of {limits.max_entries}.")
    allowed = ENCODINGS_DELTA if delta is not None else ENCODINGS_FULL
    seen: set[str] = set()
    by_name = {f["name"]: f for f in files}
    for i, e in enumerate(entries):
        ew = f"{w}.entries[{i}]"
        if not isinstance(e, dict):
            raise FormatError(f"{ew} must be an object.")
        _exact_keys(e, {"name", "encoding", "stored_size", "stored_sha256", "decoded_size"}, ew)
        name = check_name(_get(e, "name", str, ew), ew)
        if name in seen:
            raise UnsafeEntryError(f"{ew}: duplicate entry {name!r}.")
        seen.add(name)
        if name not in by_name or name in unchanged:
            raise FormatError(f"{ew}: entry {name!r} is not a payload file that travels in this package.")
        enc = _get(e, "encoding", str, ew)
        if enc not in allowed:
            raise FormatError(f"{ew}: encoding {enc!r} is not one of {sorted(allowed)} for a "
                              f"{'delta' if delta is not None else 'full'} package.")
        _size(e, "stored_size", ew, limits.max_entry_bytes)
        _hex(e, "stored_sha256", ew)
        dec = _size(e, "decoded_size", ew, limits.max_entry_bytes)
        if enc != "copy-ops" and dec != by_name[name]["size"]:
            raise FormatError(f"{ew}: decoded_size {dec} differs from the payload file's size "
                              f"{by_name[name]['size']}.")
    missing = names - seen - unchanged
    if missing:
        raise FormatError(f"{w}: payload file(s) {sorted(missing)} have no entry and are not unchanged.")
    probes = _get(m, "probes", list, w)
    for i, p in enumerate(probes):
        if not isinstance(p, dict) or not isinstance(p.get("kind"), str):
            raise FormatError(f"{w}.probes[{i}] must be an object with a string 'kind'.")
    return m


# ------------------------------------------------------------------------------------------- open/verify
@dataclass
class Package:
    path: str
    manifest: dict
    manifest_bytes: bytes
    signature: bytes
    stored: dict[str, bytes]     # entry name -> stored bytes, sha256-checked against the manifest

    @property
    def is_delta(self) -> bool:
        return self.manifest["delta"] is not None

    @property
    def files(self) -> list[dict]:
        return self.manifest["payload"]["files"]


def check_trusted_key(public_key, where: str) -> None:
    from edge_lora.ota.keys import raw_public, weak_public_key

    weak = weak_public_key(raw_public(public_key))
    if weak:   # a small-order key "verifies" signatures nobody made
        raise SignatureError(f"{where}: the trusted public key is refused: {weak}. Trust only the "
                             "ota_ed25519.pub that keygen wrote.")


def verify_signature(public_key, manifest_bytes: bytes, signature: bytes, where: str) -> None:
    from cryptography.exceptions import InvalidSignature

    check_trusted_key(public_key, where)
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature as exc:
        raise SignatureError(f"{where}: the Ed25519 signature does not match the manifest: the manifest or the "
                             "signature was altered after signing. Do not install it; fetch the package again "
                             "from the publisher.") from exc


def open_package(source, public_key, limits: Limits = DEFAULT_LIMITS) -> Package:
    """Framing, signature (against the trusted key), manifest schema, and each entry's size and sha256."""
    from edge_lora.ota.keys import key_id

    check_trusted_key(public_key, str(source))
    # authenticate the head first: nothing proportional to the file is read for an unsigned one
    where, hint, head_manifest, head_signature = read_head(source, limits)
    trusted = key_id(public_key)
    if hint != trusted:
        raise SignatureError(f"{where} is not signed by the trusted key: it names signer key {hint}, "
                             f"the trusted public key is {trusted}. Install only packages from your own "
                             "publisher, or pass that publisher's public key with --pubkey.")
    verify_signature(public_key, head_manifest, head_signature, where)
    raw: RawContainer = read_container(source, limits)
    if (raw.key_id_hint, raw.manifest_bytes, raw.signature) != (hint, head_manifest, head_signature):
        raise IntegrityError(f"{where} changed while it was being read; fetch it again and install once it is "
                             "complete.")
    m = parse_manifest(raw.manifest_bytes, where, limits)
    if m["signer"]["key_id"] != trusted:
        raise SignatureError(f"{where}: the manifest names signer {m['signer']['key_id']}, not the trusted key "
                             f"{trusted}.")
    expected = m["entries"]
    if [e.name for e in raw.entries] != [e["name"] for e in expected]:
        raise IntegrityError(f"{where}: the entries in the file ({[e.name for e in raw.entries]}) are not the "
                             f"ones the signed manifest lists ({[e['name'] for e in expected]}), in order.")
    stored = {}
    for e, spec in zip(raw.entries, expected):
        if len(e.data) != spec["stored_size"]:
            raise IntegrityError(f"{where}: entry {e.name!r} holds {len(e.data)} bytes; the signed manifest says "
                                 f"{spec['stored_size']}.")
        if codec.sha256(e.data) != spec["stored_sha256"]:
            raise IntegrityError(f"{where}: entry {e.name!r} fails its sha256 check: its bytes were altered or "
                                 "corrupted in transit. Fetch the package again.")
        stored[e.name] = e.data
    return Package(where, m, raw.manifest_bytes, raw.signature, stored)


def decode_payload(pkg: Package, old_file: Callable[[str], bytes] | None, limits: Limits = DEFAULT_LIMITS
                   ) -> dict[str, bytes]:
    """Every payload file's bytes, checked against its signed size and sha256. ``old_file(name)`` returns the
    installed previous version's file (already hash-checked) for deltas."""
    m, where = pkg.manifest, pkg.path
    entries = {e["name"]: e for e in m["entries"]}
    unchanged = set(m["delta"]["unchanged"]) if pkg.is_delta else set()
    if pkg.is_delta and old_file is None:
        raise DeltaError(f"{where} is a delta against version {m['delta']['from_version']}: it can only be "
                         "decoded next to that installed version (pass --root).")
    out: dict[str, bytes] = {}
    for f in pkg.files:
        name, fw = f["name"], f"{where}: {f['name']!r}"
        if name in unchanged:
            data = old_file(name)
        else:
            e = entries[name]
            enc, stored = e["encoding"], pkg.stored[name]
            if enc == "zstd":
                data = codec.zstd_decompress(stored, e["decoded_size"], fw, limits)
            elif enc == "zstd-patch":
                data = codec.zstd_decompress(stored, e["decoded_size"], fw, limits, old=old_file(name))
            else:  # copy-ops
                blob = codec.zstd_decompress(stored, e["decoded_size"], fw, limits)
                data = codec.apply_copy_ops(blob, old_file(name), f["size"], fw, limits)
        if len(data) != f["size"] or codec.sha256(data) != f["sha256"]:
            if name in unchanged or entries[name]["encoding"] != "zstd":  # rebuilt from the installed file
                raise DeltaError(f"{fw}: the delta rebuilds bytes whose size/sha256 differ from the signed "
                                 "manifest; it does not apply to the installed version. Install the full package.")
            raise IntegrityError(f"{fw} decodes to bytes whose size/sha256 differ from the signed manifest; the "
                                 "package is corrupt. Fetch it again.")
        out[name] = data
    return out
