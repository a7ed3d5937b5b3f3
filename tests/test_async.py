"""save_async: the snapshot, errors from the background, ordering of saves, and exit."""

import functools
import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pytree_ckpt as pc
from pytree_ckpt import _async, _packing, _write

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")


@pytest.fixture
def gate(monkeypatch):
    """Holds every background write until ``gate.set()``; records when writes start."""
    event = threading.Event()
    event.started = threading.Event()
    real = _write.write_data

    def write_data(*args):
        event.started.set()
        assert event.wait(30), "test gate never opened"
        return real(*args)

    monkeypatch.setattr(_write, "write_data", write_data)
    yield event
    event.set()
    _async.wait_all()


def _state(mesh):
    rng = np.random.default_rng(0)
    return {
        "w": jax.device_put(rng.standard_normal((256, 512), np.float32),
                            NamedSharding(mesh, P("x", "y"))),
        "rep": jax.device_put(rng.standard_normal((128, 512), np.float32),
                              NamedSharding(mesh, P())),
        "b": jax.device_put(rng.standard_normal((8,), np.float32), NamedSharding(mesh, P())),
        "one": jnp.arange(300_000, dtype=jnp.float32),
        "step": jnp.int32(0),
    }


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("x", "y"))


def test_snapshot_survives_a_donating_step(tmp_path, mesh, gate):
    state = _state(mesh)
    expected = jax.tree.map(np.array, state)
    step = jax.jit(lambda s: jax.tree.map(lambda v: v * 2 + 1, s), donate_argnums=0)
    fut = pc.save_async(state, tmp_path / "c")
    new = step(state)  # donates every buffer the snapshot was taken from
    jax.block_until_ready(new)
    # Donation really happened: the snapshot holds no view of device memory (on the CPU,
    # a NumPy view of a buffer silently stops XLA from donating it).
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert not fut.done()  # the write had not even started when the step ran
    gate.set()
    assert fut.result() == str(tmp_path / "c")
    restored, status = pc.restore(tmp_path / "c", jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), new))
    status.assert_consumed()
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), value)
        assert restored[path].sharding == new[path].sharding


def test_background_error_is_reraised_by_result(tmp_path, gate):
    fut = pc.save_async({"w": np.ones((300, 300))}, tmp_path / "c")
    assert gate.started.wait(10)
    # After the snapshot, the destination becomes unwritable: a file where the checkpoint's
    # directory should be.
    (tmp_path / "c").write_text("in the way")
    gate.set()
    with pytest.raises(pc.SaveError, match="save failed, nothing was committed"):
        fut.result()
    assert isinstance(fut.exception(), pc.SaveError)
    assert fut.done() and "done" in repr(fut)
    assert (tmp_path / "c").read_text() == "in the way"


def test_a_failing_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    pc.save({"w": np.arange(3)}, tmp_path / "c")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(_write, "write_data", fail)
    fut = pc.save_async({"w": np.arange(5)}, tmp_path / "c", overwrite=True)
    with pytest.raises(pc.SaveError, match="OSError: disk full"):
        fut.result()
    tree, _ = pc.restore(tmp_path / "c")
    np.testing.assert_array_equal(tree["w"], np.arange(3))


def test_a_save_waits_for_the_previous_one(tmp_path, gate):
    first = pc.save_async({"w": np.arange(4)}, tmp_path / "a")
    second: list = []
    thread = threading.Thread(
        target=lambda: second.append(pc.save_async({"w": np.arange(6)}, tmp_path / "b")))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and not first.done()  # blocked before its snapshot
    gate.set()
    thread.join(10)
    assert not thread.is_alive()
    assert first.done()  # the second save started only after the first finished
    assert first.result() == str(tmp_path / "a")
    assert second[0].result() == str(tmp_path / "b")
    np.testing.assert_array_equal(pc.restore(tmp_path / "b")[0]["w"], np.arange(6))


