"""Flax msgpack files written by ``flax.serialization``, read by pytree_ckpt."""

import _upload
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import pytree_ckpt as pc


def _trained_state():
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    x = jnp.arange(12.0).reshape(3, 4)
    params = model.init(jax.random.key(0), x)["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=optax.adam(1e-2))
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(state.params)
    return model, x, state.apply_gradients(grads=grads)  # non-zero moments, step 1


def _fresh_state(model, x):
    params = model.init(jax.random.key(7), x)["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.adam(1e-2))


def _equal_trees(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_train_state_with_adam_restores_into_a_train_state(tmp_path):
    model, x, state = _trained_state()
    path = tmp_path / "state.msgpack"
    path.write_bytes(flax.serialization.to_bytes(state))
    info = pc.metadata(str(path))
    assert info.format == "flax_msgpack" and info.format_version == 0
    assert info.leaves["step"].kind == "py" and info.leaves["step"].value == 1
    assert info.leaves["opt_state/0/mu/layers_0/kernel"].shape == (4, 8)
    assert info.leaves["opt_state/0/count"].kind == "numpy"
    restored, status = pc.restore(str(path), _fresh_state(model, x))
    status.assert_consumed()
    assert type(restored) is train_state.TrainState and restored.step == 1
    _equal_trees(restored.params, state.params)
    _equal_trees(restored.opt_state, state.opt_state)
    assert isinstance(restored.params["layers_0"]["kernel"], jax.Array)
    # Only the weights, with at=; and without a target, dicts of NumPy arrays.
    params, status = pc.restore(str(path), _fresh_state(model, x).params, at="params")
    status.assert_consumed()
    _equal_trees(params, state.params)
    plain, _ = pc.restore(str(path))
    assert set(plain) == {"step", "params", "opt_state"}
    assert plain["opt_state"]["1"] == {}  # optax's EmptyState: an empty map
    np.testing.assert_array_equal(plain["opt_state"]["0"]["nu"]["layers_2"]["bias"],
                                  state.opt_state[0].nu["layers_2"]["bias"])


def test_python_and_numpy_leaves(tmp_path):
    tree = {"i": 3, "f": 2.5, "c": 1 + 2j, "none": None, "s": "hi", "b": b"\x00\x01",
            "np32": np.float32(1.25), "bf16": np.ones((2, 2), ml_dtypes.bfloat16),
            "bools": np.array([True, False]), "seq": [np.int8(4), 5], "empty": {}}
    path = tmp_path / "leaves.msgpack"
    path.write_bytes(flax.serialization.msgpack_serialize(tree))
    plain, status = pc.restore(str(path))
    assert len(status.matched) == 11
    for key in ("i", "f", "c", "s", "b"):
        assert plain[key] == tree[key] and type(plain[key]) is type(tree[key])
    assert plain["none"] is None and plain["empty"] == {}
    assert type(plain["np32"]) is np.float32 and plain["np32"] == 1.25
    assert plain["bf16"].dtype == ml_dtypes.bfloat16
    assert plain["seq"] == [np.int8(4), 5]  # a msgpack array is a list
    target = {"i": np.int64(0), "f": np.float64(0), "seq": [0, np.int8(0)],
              "np32": jnp.zeros(())}
    restored, status = pc.restore(str(path), target)
    assert restored["i"] == 3 and type(restored["i"]) is np.int64
    assert type(restored["f"]) is np.float64 and restored["f"] == 2.5
    assert restored["seq"][0] == 4 and type(restored["seq"][0]) is int
    assert float(restored["np32"]) == 1.25
    assert status.matched == ("f", "i", "np32", "seq/0", "seq/1")


def test_chunked_arrays_read_back(tmp_path, monkeypatch):
    # Flax chunks arrays over MAX_CHUNK_SIZE bytes; lowered, small arrays are chunked too.
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 64)
    big = np.arange(10 * 7, dtype=np.float32).reshape(10, 7)  # 280 bytes: 5 chunks of 16
    data = flax.serialization.to_bytes({"emb": big, "small": np.ones(3, np.float32)})
    assert b"__msgpack_chunked_array__" in data
    path = tmp_path / "chunked.msgpack"
    path.write_bytes(data)
    plain, _ = pc.restore(str(path))
    np.testing.assert_array_equal(plain["emb"], big)
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    target = {"emb": jax.ShapeDtypeStruct((10, 7), jnp.float32, sharding=sharding),
              "small": jnp.zeros(3)}
    restored, status = pc.restore(str(path), target)
    status.assert_consumed()
    assert restored["emb"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["emb"]), big)
    assert pc.metadata(str(path)).leaves["emb"].shape == (10, 7)


def _ext(shape, dtype, raw, code=1):
    return msgpack.ExtType(code, msgpack.packb([shape, dtype, raw], use_bin_type=True))


@pytest.mark.parametrize("tree, message", [
    ({"w": _ext([3], "float32", b"\0" * 8)}, r"8 bytes for shape \[3\] of float32"),
    ({"w": _ext([2], "object", b"\0" * 16)}, r"unknown dtype 'object'"),
    ({"w": _ext([-1], "float32", b"")}, r"bad shape \[-1\]"),
    ({"w": msgpack.ExtType(9, b"")}, r"unknown extension type 9"),
    ({"w": _ext([2], "float32", b"\0" * 8, code=3)}, r"a NumPy scalar of shape \[2\]"),
    ({"w": {"__msgpack_chunked_array__": True, "shape": {"0": 5},
            "chunks": {"0": _ext([2], "float32", b"\0" * 8)}}},
     r"entry 'w': malformed chunked array"),
    ({"w": {"__msgpack_chunked_array__": True, "shape": {"0": 2},
            "chunks": {"1": _ext([2], "float32", b"\0" * 8)}}},
     r"entry 'w': malformed chunked array"),
    ({b"k": 1}, r"under '<root>': a key of type bytes"),
], ids=["size", "dtype", "shape", "ext", "scalar", "chunk-size", "chunk-keys", "key"])
def test_malformed_files_are_refused(tmp_path, tree, message):
    path = tmp_path / "bad.msgpack"
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    with pytest.raises(pc.CorruptCheckpointError, match=f"bad.msgpack: .*{message}"):
        pc.restore(str(path))


def test_a_key_twice_in_one_map_is_refused(tmp_path):
    path = tmp_path / "twice.msgpack"
    path.write_bytes(b"\x82\xa1w\x01\xa1w\x02")  # {"w": 1, "w": 2}
    with pytest.raises(pc.CorruptCheckpointError, match="key 'w' appears twice in one map"):
        pc.restore(str(path))


def test_a_truncated_file_is_refused(tmp_path):
    _model, _x, state = _trained_state()
    path = tmp_path / "cut.msgpack"
    path.write_bytes(flax.serialization.to_bytes(state)[:-10])
    with pytest.raises(pc.CorruptCheckpointError, match="cut.msgpack: not a valid Flax msgpack"):
        pc.metadata(str(path))


def test_object_stores(bucket):
    _model, _x, state = _trained_state()
    _upload.write(f"{bucket}/state.msgpack", flax.serialization.to_bytes(state))
    params, status = pc.restore(f"{bucket}/state.msgpack", state.params, at="params")
    status.assert_consumed()
    _equal_trees(params, state.params)
    assert pc.metadata(f"{bucket}/state.msgpack").format == "flax_msgpack"
