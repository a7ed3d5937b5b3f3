"""The commit file: its encoding, written down here beside the code (decoding it: _decode).

Layout of a checkpoint at ``<path>``::

    <path>/checkpoint.msgpack       the commit file, written LAST: its presence = committed
    <path>/d-<32 hex>/a/<id>/       one zarr3 array per large leaf (chunks with crc32c)
    <path>/d-<32 hex>/p/<proc>/<k>  packed small leaves: blobs of a few MiB per writing process

Storage keys are ids assigned by the writer (``a/17``, ``p/0/3``); no user string ever becomes
a storage key, so a dict key such as ``../../etc`` cannot leave the checkpoint directory. The
data lives in a generation folder ``d-<hex>`` named by the commit file, so an overwrite
writes a new generation next to the old one and replaces the commit file in one atomic
step; the old generation is deleted only after that.

The commit file is msgpack. Its outer value is a 4-element array::

    ["pytree_ckpt", FORMAT_VERSION, crc32(body), body]

where ``body`` (bytes) is itself msgpack of a map. Leaves are stored **by column**: one
entry per field, holding that field for every leaf, numbers as little-endian binary
(``u1`` uint8, ``u4`` uint32, ``i8`` int64). A 10,000-leaf commit file then decodes into
a few dozen objects instead of 100,000, and is validated with NumPy, not leaf by leaf.
With ``n`` leaves in save order::

    "version":   FORMAT_VERSION                 the outer version again, under the checksum
    "data":      "d-<hex>"                      generation folder holding arrays and blobs
    "nodes":     [[path, kind, type_name], ...] inner nodes, root first (_graph.NODE_KINDS)
    "paths":     [str] * n                      leaf paths (escaped, see _graph)
    "origin":    u1[n]                          index into ORIGINS: jax numpy npscalar prngkey py
    "dtype":     u1[n]                          index into "dtypes"
    "dtypes":    [str]                          dtype names (_leaves.DTYPES), or Python leaf
                                                types (_leaves.PY_TYPES) for py leaves
    "rank":      u1[n]
    "shape":     i8[sum(rank)]                  every leaf's dimensions, one after another
    "storage":   u1[n]                          0 value, 1 zarr array, 2 packed
    "values":    [value] per storage-0 leaf     a Python leaf's value (_leaves.encode_py):
                                                an int past 64 bits as bytes (two's
                                                complement, little-endian; from version 5)
                                                or decimal text (before), complex as a pair
    "array":     u4[z]  per storage-1 leaf      its zarr array a/<array>
    "chunks":    i8[sum(rank of those leaves)]  their chunk shapes, one after another
    "stored":    u1[z]                          index into "dtypes": the dtype stored
    "blob":      u4[p]  per storage-2 leaf      index into "blobs"
    "offset":    i8[p]                          bytes [offset, offset + nbytes) of that blob,
    "crc":       u4[p]                          with their CRC-32C; nbytes = shape x itemsize
    "impl":      u1[n]                          0, or 1 + index into "impls" (PRNG keys)
    "impls":     [str]                          PRNG implementation names
    "sharding":  u4[n]                          0, or 1 + index into "shardings"
    "shardings": [[mesh_shape, axis_names, partition_spec, axis_types, device_ids], ...]
    "weak":      u1[n]                          1 for a weakly typed jax.Array, else 0
    "blobs":     [[proc, k, nbytes], ...]       packed blob n is p/<proc>/<k>, nbytes long
    "arrays":    count                          zarr arrays are a/0 .. a/<count-1>
    "writer":    {"library": ..., "jax": ..., "tensorstore": ..., "processes": int, "time": float}
    "chunk_crc": u4[sum of chunk counts]        (from version 5) every zarr leaf's chunks'
                                                CRC-32C, as their crc32c trailers hold them,
                                                leaf after leaf, each leaf's in C order of
                                                its chunk grid: binds each chunk to this
                                                commit, leaf and position (see _binding)
    "refs":      [[step, "d-<hex>"], ...]       (from version 6) generations of sibling
                                                checkpoints (folders named by a step number
                                                beside this one) holding carried leaves
    "ref":       u4[z]  per storage-1 leaf      (from version 6) 0: its array is in "data";
                                                k: in refs[k-1] (a carried leaf, see _carry),
                                                with the array id, chunks, stored dtype and
                                                chunk CRC-32Cs its writer recorded

A partition spec's entries are None, a name, or a list of names; the saved sharding is
recorded for display and as the default layout on restore. ``axis_types`` names each mesh
axis's ``jax.sharding.AxisType`` ("Auto", "Explicit" or "Manual"); ``device_ids`` are the
mesh's device ids in mesh order (``mesh.devices.flat``), so a restore onto the same devices
gets the same layout (a mesh of ``jax.make_mesh`` orders its devices by topology). The
``stored`` dtype differs from ``dtype`` only where TensorStore lacks the dtype; the bytes
are then stored as unsigned integers of the same width. Packed leaves carry CRC-32C, as the
zarr3 chunks do (their crc32c codec); the commit file's own checksum is zlib's CRC-32. The
reader treats every field as untrusted. Version 5 is version 6 without ``refs`` and ``ref``
(every array in ``data``). The body repeats the version (from version 4): the
outer one, which says how to read the rest, is outside the checksum, and a flipped bit there
once read a version-3 file as version 2. Version 4 is this layout without ``chunk_crc``
(its chunks are bound to nothing: restore and verify check each chunk against its own
trailer only), without ``weak`` (no leaf weakly typed) and with sharding records of three
entries (no axis types: Auto; no device ids); version 3 that without the body's version,
version 2 that with zlib's CRC-32 for packed leaves (slower to compute than CRC-32C);
all are still read, and a
body's version, where there is one, must match. Version 1 (one record per leaf)
was written by pre-release versions only; it is refused with a FormatVersionError.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import google_crc32c
import msgpack
import numpy as np

from . import _graph, _leaves

if TYPE_CHECKING:  # _columns imports this module
    from ._columns import Columns

MAGIC = "pytree_ckpt"
FORMAT_VERSION = 6
READ_VERSIONS = (2, 3, 4, 5, 6)
# google_crc32c's C extension reads any C-contiguous array's bytes, whatever its dtype (so
# restore checks a leaf in the array it returns, with no uint8 view made per leaf); its
# pure-Python fallback iterates items, so it is given bytes.
_CRC32C = (google_crc32c.value if google_crc32c.implementation == "c"
           else lambda data: google_crc32c.value(bytes(data)))
# A packed leaf's checksum per format version, of a C-contiguous NumPy array of its bytes
# (google_crc32c takes no memoryview).
LEAF_CRC = {2: zlib.crc32, 3: _CRC32C, 4: _CRC32C, 5: _CRC32C, 6: _CRC32C}
COMMIT_FILE = "checkpoint.msgpack"
# The file marking a deleted step's folder that keeps only data later steps carry (_retire).
RETIRED = "retired"
# ~50 bytes a leaf: room for millions of leaves, and decoding a forged file of this size
# takes at most a few GB (see _decode's body limits).
MAX_COMMIT_BYTES = 256 << 20
# A generation folder's name, as a commit file may name it: "d-" and the save's id.
GENERATION_RE = re.compile(r"d-[0-9a-f]{32}")


def generation_folder(save_id: str) -> str:
    """The name of the generation folder that save ``save_id`` writes its data into."""
    return f"d-{save_id}"


def is_step_name(name: str) -> bool:
    """Whether ``name`` names a manager's step (a folder a format-6 reference may name): a
    decimal number without leading zeros."""
    return name == "0" or (name.isdigit() and name.isascii() and name[0] != "0")


def is_generation(name: str) -> bool:
    """Whether directory entry ``name`` is named like a generation folder (``d-*``): the
    loose test for listings; a commit file's ``data`` must match GENERATION_RE in full."""
    return name.startswith("d-")


