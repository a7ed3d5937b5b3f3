"""restore: match the target's paths against the checkpoint, read what matched, build a new tree.

Restore is pure: it never mutates the target and never prints. Every target path ends up in
exactly one of ``matched``, ``unmatched`` or ``mismatched``; every checkpoint path (under
``at``) no target path asked for is ``unused``. Unmatched and mismatched leaves keep the
target's value; a leaf is never filled with data of another shape.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import _foreign, _gc, _graph, _leaves, _progress, _source, _storage
from ._build import Want, default_device
from ._errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PathCollisionError,
    PathNotFoundError,
    ShardingError,
    UnsupportedLeafError,
)
from ._format import COMMIT_FILE, Commit, LeafRecord, SavedSharding, decode, generation_of
from ._read import read_leaves
from ._status import Cast, Mismatch, RestoreStatus, check_complete


def commit_file(loc: _storage.Location) -> str:
    """The commit file of the checkpoint at ``loc``, as errors about it name it."""
    return f"{loc.url}/{COMMIT_FILE}"


def load_commit(loc: _storage.Location, kv: Any) -> Commit:
    """Reads and validates the commit file, or says precisely why there is none."""
    if loc.local is not None:  # a FIFO there would block the read forever
        _storage.check_regular(os.path.join(loc.local, COMMIT_FILE))
    try:
        data = _storage.read_key(kv, COMMIT_FILE)
    except Exception as e:
        raise CheckpointNotFoundError(f"{loc.url}: cannot read the commit file ({e})") from e
    if data is None:
        names = _storage.top_level_names(loc, kv)
        if not names:
            raise CheckpointNotFoundError(f"{loc.url}: no checkpoint there (nothing exists)")
        if any(n.startswith(("d-", COMMIT_FILE + ".")) for n in names):
            raise IncompleteCheckpointError(
                f"{loc.url}: incomplete checkpoint (data but no {COMMIT_FILE}): a save did not "
                "finish, so nothing here is restorable")
        raise CheckpointNotFoundError(
            f"{loc.url}: not a checkpoint (no {COMMIT_FILE}; it holds "
            f"{', '.join(sorted(map(repr, names))[:5])})")
    return decode(data, commit_file(loc))


def open_source(loc: _storage.Location) -> _source.Source:
    """The checkpoint at ``loc``: ours (its commit file), or another tool's files."""
    kv = _storage.open_kvstore(loc)
    try:
        commit = load_commit(loc, kv)
    except CheckpointNotFoundError:
        foreign = _foreign.detect(loc, kv)
        if foreign is None:
            raise
        return foreign
    return _source.Source(
        format=_source.PYTREE_CKPT, url=loc.url, version=commit.version, leaves=commit.leaves,
        nodes=commit.nodes, tree_nodes=lambda: commit.tree_nodes(commit_file(loc)),
        read=functools.partial(_read, loc, kv, commit),
        writer=commit.writer)


class OverwrittenError(CorruptCheckpointError):
    """The checkpoint was overwritten or deleted while it was read: an overwrite deletes the
    generation its commit file named, so what was being read is gone (restore starts again
    from the new commit file; a reader of blocks cannot, since the rest would be another
    save's)."""


def _read(loc: _storage.Location, kv: Any, commit: Commit, jobs: list) -> dict[str, Any]:
    """:func:`read_leaves`, once nothing in a local generation folder is a FIFO, device or
    socket (TensorStore's read of one would block forever): one ``stat`` per file. A failure
    while the commit file no longer names ``commit``'s generation is :class:`OverwrittenError`."""
    try:
        if loc.local is not None:
            _storage.check_regular_tree(os.path.join(loc.local, commit.data))
        return read_leaves(loc.url, kv, commit, jobs, remote=loc.remote)
    except Exception as e:
        try:
            raw = _storage.read_key(kv, COMMIT_FILE)
        except Exception:
            raise e from None  # the commit file cannot tell: the first error stands
        if raw is not None and generation_of(raw) == commit.data:
            raise
        raise OverwrittenError(
            f"{loc.url}: overwritten or deleted while it was read: its commit file now names "
            f"another generation than {commit.data}, whose files the overwrite deleted") from e


