"""Ed25519 signing keys for OTA packages (``cryptography``).

``keygen`` writes ``ota_ed25519.key`` (PKCS#8 PEM, mode 0600, created exclusively so no other process can have
it open) and ``ota_ed25519.pub`` (SubjectPublicKeyInfo PEM) into a folder. A key id is the first 16 hex digits
of sha256 over the raw 32-byte public key; packages carry it so a wrong-key error can say which key signed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from edge_lora.errors import PackageError

PRIVATE_NAME = "ota_ed25519.key"
PUBLIC_NAME = "ota_ed25519.pub"


def _ed():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    return hashlib.sha256(raw_public(public_key)).hexdigest()[:16]


def keygen(out_dir: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """Write a fresh key pair into ``out_dir``; returns (private path, public path). Both files are written
    beside their targets first and renamed into place only when both are on disk, so a failure (a full disk, a
    folder in the way) leaves the old pair as it was."""
    from cryptography.hazmat.primitives import serialization

    out = Path(out_dir)
    priv_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    created = [p for p in (out, *out.parents) if not p.exists()]   # removed again if no pair gets written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PackageError(f"keygen --out {out}: cannot create the folder ({exc.strerror or exc}); pass a folder "
                           "you can write.") from exc
    for p in (priv_path, pub_path):
        if (p.exists() or p.is_symlink()) and not force:
            raise PackageError(f"{p} already exists; refusing to overwrite a signing key. Pick another --out "
                               "folder, or pass --force if you really mean to replace it (packages signed with "
                               "the old key will no longer verify against the new public key).")
        if p.is_dir() and not p.is_symlink():
            raise PackageError(f"{p} is a folder; keygen writes a key file there. Remove it or pick another --out.")
    key = _ed().Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    temps: list[Path] = []
    try:
        for path, data, mode in ((priv_path, pem, 0o600), (pub_path, pub, 0o644)):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
            temps.append(tmp)
            try:
                os.fchmod(fd, mode)  # the umask may have taken bits away; make the mode exact
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(temps[0], priv_path)
        os.replace(temps[1], pub_path)
        temps.clear()
    except OSError as exc:
        for t in temps:
            t.unlink(missing_ok=True)
        temps.clear()
        for folder in created:   # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise PackageError(f"keygen --out {out}: writing the key pair failed ({exc.strerror or exc}); the old "
                           "pair, if any, is unchanged.") from exc
    finally:   # also on KeyboardInterrupt: no private key left in a temporary file
        for t in temps:
            t.unlink(missing_ok=True)
    return priv_path, pub_path


def _read_key_file(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    if p.is_dir():
        name = PRIVATE_NAME if what == "private" else PUBLIC_NAME
        p = p / name
    try:
        st = p.stat()
    except OSError as exc:
        raise PackageError(f"Cannot read the {what} key {p}: {exc.strerror}. Create a pair with "
                           "`python -m edge_lora keygen --out DIR`.") from exc
    if not stat.S_ISREG(st.st_mode) or st.st_size > 16384:
        raise PackageError(f"{p} is not a key file (not a regular file of at most 16 KiB).")
    if what == "private" and os.name == "posix" and st.st_mode & 0o077:
        raise PackageError(f"The private key {p} is readable by other users (mode {oct(st.st_mode & 0o777)}). "
                           f"Run `chmod 600 {p}`, and consider the key leaked if others could log in.")
    return p.read_bytes()


def load_private_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives import serialization

    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{path} is not an unencrypted PEM private key ({exc}). Use the "
                           f"{PRIVATE_NAME} written by `python -m edge_lora keygen`.") from exc
    if not isinstance(key, _ed().Ed25519PrivateKey):
        raise PackageError(f"{path} holds a {type(key).__name__}; OTA packages are signed with Ed25519 keys "
                           "only. Make one with `python -m edge_lora keygen --out DIR`.")
    return key


# Ed25519 (RFC 8032 §5.1): the curve -x² + y² = 1 + d·x²·y² over GF(p)
_P = 2 ** 255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P


def _decode_point(raw: bytes) -> tuple[int, int] | None:
    """RFC 8032 §5.1.3 decoding; None for an encoding that is not a point (or a non-canonical y ≥ p)."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P == (-u) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    elif v * x * x % _P != u:
        return None
    if x == 0 and sign:
        return None
    return (_P - x if x & 1 != sign else x), y


def _double(pt: tuple[int, int]) -> tuple[int, int]:
    x, y = pt
    xx, yy, xy = x * x % _P, y * y % _P, x * y % _P
    dxy = _D * xx * yy % _P
    return (2 * xy * pow(1 + dxy, _P - 2, _P) % _P, (yy + xx) * pow(1 - dxy, _P - 2, _P) % _P)


def weak_public_key(raw: bytes) -> str | None:
    """Why a 32-byte Ed25519 public key must not be trusted, or None: not a canonical point, or a point of small
    order (8·A = identity), for which signatures can be forged without any private key."""
    pt = _decode_point(raw)
    if pt is None:
        return "it is not a canonical encoding of a curve point"
    for _ in range(3):
        pt = _double(pt)
    if pt == (0, 1):
        return "it is a point of small order (an all-zero or other degenerate key), for which anyone can forge a signature"
    return None


def load_public_key(path: str | os.PathLike):
    """A PEM public key, or a file holding exactly 32 raw bytes / 64 hex digits."""
    from cryptography.hazmat.primitives import serialization

    data = _read_key_file(path, "public")
    ed = _ed()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        elif len(data) == 32:
            key = ed.Ed25519PublicKey.from_public_bytes(data)
        else:
            key = ed.Ed25519PublicKey.from_public_bytes(bytes.fromhex(data.decode("ascii").strip()))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path} is not an Ed25519 public key (PEM, 32 raw bytes or 64 hex digits): "
                           f"{exc}. Use the {PUBLIC_NAME} written by keygen.") from exc
    if not isinstance(key, ed.Ed25519PublicKey):
        raise PackageError(f"{path} holds a {type(key).__name__}; the trusted key must be Ed25519.")
    weak = weak_public_key(raw_public(key))
    if weak:
        raise PackageError(f"{path} is refused as a trusted key: {weak}. Use the {PUBLIC_NAME} written by keygen.")
    return key
