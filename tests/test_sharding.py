"""Sharded saves and resharding restores on 8 virtual CPU devices (see conftest.py).

What is checked, besides equal values: every restored array has exactly the target's
sharding; the zarr chunk grid lines up with the saved shards; each replicated shard is written
once; a restore reads each target region once and nothing else; a missing chunk is an error,
never zeros; and ``metadata`` shows the saved sharding.
"""

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _values import ALL_DTYPES, representable
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import pytree_ckpt as pc
from pytree_ckpt import _build, _open, _read, _snapshot, _storage

# Big enough (512 KiB) to be stored as a zarr array rather than packed.
BIG = (256, 512)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("x", "y"))


def _values(shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype)


def _put(value, mesh, spec):
    return jax.device_put(value, NamedSharding(mesh, spec))


def _commit(path):
    loc = _storage.location(path)
    return _open.load_commit(loc, _storage.open_kvstore(loc))


def _chunk_files(ckpt, commit, leaf):
    root = os.path.join(ckpt, commit.data, "a", str(commit.leaves[leaf].storage.index), "c")
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


def _check(restored, expected, sharding):
    assert isinstance(restored, jax.Array)
    assert restored.sharding == sharding, (restored.sharding, sharding)
    np.testing.assert_array_equal(np.asarray(restored), expected)
    for shard in restored.addressable_shards:  # every device holds its own region
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


# --- the resharding matrix -------------------------------------------------------------


def _targets(mesh):
    """Target shardings by name: other meshes, other specs, fewer devices, one device."""
    devices = jax.devices()
    two = jax.make_mesh((2,), ("x",), devices=devices[:2])
    eight = jax.make_mesh((8,), ("x",))
    wide = jax.make_mesh((2, 4), ("a", "b"))
    back = jax.sharding.Mesh(np.array(devices[4:][::-1]).reshape(2, 2), ("p", "q"))
    return {
        "same": NamedSharding(mesh, P("x", "y")),
        "2 devices": NamedSharding(two, P("x")),
        "8 devices P(None, x)": NamedSharding(eight, P(None, "x")),
        "4x2 P(None, x)": NamedSharding(mesh, P(None, "x")),
        "2x4 P(b, a)": NamedSharding(wide, P("b", "a")),
        "replicated": NamedSharding(mesh, P()),
        "partially replicated": NamedSharding(mesh, P("x", None)),
        "both axes on dim 1": NamedSharding(mesh, P(None, ("x", "y"))),
        "single device": SingleDeviceSharding(devices[3]),
        "devices 7..4, P(q, p)": NamedSharding(back, P("q", "p")),
    }


SAVE_SPECS = {
    "P(x, y)": P("x", "y"),
    "P(x, None)": P("x", None),
    "P(None, y)": P(None, "y"),
    "P((x, y))": P(("x", "y")),
    "P(y, x)": P("y", "x"),
    "replicated": P(),
}


@pytest.mark.parametrize("save_spec", SAVE_SPECS.values(), ids=SAVE_SPECS.keys())
def test_restore_onto_every_target_sharding(tmp_path, mesh, save_spec):
    value = _values(BIG)
    ckpt = pc.save({"w": _put(value, mesh, save_spec)}, tmp_path / "c")
    for sharding in _targets(mesh).values():
        target = {"w": jax.ShapeDtypeStruct(BIG, jnp.float32, sharding=sharding)}
        tree, status = pc.restore(ckpt, target)
        status.assert_consumed()
        _check(tree["w"], value, sharding)


def test_restore_onto_a_concrete_arrays_sharding(tmp_path, mesh):
    value = _values(BIG)
    ckpt = pc.save(_put(value, mesh, P("x", "y")), tmp_path / "c")
    wide = jax.make_mesh((2, 4), ("a", "b"))
    like = jax.device_put(jnp.zeros(BIG), NamedSharding(wide, P(None, "b")))
    tree, status = pc.restore(ckpt, like)
    status.assert_consumed()
    _check(tree, value, like.sharding)


def test_shape_dtype_struct_without_sharding_goes_to_the_default_device(tmp_path, mesh):
    value = _values(BIG)
    ckpt = pc.save(_put(value, mesh, P("x", "y")), tmp_path / "c")
    tree, _ = pc.restore(ckpt, jax.ShapeDtypeStruct(BIG, jnp.float32))
    _check(tree, value, SingleDeviceSharding(jax.devices()[0]))


