"""The sparsesync exception family.

Every refusal sparsesync makes is a :class:`SparseSyncError`, so one ``except SparseSyncError`` clause is enough.
Refusals of a bad argument are :class:`InvalidArgument`, which is also a ``ValueError`` (and :class:`InvalidType` also
a ``TypeError``) so that code written against the standard exceptions keeps working.

Whenever one of these is raised by a decoder or a receiver, nothing was changed: the target holds the bytes it held
before the call.
"""
from __future__ import annotations


class SparseSyncError(Exception):
    """Base class of every sparsesync error."""


class InvalidArgument(SparseSyncError, ValueError):
    """An argument has a bad value (the message names it and the value). Nothing was changed."""


class InvalidType(SparseSyncError, TypeError):
    """An argument has a bad type (the message names it and the type). Nothing was changed."""


class CorruptPayload(SparseSyncError):
    """A bucket is damaged, truncated, reordered, duplicated, foreign or malformed. Nothing was changed."""


class VersionMismatch(SparseSyncError):
    """The update was made against another version than the one the decoder holds. Nothing was changed."""


class BaseMismatch(VersionMismatch):
    """The decoder claims the right version, but its bytes differ from the encoder's base. Nothing was changed."""


class RollbackRefused(VersionMismatch):
    """The update would move the receiver to a lower version than it holds; refused unless explicitly allowed
    (``Decoder(allow_rollback=True)`` / ``Receiver(allow_rollback=True)``, or ``Sender.push(..., allow_rollback=True)``).
    Nothing was changed."""


class VersionConflict(SparseSyncError):
    """A version identifies bytes: the caller tried to encode or push other bytes under a version that was already
    encoded or pushed, or a version older than the last one. The message names both versions. Nothing was sent."""


class LayoutMismatch(SparseSyncError):
    """The tensor set (names, dtypes, shapes) differs between encoder and decoder. Nothing was changed."""


class PushFailed(SparseSyncError):
    """A push left fewer peers at the new version than required (``quorum``; by default at least one). ``stats`` holds
    the :class:`~sparsesync.session.PushStats` with every peer's result and error."""

    def __init__(self, message: str, stats=None):
        super().__init__(message)
        self.stats = stats
