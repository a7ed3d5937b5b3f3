"""All I/O, through TensorStore kvstores: ``file``, ``memory``, ``gcs`` and ``s3`` alike.

A checkpoint *location* is a kvstore spec whose path ends in ``/``; every key below is
relative to it. Zarr3 arrays are opened with ``fill_missing_data_reads=False`` and
``store_data_equal_to_fill_value=True``: by default TensorStore skips writing chunks equal to
the fill value and reads a missing chunk as the fill value, and for a checkpoint a missing
chunk must be an error, never zeros.
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
import stat
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

import tensorstore as ts

from . import _options
from ._errors import CheckpointError, NotACheckpointError
from ._faults import faults, retry_settings

# Chunks of at most this many bytes (and lined up with shard boundaries) read and write in
# parallel; one 64 MiB chunk per array reads back slower than chunks of ~4 MiB.
CHUNK_BYTES = 4 << 20
# A shard is never cut into chunks smaller than this (a shard of prime length along a sharded
# axis would otherwise be cut into rows): every chunk costs a request and TensorStore's
# bookkeeping, so the reader refuses arrays of more chunks than most_chunks allows.
MIN_CHUNK_BYTES = 16 << 10
# Chunks a leaf may have whatever its size: one per shard of the largest meshes (a shard
# smaller than CHUNK_BYTES is one chunk, of any size).
_MOST_SHARDS = 1 << 16


def most_chunks(nbytes: int) -> int:
    """How many chunks the writer may cut an array of ``nbytes`` into (see
    :func:`choose_chunks`), generously: the reader refuses more."""
    return _MOST_SHARDS + 2 * (nbytes // MIN_CHUNK_BYTES + 1)


class Location(NamedTuple):
    """Where a checkpoint lives: a kvstore spec and, for local files, the directory."""

    url: str
    spec: dict[str, Any]
    local: str | None

    @property
    def remote(self) -> bool:
        """Whether each request goes over a network (an object store), not to a local disk
        or memory: reads then want more requests in flight."""
        return self.spec.get("driver") not in ("file", "memory")

    def child(self, name: str) -> Location:
        """The location of ``name`` inside this one (for a manager's numbered steps)."""
        spec = dict(self.spec, path=self.spec.get("path", "") + name.strip("/") + "/")
        local = os.path.join(self.local, name) if self.local is not None else None
        return Location(f"{self.url.rstrip('/')}/{name}", spec, local)


_S3_ENV = (("endpoint", "AWS_ENDPOINT_URL_S3"), ("endpoint", "AWS_ENDPOINT_URL"),
           ("aws_region", "AWS_REGION"), ("aws_region", "AWS_DEFAULT_REGION"))


def location(path: str | os.PathLike | dict) -> Location:
    """Parses a user's path: a local path, ``file://``, ``memory://``, ``gs://``, ``s3://``.

    A dict is taken as a TensorStore kvstore spec (for options no URL can say).
    """
    if isinstance(path, dict):
        spec = dict(path)
        spec["path"] = spec.get("path", "").rstrip("/") + "/"
        if spec.get("driver") == "file":
            return Location(spec["path"].rstrip("/") or "/", spec, spec["path"])
        return Location(_spec_url(spec), spec, None)
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"checkpoint path must be str, os.PathLike or a kvstore spec dict: {path!r}")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "file", text
    rest = rest.strip("/") if scheme != "file" else rest
    if scheme == "file":
        local = os.path.abspath(rest)
        return Location(local, {"driver": "file", "path": local.rstrip("/") + "/"}, local)
    if scheme == "memory":
        return Location(text, {"driver": "memory", "path": rest + "/"}, None)
    if scheme in ("gs", "s3"):
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{text!r}: no bucket name")
        spec: dict[str, Any] = {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket,
                                "path": key.strip("/") + "/" if key else ""}
        if scheme == "s3":
            # TensorStore's s3:// URLs ignore AWS_ENDPOINT_URL; a spec takes the endpoint.
            for field, var in _S3_ENV:
                if var in os.environ and field not in spec:
                    spec[field] = os.environ[var]
            if "AWS_ACCESS_KEY_ID" in os.environ:
                spec["aws_credentials"] = {"type": "environment"}
        return Location(text, spec, None)
    raise ValueError(f"{text!r}: unsupported scheme {scheme!r} (use a path, file://, "
                     "memory://, gs:// or s3://)")