# A restore that finds its checkpoint overwritten while it reads starts again this many times
# in all (each time from the then newest commit file) before it gives up.
_ATTEMPTS = 3


def restore(path: str | os.PathLike | dict, target: Any = None, *, at: str | None = None,
            rename: _graph.Rename | None = None, strict: bool = False,
            progress: bool = False) -> tuple[Any, RestoreStatus]:
    """Restores a checkpoint into a new tree shaped like ``target``; returns it and the status.

    **Arguments:**

    - ``path``: where the checkpoint is (as for :func:`save`). Other tools' checkpoints are
      read too, recognized by their files: an Orbax checkpoint (an item folder, or a
      ``CheckpointManager`` step folder whose items are the top-level names), a Flax msgpack
      file (``flax.serialization.to_bytes``), a safetensors file or a folder or
      ``model.safetensors.index.json`` of a sharded set (a dotted name ``a.b.0`` is the path
      ``a/b/0``). :func:`metadata` says which format it found.
    - ``target``: a tree whose leaves say what to restore: concrete arrays or values (their
      shape, dtype, sharding and kind), ``jax.ShapeDtypeStruct`` (with ``.sharding``, or the
      default device), or None to rebuild the saved tree as nested dicts/lists/tuples with
      every leaf of the kind it was saved as.
    - ``at``: a checkpoint path; restore that subtree (e.g. ``"params"``) into ``target``.
    - ``rename``: ``{old_prefix: new_prefix}``, a list of ``(pattern, replacement)``
      regular-expression rules applied in order to each checkpoint path (e.g.
      ``[(r"^model/layers/(\\d+)/", r"layers/\\1/")]``), or a function mapping checkpoint
      paths to target paths, to follow renamed modules.
    - ``strict``: raise :class:`PartialRestoreError` unless every target leaf was restored
      (the check of ``status.assert_existing_matched()``; unused checkpoint entries are
      fine). Off by default: restore is pure and reports in the status; a
      :class:`CheckpointManager`'s restore is strict by default.
    - ``progress``: show a progress bar of the bytes read (tqdm: a widget in a notebook, on
      stderr elsewhere), over the restored leaves' whole sizes; in a multi-process job only
      process 0 shows it. Off by default: restore prints nothing.

    Matching is by path. Leaves found with another shape, or a dtype that would lose
    information (int <-> float, narrowing ints), are ``mismatched`` and keep the target's
    value; float <-> float and widening int conversions are done and listed in ``cast``.

    **Returns:** ``(tree, status)``, a new tree and a :class:`RestoreStatus`.

    **Raises:** :class:`CheckpointNotFoundError`, :class:`IncompleteCheckpointError`,
    :class:`CorruptCheckpointError` (naming the leaf whose bytes fail their checksum, or the
    file and entry of another tool's checkpoint that is malformed; also when the checkpoint
    was overwritten or deleted while it was read three times running: an overwrite deletes
    the data being read, and restore starts again from the new commit file),
    :class:`FormatVersionError`, :class:`PathNotFoundError` if ``at`` names nothing,
    :class:`PathCollisionError` if two checkpoint paths map to one after ``at``/``rename``,
    :class:`UnsupportedLeafError` for a target leaf of an unknown type (or an entry of a
    dtype this library cannot hold), ``TypeError`` / ``ValueError`` for a malformed
    ``rename`` rule,
    :class:`PartialRestoreError` with ``strict=True`` if a target leaf was not restored,
    :class:`NotACheckpointError` for a FIFO, device or socket among a local checkpoint's
    files.

    Example::

        >>> state = {"params": {"w": jnp.ones(3)}, "step": 7}
        >>> _ = pc.save(state, "memory://doc/restore")
        >>> params, status = pc.restore("memory://doc/restore", {"w": jnp.zeros(3)},
        ...                             at="params")
        >>> status.matched, status.unused
        (('w',), ())
    """
    with _gc.paused():  # per-leaf loops: see _gc
        for attempt in range(_ATTEMPTS):
            try:
                tree, status = _restore(path, target, at, rename, progress)
                break
            except OverwrittenError:
                if attempt == _ATTEMPTS - 1:
                    raise
    if strict:
        check_complete(status, _storage.location(path).url, "call restore without strict=True")
    return tree, status


