"""Where a restore without a target puts each saved leaf: the kind it was saved as, on its
saved mesh where this process's devices can hold it, else on the default device."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from . import _leaves
from ._build import Want
from ._errors import CorruptCheckpointError
from ._format import LeafRecord, SavedSharding


def saved_want(rec: LeafRecord, placement: Placement) -> Want:
    """What restoring without a target gives back for ``rec``: the kind it was saved as."""
    if rec.origin == _leaves.PY:
        return Want(_leaves.PY, None, (), pytype=_leaves.PY_TYPES[rec.dtype])
    dtype = _leaves.DTYPES[rec.dtype]
    if rec.origin == _leaves.NPSCALAR:
        return Want(_leaves.NPSCALAR, dtype, (), pytype=dtype.type)
    if rec.origin == _leaves.NUMPY:
        return Want(_leaves.NUMPY, dtype, rec.shape)
    return Want(rec.origin, dtype, rec.shape, placement(rec), impl=rec.impl, weak=rec.weak)


class Placement:
    """Where a restore without a target puts each saved jax.Array or PRNG key: on its saved
    mesh, made once per saved sharding, when this process's devices can hold it, else on
    the default device.

    The mesh takes its saved devices, in their saved order, where they all exist here (a
    ``jax.make_mesh`` mesh orders devices by topology: another order is another layout);
    else, when the device count matches, ``jax.devices()`` in order (checkpoints written
    before format 5 recorded no device ids). Axis types come back as saved (Auto before
    format 5)."""

    def __init__(self, device: Any) -> None:
        self.default = self._device = jax.sharding.SingleDeviceSharding(device)
        self._meshes: dict[SavedSharding, jax.sharding.Mesh | None] = {}
        self._devices = jax.devices()

    def __call__(self, rec: LeafRecord) -> jax.sharding.Sharding:
        saved = rec.sharding
        if saved is None:
            return self._device
        if saved not in self._meshes:
            self._meshes[saved] = self._mesh(rec, saved)
        mesh = self._meshes[saved]
        if mesh is None:
            return self._device
        spec = saved.spec
        if rec.origin == _leaves.PRNGKEY:  # the key data's spec, cut to the keys' rank
            assert rec.impl is not None  # every key has one
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

    def _mesh(self, rec: LeafRecord, saved: SavedSharding) -> jax.sharding.Mesh | None:
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
