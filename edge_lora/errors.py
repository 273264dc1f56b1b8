"""Every error a user can cause is an EdgeLoraError: it says what is wrong, where, and what to do.

The CLI turns these into a one-paragraph message and a non-zero exit; anything else is a bug.
"""


class EdgeLoraError(Exception):
    """Base class. Messages name the file, tensor or key at fault and the fix."""

    exit_code = 2


class AdapterError(EdgeLoraError):
    """The adapter folder or its tensors cannot be read as a PEFT LoRA adapter."""


class CompatibilityError(EdgeLoraError):
    """The adapter does not fit the base model it is paired with."""


class ModelError(EdgeLoraError):
    """A base model cannot be found, converted or loaded."""


class ExportMetaError(ModelError):
    """An export folder's edge_lora.json is missing, damaged, or of another format version: every command that
    reads one (validate, profile, package, the runtimes) raises this, with the same message."""


class ProfileError(EdgeLoraError):
    """An export profile has an unknown key or a bad value."""


class ConfigError(ProfileError):
    """A stage setting (from a profile, ``--set`` or a command-line flag) is out of range or of the wrong kind.
    Raised by the config dataclasses' ``__post_init__``; a setting to change, never a missed budget (exit 2)."""


class BudgetError(EdgeLoraError):
    """A compression, accuracy, latency or memory budget was missed."""

    exit_code = 3


class PackageError(EdgeLoraError):
    """An OTA package is malformed, tampered, or must not be installed."""
