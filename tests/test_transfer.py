"""_transfer: the one module on JAX's private batched transfer and a sharding's private
device. These tests pin what it gives against the public API, so that a JAX release that
changes either shows here first."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from pytree_ckpt import _transfer


@pytest.mark.parametrize("weak_type", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, jnp.bfloat16, np.bool_])
def test_to_device_gives_what_device_put_gives(dtype, weak_type):
    device = jax.devices()[2]
    sharding = SingleDeviceSharding(device)
    host = np.asarray(np.arange(6).reshape(2, 3) % 2, dtype)
    x = _transfer.to_device(host, sharding, copy=True, weak_type=weak_type)
    public = jax.device_put(host, device)
    assert x.dtype == public.dtype and x.shape == public.shape
    assert x.weak_type is weak_type and x.sharding == public.sharding
    assert x.devices() == {device}
    np.testing.assert_array_equal(np.asarray(x), host)
    np.testing.assert_array_equal(jax.jit(lambda a, b: a | b if a.dtype == bool else a + b)(
        x, public), host | host if host.dtype == bool else host + host)


@pytest.mark.parametrize("weak_type", [False, True])
def test_assemble_builds_a_sharded_array_from_its_pieces(weak_type):
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))
    host = np.arange(64, dtype=np.float32).reshape(8, 8)
    placed = sharding.addressable_devices_indices_map(host.shape)
    x = _transfer.assemble(host.shape, host.dtype, sharding, [host[i] for i in placed.values()],
                           list(placed), copy=True, weak_type=weak_type)
    live = jax.device_put(host, sharding)
    assert x.sharding == live.sharding and x.weak_type is weak_type and x.dtype == np.float32
    for shard in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
    np.testing.assert_array_equal(jax.jit(lambda a, b: a + b)(x, live), host * 2)


def test_put_gives_a_weak_type_where_asked():
    sharding = SingleDeviceSharding(jax.devices()[1])
    strong = _transfer.put(np.float32(2.5), sharding, weak_type=False)
    weak = _transfer.put(np.float32(2.5), sharding, weak_type=True)
    assert (strong.weak_type, weak.weak_type) == (False, True)
    assert weak.sharding == strong.sharding and float(weak) == 2.5
    assert jax.jit(lambda a: a * 2)(weak).weak_type


def test_device_of_a_one_device_sharding():
    for device in jax.devices():
        assert _transfer.device_of(SingleDeviceSharding(device)) is device
