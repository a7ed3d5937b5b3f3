"""Restore gives back exactly what was saved: byte orders, registered node orders, Python
leaf types, x64 dtypes and weak types, and Python leaves the commit file must hold."""

import os
import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import GetAttrKey

import pytree_ckpt as pc


@pytest.fixture
def where(tmp_path):
    return str(tmp_path / "ckpt")


# ---- Byte order -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2,), (300, 300)], ids=["packed", "zarr"])
@pytest.mark.parametrize("dtype", [">f4", ">i8", ">c16", ">u2"])
def test_big_endian_numpy_leaves_restore_their_values(where, dtype, shape):
    values = (np.arange(np.prod(shape)).reshape(shape) * 3 + 7).astype(dtype)
    pc.save({"a": values, "s": np.array(7, dtype)}, where)
    restored, status = pc.restore(where)
    status.assert_consumed()
    np.testing.assert_array_equal(restored["a"], values)
    assert restored["a"].dtype == np.dtype(dtype).newbyteorder("<")
    assert restored["s"] == 7 and restored["s"].shape == ()
    # A big-endian target gets its own byte order back, the same values, and no cast.
    target = {"a": np.zeros(shape, dtype), "s": np.zeros((), dtype)}
    restored, status = pc.restore(where, target)
    status.assert_consumed()
    assert status.cast == ()
    assert restored["a"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(restored["a"], values)
    # Into a jax.Array target: the values, as JAX computes with them.
    if np.dtype(dtype).itemsize <= 4:  # JAX without x64 has no 64-bit arrays
        restored, status = pc.restore(where, {"a": jnp.zeros(shape, values.dtype.newbyteorder("<"))})
        assert status.matched == ("a",) and status.cast == ()
        np.testing.assert_array_equal(np.asarray(restored["a"]), values)


# ---- NamedTuples registered with a flatten of their own ---------------------------------

class _Reversed(typing.NamedTuple):
    a: typing.Any
    b: typing.Any


jax.tree_util.register_pytree_node(
    _Reversed, lambda n: ((n.b, n.a), None), lambda _, c: _Reversed(c[1], c[0]))


class _ReversedKeys(typing.NamedTuple):
    a: typing.Any
    b: typing.Any


jax.tree_util.register_pytree_with_keys(
    _ReversedKeys, lambda n: (((GetAttrKey("b"), n.b), (GetAttrKey("a"), n.a)), None),
    lambda _, c: _ReversedKeys(c[1], c[0]))


@pytest.mark.parametrize("node, paths", [(_Reversed, ("x/0", "x/1")),
                                         (_ReversedKeys, ("x/b", "x/a"))])
def test_namedtuple_registered_with_its_own_flatten_keeps_its_fields(where, node, paths):
    pc.save({"x": node(np.float32(1), jnp.arange(3))}, where)
    restored, status = pc.restore(where, {"x": node(np.float32(0), jnp.zeros(3, jnp.int32))})
    status.assert_consumed()
    assert status.matched == paths
    assert type(restored["x"]) is node
    assert restored["x"].a == np.float32(1)
    np.testing.assert_array_equal(restored["x"].b, [0, 1, 2])


def test_plain_namedtuples_are_named_by_their_fields(where):
    class Plain(typing.NamedTuple):
        first: typing.Any
        second: typing.Any

    pc.save({"x": Plain(1, 2)}, where)
    assert pc.restore(where)[0] == {"x": {"first": 1, "second": 2}}
    restored, status = pc.restore(where, {"x": Plain(0, 0)})
    assert status.matched == ("x/first", "x/second") and restored["x"] == Plain(1, 2)


# ---- Python leaf types ------------------------------------------------------------------

def test_a_python_int_is_never_converted_to_a_python_float(where):
    pc.save({"n": 2**53 + 1, "huge": 10**400, "f": 2.5}, where)
    restored, status = pc.restore(where, {"n": 0.0, "huge": 0.0, "f": 0})
    assert status.matched == () and status.cast == ()
    assert status.mismatched == (
        pc.Mismatch("f", (), "float", (), "int"),
        pc.Mismatch("huge", (), "int", (), "float"),
        pc.Mismatch("n", (), "int", (), "float"),
    )
    assert restored == {"n": 0.0, "huge": 0.0, "f": 0}
    restored, status = pc.restore(where, {"n": 0, "huge": 0, "f": 0.0})
    status.assert_consumed()
    assert restored == {"n": 2**53 + 1, "huge": 10**400, "f": 2.5}


# ---- x64 --------------------------------------------------------------------------------

_WIDE = {"f": np.float64, "i": np.int64, "u": np.uint64, "c": np.complex128}
_NARROW = {"f": "float32", "i": "int32", "u": "uint32", "c": "complex64"}


def _wide_tree():
    with jax.enable_x64(True):
        tree = {k: jnp.asarray(np.arange(1, 4).astype(t)) for k, t in _WIDE.items()}
        tree["big"] = jnp.asarray(np.arange(300 * 300, dtype=np.float64).reshape(300, 300))
    tree["np"] = np.arange(3.0)  # NumPy leaves keep their dtype whatever JAX does
    return tree


def test_x64_leaves_restored_without_x64_are_arrays_jax_computes_with(where):
    tree = _wide_tree()
    assert tree["f"].dtype == np.float64
    pc.save(tree, where)
    restored, status = pc.restore(where)
    assert status.cast == (pc.Cast("big", "float64", "float32"),
                           *(pc.Cast(k, np.dtype(_WIDE[k]).name, _NARROW[k]) for k in "cfiu"))
    add = jax.jit(lambda a, b: a + b)
    for k in _WIDE:
        assert restored[k].dtype == _NARROW[k] and not restored[k].weak_type
        np.testing.assert_array_equal(add(restored[k], jnp.ones(3, _NARROW[k])), [2, 3, 4])
    assert restored["big"].dtype == np.float32
    np.testing.assert_array_equal(add(restored["big"], restored["big"]),
                                  np.arange(300 * 300).reshape(300, 300) * 2)
    assert restored["np"].dtype == np.float64
    # With a target asking for float64 / int64, as jax.ShapeDtypeStruct keeps them:
    target = {"f": jax.ShapeDtypeStruct((3,), np.float64), "i": jax.ShapeDtypeStruct((3,),
                                                                                     np.int64)}
    restored, status = pc.restore(where, target)
    assert status.matched == ("f", "i")
    assert status.cast == (pc.Cast("f", "float64", "float32"), pc.Cast("i", "int64", "int32"))
    np.testing.assert_array_equal(add(restored["f"], jnp.ones(3)), [2, 3, 4])
    np.testing.assert_array_equal(add(restored["i"], jnp.ones(3, jnp.int32)), [2, 3, 4])
    # A target of float64 for float32 data: nothing to convert, nothing listed.
    pc.save({"f": jnp.arange(3.0)}, where + "32")
    restored, status = pc.restore(where + "32", {"f": jax.ShapeDtypeStruct((3,), np.float64)})
    assert status.cast == () and restored["f"].dtype == np.float32


def test_x64_leaves_restored_with_x64_keep_their_dtypes(where):
    pc.save(_wide_tree(), where)
    with jax.enable_x64(True):
        restored, status = pc.restore(where)
        assert status.cast == ()
        for k, t in _WIDE.items():
            assert restored[k].dtype == t
            np.testing.assert_array_equal(jax.jit(lambda a: a + 1)(restored[k]), [2, 3, 4])


# ---- Weak types -------------------------------------------------------------------------

def _weak_tree():
    step = jax.jit(lambda s: s + 1)(0)
    lr = jax.jit(lambda: 0.5)()
    wide = jax.jit(lambda: jnp.broadcast_to(1.5, (300, 300)))()  # weak, stored as zarr
    return {"step": step, "lr": lr, "wide": wide, "strong": jnp.int32(3)}


def test_weak_types_are_restored(where):
    tree = _weak_tree()
    assert [tree[k].weak_type for k in ("step", "lr", "wide", "strong")] == [
        True, True, True, False]
    pc.save(tree, where)
    traces = []
    train_step = jax.jit(lambda s: traces.append(s) or s + 1)
    train_step(tree["step"])
    restored, status = pc.restore(where)
    status.assert_consumed()
    for k, v in tree.items():
        assert restored[k].weak_type == v.weak_type and restored[k].dtype == v.dtype, k
        np.testing.assert_array_equal(restored[k], v)
        assert restored[k].sharding == v.sharding
    train_step(restored["step"])
    assert len(traces) == 1  # resuming does not trace (and compile) the step again
    # A target's weak type wins: a strong target gets a strong array, and the other way.
    target = {"step": jnp.int32(0), "lr": jax.ShapeDtypeStruct((), jnp.float32),
              "wide": jax.ShapeDtypeStruct((300, 300), jnp.float32),
              "strong": jax.jit(lambda: 0)()}
    restored, status = pc.restore(where, target)
    status.assert_consumed()
    assert [restored[k].weak_type for k in ("step", "lr", "wide", "strong")] == [
        False, False, False, True]
    assert int(restored["strong"]) == 3 and int(restored["step"]) == 1


def test_a_python_int_restores_into_a_weakly_typed_target(where):
    pc.save({"step": 5}, where)
    restored, status = pc.restore(where, {"step": jax.jit(lambda: 0)()})
    assert status.matched == ("step",)
    assert restored["step"].weak_type and int(restored["step"]) == 5


# ---- Python leaves the commit file must hold --------------------------------------------

def test_ints_of_any_size_round_trip(where):
    huge = {"pos": 7 ** 20_000, "neg": -(3 ** 30_000), "edge": 2**64, "min": -(2**63) - 1}
    assert huge["pos"] > 10**4300  # past the 4,300 digits Python writes as text
    fut = pc.save_async({**huge, "w": jnp.arange(3.0)}, where)
    assert fut.result() == where
    restored, status = pc.restore(where)
    status.assert_consumed()
    assert {k: restored[k] for k in huge} == huge
    assert all(type(restored[k]) is int for k in huge)
    assert pc.metadata(where).leaves["pos"].value == huge["pos"]
    restored, _ = pc.restore(where, {k: 0 for k in huge})
    assert restored == huge


@pytest.mark.parametrize("tree, path", [
    ({"ok": 1, "bad": "a\ud800b"}, "bad"),
    ({"ok": 1, "nest": {"k\udfff": jnp.ones(2)}}, "nest/k\udfff"),
    ({"nest": [{"\ud800": {}}]}, "nest/0/\ud800"),  # an empty node
], ids=["str leaf", "dict key", "empty node"])
def test_text_the_commit_file_cannot_hold_is_refused_at_once(where, tree, path):
    big = jnp.ones((300, 300))  # written before the commit file, were the save let start
    for save in (pc.save, pc.save_async):
        with pytest.raises(pc.UnsupportedLeafError, match=(
                re.escape(repr(path)) + r".*not valid Unicode text \(a lone surrogate\)")):
            save({"big": big, **tree}, where)
        assert not os.path.exists(where)


def test_ints_too_long_for_text_are_shown_by_their_size(where):
    pc.save({"pos": 7 ** 20_000, "n": 5}, where)
    info = pc.metadata(where)
    assert f"pos: int = <int of {(7 ** 20_000).bit_length():,} bits>" in str(info)
    assert "&lt;int of 56,148 bits&gt;" in info._repr_html_()
    assert "value=<int of 56,148 bits>" in repr(info.leaves["pos"]) and repr(info)
    assert repr(info.leaves["n"]) == (
        "LeafMetadata(path='n', kind='py', shape=(), dtype='int', nbytes=0, sharding=None, "
        "value=5)")
