"""Exceptions raised by the loader. All are ``ValueError`` subclasses and name the file and module."""

from __future__ import annotations


class LohakrError(ValueError):
    """Base class: a problem with an adapter file or with how it meets a model."""


class AdapterFormatError(LohakrError):
    """The file (or one module in it) is not a readable LoHa/LoKr/LoRA adapter."""


class AdapterShapeError(AdapterFormatError):
    """A module's factors do not fit together (missing partner key, rank or shape mismatch)."""


class BaseModelMismatchError(LohakrError):
    """The adapter was trained for another base model than the one it is applied to."""


class StrictLoadError(LohakrError):
    """``strict=True`` and some module of the file would not be applied."""


class BlockWeightsError(LohakrError):
    """A block-weight specification could not be parsed."""


def where(source: str | None, module: str | None = None) -> str:
    """Prefix for messages: ``"file.safetensors: module lora_unet_...: "``."""
    parts = []
    if source:
        parts.append(source)
    if module:
        parts.append(f"module {module}")
    return (": ".join(parts) + ": ") if parts else ""


class FusedAdapterError(LohakrError):
    """An adapter fused into the weights (``fuse=True``) cannot change strength or be unloaded."""


class FusedPartlyError(LohakrError, RuntimeError):
    """Fusing failed midway: some layers are changed and nothing was kept to undo them."""


class NonFiniteUpdateError(LohakrError):
    """Patching would write NaN or inf into a weight (factor overflow, alpha, scalar, strength)."""


class NothingToApplyError(LohakrError):
    """No module of the file applies to this model: the load would change nothing."""


class SourceFileChangedError(LohakrError):
    """A file that holds originals of patched weights changed on disk since they were loaded from it
    (docs/architecture.md#originals-in-files)."""
