"""pytree_ckpt: a functional checkpointer for JAX pytrees.

``save(tree, path)`` writes every leaf through TensorStore; ``restore(path, target)`` returns
a new tree and a pure :class:`RestoreStatus` saying what matched, what the target asked for
that the checkpoint lacks, what the checkpoint holds that nobody used, and what matched in
name but not in shape or dtype.
"""

import importlib.metadata as _metadata

try:
    __version__ = _metadata.version("pytree_ckpt")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

from ._async import SaveFuture as SaveFuture
from ._blocks import read_blocks as read_blocks
from ._clean import CleanReport as CleanReport
from ._clean import clean as clean
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointExistsError as CheckpointExistsError
from ._errors import CheckpointNotFoundError as CheckpointNotFoundError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import CorruptCheckpointError as CorruptCheckpointError
from ._errors import DistributedError as DistributedError
from ._errors import FormatVersionError as FormatVersionError
from ._errors import IncompleteCheckpointError as IncompleteCheckpointError
from ._errors import LockedError as LockedError
from ._errors import NotACheckpointError as NotACheckpointError
from ._errors import OverwrittenError as OverwrittenError
from ._errors import PartialRestoreError as PartialRestoreError
from ._errors import PathCollisionError as PathCollisionError
from ._errors import PathNotFoundError as PathNotFoundError
from ._errors import RegionError as RegionError
from ._errors import SaveError as SaveError
from ._errors import ShardingError as ShardingError
from ._errors import StorageError as StorageError
from ._errors import TransformError as TransformError
from ._errors import UnsupportedLeafError as UnsupportedLeafError
from ._foreign.safetensors import save_safetensors as save_safetensors
from ._graph import join_path as join_path
from ._graph import split_path as split_path
from ._jit import save_in_jit as save_in_jit
from ._manager import CheckpointManager as CheckpointManager
from ._metadata import CheckpointMetadata as CheckpointMetadata
from ._metadata import LeafMetadata as LeafMetadata
from ._metadata import metadata as metadata
from ._options import configure as configure
from ._restore import restore as restore
from ._save import save as save
from ._save import save_async as save_async
from ._status import Cast as Cast
from ._status import Mismatch as Mismatch
from ._status import RestoreStatus as RestoreStatus
from ._steps import latest as latest
from ._verify import VerifyReport as VerifyReport
from ._verify import verify as verify

__all__ = [
    "Cast",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CleanReport",
    "CheckpointMetadata",
    "CheckpointNotFoundError",
    "ConfigurationError",
    "CorruptCheckpointError",
    "DistributedError",
    "FormatVersionError",
    "IncompleteCheckpointError",
    "LeafMetadata",
    "LockedError",
    "Mismatch",
    "NotACheckpointError",
    "OverwrittenError",
    "PartialRestoreError",
    "PathCollisionError",
    "PathNotFoundError",
    "RegionError",
    "RestoreStatus",
    "SaveError",
    "SaveFuture",
    "ShardingError",
    "StorageError",
    "TransformError",
    "UnsupportedLeafError",
    "VerifyReport",
    "clean",
    "configure",
    "join_path",
    "latest",
    "metadata",
    "read_blocks",
    "restore",
    "save",
    "save_async",
    "save_safetensors",
    "split_path",
    "verify",
    "save_in_jit",
]