def _spec_url(spec: dict) -> str:
    """How a kvstore spec's location is written as a URL (the URL names the same objects,
    though options such as an endpoint come from the environment then)."""
    driver, key = spec.get("driver", ""), spec["path"].strip("/")
    scheme = {"gcs": "gs", "s3": "s3"}.get(driver)
    if scheme is not None and spec.get("bucket"):
        return f"{scheme}://{spec['bucket']}/{key}".rstrip("/")
    return f"{driver}://{key}"


_context_lock = threading.Lock()

@functools.cache
def _base_context() -> ts.Context:
    with _context_lock:
        return ts.Context({
            "cache_pool": {"total_bytes_limit": 0},
            "file_io_concurrency": {"limit": 64},
            "data_copy_concurrency": {"limit": max(os.cpu_count() or 1, 1)},
        })


@functools.cache
def _retrying_context(deadline_s: float) -> ts.Context:
    retries = retry_settings(deadline_s)
    spec = {"gcs_request_retries": retries, "s3_request_retries": retries,
            "http_request_retries": retries}
    return ts.Context(ts.Context.Spec(spec), _base_context())


def context() -> ts.Context:
    """The TensorStore context for the storage deadline in force (created on first use,
    not at import; see :func:`pytree_ckpt.configure`).

    Every such context is a child of one base context, so there is one ``memory://`` store
    per process (a checkpoint saved to memory can be restored by a later call, whatever the
    deadline); caching is off, since a checkpoint's bytes are read once.
    """
    return _retrying_context(_options.get("storage_deadline_s"))


def forget_contexts() -> None:
    """Drops every context (``memory://`` contents with them): the next one reads again what
    TensorStore reads when a driver opens, e.g. ``TENSORSTORE_GCS_HTTP_URL``."""
    _retrying_context.cache_clear()
    _base_context.cache_clear()


def open_kvstore(loc: Location) -> ts.KvStore:
    ctx = context()  # a bad option is a ConfigurationError of its own
    try:
        return ts.KvStore.open(loc.spec, context=ctx).result()
    except Exception as e:
        raise CheckpointError(f"{loc.url}: cannot open storage ({e})") from e


def kv_url(kv: ts.KvStore, key: str = "") -> str:
    """A URL for ``key`` in ``kv``, for messages (an S3 spec with an endpoint has no
    ``kv.url``: its bucket is named as ``s3://``)."""
    try:
        spec = kv.spec().to_json()
    except Exception:  # noqa: BLE001 - only for a message
        return key
    return _spec_url(dict(spec, path=spec.get("path", "") + key))


def top_level_names(loc: Location, kv: ts.KvStore) -> set[str] | None:
    """Names directly inside the location, or None if it does not exist at all."""
    if loc.local is not None:
        try:
            return set(os.listdir(loc.local))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return {""}
    keys = listing(loc, kv, loc.url)
    if not keys:
        return None
    return {k.decode("utf-8", "replace").split("/", 1)[0] for k in keys}