def test_restore_without_target_uses_the_saved_sharding(tmp_path, mesh):
    value = _values(BIG)
    saved = _put(value, mesh, P("x", "y"))
    ckpt = pc.save({"w": saved, "b": _put(_values((8, 2)), mesh, P("x", "y"))}, tmp_path / "c")
    tree, status = pc.restore(ckpt)
    assert status.matched == ("b", "w")
    w = tree["w"]
    # The saved sharding comes back: mesh devices in their order, axis names and types,
    # and spec; the restored array computes with live ones.
    assert w.sharding == saved.sharding
    assert w.sharding.mesh.axis_types == saved.sharding.mesh.axis_types
    _check(w, value, saved.sharding)
    assert tree["b"].sharding == saved.sharding
    np.testing.assert_array_equal(jax.jit(lambda a, b: a + b)(w, saved), value * 2)


def test_saved_sharding_on_more_devices_than_here_restores_on_the_default_device(
        tmp_path, mesh, monkeypatch):
    value = _values(BIG)
    ckpt = pc.save(_put(value, mesh, P("x", "y")), tmp_path / "c")
    monkeypatch.setattr(jax, "devices", lambda *a: jax.local_devices()[:2])
    tree, _ = pc.restore(ckpt)
    _check(tree, value, SingleDeviceSharding(jax.local_devices()[0]))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(64, 32), (1024, 520)], ids=["small", "over 256 KiB"])
def test_sharded_dtypes(tmp_path, mesh, dtype, shape):
    with jax.enable_x64(True):  # 64-bit dtypes as jax.Arrays
        _sharded_dtype_round_trip(tmp_path, mesh, dtype, shape)


def _sharded_dtype_round_trip(tmp_path, mesh, dtype, shape):
    value = representable(dtype, shape, seed=1)
    saved = {"sharded": _put(value, mesh, P("x", "y")), "replicated": _put(value, mesh, P())}
    ckpt = pc.save(saved, tmp_path / "c")
    target = jax.ShapeDtypeStruct(value.shape, value.dtype,
                                  sharding=NamedSharding(mesh, P("y", None)))
    tree, status = pc.restore(ckpt, {"sharded": target, "replicated": target})
    status.assert_consumed()
    _check(tree["sharded"], value, target.sharding)
    _check(tree["replicated"], value, target.sharding)
    tree, status = pc.restore(ckpt)  # the saved shardings
    status.assert_consumed()
    for name, array in saved.items():
        _check(tree[name], value, array.sharding)
        assert tree[name].dtype == dtype


def test_small_sharded_arrays(tmp_path, mesh):
    """Small arrays split over devices are zarr arrays with one chunk per shard; small
    replicated ones join the packed blob."""
    tree = {
        "tiny": _put(np.arange(8, dtype=np.int32), mesh, P(("x", "y"))),
        "small": _put(_values((8, 6)), mesh, P("x", "y")),
        "halves": _put(_values((4, 4)), mesh, P(None, "y")),
        "rep": _put(_values((3, 5)), mesh, P()),
        "one": jnp.float32(2.5),
    }
    ckpt = pc.save(tree, tmp_path / "c")
    commit = _commit(ckpt)
    kinds = {p: r.storage.kind for p, r in commit.leaves.items()}
    assert kinds == {"tiny": "z", "small": "z", "halves": "z", "rep": "p", "one": "p"}
    assert commit.leaves["small"].storage.chunks == (2, 3)
    assert len(_chunk_files(ckpt, commit, "small")) == 8
    assert len(_chunk_files(ckpt, commit, "halves")) == 2
    wide = jax.make_mesh((2, 4), ("a", "b"))
    specs = {"tiny": P("b"), "small": P("b", "a"), "halves": P("b", "a"), "rep": P("a"),
             "one": P()}
    tree["rep"] = _put(_values((4, 5)), mesh, P())
    ckpt = pc.save(tree, tmp_path / "c2")
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(wide, specs[k]))
              for k, v in tree.items()}
    restored, status = pc.restore(ckpt, target)
    status.assert_consumed()
    for k, v in tree.items():
        _check(restored[k], np.asarray(v), target[k].sharding)
    # And without a target: the saved shardings.
    again, _ = pc.restore(ckpt)
    for k, v in tree.items():
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(v))
    assert again["small"].sharding.spec == P("x", "y")


