"""safetensors files: reading one file or a sharded set, and writing a tree as one file.

The format (as the ``safetensors`` package writes it)::

    u64 little-endian N | N bytes of UTF-8 JSON (space-padded) | data

The header maps each tensor's name to ``{"dtype", "shape", "data_offsets": [b, e]}``, with
offsets relative to the first byte after the header, and ``"__metadata__"`` to a map of
strings. Data is C-order and little-endian. Names are flat and by convention dotted
(``model.layers.0.mlp.weight``); here the dots separate path names
(``model/layers/0/mlp/weight``), so a target's list indices match digit names. A large
model comes as several files named by ``model.safetensors.index.json``
(``{"weight_map": {name: file}}``), in the same folder.

The header is untrusted: its size is bounded, names appear once, dtypes are known, every
tensor's byte count agrees with its shape and lies inside the file, and no two overlap.
A tensor is read as byte ranges (:mod:`.safetensors_read`): for a sharded target or a region
(:func:`pytree_ckpt.read_blocks`), each region's bytes, not the whole tensor's.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import stat
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from .. import _graph, _leaves, _source, _storage
from .._errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    PathCollisionError,
    UnsupportedLeafError,
)
from .._format import LeafRecord, Storage
from . import safetensors_read

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the reference reader's bound

# safetensors dtype -> NumPy / ml_dtypes name (_leaves.DTYPES). The sub-byte float types
# (F4, F6_*) are packed and not read.
DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}
_NAMES = {v: k for k, v in DTYPES.items()}


def is_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes look like a safetensors header."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2


def path_of(name: str) -> str:
    """The checkpoint path of a tensor name: its dots separate names."""
    path = ""
    for part in name.split("."):
        path = _graph.child_path(path, part)
    return path


def open_file(f: _source.File) -> _source.Source:
    """The safetensors file ``f`` as a :class:`_source.Source`."""
    metadata, entries = _header(f, 0)
    return _make_source(f.url, [f], entries, metadata)


def open_index(index: _source.File) -> _source.Source:
    """A sharded set named by its ``model.safetensors.index.json`` as a Source."""
    weight_map, metadata = _index(index)
    names = sorted(set(weight_map.values()))
    files = [_source.sibling(index, name) for name in names]
    entries, file_meta = [], {}
    for number, f in enumerate(files):
        meta, found = _header(f, number)
        file_meta.update(meta)
        listed = {n for n, file in weight_map.items() if file == names[number]}
        missing = listed - {e[0] for e in found}
        if missing:
            raise CorruptCheckpointError(
                f"{index.url}: entry {sorted(missing)[0]!r:.200} is not in {f.url}, where "
                "the index says it is")
        entries += found
    return _make_source(index.url, files, entries, {**file_meta, **metadata})


def _make_source(url: str, files: list[_source.File], entries: list[tuple[str, LeafRecord]],
                 metadata: Mapping[str, Any]) -> _source.Source:
    names: dict[str, str] = {}
    for name, rec in entries:
        if rec.path in names:
            raise CorruptCheckpointError(
                f"{url}: entries {names[rec.path]!r:.100} and {name!r:.100} name one path "
                f"{rec.path!r:.100}")
        names[rec.path] = name
    leaves = _source.records(url, (rec for _name, rec in entries))
    nodes = _source.nodes_for(leaves)
    return _source.Source(
        format=_source.SAFETENSORS, url=url, version=0, leaves=leaves, nodes=nodes,
        tree_nodes=_source.checked_nodes(url, nodes, leaves),
        read=lambda jobs, share: safetensors_read.read(files, jobs, share),
        writer={"library": "safetensors", "files": len(files), "metadata": dict(metadata)})


def _index(f: _source.File) -> tuple[dict[str, str], dict[str, Any]]:
    data = _source.read_file(f)
    if data is None:
        raise CorruptCheckpointError(f"{f.url}: cannot read the index file")
    if len(data) > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"{f.url}: index file of {len(data)} bytes is too large")
    doc = _json(f.url, data)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not (isinstance(weight_map, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise CorruptCheckpointError(f"{f.url}: no 'weight_map' of names to file names")
    for name, file in weight_map.items():
        if not file or "/" in file or "\\" in file or file in (".", ".."):
            raise CorruptCheckpointError(
                f"{f.url}: entry {name!r:.200}: file {file!r:.100} is not a file name in the "
                "index's folder")
    metadata = doc.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else {}


def _json(url: str, text: bytes) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise CorruptCheckpointError(f"{url}: entry {twice!r:.200} appears twice")
        return out

    _source.check_json_cost(url, text)
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=no_duplicates)
    except CorruptCheckpointError:
        raise
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{url}: malformed JSON header ({e!s:.200})") from None


def _header(f: _source.File, number: int) -> tuple[dict[str, Any], list[tuple[str, LeafRecord]]]:
    """The file's ``__metadata__`` and its tensors as (name, record), checked."""
    n = int.from_bytes(_source.read_range(f, 0, 8, "header length"), "little")
    if n > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"{f.url}: header of {n} bytes is larger than {MAX_HEADER_BYTES} (not a "
            "safetensors file, or a damaged one)")
    header = _json(f.url, _source.read_range(f, 8, 8 + n, "header"))
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{f.url}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CorruptCheckpointError(f"{f.url}: __metadata__ must map strings to strings")
    entries = [(name, _record(f.url, name, spec, 8 + n, number))
               for name, spec in header.items()]
    spans = sorted((rec.storage.offset, rec.storage.offset + rec.storage.nbytes, name)
                   for name, rec in entries if rec.storage.nbytes)
    for (_b0, e0, first), (b1, _e1, second) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CorruptCheckpointError(
                f"{f.url}: entries {first!r:.100} and {second!r:.100} overlap in the file")
    if spans:  # the last byte any tensor needs must exist
        end, name = spans[-1][1], spans[-1][2]
        _source.read_range(f, end - 1, end, f"entry {name!r:.200}")
    return metadata, entries


