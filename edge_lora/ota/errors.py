"""The OTA package errors. All are PackageErrors, so the CLI prints them and exits non-zero.

Each names the package file (or install root), the entry or key at fault, what is wrong and what to do. Each
check that defends against one attack raises its own class, so the tests can tell them apart.
"""

from edge_lora.errors import PackageError


class FormatError(PackageError):
    """The file is not a well-formed package: bad magic, truncated, trailing bytes, bad manifest schema."""


class SignatureError(PackageError):
    """The Ed25519 signature does not verify with the trusted public key (tampered, or another signer)."""


class IntegrityError(PackageError):
    """A size or sha256 in the signed manifest does not match the bytes (tampered or corrupt payload)."""


class UnsafeEntryError(PackageError):
    """An entry name or type could escape or confuse the install folder: absolute path, '..', separators,
    links, duplicates, reserved names."""


class SizeLimitError(PackageError):
    """An entry, the payload total, the manifest or the file exceeds a hard limit (zip/zstd bombs)."""


class BaseMismatchError(PackageError):
    """The package is bound to another base model than the one on the device."""


class VersionError(PackageError):
    """The version is not strictly greater than the highest installed one (rollback or replay)."""


class DeltaError(PackageError):
    """A delta package does not apply to the installed version."""


class ProbeError(PackageError):
    """The adapter, decoded and installed, does not reproduce the probe's expected outputs."""


class InstallRootError(PackageError):
    """The install root is missing pieces, holds links where folders belong, or its state file is broken."""
