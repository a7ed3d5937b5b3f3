"""Every error pytree_ckpt raises.

Each one derives from :class:`CheckpointError` and from the built-in that fits, so callers can
catch either ``pc.CheckpointError`` or the usual ``FileNotFoundError`` / ``ValueError``::

    CheckpointError
    ├── CheckpointNotFoundError      (FileNotFoundError)  nothing at the path
    ├── IncompleteCheckpointError    (FileNotFoundError)  data but no commit file: a save never finished
    ├── CheckpointExistsError        (FileExistsError)    a checkpoint is there and overwrite=False
    ├── NotACheckpointError          (FileExistsError)    the path holds something that is not ours
    ├── CorruptCheckpointError       (ValueError)         bad checksum or malformed commit file
    │   └── FormatVersionError                            written by a format version we cannot read
    ├── UnsupportedLeafError         (TypeError)          a leaf that cannot be saved exactly
    ├── PathCollisionError           (ValueError)         two leaves with one path, e.g. {1: a, "1": b}
    ├── PathNotFoundError            (KeyError)           ``at=`` names nothing in the checkpoint
    ├── SaveError                    (RuntimeError)       a write failed, here or on another process
    └── LockedError                  (RuntimeError)       another CheckpointManager holds the directory
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by pytree_ckpt."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint exists at the given path."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """The path holds checkpoint data but no commit file: a save did not finish."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint is already at the path and ``overwrite`` is False."""


class NotACheckpointError(CheckpointError, FileExistsError):
    """The path exists and holds something that is not a pytree_ckpt checkpoint."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """Stored bytes do not match their checksum, or the commit file is malformed."""


class FormatVersionError(CorruptCheckpointError):
    """The commit file was written in a format version this library cannot read."""


class UnsupportedLeafError(CheckpointError, TypeError):
    """A leaf of the tree has a type that cannot be saved exactly (and pickle is never used),
    or the tree is nested too deep to flatten."""


class PathCollisionError(CheckpointError, ValueError):
    """Two leaves or nodes of the tree encode to the same path."""


class PathNotFoundError(CheckpointError, KeyError):
    """A path given to ``restore(at=...)`` names nothing in the checkpoint."""

    def __str__(self) -> str:
        # KeyError's str() would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class SaveError(CheckpointError, RuntimeError):
    """Writing a checkpoint failed; nothing was committed and earlier checkpoints are intact."""


class LockedError(CheckpointError, RuntimeError):
    """Another :class:`CheckpointManager` (here or in another live process) holds the directory."""