def _record(url: str, name: str, spec: Any, base: int, number: int) -> LeafRecord:
    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{url}: entry {name!r:.200}: {what}")

    if not isinstance(spec, dict):
        raise bad("not a tensor record")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise bad(f"unknown or unsupported dtype {str(dtype)!r:.40} (read: "
                  f"{', '.join(DTYPES)})")
    if not isinstance(shape, list):
        raise bad(f"bad shape {str(shape):.100}")
    _source.check_shape(url, name, shape, _leaves.DTYPES[DTYPES[dtype]].itemsize)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            type(x) is int and 0 <= x < 1 << 62 for x in offsets) and offsets[0] <= offsets[1]):
        raise bad(f"bad data_offsets {str(offsets):.100}")
    nbytes = math.prod(shape) * _leaves.DTYPES[DTYPES[dtype]].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"{offsets[1] - offsets[0]} bytes for shape {shape} of {dtype} "
                  f"({nbytes} bytes)")
    return LeafRecord(path_of(name), _leaves.NUMPY, DTYPES[dtype], tuple(shape), None,
                      Storage("s", index=number, offset=base + offsets[0], nbytes=nbytes), None)


# -- writing -------------------------------------------------------------------------------


def save_safetensors(tree: Any, path: str | os.PathLike | dict, *,
                     metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> str:
    """Writes the arrays of ``tree`` as one safetensors file, for PyTorch and Hugging Face.

    Each leaf's path becomes its tensor name with ``.`` between names
    (``params/dense/kernel`` is ``params.dense.kernel``), which is how :func:`restore` reads
    such a file back. Values are written as they are (no transposes): a Flax ``Dense`` kernel
    is ``(in, out)``, where a PyTorch ``Linear`` weight is ``(out, in)``.

    **Arguments:**

    - ``tree``: a pytree of arrays (``jax.Array`` whose shards this process holds in full,
      NumPy arrays and scalars), e.g. a checkpoint's ``params`` restored with ``at=``.
    - ``path``: the file to write (a local path, ``file://``, ``memory://``, ``gs://``,
      ``s3://``), replaced in one step. A local file is streamed, one leaf's bytes at a
      time, into ``path.__lock`` and renamed; an object store takes the file as one value.
    - ``metadata``: strings to store in the header's ``__metadata__``.
    - ``overwrite``: replace an existing file.

    **Returns:** the file's path, as :func:`save` returns it.

    **Raises:** :class:`UnsupportedLeafError` for a leaf that is not an array, a PRNG key,
    a dtype safetensors has no name for (int4, ...) or a ``jax.Array`` not held in full here;
    :class:`PathCollisionError` when two paths give one name (``{"a.b": x, "a": {"b": y}}``)
    or the tree is a single array (a tensor needs a name); :class:`CheckpointExistsError` if
    the file exists and ``overwrite`` is False; :class:`NotACheckpointError` for a symbolic
    link, FIFO or folder at ``path.__lock`` (nothing is written through it); ``TypeError``
    for metadata that is not strings.

    Example::

        >>> params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
        >>> pc.save_safetensors(params, "memory://doc/model.safetensors")
        'memory://doc/model.safetensors'
        >>> restored, status = pc.restore("memory://doc/model.safetensors", params)
        >>> status.matched
        ('dense/bias', 'dense/kernel')
    """
    if metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    loc = _storage.location(path)
    f = _source.file_at(loc)
    if f is None:
        raise ValueError(f"{loc.url}: a safetensors file needs a file name")
    flat = _graph.flatten(tree, treedef=False)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for leaf_path, leaf in zip(flat.paths, flat.leaves, strict=True):
        name = ".".join(_graph.split_path(leaf_path))
        if not leaf_path:
            raise PathCollisionError(
                "a safetensors tensor needs a name: pass a dict of arrays, not a single array")
        if name in header:
            raise PathCollisionError(
                f"two leaves both give the tensor name {name!r} (the second is "
                f"{leaf_path!r}); rename one of them")
        dtype, shape = _tensor(leaf_path, leaf)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype.name], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the package writes
    head = len(text).to_bytes(8, "little") + text
    # Each leaf's bytes as a host array when written, one at a time.
    data = (_host_array(p, leaf).reshape(-1).view(np.uint8)
            for p, leaf in zip(flat.paths, flat.leaves, strict=True))
    if f.local is not None:
        _write_local(f.local, head, data, overwrite)
        return loc.url
    if not overwrite and f.kv.read(f.key, byte_range=slice(0, 0)).result().state == "value":
        raise CheckpointExistsError(f"{f.url}: the file exists (pass overwrite=True to replace "
                                    "it)")
    whole = bytearray(len(head) + offset)  # a store takes one value: filled leaf by leaf
    view = memoryview(whole)
    view[:len(head)] = head
    at = len(head)
    for piece in data:
        view[at:at + len(piece)] = piece.data  # 1-D uint8: one byte per element
        at += len(piece)
    view.release()
    f.kv.write(f.key, whole).result()  # pyright: ignore[reportArgumentType]  # takes a bytearray
    return loc.url