def test_sharded_prng_keys(tmp_path, mesh):
    keys = jax.device_put(jax.random.split(jax.random.key(3), 8),
                          NamedSharding(mesh, P(("x", "y"))))
    ckpt = pc.save({"k": keys}, tmp_path / "c")
    target = {"k": jax.ShapeDtypeStruct(keys.shape, keys.dtype,
                                        sharding=NamedSharding(mesh, P("x")))}
    tree, status = pc.restore(ckpt, target)
    status.assert_consumed()
    assert tree["k"].sharding == target["k"].sharding
    np.testing.assert_array_equal(jax.random.key_data(tree["k"]), jax.random.key_data(keys))
    again, _ = pc.restore(ckpt)
    np.testing.assert_array_equal(jax.random.key_data(again["k"]), jax.random.key_data(keys))


# --- what is written -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 512), (12, 10), (96, 2)], ids=str)
@pytest.mark.parametrize("spec", [P("x", "y"), P("x", None), P(None, "y"), P()], ids=str)
def test_chunks_divide_the_shard_shape(tmp_path, mesh, shape, spec, monkeypatch):
    value = _put(_values(shape), mesh, spec)
    shard_shape = value.sharding.shard_shape(shape)
    chunks = tuple(_storage.choose_chunks(shard_shape, 4))
    assert all(s % c == 0 for s, c in zip(shard_shape, chunks, strict=True))
    monkeypatch.setattr(_snapshot, "PACK_BYTES", 0)  # every case a zarr array, none packed
    ckpt = pc.save({"v": value}, tmp_path / "c")
    commit = _commit(ckpt)
    record = commit.leaves["v"].storage
    assert record.kind == "z" and record.chunks == chunks
    grid = [math.ceil(d / c) for d, c in zip(shape, chunks, strict=True)]
    assert len(_chunk_files(ckpt, commit, "v")) == math.prod(grid)
    np.testing.assert_array_equal(np.asarray(pc.restore(ckpt)[0]["v"]), np.asarray(value))


def test_big_shards_are_split_into_chunks_on_shard_boundaries():
    for shard in [(4096, 4096), (1024, 3000), (7, 1 << 21), (1536,), (6, 10, 4096)]:
        chunks = _storage.choose_chunks(shard, 4, limit=1 << 20)
        assert all(s % c == 0 for s, c in zip(shard, chunks, strict=True)), (shard, chunks)
        assert math.prod(chunks) * 4 <= 1 << 20 or min(chunks) == 1, (shard, chunks)


def test_unsharded_axes_are_cut_into_balanced_chunks_whatever_their_length(tmp_path, mesh):
    # 1,000,033 (a prime) rows of 2 float32, 8 MB: cut by divisors alone, that was a million
    # one-row chunks; along an axis no shard boundary crosses, any chunk size is safe.
    value = np.arange(2 * 1_000_033, dtype=np.float32).reshape(1_000_033, 2)
    ckpt = pc.save({"v": value}, tmp_path / "c")
    commit = _commit(ckpt)
    assert commit.leaves["v"].storage.chunks == (500_017, 2)
    assert len(_chunk_files(ckpt, commit, "v")) == 2
    np.testing.assert_array_equal(pc.restore(ckpt, {"v": value})[0]["v"], value)
    # Sharded along that axis, chunks still divide the shard.
    sharded = _put(np.arange(8 * 524_309, dtype=np.float32).reshape(8, 524_309), mesh,
                   P(("x", "y"), None))
    shard = sharded.sharding.shard_shape(sharded.shape)
    chunks = _storage.choose_chunks(shard, 4, sharded.shape, limit=1 << 20)
    assert chunks == [1, 174_770] and shard == (1, 524_309)  # 3 balanced chunks of <= 1 MiB
    restored, _ = pc.restore(pc.save({"s": sharded}, tmp_path / "s"), {"s": sharded})
    np.testing.assert_array_equal(np.asarray(restored["s"]), np.asarray(sharded))


@pytest.mark.parametrize("spec,writes", [(P("x", "y"), 8), (P("x", None), 4),
                                         (P(None, "y"), 2), (P(), 1)], ids=str)