def test_save_to_the_same_path_after_an_async_save(tmp_path, gate):
    fut = pc.save_async({"w": np.arange(4)}, tmp_path / "c")
    gate.set()
    pc.save({"w": np.arange(7)}, tmp_path / "c", overwrite=True)  # waits, then overwrites
    assert fut.result() == str(tmp_path / "c")
    np.testing.assert_array_equal(pc.restore(tmp_path / "c")[0]["w"], np.arange(7))


def test_result_with_a_timeout_does_not_retrieve_the_error(tmp_path, gate):
    fut = pc.save_async({"w": np.arange(4)}, tmp_path / "c")
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.05)
    assert "pending" in repr(fut)
    gate.set()
    assert fut.result() == str(tmp_path / "c")


def _run(script: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)


def test_interpreter_exit_waits_for_a_pending_save(tmp_path):
    proc = _run(f"""
        import time
        import numpy as np
        import pytree_ckpt as pc
        from pytree_ckpt import _write

        real = _write.write_data
        def slow(*args):
            time.sleep(1.0)  # still writing when the main thread ends
            return real(*args)
        _write.write_data = slow
        fut = pc.save_async({{"w": np.arange(10.0), "s": "text"}}, {str(tmp_path / "c")!r})
        assert not fut.done()
        print("exiting", flush=True)
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "exiting\n" and proc.stderr == ""
    tree, status = pc.restore(tmp_path / "c")
    np.testing.assert_array_equal(tree["w"], np.arange(10.0))
    assert tree["s"] == "text"


def test_an_unretrieved_background_error_is_reported_at_exit(tmp_path):
    proc = _run(f"""
        import numpy as np
        import pytree_ckpt as pc
        from pytree_ckpt import _write

        def fail(*args):
            raise OSError("disk full")
        _write.write_data = fail
        pc.save_async({{"w": np.arange(3)}}, {str(tmp_path / "bad")!r})
        seen = pc.save_async({{"w": np.arange(3)}}, {str(tmp_path / "seen")!r})
        try:
            seen.result()
        except pc.SaveError:
            print("caught", flush=True)
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "caught\n"
    assert "background save to " + str(tmp_path / "bad") in proc.stderr
    assert "OSError: disk full" in proc.stderr
    assert str(tmp_path / "seen") not in proc.stderr  # its error was retrieved



def test_a_tree_of_python_leaves_only_saves_to_a_new_directory(tmp_path):
    # No array data at all: the commit still lands in a directory that did not exist.
    path = tmp_path / "new" / "c"
    assert pc.save_async({"step": 3, "name": "run"}, path).result() == str(path)
    assert pc.restore(path)[0] == {"step": 3, "name": "run"}


def test_flax_optax_state_saved_async_in_a_donated_loop_restores_onto_another_mesh(tmp_path):
    """The issue's "done when": a Flax + optax training state sharded over 8 devices, saved
    asynchronously every few steps of a jitted loop that donates it, restored onto another
    mesh with other PartitionSpecs, every path matched both ways."""
    nn = pytest.importorskip("flax.linen")
    optax = pytest.importorskip("optax")
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.relu(nn.Dense(64)(x)))

    def specs(tree, two_d, one_d):
        return jax.tree.map(lambda x: {2: two_d, 1: one_d}.get(x.ndim, P()), tree)

    def place(tree, mesh, two_d, one_d):
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                            tree, specs(tree, two_d, one_d))

    model = MLP()
    auto = (jax.sharding.AxisType.Auto,) * 2  # let jit propagate shardings through the MLP
    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=auto)
    params = model.init(jax.random.key(0), jnp.ones((16, 32)))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=optax.adam(1e-2))
    state = state.replace(step=jnp.int32(0))
    # Parameters and Adam moments sharded over the 4x2 mesh; step and count replicated.
    state = place(state, mesh, P("x", "y"), P("y"))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 32), np.float32), rng.standard_normal((16, 8), np.float32)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        def loss(params):
            return jnp.mean((state.apply_fn(params, x) - y) ** 2)
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    futures, expected = {}, {}
    for i in range(7):
        if i % 3 == 0:
            expected[i] = jax.tree.map(lambda v: np.array(v, copy=True), state)
            futures[i] = pc.save_async(state, tmp_path / f"step_{i}")
        old, state = state, train_step(state, x, y)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))  # truly donated
    assert [f.result() for f in futures.values()] == [str(tmp_path / f"step_{i}")
                                                       for i in futures]

    info = pc.metadata(tmp_path / "step_3")
    assert info.leaves["params/params/Dense_0/kernel"].sharding == \
        "P('x', 'y') over mesh(x=4, y=2)"
    other = jax.make_mesh((2, 4), ("a", "b"), axis_types=auto)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, s)),
        state, specs(state, P("b", "a"), P("a")))
    for i in futures:
        restored, status = pc.restore(tmp_path / f"step_{i}", target)
        status.assert_consumed()
        assert int(restored.step) == i
        for got, want, abstract in zip(jax.tree.leaves(restored),
                                       jax.tree.leaves(expected[i]),
                                       jax.tree.leaves(target), strict=True):
            assert got.sharding == abstract.sharding
            np.testing.assert_array_equal(np.asarray(got), want)
    # The restored state trains on the new mesh.
    assert int(train_step(restored, x, y).step) == 7


