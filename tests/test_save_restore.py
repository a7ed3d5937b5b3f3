import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _values import ALL_DTYPES, representable

import pytree_ckpt as pc

DTYPES = ALL_DTYPES


values = representable


def same(a, b):
    """Bit-exact equality of two leaves, including their kind and dtype."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        assert jax.random.key_impl(a) == jax.random.key_impl(b)
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    if isinstance(a, (np.ndarray, np.generic, jax.Array)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    else:
        assert a == b or (a != a and b != b)


@pytest.fixture(params=["file", "memory"])
def where(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "ckpt")
    return f"memory://{tmp_path.name}/ckpt"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
# (520, 520) is over the packing threshold (256 KiB) for every dtype: a zarr array.
@pytest.mark.parametrize("shape", [(), (0,), (3, 5), (300, 300), (520, 520)], ids=str)
def test_dtype_matrix_round_trips_bit_exactly(dtype, shape, tmp_path):
    host = values(dtype, shape)
    tree = {"np": host, "jax": jnp.asarray(host) if np.dtype(dtype).itemsize else host}
    pc.save(tree, tmp_path / "c")
    restored, status = pc.restore(tmp_path / "c")
    status.assert_consumed()
    same(restored["np"], tree["np"])
    same(restored["jax"], tree["jax"])
    restored, status = pc.restore(tmp_path / "c", tree)
    status.assert_consumed()
    assert status.cast == ()
    same(restored["jax"], tree["jax"])


PY_LEAVES = {"int": 7, "neg": -(2**63), "big": 2**100, "float": 0.1, "nan": float("nan"),
             "inf": -float("inf"), "bool": True, "str": "héllo\x00/..", "bytes": b"\x00\xff",
             "none": None, "complex": 1.5 - 2j, "f32": np.float32(1.25), "i8": np.int8(-3),
             "bf16": ml_dtypes.bfloat16(3.5), "u64": np.uint64(2**64 - 1)}


def test_python_and_numpy_scalar_leaves_round_trip_exactly(where):
    pc.save(PY_LEAVES, where)
    restored, status = pc.restore(where)
    status.assert_consumed()
    assert restored.keys() == PY_LEAVES.keys()
    for k, v in PY_LEAVES.items():
        same(restored[k], v)


def test_typed_prng_keys_round_trip(where):
    tree = {"key": jax.random.key(42), "keys": jax.random.split(jax.random.key(1, impl="rbg"), 4)}
    pc.save(tree, where)
    restored, status = pc.restore(where)
    same(restored["key"], tree["key"])
    same(restored["keys"], tree["keys"])
    abstract = jax.tree.map(lambda k: jax.ShapeDtypeStruct(k.shape, k.dtype), tree)
    restored, status = pc.restore(where, abstract)
    status.assert_consumed()
    same(restored["keys"], tree["keys"])


def test_structure_comes_back_without_a_target(where):
    NT = collections.namedtuple("NT", "mu nu")
    tree = {"list": [1, 2.0], "tuple": (np.zeros(2),), "nt": NT(3, 4), "empty": {}, "el": []}
    pc.save(tree, where)
    restored, _ = pc.restore(where)
    # NamedTuples and other nodes come back as dicts of their fields (never imported).
    assert restored["nt"] == {"mu": 3, "nu": 4}
    assert restored["list"] == [1, 2.0] and restored["empty"] == {} and restored["el"] == []
    assert isinstance(restored["tuple"], tuple)
    assert pc.metadata(where).node_types["nt"].endswith("NT")


def test_matching_ignores_container_types(where):
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class State:
        params: dict
        step: int

    NT = collections.namedtuple("NT", "params step")
    pc.save(State(params={"w": jnp.arange(3.0)}, step=5), where)

    restored, status = pc.restore(where, {"params": {"w": jnp.zeros(3)}, "step": 0})
    status.assert_consumed()
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(3.0))
    assert restored["step"] == 5

    restored, status = pc.restore(where, NT({"w": jnp.zeros(3)}, 0))
    status.assert_consumed()
    assert type(restored) is NT and restored.step == 5
    np.testing.assert_array_equal(restored.params["w"], np.arange(3.0))


def test_restored_leaves_take_the_targets_kind(where):
    pc.save({"a": np.arange(4, dtype=np.float32), "s": np.float32(2.5), "p": 3, "j": jnp.ones(2)},
            where)
    target = {"a": jnp.zeros(4), "s": np.float32(0), "p": 0, "j": np.zeros(2, np.float32)}
    restored, status = pc.restore(where, target)
    status.assert_consumed()
    assert isinstance(restored["a"], jax.Array) and isinstance(restored["j"], np.ndarray)
    assert type(restored["s"]) is np.float32 and restored["s"] == 2.5
    assert type(restored["p"]) is int and restored["p"] == 3
    abstract = {"a": jax.ShapeDtypeStruct((4,), jnp.float32)}
    restored, status = pc.restore(where, abstract)
    assert isinstance(restored["a"], jax.Array)
    assert restored["a"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert status.unused == ("j", "p", "s")


def test_status_reports_unmatched_unused_and_mismatched_and_keeps_target_values(where):
    pc.save({"w": jnp.ones((2, 3)), "b": jnp.ones(3), "old": 1, "i": jnp.arange(3)}, where)
    target = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(3), "new": 9, "i": jnp.zeros(3)}
    restored, status = pc.restore(where, target)
    assert status.matched == ("b",)
    assert status.unmatched == ("new",)
    assert status.unused == ("old",)
    assert status.mismatched == (
        pc.Mismatch("i", (3,), "int32", (3,), "float32"),
        pc.Mismatch("w", (2, 3), "float32", (3, 2), "float32"),
    )
    assert restored["w"] is target["w"] and restored["new"] == 9 and restored["i"] is target["i"]
    np.testing.assert_array_equal(restored["b"], np.ones(3))


def test_float_casts_are_done_and_reported_unsafe_ones_are_not(where):
    pc.save({"f": jnp.arange(3.0), "i8": np.arange(3, dtype=np.int8),
             "i64": np.arange(3, dtype=np.int64), "n": 3}, where)
    target = {"f": jax.ShapeDtypeStruct((3,), jnp.bfloat16), "i8": np.zeros(3, np.int32),
              "i64": np.zeros(3, np.int16), "n": np.float32(0)}
    restored, status = pc.restore(where, target)
    assert status.cast == (pc.Cast("f", "float32", "bfloat16"), pc.Cast("i8", "int8", "int32"))
    assert [m.path for m in status.mismatched] == ["i64", "n"]
    assert restored["f"].dtype == jnp.bfloat16 and restored["i8"].dtype == np.int32
    np.testing.assert_array_equal(restored["i8"], [0, 1, 2])


def test_at_restores_a_subtree_and_scopes_the_status(where):
    pc.save({"params": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}},
             "opt_state": {"mu": jnp.ones(2)}, "step": 3}, where)
    params, status = pc.restore(where, {"dense": {"kernel": jnp.zeros((2, 2))}}, at="params")
    assert status.matched == ("dense/kernel",)
    assert status.unused == ("params/dense/bias",)
    np.testing.assert_array_equal(params["dense"]["kernel"], np.ones((2, 2)))
    sub, _ = pc.restore(where, at="params/dense")
    assert set(sub) == {"kernel", "bias"}
    with pytest.raises(pc.PathNotFoundError, match=r"at='parms' names nothing.*'params'"):
        pc.restore(where, at="parms")


def test_rename_follows_renamed_modules(where):
    pc.save({"encoder": {"old_block": {"w": jnp.ones(2)}}}, where)
    target = {"encoder": {"new_block": {"w": jnp.zeros(2)}}}
    restored, status = pc.restore(where, target, rename={"encoder/old_block": "encoder/new_block"})
    status.assert_consumed()
    np.testing.assert_array_equal(restored["encoder"]["new_block"]["w"], np.ones(2))
    _, status = pc.restore(where, target, rename=lambda p: p.replace("old_block", "new_block"))
    status.assert_consumed()


def test_restore_never_mutates_the_target(where):
    pc.save({"a": np.ones(3)}, where)
    target = {"a": np.zeros(3)}
    restored, _ = pc.restore(where, target)
    np.testing.assert_array_equal(target["a"], np.zeros(3))
    assert restored is not target and restored["a"] is not target["a"]


def test_equal_restores_give_equal_hashable_statuses(where):
    pc.save({"a": np.ones(3), "b": 1}, where)
    s1 = pc.restore(where, {"a": np.zeros(3), "c": 0})[1]
    s2 = pc.restore(where, {"a": np.zeros(3), "c": 0})[1]
    assert s1 == s2 and hash(s1) == hash(s2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s1.matched = ()


def test_save_snapshots_numpy_leaves(where):
    arr = np.ones(1000)
    fut = pc.save_async({"a": arr}, where)
    arr[:] = 5  # mutating after the snapshot must not reach the checkpoint
    fut.result()
    restored, _ = pc.restore(where)
    np.testing.assert_array_equal(restored["a"], np.ones(1000))


def test_unsupported_leaf_raises_naming_its_path(where):
    with pytest.raises(pc.UnsupportedLeafError, match=r"leaf 'model/fn' has type builtins.function"):
        pc.save({"model": {"fn": lambda x: x}}, where)
    with pytest.raises(pc.UnsupportedLeafError, match="leaf 'obj' has dtype object, which cannot be saved"):
        pc.save({"obj": np.array([object()])}, where)


def test_metadata_reads_structure_without_array_data(where):
    tree = {"params": {"w": jnp.ones((4, 8), jnp.bfloat16)}, "step": 12, "name": "run"}
    pc.save(tree, where)
    info = pc.metadata(where)
    w = info.leaves["params/w"]
    assert (w.kind, w.shape, w.dtype, w.nbytes) == ("jax", (4, 8), "bfloat16", 64)
    assert info.tree["step"].value == 12 and info.tree["name"].value == "run"
    assert info.nbytes == 64
    assert "params/w: jax bfloat16[4, 8] (64 B)" in str(info)
    assert "<table>" in info._repr_html_()


def test_metadata_builds_its_tree_on_first_use_and_keeps_it(where):
    # Most callers read `leaves`; the nested tree costs about as much again to build.
    pc.save({"a": [1, (2.5, "x")], "b": {"c": np.zeros(3, np.float32)}}, where)
    info = pc.metadata(where)
    assert "tree" not in vars(info)
    tree = info.tree
    assert isinstance(tree["a"], list) and isinstance(tree["a"][1], tuple)
    assert tree["a"][1][1].value == "x" and tree["b"]["c"] == info.leaves["b/c"]
    assert info.tree is tree
    again = pc.metadata(where)
    assert again == info and hash(again) == hash(info) and again.tree == tree
    assert dataclasses.replace(info, path="elsewhere").tree == tree


def test_metadata_gives_every_leaf_its_own_shape_across_ranks(tmp_path):
    shapes = [(), (3,), (2, 5), (0,), (1, 0, 4), (7,), (), (2, 3, 4, 5), (4, 2)]
    tree = {f"l{i}": np.zeros(shape, np.int16) for i, shape in enumerate(shapes)}
    tree["py"], tree["key"] = 3, jax.random.key(0)
    info = pc.metadata(pc.save(tree, tmp_path / "c"))
    assert {p: m.shape for p, m in info.leaves.items()} == {
        **{f"l{i}": shape for i, shape in enumerate(shapes)}, "py": (), "key": (2,)}
    assert [info.leaves[f"l{i}"].nbytes for i in range(len(shapes))] == [
        2 * math.prod(shape) for shape in shapes]


def test_packed_leaves_are_read_in_ranges_of_one_blob():
    from pytree_ckpt import _format, _read

    def job(name, blob, offset, nbytes):
        storage = _format.Storage("p", None, blob, (), "", offset, nbytes, 0)
        return (name, _format.LeafRecord(name, "jax", "uint8", (nbytes,), None, storage, None),
                None)

    gap, most = _read._COALESCE_GAP, 1 << 20
    jobs = [
        job("late", 0, 110 + gap + 1, 8),  # more than the gap past the group's furthest end
        job("b1", 1, 0, 10),  # another blob: never in a group with blob 0's leaves
        job("inside", 0, 50, 10),  # overlaps "first" (a forged layout): same group
        job("first", 0, 0, 100),
        job("touching", 0, 100, 10),
        job("far", 0, 110 + gap + 1 + most - 4, 8),  # would take its group past `most`
    ]
    ranges = list(_read._range_groups(jobs, most))
    groups = [[name for name, _, _ in g] for g, _, _ in ranges]
    assert groups == [["first", "inside", "touching"], ["late"], ["far"], ["b1"]]
    late = 110 + gap + 1
    assert [(a, b) for _, a, b in ranges] == [
        (0, 110), (late, late + 8), (late + most - 4, late + most + 4), (0, 10)]
    assert list(_read._range_groups([], most)) == []


def test_large_single_device_arrays_are_read_in_slabs_exactly(tmp_path):
    from pytree_ckpt import _read

    value = np.arange(4096 * 1024, dtype=np.float32).reshape(4096, 1024)
    slabs = list(_read._slabs(((0, 4096), (0, 1024)), (1024, 1024), 4))
    assert [local for local, _ in slabs] == [(slice(0, 2048), slice(0, 1024)),
                                            (slice(2048, 4096), slice(0, 1024))]
    # A chunk row too big for one slab is split along the next axis (a (1, n) array, a
    # stack of layers), so that the read window bounds what one read holds.
    slabs = list(_read._slabs(((3, 5), (0, 1 << 22)), (1, 1 << 20), 4))
    assert [stored for _, stored in slabs] == [
        (slice(r, r + 1), slice(c, c + (1 << 21))) for r in (3, 4) for c in (0, 1 << 21)]
    assert [local[0] for local, _ in slabs] == [slice(0, 1)] * 2 + [slice(1, 2)] * 2
    rows = np.arange(2 << 22, dtype=np.float32).reshape(2, 1 << 22)  # 16 MiB rows
    pc.save({"w": value, "j": jnp.asarray(value), "r": rows, "rj": jnp.asarray(rows)},
            tmp_path / "c")
    restored, status = pc.restore(tmp_path / "c", {
        "w": np.zeros_like(value), "j": jax.ShapeDtypeStruct(value.shape, jnp.float32),
        "r": np.zeros_like(rows), "rj": jax.ShapeDtypeStruct(rows.shape, jnp.float32)})
    status.assert_consumed()
    np.testing.assert_array_equal(restored["w"], value)
    np.testing.assert_array_equal(restored["j"], value)
    np.testing.assert_array_equal(restored["r"], rows)
    np.testing.assert_array_equal(restored["rj"], rows)


def test_a_synchronous_save_copies_nothing_up_front_and_packs_as_it_writes(tmp_path,
                                                                           monkeypatch):
    """pc.save's caller waits, so its leaves are the snapshot: no host copy of the tree
    (peak memory is the tree and a few parts, not two trees), and small leaves are packed
    part by part into reused buffers of varying sizes, every byte rewritten."""
    from pytree_ckpt import _packing, _snapshot

    def no_copy(*args):
        raise AssertionError("a synchronous save made a snapshot copy")

    monkeypatch.setattr(_snapshot, "_copy_shards", no_copy)
    monkeypatch.setattr(_packing.pool, "take", no_copy)
    monkeypatch.setattr(_packing, "PART_BYTES", 1000)  # many parts, of several sizes
    rng = np.random.default_rng(0)
    tree = {f"l{i:02d}": jnp.asarray(rng.standard_normal(int(n)).astype(np.float32))
            for i, n in enumerate(rng.integers(1, 200, size=60))}
    tree["big"] = jnp.asarray(rng.standard_normal((300, 300)).astype(np.float32))
    tree["np"] = rng.integers(0, 9, size=(7, 3))
    pc.save(tree, tmp_path / "c")
    restored, status = pc.restore(tmp_path / "c", tree)
    status.assert_consumed()
    for path, leaf in tree.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(leaf), path)
