"""Every error pytree_ckpt raises.

Each one derives from :class:`CheckpointError` and from the built-in that fits, so callers can
catch either ``pc.CheckpointError`` or the usual ``FileNotFoundError`` / ``ValueError``::

    CheckpointError
    ├── CheckpointNotFoundError      (FileNotFoundError)  nothing at the path
    ├── IncompleteCheckpointError    (FileNotFoundError)  data but no commit file: a save never finished
    ├── CheckpointExistsError        (FileExistsError)    a checkpoint is there and overwrite=False
    ├── NotACheckpointError          (FileExistsError)    the path holds something that is not ours
    ├── CorruptCheckpointError       (ValueError)         bad checksum or malformed commit file
    │   ├── FormatVersionError                            written by a format version we cannot read
    │   └── OverwrittenError                              overwritten or deleted while it was read
    ├── UnsupportedLeafError         (TypeError)          a leaf that cannot be saved exactly
    ├── PathCollisionError           (ValueError)         two leaves with one path, e.g. {1: a, "1": b}
    ├── PathNotFoundError            (KeyError)           ``at=`` names nothing in the checkpoint
    ├── RegionError                  (IndexError)         an index outside a leaf's shape
    ├── PartialRestoreError          (AssertionError)     a strict restore left target leaves unrestored
    ├── TransformError               (ValueError)         a restore's transform raised or did not fit
    ├── ShardingError                (ValueError)         a target's sharding names no devices here
    ├── StorageError                 (OSError)            the store could not be read or written
    ├── ConfigurationError           (ValueError)         a bad option, or a bad PYTREE_CKPT_* variable
    ├── SaveError                    (RuntimeError)       a write failed, here or on another process
    │   └── DistributedError                              the processes of a job could not agree
    └── LockedError                  (RuntimeError)       another CheckpointManager holds the directory
"""

from __future__ import annotations

from typing import Any


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
    """A path given to ``restore(at=...)`` names nothing in the checkpoint, or one given to
    :func:`read_blocks` names no leaf."""

    def __str__(self) -> str:
        # KeyError's str() would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class RegionError(CheckpointError, IndexError):
    """An ``index`` given to :func:`read_blocks` is not a region of the leaf: it reaches
    outside the leaf's shape, has a step, or is not made of slices."""


class PartialRestoreError(CheckpointError, AssertionError):
    """A strict restore (:meth:`CheckpointManager.restore` by default, :func:`restore` with
    ``strict=True``) left target leaves unmatched or mismatched; the message names every one.

    The ``assert_*`` checks of :class:`RestoreStatus` raise it too. An ``AssertionError``
    because those are assertions: code that catches ``AssertionError`` keeps working.
    ``status`` holds the :class:`RestoreStatus` of the refused restore or of the check.

    Example::

        >>> _ = pc.save({"w": jnp.ones(3), "step": 1}, "memory://doc/partial")
        >>> try:
        ...     pc.restore("memory://doc/partial", {"w": jnp.zeros(4), "b": 0.0}, strict=True)
        ... except pc.PartialRestoreError as e:
        ...     print(e)
        memory://doc/partial: 2 target leaves were not restored and keep the target's value (...):
          unmatched, in the target but not in the checkpoint (1):
            b
          mismatched, found with another shape or an unsafe dtype (1):
            w: saved float32[3], target float32[4]
        To accept a partial restore, call restore without strict=True, and read the returned status.
    """

    def __init__(self, message: str, status: Any = None):
        super().__init__(message)
        self.status = status


class OverwrittenError(CorruptCheckpointError):
    """The checkpoint was overwritten or deleted while it was read: an overwrite deletes the
    generation its commit file named, so what was being read is gone. :func:`restore` starts
    again from the new commit file (and raises this only if that keeps happening);
    :func:`read_blocks` cannot, since the rest would be another save's."""


class TransformError(CheckpointError, ValueError):
    """A function given to ``restore(transform=...)`` raised, or returned something that
    does not fit its target leaf (another shape, a dtype restore would not convert to the
    target's, not an array); the message names the leaf's path."""


class ShardingError(CheckpointError, ValueError):
    """A target leaf's sharding cannot be placed on devices: it is on an abstract mesh
    (``jax.eval_shape`` under ``jax.set_mesh``) and no matching concrete mesh is set."""


class StorageError(CheckpointError, OSError):
    """The store could not be read or written: permission denied, a server error or a dropped
    connection still failing after retries (see :func:`configure`'s ``storage_deadline_s``),
    an unreachable endpoint. Nothing is known about the checkpoint itself: it is neither
    missing (:class:`CheckpointNotFoundError`) nor damaged (:class:`CorruptCheckpointError`);
    retrying later, or fixing credentials or permissions, is the way out. The message names
    the URL and the last fault; ``__cause__`` is TensorStore's error.

    Example (the common resume pattern, which must not restart training from scratch on a
    permissions or network fault)::

        try:
            state, _ = pc.restore("gs://my-bucket/run/7", target)
        except pc.StorageError:
            raise  # 403, or 503 after retries: nothing is known; fix and rerun
        except FileNotFoundError:
            state = init()  # really absent: start fresh
    """


class ConfigurationError(CheckpointError, ValueError):
    """An option given to :func:`configure`, or a ``PYTREE_CKPT_*`` environment variable
    read in its place, is not a valid value; the message names the option or variable.
    Raised when the value is used, never by ``import pytree_ckpt``."""


class SaveError(CheckpointError, RuntimeError):
    """Writing a checkpoint failed; nothing was committed and earlier checkpoints are intact.
    Where the store refused or kept failing a write (on this process: errors of other
    processes arrive as text), ``__cause__`` is the :class:`StorageError`."""


class DistributedError(SaveError):
    """In a multi-process job, the processes could not agree on a save: a barrier timed out,
    or another process failed or vanished. The message names the processes and what each
    reported; nothing was committed."""


class LockedError(CheckpointError, RuntimeError):
    """Another :class:`CheckpointManager` (here or in another live process) holds the directory."""