def test_replicated_shards_are_written_once(tmp_path, mesh, spec, writes, monkeypatch):
    value = _put(_values(BIG), mesh, spec)
    snap = _snapshot.snapshot({"w": value})
    (array,) = snap.arrays
    assert len(array.shards) == writes
    regions = {_build._region_key(i, BIG) for i, _ in array.shards}
    assert len(regions) == writes  # each distinct region exactly once
    ckpt = pc.save({"w": value}, tmp_path / "c")
    commit = _commit(ckpt)
    assert len(_chunk_files(ckpt, commit, "w")) == writes  # one chunk per shard here


def test_snapshot_holds_no_view_of_device_memory(mesh):
    value = _put(_values(BIG), mesh, P("x", None))
    snap = _snapshot.snapshot({"w": value})
    # On the CPU the snapshot is a copy made by XLA: separate buffers, same values.
    copies = [np.asarray(host) for _, host in snap.arrays[0].shards]
    for shard in value.addressable_shards:
        for copy in copies:
            assert not np.shares_memory(copy, np.asarray(shard.data))
    value.delete()  # as donation would: the snapshot must not care
    for (index, _), copy in zip(snap.arrays[0].shards, copies, strict=True):
        np.testing.assert_array_equal(copy, _values(BIG)[index])


# --- what is read --------------------------------------------------------------------------


def _record_reads(monkeypatch):
    reads = []
    real = _build.read_into

    def read_into(source, buf):
        reads.append(tuple((d.inclusive_min, d.exclusive_max) for d in source.domain))
        return real(source, buf)

    monkeypatch.setattr(_build, "read_into", read_into)
    return reads


@pytest.mark.parametrize("name", ["2 devices", "replicated", "partially replicated",
                                  "2x4 P(b, a)", "single device"])
def test_restore_reads_each_needed_region_once(tmp_path, mesh, monkeypatch, name):
    value = _values(BIG)
    ckpt = pc.save(_put(value, mesh, P("x", "y")), tmp_path / "c")
    sharding = _targets(mesh)[name]
    reads = _record_reads(monkeypatch)
    tree, _ = pc.restore(ckpt, jax.ShapeDtypeStruct(BIG, jnp.float32, sharding=sharding))
    _check(tree, value, sharding)
    needed = {_build._region_key(tuple(i), BIG)
              for i in sharding.addressable_devices_indices_map(BIG).values()}
    assert sorted(reads) == sorted(needed)


def test_restore_reads_a_window_of_slabs_at_a_time(tmp_path, mesh, monkeypatch):
    """With every read in flight at once, TensorStore's per-chunk buffers piled up to half
    the tree at the peak; a window keeps a few reads going, across leaves, and no more."""
    tree = {f"w{i}": _put(_values(BIG, seed=i), mesh, P("x", "y")) for i in range(3)}
    ckpt = pc.save(tree, tmp_path / "c")
    shard = math.prod(BIG) * 4 // 8
    monkeypatch.setattr(_read, "window_bytes", lambda: 3 * shard)
    outstanding, most = [0], [0]
    real = _build.read_into

    class Tracked:
        def __init__(self, future, nbytes):
            self.future, self.nbytes = future, nbytes

        def result(self):
            outstanding[0] -= self.nbytes
            return self.future.result()

    def read_into(source, buf):
        outstanding[0] += buf.nbytes
        most[0] = max(most[0], outstanding[0])
        return Tracked(real(source, buf), buf.nbytes)

    monkeypatch.setattr(_build, "read_into", read_into)
    sharding = NamedSharding(mesh, P("x", "y"))
    target = {k: jax.ShapeDtypeStruct(BIG, jnp.float32, sharding=sharding) for k in tree}
    restored, status = pc.restore(ckpt, target)
    status.assert_consumed()
    for i in range(3):
        _check(restored[f"w{i}"], _values(BIG, seed=i), sharding)
    assert most[0] == 3 * shard and outstanding[0] == 0


