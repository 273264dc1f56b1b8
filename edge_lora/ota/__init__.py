"""OTA adapter packages: signed, bound to their base model, delta-updatable, installed atomically.

Modules: ``container`` (binary framing and limits), ``manifest`` (schema, signature check, payload decoding),
``codec`` (zstd, zstd --patch-from style deltas, per-tensor copy-ops deltas), ``probe`` (factors / torch-logits /
ort on an installed hot-swap export), ``install`` (device side: verify, install, rollback, list), ``keys`` (Ed25519). The packager and the
CLI live in ``edge_lora.stages.package``. Format and threat model: docs/ota.md.

Importing this package does not import torch: the device side needs numpy, zstandard and cryptography only
(plus torch + peft for the optional torch-logits probe, onnxruntime for the ort probe).
"""

from edge_lora.ota.container import Limits  # noqa: F401
from edge_lora.ota.errors import (  # noqa: F401
                                  BaseMismatchError,
                                  DeltaError,
                                  FormatError,
                                  InstallRootError,
                                  IntegrityError,
                                  ProbeError,
                                  SignatureError,
                                  SizeLimitError,
                                  UnsafeEntryError,
                                  VersionError,
)