def child_names(loc: Location, kv: ts.KvStore) -> dict[str, set[str] | None]:
    """Names directly inside the location, each with the names directly inside it, or None
    for anything but a directory: a file, or a symbolic link (even to a directory, which is
    not the library's own: nothing is read, written or deleted through it). For a manager's
    directory of numbered checkpoints.

    On object stores this lists every key below the location (TensorStore has no delimiter
    listing), i.e. costs one request per 1,000 keys.
    """
    out: dict[str, set[str] | None] = {}
    if loc.local is not None:
        try:
            entries = list(os.scandir(loc.local))
        except FileNotFoundError:
            return out
        for entry in entries:
            out[entry.name] = None
            if entry.is_dir(follow_symlinks=False):
                try:
                    out[entry.name] = set(os.listdir(entry.path))
                except OSError:  # gone meanwhile
                    pass
        return out
    for key in listing(loc, kv, loc.url):
        first, _, rest = key.decode("utf-8", "replace").partition("/")
        inside = out.setdefault(first, set())
        assert inside is not None  # None only for files of a local directory, above
        if rest:
            inside.add(rest.split("/", 1)[0])
    return out


def folder_names(loc: Location, kv: ts.KvStore, folder: str) -> set[str] | None:
    """Names directly inside ``folder`` (a folder name inside the location), or None if
    nothing is there (or, locally, it is not a directory: a file or a symbolic link). On
    object stores one listing of the keys below ``folder`` only."""
    if loc.local is not None:
        path = os.path.join(loc.local, folder)
        if os.path.islink(path) or not os.path.isdir(path):
            return None
        try:
            return set(os.listdir(path))
        except FileNotFoundError:
            return None
    start = folder.strip("/") + "/"
    keys = listing(loc, kv, f"{loc.url}/{folder}", start)
    return {k.decode("utf-8", "replace").split("/", 1)[0] for k in keys} or None


def listing(loc: Location, kv: ts.KvStore, url: str, prefix: str = "") -> list[bytes]:
    """The keys below ``prefix`` (``""`` or ending in ``/``), relative to it; a fault of the
    store is a :class:`StorageError` naming ``url``.

    TensorStore (0.1.86) reads a GCS listing refused with an HTTP 4xx (403 included) as an
    empty one: an empty GCS listing is confirmed by reading one key there (missing, if the
    bucket answers), so that a refusal is never taken for "no checkpoint here"."""
    with faults(url):
        if prefix:
            keys = kv.list(prefix_range(prefix), strip_prefix_length=len(prefix.encode()))
        else:
            keys = kv.list()
        keys = keys.result()
        if not keys and loc.spec.get("driver") == "gcs":
            kv.read(prefix + ".pytree-ckpt-probe").result()
    return keys


def prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """The keys that start with ``prefix`` (ending in ``/``). Object stores list a range by
    the longest prefix its bounds share: this one's is ``prefix`` itself (``[7/, 70)``'s would
    be ``7``, listing steps 70, 700, ... too). No UTF-8 key holds the byte 0xff."""
    start = prefix.encode()
    return ts.KvStore.KeyRange(start, start + b"\xff")


def list_key(kv: ts.KvStore, key: str) -> ts.Future:
    """A future of the keys equal to ``key``: one small listing on an object store."""
    return kv.list(ts.KvStore.KeyRange(key, key + "\0"))


def delete_prefix(loc: Location, kv: ts.KvStore, prefix: str) -> None:
    """Deletes everything under ``prefix`` (a folder name inside the location); a symbolic
    link there is refused (:class:`NotACheckpointError`), and none below it is followed."""
    if loc.local is not None:
        import shutil

        path = os.path.join(loc.local, prefix)
        if os.path.islink(path):
            raise link_error(path)
        try:
            shutil.rmtree(path)  # removes links below, never what they point to
        except FileNotFoundError:
            pass  # already gone: deleting is idempotent, failing to delete is not silent
        return
    with faults(f"{loc.url}/{prefix}"):
        kv.delete_range(prefix_range(prefix.rstrip("/") + "/")).result()


