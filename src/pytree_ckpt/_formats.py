"""Recognizing other tools' checkpoints by their files, and opening each with its reader.

Tried in order where no commit file of ours is found at a path:

- a folder holding ``model.safetensors.index.json``: a sharded safetensors set;
- the path as a file: ``*.json`` with a ``weight_map`` is such an index; a first 8 bytes
  that give a header length followed by ``{`` is a safetensors file.

Nothing is imported or executed from what a file says: the bytes choose a reader, and the
reader treats them as untrusted.
"""

from __future__ import annotations

from typing import Any

from . import _safetensors, _source, _storage

_HEAD_BYTES = 16


def detect(loc: _storage.Location, kv: Any) -> _source.Source | None:
    """The checkpoint at ``loc`` read by the reader its files call for, or None."""
    if _exists(kv, _safetensors.INDEX_FILE):
        f = _source.File(f"{loc.url.rstrip('/')}/{_safetensors.INDEX_FILE}", kv,
                         _safetensors.INDEX_FILE)
        return _safetensors.open_index(f)
    try:
        f = _source.file_at(loc)
        head = f.kv.read(f.key, byte_range=slice(0, _HEAD_BYTES)).result() if f else None
    except Exception:  # a folder, or a name the store cannot read as a file
        return None
    if head is None or head.state != "value":
        return None
    data = bytes(head.value)
    if f.key.endswith(".json"):
        return _safetensors.open_index(f)
    if _safetensors.is_safetensors(data):
        return _safetensors.open_file(f)
    return None


def _exists(kv: Any, key: str) -> bool:
    try:
        return kv.read(key, byte_range=slice(0, 0)).result().state == "value"
    except Exception:  # the location is a file, not a folder
        return False