def _restore(path: Any, target: Any, at: str | None, rename: Any, progress: bool = False
             ) -> tuple[Any, RestoreStatus]:
    loc = _storage.location(path)
    ckpt = open_source(loc)
    rename_fn = _graph.renamer(rename) if rename is not None else None
    entries = _select(ckpt, at, rename_fn, loc.url)
    if target is None:
        return _restore_saved(ckpt, entries, at, rename_fn, progress)
    flat = _graph.flatten(target)
    device = default_device()
    wants = [_want(p, leaf, device) for p, leaf in zip(flat.paths, flat.leaves, strict=True)]
    matched, unmatched, mismatched, casts, jobs = [], [], [], [], []
    sources = list(map(entries.get, flat.paths))
    records = iter(ckpt.leaves.records([src for src in sources if src is not None]))
    narrow = _narrowing()
    for path, want, src in zip(flat.paths, wants, sources, strict=True):
        if src is None:
            unmatched.append(path)
            continue
        record = next(records)
        verdict = _compare(record, want)
        if verdict is None:
            mismatched.append(_mismatch(path, record, want))
            continue
        matched.append(path)
        if narrow and want.kind is _leaves.JAX and want.dtype in narrow:
            want = _narrowed(path, record, want, narrow, casts)
        elif verdict:
            casts.append(Cast(path, record.dtype, _want_dtype_str(want)))
        jobs.append((path, record, want))
    values = _read_all(ckpt, jobs, progress)
    leaves = [values.get(p, leaf) for p, leaf in zip(flat.paths, flat.leaves, strict=True)]
    status = RestoreStatus(
        matched=tuple(matched), unmatched=tuple(unmatched),
        unused=_unused(entries, matched, mismatched),
        mismatched=tuple(mismatched), cast=tuple(casts))
    return jax.tree_util.tree_unflatten(flat.treedef, leaves), status


def _read_all(ckpt: _source.Source, jobs: list, progress: bool) -> dict[str, Any]:
    """Reads ``jobs``; with ``progress``, under a bar (process 0's only: one bar per job)."""
    if not progress or jax.process_index() != 0:
        return ckpt.read(jobs)
    return _progress.read_with_bar(ckpt.read, jobs, "restore")


# Without x64, JAX computes in 32 bits: a 64-bit jax.Array is one no computation accepts.
_NARROW = {np.dtype(wide): np.dtype(narrow) for wide, narrow in (
    (np.float64, np.float32), (np.int64, np.int32), (np.uint64, np.uint32),
    (np.complex128, np.complex64))}


def _narrowing() -> dict[np.dtype, np.dtype]:
    """The dtypes a jax.Array cannot have now, and what ``jnp.asarray`` makes of them."""
    return {} if jax.config.jax_enable_x64 else _NARROW


def _narrowed(path: str, rec: LeafRecord, want: Want, narrow: dict[np.dtype, np.dtype],
              casts: list[Cast]) -> Want:
    """``want`` asking for what JAX makes of its 64-bit dtype without x64, as
    ``jnp.asarray`` converts (values that do not fit wrap or round); the conversion is
    listed in ``casts`` (unless the saved dtype is already that)."""
    want = want._replace(dtype=narrow[want.dtype])
    if rec.dtype != want.dtype.name:
        casts.append(Cast(path, rec.dtype, want.dtype.name))
    return want


def _unused(entries: dict[str, str], matched: list[str], mismatched: list[Mismatch]
            ) -> tuple[str, ...]:
    """The checkpoint paths in ``entries`` that no target path used."""
    if len(matched) + len(mismatched) == len(entries):
        # Distinct target paths, each mapped to a distinct checkpoint path: all used. The
        # common case, without a set of every path (~0.9 ms at 10,000 leaves).
        return ()
    used = {entries[p] for p in matched} | {entries[m.path] for m in mismatched}
    return tuple(src for src in entries.values() if src not in used)


