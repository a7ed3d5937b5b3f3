"""restore: match the target's paths against the checkpoint, read what matched, build a new tree.

Restore is pure: it never mutates the target and never prints. Every target path ends up in
exactly one of ``matched``, ``unmatched`` or ``mismatched``; every checkpoint path (under
``at``) no target path asked for is ``unused``. Unmatched and mismatched leaves keep the
target's value; a leaf is never filled with data of another shape.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax

from . import (
    _build,
    _gc_pause,
    _graph,
    _leaves,
    _match,
    _placement,
    _progress,
    _source,
    _transform,
)
from ._build import Want, default_device
from ._errors import OverwrittenError
from ._format import LeafRecord
from ._open import open_path
from ._status import Cast, RestoreStatus, check_complete

# A restore that finds its checkpoint overwritten while it reads starts again this many times
# in all (each time from the then newest commit file) before it gives up.
_ATTEMPTS = 3


def restore(path: str | os.PathLike | dict, target: Any = None, *, at: str | None = None,
            rename: _graph.Rename | None = None, transform: _transform.Transform | None = None,
            strict: bool = False, progress: bool = False, share_reads: bool | None = None
            ) -> tuple[Any, RestoreStatus]:
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
    - ``transform``: a list of ``(pattern, fn)`` rules that change a saved array's layout
      on its way into the target, e.g. ``[(r".*/kernel", np.transpose)]`` for PyTorch's
      ``(out, in)`` Linear weights into Flax's ``(in, out)`` kernels. ``pattern`` is a regular
      expression matched against whole target paths (``re.fullmatch``, after ``at`` and
      ``rename``); the first rule that matches a path applies. ``fn`` gets the saved array as
      NumPy, whole and as saved, and returns what the target leaf takes; the shape and dtype
      check comes after it, so a rule applies to every matching leaf whatever its shape (a
      square matrix too). A transformed leaf is read whole on the host, transformed, then
      placed as the target asks (sharded by the target's sharding). The status lists these
      paths in ``transformed``.
    - ``strict``: raise :class:`PartialRestoreError` unless every target leaf was restored
      (the check of ``status.assert_existing_matched()``; unused checkpoint entries are
      fine). Off by default: restore is pure and reports in the status; a
      :class:`CheckpointManager`'s restore is strict by default.
    - ``progress``: show a progress bar of the bytes read (tqdm: a widget in a notebook, on
      stderr elsewhere), over the restored leaves' whole sizes; in a multi-process job only
      process 0 shows it. Off by default: restore prints nothing.
    - ``share_reads``: in a multi-process job, a region that devices of several processes
      hold (a replicated leaf, or one replicated along a mesh axis) is read from storage
      once: its chunks are split among those processes, each reads its share, and the rest
      arrives over a JAX all-gather. Every process must then call restore with the same
      target. A process whose share fails, or that dies, makes restore raise on every
      process: its own error where it failed, elsewhere a :class:`SaveError` (the
      coordination service's error) naming it, within the liveness timeout
      (:func:`configure`). None (the default): shared when reading from an object store
      (``gs://``, ``s3://``), not from a local path; True or False: always or never.

    Matching is by path. Leaves found with another shape, or a dtype that would lose
    information (int <-> float, narrowing ints), are ``mismatched`` and keep the target's
    value; float <-> float and widening int conversions are done and listed in ``cast``.

    **Returns:** ``(tree, status)``, a new tree and a :class:`RestoreStatus`.

    **Raises:** :class:`CheckpointNotFoundError` (also naming a leaf a manager's step carries
    and the step folder beside it that should hold it, for a step copied alone),
    :class:`IncompleteCheckpointError`,
    :class:`CorruptCheckpointError` (naming the leaf whose bytes fail their checksum, or the
    file and entry of another tool's checkpoint that is malformed; also when the checkpoint
    was overwritten or deleted while it was read three times running: an overwrite deletes
    the data being read, and restore starts again from the new commit file),
    :class:`FormatVersionError`, :class:`PathNotFoundError` if ``at`` names nothing,
    :class:`PathCollisionError` if two checkpoint paths map to one after ``at``/``rename``,
    :class:`UnsupportedLeafError` for a target leaf of an unknown type (or an entry of a
    dtype this library cannot hold), ``TypeError`` / ``ValueError`` for a malformed
    ``rename`` rule,
    :class:`TransformError` naming the leaf whose ``transform`` raised or returned an array
    that does not fit the target (another shape, a dtype not converted to the target's),
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
        >>> _ = pc.save({"w": jnp.arange(6.0).reshape(2, 3)}, "memory://doc/transform")
        >>> tree, status = pc.restore("memory://doc/transform", {"w": jnp.zeros((3, 2))},
        ...                           transform=[("w", lambda a: a.T)])
        >>> tree["w"][:, 0].tolist(), status.transformed
        ([0.0, 1.0, 2.0], ('w',))
    """
    rules = _transform.Rules(transform) if transform is not None else None
    for attempt in range(_ATTEMPTS):
        try:
            tree, status, url = _restore(path, target, at, rename, rules, progress,
                                         share_reads)
            break
        except OverwrittenError:
            if attempt == _ATTEMPTS - 1:
                raise
    else:
        raise AssertionError("unreachable: the last attempt returns or raises")
    if strict:
        check_complete(status, url, "call restore without strict=True")
    return tree, status


