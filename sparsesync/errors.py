"""The sparsesync exception family. Every error a user can trigger through a payload or a state is one of these."""


class SparseSyncError(Exception):
    """Base class of every sparsesync error."""


class CorruptPayload(SparseSyncError):
    """A bucket is damaged, truncated, reordered, duplicated, foreign or malformed. Nothing was changed."""


class VersionMismatch(SparseSyncError):
    """The update was made against another version than the one the decoder holds. Nothing was changed."""


class BaseMismatch(VersionMismatch):
    """The decoder claims the right version, but its bytes differ from the encoder's base. Nothing was changed."""


class LayoutMismatch(SparseSyncError):
    """The tensor set (names, dtypes, shapes) differs between encoder and decoder. Nothing was changed."""