def _select(ckpt: _source.Source, at: str | None, rename_fn: Callable[[str], str] | None, url: str
            ) -> dict[str, str]:
    """Checkpoint paths by target path (after ``at`` and ``rename``). Paths only: a leaf's
    record is built when a target asks for it (see _format._Columns)."""
    if rename_fn is None and not at:
        return {p: p for p in ckpt.leaves}
    if rename_fn is None:  # distinct paths under ``at`` stay distinct: no collisions
        prefix = at + "/"
        cut = len(prefix)
        out = {p[cut:]: p for p in ckpt.leaves if p.startswith(prefix)}
        if at in ckpt.leaves:
            out[""] = at
        if not out:
            _check_at(ckpt, at, url)
        return out
    out: dict[str, str] = {}
    for path in ckpt.leaves:
        rel = _graph.relative_to(path, at) if at is not None else path
        if rel is None:
            continue
        new = rename_fn(rel)
        if new in out:
            raise PathCollisionError(
                f"{url}: checkpoint paths {out[new]!r} and {path!r} both map to {new!r} "
                "after at=/rename")
        out[new] = path
    if at is not None and not out:
        _check_at(ckpt, at, url)
    return out


def _check_at(ckpt: _source.Source, at: str, url: str) -> None:
    """Raises unless ``at`` names a node (an empty subtree) of the checkpoint."""
    if not any(_graph.relative_to(n.path, at) is not None for n in ckpt.nodes):
        tops = sorted({_graph.split_path(p)[0] for p in ckpt.leaves if p})
        raise PathNotFoundError(
            f"{url}: at={at!r} names nothing in the checkpoint; its top-level names are "
            f"{tops[:20]}")


@functools.lru_cache(maxsize=256)
def _is_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)  # ~0.3 µs: per leaf, cached


_WANT = functools.partial(tuple.__new__, Want)  # Want(*fields), all of them


def _want(path: str, leaf: Any, device: Any) -> Want:
    """What the target leaf at ``path`` asks for (``device``: where an unsharded
    ``ShapeDtypeStruct`` goes)."""
    if isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array)):
        sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(device)
        if type(sharding) is _NAMED and isinstance(sharding.mesh, jax.sharding.AbstractMesh):
            sharding = _on_concrete_mesh(path, sharding)
        if _is_key(leaf.dtype):
            # jax.random.key_impl takes arrays only; an abstract key's dtype knows its impl.
            impl = (str(jax.random.key_impl(leaf)) if isinstance(leaf, jax.Array)
                    else leaf.dtype._impl.name)
            data = jax.eval_shape(jax.random.key_data, leaf)
            return Want(_leaves.PRNGKEY, np.dtype(data.dtype), tuple(data.shape), sharding,
                        impl=impl)
        dtype, shape = leaf.dtype, leaf.shape
        # Per target leaf: no conversions where there is nothing to convert, and the tuple
        # made without NamedTuple's Python-level __new__ (~3 ms of a 10,000-leaf restore).
        return _WANT((_leaves.JAX, dtype if isinstance(dtype, np.dtype) else np.dtype(dtype),
                      shape if type(shape) is tuple else tuple(shape), sharding, None, None,
                      leaf.weak_type, None))
    if isinstance(leaf, np.ndarray):
        return Want(_leaves.NUMPY, leaf.dtype, leaf.shape)
    if isinstance(leaf, np.generic):
        return Want(_leaves.NPSCALAR, leaf.dtype, (), pytype=type(leaf))
    if type(leaf) in _leaves.PY_TYPES.values():
        return Want(_leaves.PY, None, (), pytype=type(leaf))
    raise UnsupportedLeafError(
        f"target leaf {path or '<root>'!r} has type {type(leaf).__module__}."
        f"{type(leaf).__qualname__}; a target leaf must be an array, a "
        "jax.ShapeDtypeStruct, a NumPy scalar or None/bool/int/float/complex/str/bytes")


_NAMED = jax.sharding.NamedSharding


def _on_concrete_mesh(path: str, sharding: jax.sharding.NamedSharding
                      ) -> jax.sharding.NamedSharding:
    """A target sharding on an ``AbstractMesh`` (what ``jax.eval_shape`` and
    ``nnx.eval_shape`` give under ``jax.set_mesh``) on the concrete mesh in context."""
    abstract, mesh = sharding.mesh, jax.sharding.get_mesh()
    if mesh.empty or (mesh.axis_names, mesh.axis_sizes, mesh.axis_types) != (
            abstract.axis_names, abstract.axis_sizes, abstract.axis_types):
        found = "no mesh" if mesh.empty else f"mesh {dict(mesh.shape)} ({mesh.axis_types})"
        raise ShardingError(
            f"target leaf {path or '<root>'!r}: its sharding is on an abstract mesh "
            f"{dict(abstract.shape)} ({abstract.axis_types}) and {found} is set; restore "
            "inside `with jax.set_mesh(mesh):` with that mesh, or give a concrete sharding")
    return jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)