# --- packing parts reused from one save to the next ----------------------------------------


def _small_leaves(seed):
    """Small leaves of every copy path: CPU arrays (buffer protocol), ml_dtypes, host values,
    empty and 0-d arrays, and sizes that leave alignment padding between leaves."""
    rng = np.random.default_rng(seed)
    return {
        "f32": jnp.asarray(rng.standard_normal(37, np.float32)),
        "bf16": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16),
        "i4": jnp.asarray(rng.integers(-8, 8, 7), jnp.int4),
        "flag": jnp.asarray(rng.integers(0, 2, 3).astype(bool)),
        "scalar": jnp.float32(rng.standard_normal()),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "np": rng.standard_normal((3, 5)),
        "strided": rng.standard_normal(20).astype(np.float32)[::3],
        "fortran": np.asfortranarray(rng.integers(0, 99, (4, 6)).astype(np.int16)),
        "npscalar": np.int8(seed),
        "key": jax.random.key(seed),
    }


def _is_key(x):
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _packing_of(tree):
    """What _snapshot.snapshot hands _packing.pack for these leaves, in this process."""
    from pytree_ckpt import _graph

    flat = _graph.flatten(jax.tree.map(
        lambda v: jax.random.key_data(v) if _is_key(v) else v, tree))
    packing = _packing.Packing()
    for path, v in zip(flat.paths, flat.leaves, strict=True):
        packing.add(path, v, np.asarray(v).nbytes, isinstance(v, jax.Array) and v.size > 0
                    and v.dtype.name in _packing.BUFFER_DTYPES)
    return packing


def _placed(packing):
    return [list(packing.placed(k)) for k in range(len(packing.part_sizes))]


def test_a_reused_part_carries_no_byte_of_the_previous_save():
    first = _packing.pack(_packing_of(_small_leaves(1)))
    for part in first:
        part[:] = b"\xab" * len(part)  # whatever a previous save left there
        _packing.pool.give(part)
    reused = _packing.pack(packing := _packing_of(_small_leaves(2)))
    assert [id(p) for p in reused] == [id(p) for p in first]  # same sizes: the same parts
    fresh = _packing.pack(packing_fresh := _packing_of(_small_leaves(2)))  # the pool is empty
    assert not {id(p) for p in fresh} & {id(p) for p in first}
    assert _placed(packing) == _placed(packing_fresh)
    assert [bytes(p) for p in reused] == [bytes(p) for p in fresh]  # padding zeroed too