def test_a_process_reads_only_its_devices_regions(tmp_path, mesh):
    """As a process owning devices 0-3 would: the chunks of other devices' regions are
    deleted from disk, and reading this process's regions still works."""
    value = _values(BIG)
    ckpt = pc.save(_put(value, mesh, P("x", "y")), tmp_path / "c")
    commit = _commit(ckpt)
    rec = commit.leaves[""]
    sharding = NamedSharding(mesh, P("x", None))
    mine = {d: i for d, i in sharding.addressable_devices_indices_map(BIG).items() if d.id < 4}
    half = types.SimpleNamespace(addressable_devices_indices_map=lambda shape: mine)
    chunk_dir = os.path.join(ckpt, commit.data, "a", "0", "c")
    for row in ("2", "3"):  # the chunks of rows 128..255, which devices 4-7 hold
        for col in os.listdir(os.path.join(chunk_dir, row)):
            os.remove(os.path.join(chunk_dir, row, col))
    loc = _storage.location(ckpt)
    kv = _storage.open_kvstore(loc)
    want = _build.Want("jax", np.dtype(np.float32), BIG, half)
    ((*_, regions),) = _read._ZarrReads("", commit, [("", rec, want)], _build.Layouts(),
                                        lambda _rec: (kv, commit.data))
    assert sorted(regions) == [((0, 64), (0, 512)), ((64, 128), (0, 512))]
    for (r0, r1), _ in regions:
        np.testing.assert_array_equal(regions[((r0, r1), (0, 512))], value[r0:r1])
    # The whole array needs the deleted chunks: an error naming the leaf, never zeros.
    with pytest.raises(pc.CorruptCheckpointError, match="leaf '': cannot read its array data"):
        pc.restore(ckpt, jax.ShapeDtypeStruct(BIG, jnp.float32, sharding=sharding))


def test_a_missing_chunk_is_an_error_never_zeros(tmp_path, mesh):
    value = _values(BIG)
    ckpt = pc.save({"w": _put(value, mesh, P("x", "y"))}, tmp_path / "c")
    commit = _commit(ckpt)
    os.remove(os.path.join(ckpt, commit.data, "a", "0", "c", "1", "1"))
    for target in (None, {"w": jax.ShapeDtypeStruct(BIG, jnp.float32)}):
        with pytest.raises(pc.CorruptCheckpointError, match="leaf 'w'"):
            pc.restore(ckpt, target)
    # A target needing only other chunks does not touch the missing one: restore reads no
    # more than the target's regions. (Regions of rows 0..63 exclude chunk row 1.)
    loc = _storage.location(ckpt)
    rows = NamedSharding(mesh, P("x", "y")).addressable_devices_indices_map(BIG)
    mine = {d: i for d, i in rows.items() if i[0].start == 0}
    want = _build.Want("jax", np.dtype(np.float32), BIG,
                         types.SimpleNamespace(addressable_devices_indices_map=lambda s: mine))
    kv = _storage.open_kvstore(loc)
    ((*_, regions),) = _read._ZarrReads("", commit, [("w", commit.leaves["w"], want)],
                                        _build.Layouts(), lambda _rec: (kv, commit.data))
    assert len(regions) == 2


# --- metadata ------------------------------------------------------------------------------


def test_metadata_shows_the_saved_sharding(tmp_path, mesh):
    tree = {"w": _put(_values(BIG), mesh, P("x", "y")),
            "b": _put(_values((8,)), mesh, P(("x", "y"))),
            "r": _put(_values((4,)), mesh, P()),
            "n": np.zeros(3), "s": 1}
    info = pc.metadata(pc.save(tree, tmp_path / "c"))
    # jax.make_mesh makes Explicit axes; Auto ones go unsaid.
    assert info.leaves["w"].sharding == "P('x', 'y') over mesh(x=4 Explicit, y=2 Explicit)"
    assert info.leaves["b"].sharding == "P(('x', 'y'),) over mesh(x=4 Explicit, y=2 Explicit)"
    assert info.leaves["r"].sharding == "P() over mesh(x=4 Explicit, y=2 Explicit)"
    assert info.leaves["n"].sharding is None and info.leaves["s"].sharding is None
    assert "sharded P('x', 'y') over mesh(x=4 Explicit, y=2 Explicit)" in str(info)
    commit = _commit(tmp_path / "c")
    ids = tuple(d.id for d in mesh.devices.flat)
    assert commit.leaves["w"].sharding == ((4, 2), ("x", "y"), ("x", "y"),
                                           ("Explicit", "Explicit"), ids)
    assert commit.leaves["b"].sharding == ((4, 2), ("x", "y"), (("x", "y"),),
                                           ("Explicit", "Explicit"), ids)
    auto = jax.sharding.Mesh(mesh.devices, ("x", "y"))
    info = pc.metadata(pc.save({"a": _put(_values(BIG), auto, P("x"))}, tmp_path / "auto"))
    assert info.leaves["a"].sharding == "P('x',) over mesh(x=4, y=2)"