def _restore(path: Any, target: Any, at: str | None, rename: Any,
             rules: _transform.Rules | None, progress: bool, share: bool | None
             ) -> tuple[Any, RestoreStatus, str]:
    """The restored tree, its status, and the checkpoint's URL (for messages)."""
    loc, ckpt = open_path(path)
    rename_fn = _graph.renamer(rename) if rename is not None else None
    with _gc_pause.paused():
        entries = _match.select(ckpt, at, rename_fn, loc.url)
    if target is None:
        return *_restore_saved(ckpt, entries, at, rename_fn, rules, progress, share), loc.url
    with _gc_pause.paused():  # the per-leaf loops, never the reads: see _gc_pause
        flat, jobs, transforms, status = _match_target(ckpt, entries, target, rules)
    values = _read_all(ckpt, jobs, progress, share)
    if transforms:  # the user's functions, outside the pause
        casts: list[Cast] = []
        for path, record, want, fn in transforms:
            values[path] = _transformed(ckpt.url, path, record, want, fn, values[path], casts)
        status = dataclasses.replace(status, cast=status.cast + tuple(casts),
                                     transformed=tuple(t[0] for t in transforms))
    with _gc_pause.paused():
        leaves = [values.get(p, leaf) for p, leaf in zip(flat.paths, flat.leaves, strict=True)]
        return jax.tree_util.tree_unflatten(flat.treedef, leaves), status, loc.url


def _match_target(ckpt: _source.Source, entries: dict[str, str], target: Any,
                  rules: _transform.Rules | None) -> tuple[_graph.Flat, list, list, RestoreStatus]:
    """The target flattened, the reads its matched leaves need, the transforms to apply once
    read, and the restore's status (its ``transformed`` and their casts added after them)."""
    flat = _graph.flatten(target)
    device = default_device()
    wants = [_match.want_for(p, leaf, device) for p, leaf in zip(flat.paths, flat.leaves, strict=True)]
    matched, unmatched, mismatched, casts, jobs, transforms = [], [], [], [], [], []
    sources = list(map(entries.get, flat.paths))
    records = iter(ckpt.leaves.records([src for src in sources if src is not None]))
    narrow = _match.narrowing()
    for path, want, src in zip(flat.paths, wants, sources, strict=True):
        if src is None:
            unmatched.append(path)
            continue
        record = next(records)
        fn = rules(path) if rules is not None else None
        if fn is not None:  # read whole as saved; checked against the target once transformed
            matched.append(path)
            transforms.append((path, record, want, fn))
            jobs.append((path, record, _transform.host_want(ckpt.url, path, record)))
            continue
        verdict = _match.compare(record, want)
        if verdict is None:
            mismatched.append(_match.mismatch(path, record, want))
            continue
        matched.append(path)
        if narrow and want.kind is _leaves.JAX and want.dtype in narrow:
            want = _match.narrowed(path, record, want, narrow, casts)
        elif verdict:
            casts.append(Cast(path, record.dtype, _match.want_dtype_str(want)))
        jobs.append((path, record, want))
    status = RestoreStatus(
        matched=tuple(matched), unmatched=tuple(unmatched),
        unused=_match.unused(entries, matched, mismatched),
        mismatched=tuple(mismatched), cast=tuple(casts))
    return flat, jobs, transforms, status