def _write_local(path: str, head: bytes, data: Iterator[np.ndarray], overwrite: bool) -> None:
    """Writes ``head`` and then each of ``data`` to the local file ``path``, streamed, in one
    atomic step: into ``path.__lock`` and renamed over ``path``, as TensorStore's file
    driver writes (and with its lock: a concurrent writer of either kind waits).

    A symbolic link, FIFO or anything but a file at ``path.__lock`` is refused
    (:class:`NotACheckpointError` naming it), never written through; a stale one a killed
    writer left is truncated first (a shorter new file would otherwise keep its tail)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not overwrite and os.path.exists(path):
        raise CheckpointExistsError(f"{path}: the file exists (pass overwrite=True to replace "
                                    "it)")
    temp = path + ".__lock"
    fd = _open_temp(temp)
    try:
        os.ftruncate(fd, 0)
        with os.fdopen(os.dup(fd), "wb", buffering=0) as out:
            out.write(head)
            for piece in data:
                view = piece.data  # 1-D uint8: a write's count of bytes is a count of elements
                while view:
                    view = view[out.write(view):]
        os.fsync(fd)
        os.rename(temp, path)
    except BaseException:
        if os.path.exists(temp) and os.stat(temp).st_ino == os.fstat(fd).st_ino:
            os.unlink(temp)
        raise
    finally:
        os.close(fd)  # releases the lock
    _storage.fsync_dir(os.path.dirname(path) or ".")


def _open_temp(temp: str) -> int:
    """The temporary file ``temp`` opened for writing and locked (fcntl, as TensorStore
    locks it), once it is still the temporary file: a live writer renames it away before
    it unlocks."""
    for _ in range(100):
        try:  # O_NONBLOCK: a FIFO planted there must not block the open
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o644)
        except OSError as e:  # ELOOP: a link; ENXIO: a FIFO nobody reads; EISDIR
            raise _storage.link_error(temp, e) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _storage.link_error(temp)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            if os.stat(temp).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # renamed away by the writer that held the lock: open the new one
    raise OSError(f"{temp}: kept being replaced by other writers")


def _tensor(path: str, leaf: Any) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape ``leaf`` is written with (no copy of its data), or
    UnsupportedLeafError: as :func:`_host_array` checks."""
    if isinstance(leaf, jax.Array | np.ndarray | np.generic):
        _check_leaf(path, leaf)
        dtype = np.dtype(leaf.dtype)
        if dtype.name not in _NAMES:
            raise UnsupportedLeafError(
                f"leaf {path!r} has dtype {dtype.name}, which safetensors cannot name")
        return dtype, tuple(int(d) for d in np.shape(leaf))
    arr = _host_array(path, leaf)
    return arr.dtype, arr.shape


def _host_array(path: str, leaf: Any) -> np.ndarray:
    """``leaf`` as a C-contiguous little-endian NumPy array, or UnsupportedLeafError."""
    _check_leaf(path, leaf)
    arr = np.asarray(leaf, order="C")  # (np.ascontiguousarray makes a 0-d array 1-d)
    if arr.dtype.name not in _NAMES:
        raise UnsupportedLeafError(
            f"leaf {path!r} has dtype {arr.dtype.name}, which safetensors cannot name")
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False)


def _check_leaf(path: str, leaf: Any) -> None:
    if isinstance(leaf, jax.Array):
        if _leaves.is_prng_key(leaf):
            raise UnsupportedLeafError(
                f"leaf {path!r} is a PRNG key; safetensors holds plain tensors (save "
                "jax.random.key_data(key) instead)")
        if not leaf.is_fully_addressable:
            raise UnsupportedLeafError(
                f"leaf {path!r} is sharded over several processes; gather it first "
                "(jax.experimental.multihost_utils.process_allgather)")
    elif not isinstance(leaf, (np.ndarray, np.generic)):
        raise UnsupportedLeafError(
            f"leaf {path!r} has type {type(leaf).__module__}.{type(leaf).__qualname__}; "
            "safetensors holds arrays only")