def is_ours(name: str) -> bool:
    """Whether a directory entry ``name`` is a save's: a generation folder, or TensorStore's
    temporary file of an interrupted commit (the commit file's name, a dot, a suffix)."""
    return is_generation(name) or name.startswith(COMMIT_FILE + ".")


class Storage(NamedTuple):
    """Where a leaf's value lives: inline (py), in a zarr array, or in a packed blob."""

    kind: str  # "v", "z" or "p"
    value: Any = None  # "v": the decoded Python value
    index: int = 0  # "z": array id; "p": blob number  # pyright: ignore[reportIncompatibleMethodOverride]
    chunks: tuple[int, ...] = ()  # "z"
    stored_dtype: str = ""  # "z"
    offset: int = 0  # "p"
    nbytes: int = 0  # "p"
    crc: int = 0  # "p"
    ref: int = 0  # "z": 0, or 1 + index into Commit.refs (data another checkpoint holds)


AXIS_TYPES = ("Auto", "Explicit", "Manual")  # jax.sharding.AxisType names


class SavedSharding(NamedTuple):
    """A leaf's saved ``NamedSharding``: its mesh and partition spec."""

    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    spec: tuple  # entries: None, an axis name, or a tuple of names
    axis_types: tuple[str, ...] | None = None  # AXIS_TYPES names; None before format 5
    device_ids: tuple[int, ...] | None = None  # in mesh order; None before format 5


class LeafRecord(NamedTuple):
    """One saved leaf, as described by the commit file."""

    path: str
    origin: str
    dtype: str
    shape: tuple[int, ...]
    impl: str | None
    storage: Storage
    sharding: SavedSharding | None
    weak: bool = False  # a weakly typed jax.Array (a jitted ``step + 1``)


