"""Recognizing other tools' checkpoints by their files, and opening each with its reader.

Tried in order where no commit file of ours is found at a path:

- a folder holding ``_METADATA``: an Orbax item folder; else ``_CHECKPOINT_METADATA``: an
  Orbax ``CheckpointManager`` step folder;
- a folder holding ``model.safetensors.index.json``: a sharded safetensors set;
- the path as a file: ``*.json`` with a ``weight_map`` is such an index; a first 8 bytes
  that give a header length followed by ``{`` is a safetensors file; a first byte that
  starts a msgpack map is a Flax msgpack file.

An Orbax ``CheckpointManager``'s directory of step folders is recognised by
orbax_run.py, for the manager, :func:`latest` and :func:`clean`.

Nothing is imported or executed from what a file says: the bytes choose a reader, and the
reader treats them as untrusted. Locally, no file that is a FIFO, device or socket is read
(:class:`NotACheckpointError`): TensorStore's read of one blocks until a writer comes.
"""

from __future__ import annotations

import os
from typing import Any

from .. import _source, _storage
from .._faults import is_storage_fault, storage_error
from . import flax_msgpack, orbax, safetensors

_HEAD_BYTES = 16


def detect(loc: _storage.Location, kv: Any) -> _source.Source | None:
    """The checkpoint at ``loc`` read by the reader its files call for, or None."""
    if _exists(loc, kv, orbax.ITEM_METADATA):
        return orbax.open_item(loc, kv)
    if _exists(loc, kv, orbax.STEP_METADATA):
        return orbax.open_step(loc, kv)
    if _exists(loc, kv, safetensors.INDEX_FILE):
        local = os.path.join(loc.local, safetensors.INDEX_FILE) if loc.local else None
        f = _source.File(f"{loc.url.rstrip('/')}/{safetensors.INDEX_FILE}", kv,
                         safetensors.INDEX_FILE, local, loc.remote)
        return safetensors.open_index(f)
    f = _file(loc)
    if f is None:
        return None
    head = _source.read_head(f, _HEAD_BYTES)
    if head is None:
        return None
    if f.key.endswith(".json"):
        return safetensors.open_index(f)
    if safetensors.is_safetensors(head):
        return safetensors.open_file(f)
    if flax_msgpack.is_msgpack_map(head):
        return flax_msgpack.open_file(f)
    return None


def _file(loc: _storage.Location) -> _source.File | None:
    try:
        return _source.file_at(loc)
    except Exception:  # a path no store can open as a file's folder
        return None


def _exists(loc: _storage.Location, kv: Any, key: str) -> bool:
    if loc.local is not None:
        _storage.check_regular(os.path.join(loc.local, key))
    try:
        return kv.read(key, byte_range=slice(0, 0)).result().state == "value"
    except Exception as e:
        if is_storage_fault(e):
            raise storage_error(_storage.kv_url(kv, key), e) from e
        return False  # the location is a file, not a folder
