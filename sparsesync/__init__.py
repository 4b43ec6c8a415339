"""sparsesync: exact, near-entropy sparse weight updates for RL weight synchronisation.

Importing this package never initialises CUDA, NCCL, vLLM or SGLang; those load lazily when used.
"""
from .codec import ApplyStats, Decoder, Encoder, Update, UpdateStats
from .digest import state_digest
from .session import PushStats, Receiver, Sender
from .errors import BaseMismatch, CorruptPayload, LayoutMismatch, SparseSyncError, VersionMismatch

__version__ = "0.1.0"

__all__ = ["Encoder", "Decoder", "Update", "UpdateStats", "Sender", "Receiver", "PushStats", "ApplyStats", "state_digest", "SparseSyncError",
           "CorruptPayload", "VersionMismatch", "BaseMismatch", "LayoutMismatch", "__version__"]