def _transformed(url: str, path: str, rec: LeafRecord, want: Want, fn: Callable, saved: Any,
                 casts: list[Cast]) -> Any:
    """The target leaf at ``path``: ``fn`` of the ``saved`` array, checked against ``want``
    and built as it asks."""
    host, result = _transform.apply(url, path, fn, saved, rec)
    cast = _transform.check(url, path, result, rec, want)
    narrow = _match.narrowing()
    if narrow and want.kind is _leaves.JAX and want.dtype in narrow:
        want = _match.narrowed(path, result, want, narrow, casts)
    elif cast:
        casts.append(Cast(path, result.dtype, _match.want_dtype_str(want)))
    return _build.build(result, want, {(): host}, _build.Layouts(), whole=True)


def _read_all(ckpt: _source.Source, jobs: list, progress: bool, share: bool | None
              ) -> dict[str, Any]:
    """Reads ``jobs`` (``share``: restore's ``share_reads``); with ``progress``, under a bar
    (process 0's only: one bar per job)."""
    if not progress or jax.process_index() != 0:
        return ckpt.read(jobs, share)
    return _progress.read_with_bar(lambda batch: ckpt.read(batch, share), jobs, "restore")


def _restore_saved(ckpt: _source.Source, entries: dict[str, str], at: str | None,
                   rename_fn: Callable[[str], str] | None, rules: _transform.Rules | None,
                   progress: bool, share: bool | None) -> tuple[Any, RestoreStatus]:
    with _gc_pause.paused():  # the per-leaf loops, never the reads: see _gc_pause
        saved_nodes = ckpt.tree_nodes()  # before reading any data
        records = ckpt.leaves.records(list(entries.values()))
        placement = _placement.Placement(default_device())
        narrow, casts, jobs, transforms = _match.narrowing(), [], [], []
        for path, rec in zip(entries, records, strict=True):
            fn = rules(path) if rules is not None else None
            if fn is not None:
                transforms.append((path, rec, fn))
                jobs.append((path, rec, _transform.host_want(ckpt.url, path, rec)))
                continue
            want = _placement.saved_want(rec, placement)
            if narrow and want.kind is _leaves.JAX and want.dtype in narrow:
                want = _match.narrowed(path, rec, want, narrow, casts)
            jobs.append((path, rec, want))
    values = _read_all(ckpt, jobs, progress, share)
    for path, rec, fn in transforms:  # the user's functions, outside the pause
        # The kind it was saved as, in the shape and dtype fn gives, on the default device
        # (a saved sharding was made for the saved shape).
        host, result = _transform.apply(ckpt.url, path, fn, values[path], rec)
        if rec.origin == _leaves.JAX:
            want = Want(_leaves.JAX, host.dtype, host.shape, placement.default)
            if narrow and host.dtype in narrow:
                want = _match.narrowed(path, result, want, narrow, casts)
        elif rec.origin == _leaves.NPSCALAR and host.shape == ():
            want = Want(_leaves.NPSCALAR, host.dtype, (), pytype=host.dtype.type)
        else:
            want = Want(_leaves.NUMPY, host.dtype, host.shape)
        values[path] = _build.build(result, want, {(): host}, _build.Layouts(), whole=True)
    with _gc_pause.paused():
        # Inner nodes follow their leaves: re-rooted at ``at`` and renamed the same way.
        nodes = []
        for node in saved_nodes:
            rel = _graph.relative_to(node.path, at) if at is not None else node.path
            if rel is not None:
                nodes.append(node._replace(path=rename_fn(rel) if rename_fn else rel))
        return _graph.rebuild(nodes, values), RestoreStatus(
            matched=tuple(entries), cast=tuple(casts),
            transformed=tuple(t[0] for t in transforms))
