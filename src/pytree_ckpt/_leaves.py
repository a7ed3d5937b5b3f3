"""What a leaf is, how it is saved exactly, and what it becomes on restore.

Leaf kinds (the ``origin`` stored per leaf in the commit file):

- ``jax``: a ``jax.Array``; restored as a ``jax.Array``.
- ``numpy``: a ``numpy.ndarray``; restored as one. A ``numpy.ma.MaskedArray`` is refused
  (its mask would be lost).
- ``npscalar``: a NumPy scalar (``np.float32(1.5)``); restored as the same scalar type.
- ``prngkey``: a typed PRNG key array (``jax.random.key``); its key data is stored
  (``jax.random.key_data``) with the implementation's name, and rewrapped on restore.
- ``py``: ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``; the value is
  stored in the commit file itself (covered by its checksum) and restored as the same type.

Anything else raises :class:`UnsupportedLeafError` naming the leaf's path. Nothing is pickled.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from ._errors import CorruptCheckpointError, UnsupportedLeafError

JAX, NUMPY, NPSCALAR, PRNGKEY, PY = "jax", "numpy", "npscalar", "prngkey", "py"
ARRAY_ORIGINS = frozenset({JAX, NUMPY, NPSCALAR, PRNGKEY})

# The dtypes a checkpoint may name. A closed list: the commit file is untrusted, and an
# object dtype must never be built from it.
_DTYPE_NAMES = (
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 "
    "complex64 complex128 bfloat16 int2 int4 uint2 uint4 float4_e2m1fn float8_e3m4 float8_e4m3 "
    "float8_e4m3b11fnuz float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu"
).split()
DTYPES: dict[str, np.dtype] = {}
for _name in _DTYPE_NAMES:
    _tp = getattr(ml_dtypes, _name, None) or getattr(np, _name, None)
    if _tp is not None:
        DTYPES[_name] = np.dtype(_tp)

# Python leaf types by the name stored for them.
PY_TYPES: dict[str, type] = {
    "none": type(None), "bool": bool, "int": int, "float": float,
    "complex": complex, "str": str, "bytes": bytes,
}
_PY_NAMES = {tp: name for name, tp in PY_TYPES.items()}


class LeafInfo(NamedTuple):
    """How one leaf is saved: its kind, dtype name and shape (``()`` for Python leaves)."""

    origin: str
    dtype: str
    shape: tuple[int, ...]
    impl: str | None = None  # PRNG implementation name, for prngkey leaves


_NAMES: dict[Any, str] = {}


def nbytes(origin: str, shape: tuple[int, ...], dtype: str) -> int:
    """The bytes of a leaf's array (``dtype`` by its name, see :data:`DTYPES`); 0 for a
    Python value."""
    return 0 if origin == PY else math.prod(shape) * DTYPES[dtype].itemsize


def dtype_name(dtype: Any) -> str:
    # np.dtype.name is computed in Python on every access; trees have few dtypes.
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = np.dtype(dtype).name
    return name


def is_prng_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)


# What follows runs once per leaf of every save, while the caller waits, so the answers
# that depend only on a type or a dtype are remembered: isinstance against jax.Array (an
# ABC) and issubdtype are slow calls.
ARRAY_KINDS: dict[type, str] = {}  # leaf type -> JAX, NUMPY or NPSCALAR
JAX_DTYPES: dict[Any, str] = {}  # dtype of a jax.Array that is not a PRNG key -> its name


def describe(path: str, leaf: Any) -> LeafInfo:
    """Classifies one leaf of a tree being saved, or raises :class:`UnsupportedLeafError`."""
    tp = type(leaf)
    py = _PY_NAMES.get(tp)
    if py is not None:
        if tp is str:
            check_text(path, leaf, "leaf")
        return LeafInfo(PY, py, ())
    kind = ARRAY_KINDS.get(tp) or _array_kind(path, tp)
    if kind is JAX:
        dtype = leaf.dtype
        name = JAX_DTYPES.get(dtype)
        if name is None:
            if jax.numpy.issubdtype(dtype, jax.dtypes.prng_key):
                data = jax.random.key_data(leaf)
                impl = str(jax.random.key_impl(leaf))
                return LeafInfo(PRNGKEY, dtype_name(data.dtype), tuple(data.shape), impl)
            name = JAX_DTYPES[dtype] = _checked_dtype(path, dtype)
        shape = leaf.shape
        return LeafInfo(JAX, name, shape if type(shape) is tuple else tuple(shape))
    if kind is NUMPY:
        return LeafInfo(NUMPY, _checked_dtype(path, leaf.dtype), leaf.shape)
    return LeafInfo(NPSCALAR, _checked_dtype(path, leaf.dtype), ())


def _array_kind(path: str, tp: type) -> str:
    if issubclass(tp, jax.Array):
        kind = JAX
    elif issubclass(tp, np.ma.MaskedArray):
        # Its values alone would be saved: the mask, silently lost.
        raise UnsupportedLeafError(
            f"leaf {path or '<root>'!r} is a numpy.ma.MaskedArray, whose mask would be lost; "
            "save its values and mask as two leaves (x.data, np.ma.getmaskarray(x)), or "
            "x.filled(value)")
    elif issubclass(tp, np.ndarray):
        kind = NUMPY
    elif issubclass(tp, np.generic):
        kind = NPSCALAR
    else:
        raise UnsupportedLeafError(
            f"leaf {path or '<root>'!r} has type {tp.__module__}.{tp.__qualname__}, which cannot "
            "be saved exactly; supported leaves are jax.Array, numpy arrays and scalars, typed "
            "PRNG keys, and None/bool/int/float/complex/str/bytes (convert it, or register its "
            "class as a pytree node)"
        )
    ARRAY_KINDS[tp] = kind
    return kind


def _checked_dtype(path: str, dtype: Any) -> str:
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise UnsupportedLeafError(
            f"leaf {path or '<root>'!r} has dtype {name}, which cannot be saved; supported "
            f"dtypes: {', '.join(DTYPES)}"
        )
    return name


def little_endian(array: np.ndarray) -> np.ndarray:
    """``array``, or a little-endian copy of it: every byte is stored little-endian, and a
    dtype's name does not say its byte order (``np.dtype(">f4").name == "float32"``)."""
    order = array.dtype.byteorder
    if order == ">" or (order == "=" and sys.byteorder == "big"):
        return array.astype(array.dtype.newbyteorder("<"))
    return array