class Commit(NamedTuple):
    """A decoded, validated commit file."""

    data: str
    nodes: tuple[_graph.Node, ...]
    leaves: Columns  # as decoded; a commit being written holds a dict (encode() needs a Mapping)
    blobs: tuple[tuple[int, int, int], ...]  # (process, part, nbytes)
    arrays: int
    writer: dict[str, Any]
    version: int  # the format it is read as / written in
    refs: tuple[tuple[str, str], ...] = ()  # (sibling step folder, generation): see "ref"

    def blob_key(self, blob: int) -> str:
        proc, part, _ = self.blobs[blob]
        return f"{self.data}/p/{proc}/{part}"


ORIGINS = (_leaves.JAX, _leaves.NUMPY, _leaves.NPSCALAR, _leaves.PRNGKEY, _leaves.PY)
ORIGIN_CODE = {o: i for i, o in enumerate(ORIGINS)}
KINDS = ("v", "z", "p")  # storage codes 0, 1, 2
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
VALUE, ZARR, PACKED = range(len(KINDS))


def encode(commit: Commit, chunk_crc: Sequence[int] = ()) -> bytes:
    """The commit file's bytes for ``commit``; ``chunk_crc``: from format 5, every zarr
    leaf's chunks' CRC-32C, leaf after leaf in commit order (see _binding)."""
    dtypes: dict[str, int] = {}
    impls: dict[str, int] = {}
    shardings: dict[SavedSharding, int] = {}
    paths, origin, dtype, rank, dims, kind, impl, sharding = [], [], [], [], [], [], [], []
    weak: list[bool] = []
    values, array, chunks, stored, blob, offset, crc, ref = [], [], [], [], [], [], [], []
    for r in commit.leaves.values():
        s = r.storage
        paths.append(r.path)
        origin.append(ORIGIN_CODE[r.origin])
        dtype.append(dtypes.setdefault(r.dtype, len(dtypes)))
        rank.append(len(r.shape))
        dims += r.shape
        kind.append(_KIND_CODE[s.kind])
        impl.append(0 if r.impl is None else impls.setdefault(r.impl, len(impls)) + 1)
        sharding.append(0 if r.sharding is None
                        else shardings.setdefault(r.sharding, len(shardings)) + 1)
        weak.append(r.weak)
        if s.kind == "v":
            values.append(_leaves.encode_py(s.value, commit.version))
        elif s.kind == "z":
            array.append(s.index)
            ref.append(s.ref)
            chunks += s.chunks
            stored.append(dtypes.setdefault(s.stored_dtype, len(dtypes)))
        else:
            blob.append(s.index)
            offset.append(s.offset)
            crc.append(s.crc)

    def column(x: list, fmt: str) -> bytes:
        return np.asarray(x, dtype=fmt).tobytes()

    body = msgpack.packb(
        {
            **({"version": commit.version} if commit.version >= 4 else {}),
            "data": commit.data,
            "nodes": [list(n) for n in commit.nodes],
            "paths": paths, "origin": column(origin, "u1"), "dtype": column(dtype, "u1"),
            "dtypes": list(dtypes), "rank": column(rank, "u1"), "shape": column(dims, "<i8"),
            "storage": column(kind, "u1"), "values": values,
            "array": column(array, "<u4"), "chunks": column(chunks, "<i8"),
            "stored": column(stored, "u1"),
            "blob": column(blob, "<u4"), "offset": column(offset, "<i8"),
            "crc": column(crc, "<u4"),
            "impl": column(impl, "u1"), "impls": list(impls),
            "sharding": column(sharding, "<u4"),
            "shardings": [_encode_sharding(x, commit.version) for x in shardings],
            **({"weak": column(weak, "u1")} if commit.version >= 5 else {}),
            "blobs": [list(b) for b in commit.blobs],
            "arrays": commit.arrays,
            "writer": commit.writer,
            **({"chunk_crc": column(list(chunk_crc), "<u4")} if commit.version >= 5 else {}),
            **({"refs": [list(r) for r in commit.refs], "ref": column(ref, "<u4")}
               if commit.version >= 6 else {}),
        },
        use_bin_type=True,
    )
    return msgpack.packb([MAGIC, commit.version, zlib.crc32(body), body], use_bin_type=True)  # pyright: ignore[reportReturnType, reportArgumentType]  # packb gives bytes


def _encode_sharding(s: SavedSharding, version: int) -> list:
    head = [list(s.mesh_shape), list(s.axis_names), [list(e) if isinstance(e, tuple) else e
                                                     for e in s.spec]]
    if version < 5:
        return head
    return [*head, list(s.axis_types or ()), list(s.device_ids or ())]


def writer_info(processes: int, time: float) -> Mapping[str, Any]:
    from importlib.metadata import version

    import jax

    from . import __version__

    return {
        "library": f"pytree_ckpt {__version__}", "jax": jax.__version__,
        "tensorstore": version("tensorstore"), "processes": processes, "time": time,
    }
