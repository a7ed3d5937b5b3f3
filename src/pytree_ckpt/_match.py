"""Matching a target against a checkpoint, by path: which checkpoint entry each target leaf
takes (after ``at`` and ``rename``), what each target leaf asks for (:class:`~._build.Want`),
and whether a saved leaf fits it as saved, with a conversion, or not at all (mismatched).

Pure: nothing here reads data or touches a device beyond describing a target's sharding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import _graph, _leaves, _source
from ._build import Want
from ._errors import PathCollisionError, PathNotFoundError, ShardingError, UnsupportedLeafError
from ._format import LeafRecord
from ._status import Cast, Mismatch

# Without x64, JAX computes in 32 bits: a 64-bit jax.Array is one no computation accepts.
_NARROW = {np.dtype(wide): np.dtype(narrow) for wide, narrow in (
    (np.float64, np.float32), (np.int64, np.int32), (np.uint64, np.uint32),
    (np.complex128, np.complex64))}


def narrowing() -> dict[np.dtype, np.dtype]:
    """The dtypes a jax.Array cannot have now, and what ``jnp.asarray`` makes of them."""
    return {} if jax.config.jax_enable_x64 else _NARROW  # pyright: ignore[reportAttributeAccessIssue]


def narrowed(path: str, rec: LeafRecord, want: Want, narrow: dict[np.dtype, np.dtype],
              casts: list[Cast]) -> Want:
    """``want`` asking for what JAX makes of its 64-bit dtype without x64, as
    ``jnp.asarray`` converts (values that do not fit wrap or round); the conversion is
    listed in ``casts`` (unless the saved dtype is already that)."""
    assert want.dtype is not None  # a key of ``narrow``
    dtype = narrow[want.dtype]
    if rec.dtype != dtype.name:
        casts.append(Cast(path, rec.dtype, dtype.name))
    return want._replace(dtype=dtype)



def unused(entries: dict[str, str], matched: list[str], mismatched: list[Mismatch]
            ) -> tuple[str, ...]:
    """The checkpoint paths in ``entries`` that no target path used."""
    if len(matched) + len(mismatched) == len(entries):
        # Distinct target paths, each mapped to a distinct checkpoint path: all used. The
        # common case, without a set of every path.
        return ()
    used = {entries[p] for p in matched} | {entries[m.path] for m in mismatched}
    return tuple(src for src in entries.values() if src not in used)



def select(ckpt: _source.Source, at: str | None, rename_fn: Callable[[str], str] | None, url: str
            ) -> dict[str, str]:
    """Checkpoint paths by target path (after ``at`` and ``rename``). Paths only: a leaf's
    record is built when a target asks for it (see _columns.Columns)."""
    if rename_fn is None and not at:
        return {p: p for p in ckpt.leaves}
    if rename_fn is None:  # distinct paths under ``at`` stay distinct: no collisions
        assert at  # without ``at``, returned above
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
    return jax.numpy.issubdtype(dtype, jax.dtypes.prng_key)  # per leaf, so cached


_WANT = functools.partial(tuple.__new__, Want)  # Want(*fields), all of them


def want_for(path: str, leaf: Any, device: Any) -> Want:
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
        # made without NamedTuple's Python-level __new__ (this runs once per target leaf).
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


def compare(rec: LeafRecord, want: Want) -> bool | None:
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
    assert want.dtype is not None  # every kind but py has one
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


def want_dtype_str(want: Want) -> str:
    if want.kind == _leaves.PY:
        assert want.pytype is not None  # type(None) for a None leaf
        return want.pytype.__name__ if want.pytype is not type(None) else "none"
    assert want.dtype is not None
    return want.dtype.name


def mismatch(path: str, rec: LeafRecord, want: Want) -> Mismatch:
    saved = rec.dtype if rec.origin != _leaves.PRNGKEY else f"key<{rec.impl}>"
    target = want_dtype_str(want) if want.kind != _leaves.PRNGKEY else f"key<{want.impl}>"
    return Mismatch(path, rec.shape, saved, want.shape, target)
