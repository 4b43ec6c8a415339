"""sparsesync: exact, near-entropy sparse weight updates for RL weight synchronisation.

Codec:    Encoder, Decoder, Update, UpdateStats, ApplyStats, state_digest
Sessions: Sender (trainer side, fan-out), Receiver (inference side), PushStats, PeerResult
Trainer:  sparsesync.trainer.wrap / SparsePusher / checkpoint_state (checkpoint coordinates, tied once, FSDP2)
Errors:   SparseSyncError and its subclasses; every refusal is one of them, and nothing changes when one is raised.

Importing this package never initialises CUDA, NCCL, vLLM or SGLang; those load lazily when used.
"""
from .codec import ApplyStats, Decoder, Encoder, Update, UpdateStats
from .digest import state_digest
from .kernels import build_info
from .errors import (BaseMismatch, CorruptPayload, InvalidArgument, InvalidType, LayoutMismatch, PushFailed,
                     RollbackRefused, SparseSyncError, VersionConflict, VersionMismatch)
from .session import PeerResult, PushStats, Receiver, Sender, probe
from . import trainer

__version__ = "0.1.0"

__all__ = ["Encoder", "Decoder", "Update", "UpdateStats", "ApplyStats", "state_digest",
           "Sender", "Receiver", "probe", "build_info", "PushStats", "PeerResult", "trainer",
           "SparseSyncError", "InvalidArgument", "InvalidType", "CorruptPayload", "VersionMismatch", "BaseMismatch",
           "RollbackRefused", "VersionConflict", "LayoutMismatch", "PushFailed", "__version__"]