def test_saves_that_reuse_parts_restore_their_own_values(tmp_path):
    trees = [_small_leaves(seed) for seed in range(3)]
    for i, tree in enumerate(trees):
        pc.save_async(tree, tmp_path / str(i)).result()
    pc.save_async(trees[0], tmp_path / "again").result()
    for i, tree in [*enumerate(trees), (0, trees[0])]:
        restored, _ = pc.restore(tmp_path / str(i))
        for name, value in tree.items():
            got = restored[name]
            if _is_key(value):
                value, got = jax.random.key_data(value), jax.random.key_data(got)
            assert np.asarray(got).tobytes() == np.asarray(value).tobytes(), name
    restored, _ = pc.restore(tmp_path / "again")
    assert np.asarray(restored["f32"]).tobytes() == np.asarray(trees[0]["f32"]).tobytes()


def test_a_donating_loop_with_reused_parts_saves_every_step(tmp_path):
    rng = np.random.default_rng(0)
    state = {f"w{i}": jnp.asarray(rng.standard_normal(50 + i, np.float32)) for i in range(40)}
    step = jax.jit(lambda s: jax.tree.map(lambda v: v * 2 + 1, s), donate_argnums=0)
    expected = []
    for k in range(4):
        expected.append(jax.tree.map(np.array, state))
        fut = pc.save_async(state, tmp_path / str(k))
        old, state = state, step(state)
        jax.block_until_ready(state)
        assert all(leaf.is_deleted() for leaf in old.values())  # donated: no view was held
        fut.result()
    for k, want in enumerate(expected):
        restored, _ = pc.restore(tmp_path / str(k))
        for name, value in want.items():
            np.testing.assert_array_equal(np.asarray(restored[name]), value)


def test_a_failed_save_gives_its_parts_back(tmp_path, gate):
    tree = _small_leaves(4)
    fut = pc.save_async(tree, tmp_path / "c")
    assert gate.started.wait(10)
    (tmp_path / "c").write_text("in the way")
    gate.set()
    with pytest.raises(pc.SaveError, match="save failed, nothing was committed"):
        fut.result()
    pooled = [p for parts in _packing.pool._free.values() for p in parts]
    assert pooled  # given back once every write had ended
    pc.save_async(_small_leaves(5), tmp_path / "d").result()
    restored, _ = pc.restore(tmp_path / "d")
    assert np.asarray(restored["f32"]).tobytes() == np.asarray(
        _small_leaves(5)["f32"]).tobytes()


def test_the_pool_holds_at_most_its_bound(monkeypatch):
    monkeypatch.setattr(_packing, "POOL_BYTES", 100)
    pool = _packing.PartPool()
    for n in (60, 30, 20, 5):
        pool.give(bytearray(n))
    assert sorted(len(p) for parts in pool._free.values() for p in parts) == [5, 30, 60]
    taken = pool.take([30, 30, 7])
    assert [len(p) for p in taken] == [30, 30, 7]
    assert pool._free == {}  # what this save did not use is dropped, not kept


def test_leaves_on_many_devices_and_prng_keys_keep_their_own_placement(tmp_path):
    # The snapshot asks each sharding object once; a PRNG key's data is a new array per
    # key, dropped right after, so a cached answer must not outlive its sharding's id.
    devices = jax.devices()
    tree = {}
    for i in range(48):
        device = devices[i % len(devices)]
        impl = "rbg" if i % 3 == 0 else "threefry2x32"
        tree[f"k{i:02d}"] = jax.device_put(jax.random.key(i, impl=impl), device)
        tree[f"x{i:02d}"] = jax.device_put(jnp.arange(i + 1, dtype=jnp.float32) * i, device)
    mesh = jax.sharding.Mesh(np.array(devices).reshape(4, 2), ("a", "b"))
    tree["replicated"] = jax.device_put(jnp.ones(6), NamedSharding(mesh, P()))
    restored, status = pc.restore(pc.save_async(tree, tmp_path / "c").result(), tree)
    status.assert_consumed()
    for name, value in tree.items():
        got = restored[name]
        assert got.sharding == value.sharding, name
        if name.startswith("k"):
            assert jax.random.key_impl(got) == jax.random.key_impl(value), name
            got, value = jax.random.key_data(got), jax.random.key_data(value)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(value), err_msg=name)
