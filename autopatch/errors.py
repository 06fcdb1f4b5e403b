"""Every error autopatch raises on purpose, each with a message that says what to do.

Example:
    >>> from autopatch.errors import AutopatchError
    >>> try:
    ...     import autopatch; autopatch.load_model("/no/such/dir")
    ... except AutopatchError as err:
    ...     print(type(err).__name__)
    ModelNotFoundError

All of them derive from :class:`AutopatchError`, so callers can catch one type.
Where a built-in type is the natural category (a missing file, a bad value),
the error also derives from it, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class AutopatchError(Exception):
    """Base class of every error raised deliberately by autopatch."""


class ModelNotFoundError(AutopatchError, OSError):
    """A model path does not exist, or a hub id cannot be fetched."""


class UnsupportedArchitectureError(AutopatchError, NotImplementedError):
    """autopatch cannot find the decoder blocks, final norm or unembedding."""


class PatchError(AutopatchError, ValueError):
    """A capture or patch request is inconsistent with the model or the batch."""


class ProfileError(AutopatchError, ValueError):
    """A patch profile is malformed or does not fit the model."""


class GateFileError(AutopatchError, ValueError):
    """A saved gate is corrupt, tampered with, of another version or another model."""


class ConfigError(AutopatchError, ValueError):
    """A command or function was asked for something inconsistent; the message says which option to change.

    Example: ``ConfigError("The gate never trains or tunes on a test split: drop 'twohop:test' from --train.")``.
    """


class ServerError(AutopatchError, RuntimeError):
    """The HTTP server could not start or serve; the message says what to check."""


class InputError(AutopatchError, TypeError):
    """An argument has the wrong type (e.g. a question that is not a string); the message names what is expected."""