_PY_KIND = {bool: "b", int: "i", float: "f", complex: "c"}


def _compare(rec: LeafRecord, want: Want) -> bool | None:
    """None: mismatched; False: restored as saved; True: restored with a dtype conversion."""
    if want.kind == _leaves.PRNGKEY or rec.origin == _leaves.PRNGKEY:
        same = (want.kind == rec.origin and want.impl == rec.impl and want.shape == rec.shape
                and want.dtype == _leaves.DTYPES[rec.dtype])
        return False if same else None
    if want.kind == _leaves.PY:
        if rec.origin == _leaves.PY:
            saved = _leaves.PY_TYPES[rec.dtype]
            # One Python type into another is never converted: int -> float would round
            # ints above 2**53 and overflow past ~1e308 (int <-> float is never done).
            return False if saved is want.pytype else None
        if rec.shape != ():
            return None
        return True if _kind_fits(_leaves.item_kind(_leaves.DTYPES[rec.dtype]),
                                  _PY_KIND.get(want.pytype)) else None
    if rec.origin == _leaves.PY:
        saved = _leaves.PY_TYPES[rec.dtype]
        if want.shape != () or saved not in _PY_KIND:
            return None
        value = rec.storage.value
        fits = _kind_fits(_PY_KIND[saved], _leaves.item_kind(want.dtype))
        return True if fits and _value_fits(value, want.dtype) else None
    if rec.shape != want.shape:
        return None
    saved = _leaves.DTYPES[rec.dtype]
    if saved == want.dtype or saved == want.dtype.newbyteorder("<"):
        return False  # the same values (a big-endian NumPy target gets its byte order)
    return True if _castable(saved, want.dtype) else None


def _kind_fits(saved: str | None, target: str | None) -> bool:
    return saved is not None and (saved == target or (saved, target) in {("u", "i"), ("i", "u")})


def _value_fits(value: Any, dtype: np.dtype) -> bool:
    if isinstance(value, bool) or _leaves.item_kind(dtype) not in "iu":
        return True
    info = np.iinfo(dtype)
    return info.min <= value <= info.max


def _castable(saved: np.dtype, target: np.dtype) -> bool:
    s, t = _leaves.item_kind(saved), _leaves.item_kind(target)
    if s == t and s in "fc":
        return True  # float <-> float (and complex) conversions are asked for by the target
    if s in "iu" and t in "iu":
        return bool(np.can_cast(saved, target, "safe"))
    return False


def _want_dtype_str(want: Want) -> str:
    if want.kind == _leaves.PY:
        return want.pytype.__name__ if want.pytype is not type(None) else "none"
    return want.dtype.name


def _mismatch(path: str, rec: LeafRecord, want: Want) -> Mismatch:
    saved = rec.dtype if rec.origin != _leaves.PRNGKEY else f"key<{rec.impl}>"
    target = _want_dtype_str(want) if want.kind != _leaves.PRNGKEY else f"key<{want.impl}>"
    return Mismatch(path, rec.shape, saved, want.shape, target)


def _saved_want(rec: LeafRecord, placement: _Placement) -> Want:
    """What restoring without a target gives back for ``rec``: the kind it was saved as."""
    dtype = _leaves.DTYPES.get(rec.dtype)
    if rec.origin == _leaves.PY:
        return Want(_leaves.PY, None, (), pytype=_leaves.PY_TYPES[rec.dtype])
    if rec.origin == _leaves.NPSCALAR:
        return Want(_leaves.NPSCALAR, dtype, (), pytype=dtype.type)
    if rec.origin == _leaves.NUMPY:
        return Want(_leaves.NUMPY, dtype, rec.shape)
    return Want(rec.origin, dtype, rec.shape, placement(rec), impl=rec.impl, weak=rec.weak)


