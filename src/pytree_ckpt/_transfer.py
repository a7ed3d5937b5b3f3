"""Host-to-device transfers: the one module that uses JAX's private batched transfer.

``jax.device_put`` of a list, and ``make_array_from_single_device_arrays`` on top, cost
several times what ``batched_device_put`` does per leaf; it builds the global array from its
per-device host pieces in one call. With many small leaves that is most of a restore. It
is private, so every use is here, with the public API as the fallback if it moves; so is
:func:`device_of`, which reads a one-device sharding's private
``_device`` (saves and restores ask it once per leaf). tests/test_transfer.py pins what
both give against the public API.

The batched transfer makes the array its abstract value describes, and checks nothing: the
dtype must be one JAX computes with (canonical: no float64 without x64, or the array is
refused by every computation), which restore decides (and reports as a cast); a weak type
is part of that abstract value.

Host pieces that are 64-byte aligned are adopted without a copy on the CPU (zero-copy host
buffer semantics); the restore path allocates its read buffers that way.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

try:  # private: jax 0.10's batched transfer and abstract array type
    from jax._src import core as _core
    from jax._src.lib import xla_client as _xc  # pyright: ignore[reportPrivateImportUsage]

    _batched = _xc.batched_device_put
    _ShapedArray = _core.ShapedArray
except (ImportError, AttributeError):  # pragma: no cover - depends on the jax version
    _batched = None


@functools.lru_cache(maxsize=4096)
def _aval(shape: tuple[int, ...], dtype: np.dtype, weak_type: bool) -> Any:
    # Building an abstract value costs about as much as the transfer itself; trees repeat
    # their shapes (every layer of a model, its two Adam moments).
    return _ShapedArray(shape, dtype, weak_type=weak_type)


def assemble(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding,
             pieces: list[np.ndarray], devices: list[Any], *, copy: bool,
             weak_type: bool = False) -> jax.Array:
    """The ``jax.Array`` of ``shape`` and (canonical) ``dtype`` on ``sharding``, weakly typed
    if ``weak_type``, whose shard on ``devices[i]`` is ``pieces[i]`` (every addressable
    device, in ``addressable_devices_indices_map`` order). Lists, handed to JAX as they are
    (a copy would cost every small leaf).

    ``copy=False`` lets the CPU backend adopt aligned pieces as they are (buffers we own);
    ``copy=True`` for views into a larger buffer, which adopting would keep alive whole.
    """
    global _batched
    if _batched is not None:
        try:
            return _batched(_aval(shape, dtype, weak_type), sharding, pieces, devices, True,
                            copy)
        except TypeError:  # pragma: no cover - signature changed: use the public path
            _batched = None
    arrays = [jax.device_put(p, d, may_alias=not copy)
              for p, d in zip(pieces, devices, strict=True)]
    return _weakly_typed(jax.make_array_from_single_device_arrays(shape, sharding, arrays),
                         weak_type)


def to_device(host: np.ndarray, sharding: jax.sharding.SingleDeviceSharding, *, copy: bool,
              weak_type: bool = False) -> jax.Array:
    """``host`` as a ``jax.Array`` on the one device of ``sharding`` (``copy`` and
    ``weak_type`` as for :func:`assemble`)."""
    return assemble(host.shape, host.dtype, sharding, [host], [device_of(sharding)], copy=copy,
                    weak_type=weak_type)


def put(host: np.ndarray, sharding: jax.sharding.Sharding, *, weak_type: bool) -> jax.Array:
    """``jax.device_put(host, sharding)``, weakly typed if ``weak_type`` (for the few leaves
    that are not built from per-device pieces)."""
    return _weakly_typed(jax.device_put(host, sharding), weak_type)


def _weakly_typed(x: jax.Array, weak_type: bool) -> jax.Array:
    # No public call gives an array a weak type; JAX's own conversion does (a no-op copy).
    if not weak_type or x.weak_type:
        return x
    from jax._src.lax import lax as _lax  # private, as the batched transfer

    return _lax._convert_element_type(x, weak_type=True)  # pyright: ignore[reportReturnType]  # a jax.Array for one


def device_of(sharding: jax.sharding.SingleDeviceSharding) -> Any:
    """The one device of ``sharding``."""
    device = getattr(sharding, "_device", None)  # private, and faster than device_set
    if device is None:  # pragma: no cover - depends on the jax version
        (device,) = sharding.device_set
    return device
