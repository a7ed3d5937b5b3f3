"""Host-to-device transfers: the one module that uses JAX's private batched transfer.

``jax.device_put`` of a list costs ~25-80 µs per leaf on a CPU host, and
``make_array_from_single_device_arrays`` more on top; ``batched_device_put`` builds the global
array from its per-device host pieces in one call, ~6-9 µs per leaf. At 10,000 leaves that is most of a restore. It is
private, so every use is here, with the public API as the fallback if it moves; so is
:func:`device_of`, which reads a one-device sharding's private ``_device`` (saves and
restores ask it once per leaf).

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
    from jax._src.lib import xla_client as _xc

    _batched = _xc.batched_device_put
    _ShapedArray = _core.ShapedArray
except (ImportError, AttributeError):  # pragma: no cover - depends on the jax version
    _batched = None


@functools.lru_cache(maxsize=4096)
def _aval(shape: tuple[int, ...], dtype: np.dtype) -> Any:
    # Building an abstract value costs about as much as the transfer itself; trees repeat
    # their shapes (every layer of a model, its two Adam moments).
    return _ShapedArray(shape, dtype)


def assemble(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding,
             pieces: list[np.ndarray], devices: list[Any], *, copy: bool) -> jax.Array:
    """The ``jax.Array`` of ``shape`` on ``sharding`` whose shard on ``devices[i]`` is
    ``pieces[i]`` (every addressable device, in ``addressable_devices_indices_map`` order).
    Lists, handed to JAX as they are (copying them cost ~0.3 µs of every small leaf).

    ``copy=False`` lets the CPU backend adopt aligned pieces as they are (buffers we own);
    ``copy=True`` for views into a larger buffer, which adopting would keep alive whole.
    """
    global _batched
    if _batched is not None:
        try:
            return _batched(_aval(shape, dtype), sharding, pieces, devices, True, copy)
        except TypeError:  # pragma: no cover - signature changed: use the public path
            _batched = None
    arrays = [jax.device_put(p, d, may_alias=not copy)
              for p, d in zip(pieces, devices, strict=True)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def to_device(host: np.ndarray, sharding: jax.sharding.SingleDeviceSharding, *, copy: bool
              ) -> jax.Array:
    """``host`` as a ``jax.Array`` on the one device of ``sharding`` (``copy`` as for
    :func:`assemble`)."""
    return assemble(host.shape, host.dtype, sharding, [host], [device_of(sharding)], copy=copy)


def device_of(sharding: jax.sharding.SingleDeviceSharding) -> Any:
    """The one device of ``sharding``."""
    device = getattr(sharding, "_device", None)  # private, and 10x faster than device_set
    if device is None:  # pragma: no cover - depends on the jax version
        (device,) = sharding.device_set
    return device