class _Placement:
    """Where a restore without a target puts each saved jax.Array or PRNG key: on its saved
    mesh, made once per saved sharding, when this process's devices can hold it, else on
    the default device.

    The mesh takes its saved devices, in their saved order, where they all exist here (a
    ``jax.make_mesh`` mesh orders devices by topology: another order is another layout);
    else, when the device count matches, ``jax.devices()`` in order (checkpoints written
    before format 5 recorded no device ids). Axis types come back as saved (Auto before
    format 5)."""

    def __init__(self, device: Any) -> None:
        self._device = jax.sharding.SingleDeviceSharding(device)
        self._meshes: dict[SavedSharding, jax.sharding.Mesh | None] = {}
        self._devices = jax.devices()

    def __call__(self, rec: LeafRecord) -> jax.sharding.Sharding:
        saved = rec.sharding
        if saved is None:
            return self._device
        if saved not in self._meshes:
            self._meshes[saved] = self._mesh(rec)
        mesh = self._meshes[saved]
        if mesh is None:
            return self._device
        spec = saved.spec
        if rec.origin == _leaves.PRNGKEY:  # the key data's spec, cut to the keys' rank
            rank = len(rec.shape) - len(_leaves.prng_key_shape(rec.impl) or ())
            spec = spec[:rank]
        try:
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
            sharding.shard_shape(rec.shape)  # the spec must fit the array
        except Exception as e:  # the commit file is untrusted; JAX's errors vary
            raise CorruptCheckpointError(
                f"leaf {rec.path!r:.200}: saved sharding {tuple(saved)!r:.100} does not fit "
                f"its shape {rec.shape} ({e})") from None
        return sharding

    def _mesh(self, rec: LeafRecord) -> jax.sharding.Mesh | None:
        saved = rec.sharding
        devices = devices_for(saved, self._devices)
        if devices is None:
            return None
        types = tuple(getattr(jax.sharding.AxisType, t) for t in saved.axis_types or
                      ("Auto",) * len(saved.axis_names))
        try:
            return jax.sharding.Mesh(np.array(devices).reshape(saved.mesh_shape),
                                     saved.axis_names, axis_types=types)
        except Exception as e:  # the commit file is untrusted; JAX's errors vary
            raise CorruptCheckpointError(
                f"leaf {rec.path!r:.200}: saved mesh {tuple(saved)!r:.100} cannot be made "
                f"here ({e})") from None


def devices_for(saved: SavedSharding, devices: list[Any]) -> list[Any] | None:
    """The devices a saved mesh is rebuilt on from ``devices`` (``jax.devices()``): its
    saved devices in their order if all are there, else all of ``devices`` in order if
    their count matches, else None (the default device then)."""
    if saved.device_ids is not None:
        by_id = {d.id: d for d in devices}
        if all(i in by_id for i in saved.device_ids):
            return [by_id[i] for i in saved.device_ids]
    return devices if math.prod(saved.mesh_shape) == len(devices) else None


def _restore_saved(ckpt: _source.Source, entries: dict[str, str], at: str | None,
                   rename_fn: Callable[[str], str] | None, progress: bool = False
                   ) -> tuple[Any, RestoreStatus]:
    saved_nodes = ckpt.tree_nodes()  # before reading any data
    records = ckpt.leaves.records(list(entries.values()))
    placement = _Placement(default_device())
    narrow, casts, jobs = _narrowing(), [], []
    for path, rec in zip(entries, records, strict=True):
        want = _saved_want(rec, placement)
        if narrow and want.kind is _leaves.JAX and want.dtype in narrow:
            want = _narrowed(path, rec, want, narrow, casts)
        jobs.append((path, rec, want))
    values = _read_all(ckpt, jobs, progress)
    # Inner nodes follow their leaves: re-rooted at ``at`` and renamed the same way.
    nodes = []
    for node in saved_nodes:
        rel = _graph.relative_to(node.path, at) if at is not None else node.path
        if rel is not None:
            nodes.append(node._replace(path=rename_fn(rel) if rename_fn else rel))
    return _graph.rebuild(nodes, values), RestoreStatus(matched=tuple(entries),
                                                        cast=tuple(casts))