def check_text(path: str, text: str, what: str) -> None:
    """Raises :class:`UnsupportedLeafError` naming ``path`` unless ``text`` (a str leaf, or a
    path) is valid Unicode: msgpack writes str as UTF-8, which has no lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedLeafError(
            f"{what} {path or '<root>'!r} is not valid Unicode text (a lone surrogate), which "
            "the checkpoint cannot store as text; use bytes, or valid text") from None


def encode_py(value: Any, version: int) -> Any:
    """A Python leaf as a msgpack value, in format ``version``: exact, complex as a pair of
    floats, ints past 64 bits as their two's-complement bytes, little-endian (decimal text
    before format 5, which Python refuses past 4,300 digits)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**64:
            return value
        if version < 5:
            return str(value)
        return value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    if isinstance(value, complex):
        return [value.real, value.imag]
    return value


def decode_py(type_name: str, stored: Any, where: str) -> Any:
    """Inverse of :func:`encode_py`, checking that the stored value has the declared type."""
    tp = PY_TYPES.get(type_name) if isinstance(type_name, str) else None
    ok = False
    value = stored
    if tp is int and isinstance(stored, str) and len(stored) <= 4300:
        try:
            value, ok = int(stored), True
        except ValueError:
            ok = False
    elif tp is int and isinstance(stored, bytes):  # linear in its length, whatever that is
        value, ok = int.from_bytes(stored, "little", signed=True), True
    elif tp is complex and isinstance(stored, list) and len(stored) == 2:
        if all(isinstance(x, float) for x in stored):
            value, ok = complex(stored[0], stored[1]), True
    elif tp is not None:
        ok = type(stored) is tp
    if not ok:
        raise CorruptCheckpointError(
            f"{where}: stored Python value {type(stored).__name__} does not match its "
            f"declared type {type_name!r}"
        )
    return value


def show_py(value: Any) -> str:
    """``repr(value)`` of a Python leaf for display; an int Python will not write as text
    (over 4,300 digits, ``sys.get_int_max_str_digits()``) as its size instead."""
    try:
        return repr(value)
    except ValueError:
        return f"<int of {value.bit_length():,} bits>"


def item_kind(dtype: np.dtype) -> str:
    """'b' bool, 'i' signed, 'u' unsigned, 'f' floating (ml_dtypes too), 'c' complex."""
    if dtype == np.bool_:
        return "b"
    if jax.numpy.issubdtype(dtype, jax.numpy.floating):
        return "f"
    if jax.numpy.issubdtype(dtype, jax.numpy.complexfloating):
        return "c"
    if jax.numpy.issubdtype(dtype, jax.numpy.unsignedinteger):
        return "u"
    return "i"


def prng_key_shape(impl: str) -> tuple[int, ...] | None:
    """The key data shape of the PRNG implementation named ``impl`` (its dtype is uint32),
    or None if no such implementation is registered here. A lookup in JAX's registry by
    name; nothing is imported."""
    try:
        return _prng_key_shape(impl)
    except (ValueError, TypeError):  # unknown names are not cached
        return None


@functools.lru_cache(maxsize=16)
def _prng_key_shape(impl: str) -> tuple[int, ...]:
    data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
    if data.dtype != np.uint32:
        raise ValueError(impl)
    return tuple(data.shape)