# --- the saved sharding, exactly ------------------------------------------------------------


def _same_array(restored, live):
    """Restored equals live in values, dtype, weak type and sharding (mesh devices, axis
    names and types, spec), and the two compute together under jax.jit."""
    assert restored.dtype == live.dtype and restored.weak_type == live.weak_type
    assert restored.sharding == live.sharding, (restored.sharding, live.sharding)
    if isinstance(live.sharding, NamedSharding):
        mesh, want = restored.sharding.mesh, live.sharding.mesh
        assert mesh.devices.tolist() == want.devices.tolist()
        assert (mesh.axis_names, mesh.axis_types) == (want.axis_names, want.axis_types)
        assert restored.sharding.spec == live.sharding.spec
    if jax.dtypes.issubdtype(live.dtype, jax.dtypes.prng_key):
        restored, live = jax.random.key_data(restored), jax.random.key_data(live)
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(live))
    total = jax.jit(lambda a, b: a + b)(restored, live)
    np.testing.assert_array_equal(np.asarray(total), np.asarray(live) * 2)


@pytest.mark.parametrize("shape", [(8, 4), BIG], ids=["small", "big"])
def test_explicit_mesh_axes_come_back_explicit(tmp_path, mesh, shape):
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,) * 2
    live = {"w": _put(_values(shape), mesh, P("x", "y")), "r": _put(_values(shape), mesh, P())}
    pc.save(live, tmp_path / "c")
    restored, status = pc.restore(tmp_path / "c")
    status.assert_consumed()
    for k in live:
        _same_array(restored[k], live[k])


def test_the_saved_device_order_comes_back(tmp_path):
    order = [3, 0, 6, 5, 1, 7, 2, 4]  # as a topology-aware jax.make_mesh may order them
    devices = np.array(jax.devices())[order].reshape(4, 2)
    permuted = jax.sharding.Mesh(devices, ("x", "y"))
    live = _put(_values(BIG), permuted, P("x", "y"))
    pc.save({"w": live}, tmp_path / "c")
    restored, _ = pc.restore(tmp_path / "c")
    _same_array(restored["w"], live)
    assert [d.id for d in restored["w"].sharding.mesh.devices.flat] == order
    assert pc.metadata(tmp_path / "c").leaves["w"].sharding == "P('x', 'y') over mesh(x=4, y=2)"


def test_saved_devices_not_all_here_fall_back_and_metadata_says_so(tmp_path, mesh):
    import zlib

    import msgpack
    from _commit_body import set_field

    from pytree_ckpt import _format

    value = _values(BIG)
    pc.save({"w": _put(value, mesh, P("x", "y"))}, tmp_path / "c")
    commit = tmp_path / "c" / _format.COMMIT_FILE
    magic, version, _, body = msgpack.unpackb(commit.read_bytes())
    body = msgpack.unpackb(body)
    record = body["shardings"][0]
    body = set_field(body, "w", "sharding", [*record[:4], list(range(100, 108))])
    packed = msgpack.packb(body, use_bin_type=True)
    commit.write_bytes(msgpack.packb([magic, version, zlib.crc32(packed), packed]))
    info = pc.metadata(tmp_path / "c")
    assert info.leaves["w"].sharding == (
        "P('x', 'y') over mesh(x=4 Explicit, y=2 Explicit) (saved on devices not all here: "
        "restores on jax.devices() in order)")
    restored, _ = pc.restore(tmp_path / "c")
    fallback = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"),
                                 axis_types=mesh.axis_types)
    _same_array(restored["w"], _put(value, fallback, P("x", "y")))


