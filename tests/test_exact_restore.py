"""Restore gives back exactly what was saved: byte orders, registered node orders, Python
leaf types, x64 dtypes and weak types, and Python leaves the commit file must hold."""

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