def delete_file(loc: Location, kv: ts.KvStore, key: str) -> None:
    """Deletes the file ``key`` (``name`` or ``folder/name``) if it is there. Locally the
    folder is opened without following a link (:class:`NotACheckpointError` for one), so a
    step folder that is a link to an archived checkpoint never loses that one's file."""
    if loc.local is None:
        with faults(f"{loc.url}/{key}"):
            kv.write(key, None).result()
        return
    folder, _, name = key.rpartition("/")
    path = os.path.join(loc.local, folder)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as e:  # ELOOP: a link; ENOTDIR: a file where a folder should be
        raise link_error(path, e) from None
    try:
        os.unlink(name, dir_fd=fd)  # a link named ``name`` is removed, not followed
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def read_key(kv: ts.KvStore, key: str, loc: Location | None = None) -> bytes | None:
    """The value of ``key``, or None if it is missing. With a local ``loc``, a FIFO, device
    or socket there is refused (:class:`NotACheckpointError`): reading one would block."""
    if loc is not None and loc.local is not None:
        check_regular(os.path.join(loc.local, key))
    with faults(loc.url + "/" + key if loc is not None else kv_url(kv, key)):
        result = kv.read(key).result()
    return bytes(result.value) if result.state == "value" else None


def check_regular(path: str) -> None:
    """Raises :class:`NotACheckpointError` unless ``path`` is missing, a regular file or a
    directory (following links: only what is read is checked)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise NotACheckpointError(
            f"{path}: not a regular file (a FIFO, device or socket); pytree_ckpt reads only "
            "regular files (reading this one could block forever)")


def check_regular_tree(directory: str) -> None:
    """:func:`check_regular` for everything below ``directory`` (one ``stat`` per file)."""
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            check_regular(os.path.join(root, name))


def write_key(loc: Location, kv: ts.KvStore, key: str, value: bytes, **options: Any) -> Any:
    """Writes one small file (the commit file, a manager's metrics) in one atomic step,
    first resetting a temporary file a killed writer left (see :func:`reset_stale_temp`).
    ``options`` go to ``KvStore.write`` (e.g. ``if_equal``); returns its result.

    Locally a symbolic link (or anything but a file) where the temporary file goes is
    refused with :class:`NotACheckpointError` naming it: TensorStore would write through
    it, into whatever file it points to. (One planted between this check and TensorStore's
    open is not caught: that needs TensorStore to open with ``O_NOFOLLOW``.)"""
    reset_stale_temp(loc, key)
    with faults(f"{loc.url}/{key}"):
        return kv.write(key, value, **options).result()


def reset_stale_temp(loc: Location, key: str) -> None:
    """Empties the temporary file that a writer killed while writing ``key`` left behind.

    TensorStore's file driver (0.1.86) writes ``key`` into ``key.__lock`` under an fcntl lock,
    fsyncs it and renames it over ``key``; but it reuses a ``.__lock`` file left by a killed
    writer without truncating it, so a new value shorter than the stale one would keep the
    stale tail (a commit file with trailing garbage: a checkpoint that saved "successfully"
    and cannot be read). The file is truncated under the same lock, and only if it is still
    the temporary file (a live writer renames it away before it unlocks).
    """
    if loc.local is None:
        return
    temp = os.path.join(loc.local, key + ".__lock")
    try:
        # O_NONBLOCK: a FIFO planted there must not block the open.
        fd = os.open(temp, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as e:  # ELOOP: a link; ENXIO: a FIFO nobody reads; EISDIR
        raise link_error(temp, e) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise link_error(temp)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # conflicts with TensorStore's open-file-description lock
        try:
            still_temp = os.stat(temp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            still_temp = False
        if still_temp:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def link_error(path: str, cause: OSError | None = None) -> NotACheckpointError:
    what = ("a symbolic link" if os.path.islink(path) else
            "not a regular file" if cause is None else f"unusable ({cause.strerror})")
    return NotACheckpointError(
        f"{path}: {what}, where pytree_ckpt keeps a file or folder of its own; refusing to "
        "write or delete through it (remove it if it is not meant to be there)")


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str) -> None:
    """fsyncs every directory below ``directory`` and its parent: TensorStore syncs files
    and their own directory, not the entries of the directories it created on the way."""
    if not os.path.isdir(directory):
        return
    for root, _dirs, _files in os.walk(directory, topdown=False):
        fsync_dir(root)
    fsync_dir(os.path.dirname(directory.rstrip("/")))


def choose_chunks(shard_shape: Iterable[int], itemsize: int, shape: Iterable[int] | None = None,
                  limit: int | None = None) -> list[int]:
    """A chunk shape of at most ~``limit`` bytes (:data:`CHUNK_BYTES` unless given) that never
    straddles a shard boundary.

    Each device then writes its own chunks with no read-modify-write; splitting further lets
    reads and writes run in parallel. The leading axes are split first, so a chunk is a
    contiguous block of whole rows in memory. Along an axis the array is sharded on, chunks
    divide the shard exactly; along one it is not (``shape`` gives the array's own shape),
    any size will do, and the last chunk may be partial: a 50,257-row embedding is cut into
    37 chunks of 1,359 rows, not (by divisors: 50,257 = 29 x 1,733, a prime) 50,257 rows.

    >>> choose_chunks((4096, 4096), 4)
    [256, 4096]
    >>> choose_chunks((50257, 768), 4, shape=(50257, 768))
    [1359, 768]
    >>> choose_chunks((4099, 4099), 4)  # sharded, 4,099 a prime: rows of 16 KiB
    [1, 4099]
    >>> choose_chunks((1048583, 2), 4)  # not rows of 8 bytes: columns of 4 MiB
    [1048583, 1]
    """
    limit = CHUNK_BYTES if limit is None else limit
    chunks = [max(int(d), 1) for d in shard_shape]
    free = ([int(s) == int(d) for s, d in zip(shard_shape, shape, strict=True)]
            if shape is not None else [False] * len(chunks))
    for axis in range(len(chunks)):
        if math.prod(chunks) * itemsize <= limit:
            break
        if free[axis]:
            others = math.prod(chunks[:axis] + chunks[axis + 1:]) * itemsize
            fit = max(1, limit // max(others, 1))
            pieces = -(-chunks[axis] // fit)
            chunks[axis] = -(-chunks[axis] // pieces)  # balanced: no sliver of a last chunk
            continue
        while math.prod(chunks) * itemsize > limit:
            p = _smallest_factor(chunks[axis])
            if not p or math.prod(chunks) // p * itemsize < MIN_CHUNK_BYTES:
                break
            chunks[axis] //= p
    return chunks


def _smallest_factor(n: int) -> int:
    if n < 2:
        return 0
    for p in (2, 3, 5, 7):
        if n % p == 0:
            return p
    f = 11
    while f * f <= n:
        if n % f == 0:
            return f
        f += 2
    return n


def array_spec(shape: Iterable[int], chunks: Iterable[int], stored_dtype: str) -> dict[str, Any]:
    """The zarr3 spec of one stored array (crc32c on every chunk)."""
    return {
        "driver": "zarr3",
        "metadata": {
            "shape": list(shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "chunk_key_encoding": {"name": "default"},
            "data_type": stored_dtype,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "crc32c"}],
        },
        "fill_missing_data_reads": False,
        "store_data_equal_to_fill_value": True,
    }


def open_array(kv: ts.KvStore, key: str, spec: dict[str, Any], *, create: bool) -> ts.Future:
    """Opens the zarr3 array under ``key``; ``create`` writes its ``zarr.json`` (the primary
    process does), otherwise the metadata is taken from the checked commit file, not read."""
    store = kv / (key.rstrip("/") + "/")
    if create:
        return ts.open(spec, kvstore=store, create=True, context=context())
    return ts.open(spec, kvstore=store, open=True, assume_metadata=True, context=context())