def test_sharded_prng_keys_come_back_sharded_without_a_target(tmp_path, mesh):
    keys = jax.random.split(jax.random.key(0), 8)
    live = {"k": jax.device_put(keys, NamedSharding(mesh, P(("x", "y")))),
            "rbg": jax.device_put(jax.random.split(jax.random.key(1, impl="rbg"), 4),
                                  NamedSharding(mesh, P("x")))}
    pc.save(live, tmp_path / "c")
    restored, status = pc.restore(tmp_path / "c")
    status.assert_consumed()
    for k, v in live.items():
        assert jax.random.key_impl(restored[k]) == jax.random.key_impl(v)
        assert restored[k].sharding == v.sharding, k
        _same_array(jax.random.key_data(restored[k]), jax.random.key_data(v))


def test_targets_on_an_abstract_mesh_take_the_mesh_in_context(tmp_path, mesh):
    value = _values(BIG)
    live = _put(value, mesh, P("x", "y"))
    pc.save({"w": live, "b": _put(value[0], mesh, P("y"))}, tmp_path / "c")
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(lambda: {"w": jax.device_put(jnp.zeros(BIG), P("x", "y")),
                                           "b": jax.device_put(jnp.zeros(BIG[1]), P("y"))})
        assert isinstance(abstract["w"].sharding.mesh, jax.sharding.AbstractMesh)
        restored, status = pc.restore(tmp_path / "c", abstract)
    status.assert_consumed()
    _same_array(restored["w"], live)
    _same_array(restored["b"], _put(value[0], mesh, P("y")))
    with pytest.raises(pc.ShardingError, match=(
            r"target leaf 'b': its sharding is on an abstract mesh \{'x': 4, 'y': 2\} .* and "
            r"no mesh is set; restore inside `with jax.set_mesh\(mesh\):`")):
        pc.restore(tmp_path / "c", abstract)
    other = jax.make_mesh((2, 4), ("x", "y"))
    with jax.set_mesh(other), pytest.raises(pc.ShardingError, match=(
            r"target leaf 'b': .* and mesh \{'x': 2, 'y': 4\} .* is set")):
        pc.restore(tmp_path / "c", abstract)


def test_unsharded_leaves_go_to_the_default_device_set_by_jax(tmp_path):
    device = jax.devices()[3]
    tree = {"big": jnp.ones(BIG), "small": jnp.arange(3.0), "n": 4, "key": jax.random.key(0)}
    pc.save(tree, tmp_path / "c")
    target = {"big": jax.ShapeDtypeStruct(BIG, jnp.float32),
              "small": jax.ShapeDtypeStruct((3,), jnp.float32),
              "n": jax.ShapeDtypeStruct((), jnp.int32), "key": jax.random.key(1)}
    with jax.default_device(device):
        saved, _ = pc.restore(tmp_path / "c")
        targeted, status = pc.restore(tmp_path / "c", target)
        live = jnp.ones(3)
    status.assert_consumed()
    assert live.devices() == {device}
    for k in ("big", "small", "key"):
        assert saved[k].devices() == {device}, k
    for k in ("big", "small", "n"):
        assert targeted[k].devices() == {device}, k
    np.testing.assert_array_equal(jax.jit(lambda a, b: a + b)(saved["small"], live), [1, 2, 3])
    assert targeted["key"].devices() == {jax.devices()[0]}  # a concrete target's own device


@pytest.mark.parametrize("version", [3, 4])
def test_checkpoints_of_formats_before_5_restore_as_they_did(tmp_path, mesh, version,
                                                             monkeypatch):
    # Written by the current writer told to write the older format: no weak types, sharding
    # records without axis types or devices.
    from pytree_ckpt import _format

    value = _values(BIG)
    live = {"w": _put(value, mesh, P("x", "y")), "step": jax.jit(lambda s: s + 1)(0)}
    with monkeypatch.context() as m:
        m.setattr(_format, "FORMAT_VERSION", version)
        pc.save(live, tmp_path / "c")
    info = pc.metadata(tmp_path / "c")
    assert info.format_version == version
    assert info.leaves["w"].sharding == "P('x', 'y') over mesh(x=4, y=2)"
    assert _commit(tmp_path / "c").leaves["w"].sharding == ((4, 2), ("x", "y"), ("x", "y"),
                                                             None, None)
    restored, status = pc.restore(tmp_path / "c")
    status.assert_consumed()
    auto = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    _same_array(restored["w"], _put(value, auto, P("x", "y")))
    assert not restored["step"].weak_type and int(restored["step"]) == 1
