"""Orbax checkpoints written by orbax-checkpoint itself, read by pytree_ckpt."""

import json
import os

import _upload
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _multiprocess import assert_all_ok, run_multiprocess
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint.experimental import v1 as ocp_v1

import pytree_ckpt as pc

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Orbax's own


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _tree():
    sharded = NamedSharding(_mesh((4, 2), ("x", "y")), PartitionSpec("x", None))
    return {
        "params": {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), sharded),
                   "b": jnp.array([1.5, -2, 3], jnp.bfloat16)},
        "layers": [jnp.zeros(2, jnp.int8), jnp.ones(2, jnp.complex64)],
        "step": 3, "lr": 0.5, "table": np.arange(5, dtype=np.uint16),
        "f8": jnp.array([1, -2], ml_dtypes.float8_e4m3fn), "none": None, "empty": {},
    }


def _standard(path, tree):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return path


def _equal(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_standard_checkpointer_restores_without_a_target(tmp_path):
    tree = _tree()
    path = _standard(str(tmp_path / "std"), tree)
    info = pc.metadata(path)
    assert info.format == "orbax" and info.format_version == 0
    assert info.leaves["params/w"].shape == (8, 4)
    assert info.leaves["params/w"].sharding == "P('x', None) over mesh(x=4, y=2)"
    assert info.leaves["params/b"].dtype == "bfloat16"
    assert info.leaves["step"].value == 3 and info.leaves["lr"].value == 0.5
    restored, status = pc.restore(path)
    assert len(status.matched) == 9
    # The saved NamedSharding where this process's devices can hold it.
    assert restored["params"]["w"].sharding.spec == PartitionSpec("x", None)
    _equal(restored["params"]["w"], tree["params"]["w"])
    assert restored["params"]["b"].dtype == jnp.bfloat16
    assert isinstance(restored["layers"], list) and restored["layers"][1].dtype == jnp.complex64
    assert type(restored["table"]) is np.ndarray and restored["table"].dtype == np.uint16
    assert restored["step"] == 3 and type(restored["step"]) is int
    assert restored["lr"] == 0.5 and restored["none"] is None and restored["empty"] == {}
    _equal(restored["f8"].astype(jnp.float32), [1, -2])


def test_an_abstract_target_on_another_mesh(tmp_path):
    tree = _tree()
    path = _standard(str(tmp_path / "std"), tree)
    cols = NamedSharding(_mesh((2,), ("m",)), PartitionSpec(None, "m"))
    target = {"params": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=cols),
                         "b": jax.ShapeDtypeStruct((3,), jnp.float32)},
              "step": np.int32(0), "lr": 0.0, "extra": jnp.zeros(1)}
    restored, status = pc.restore(path, target)
    assert status.matched == ("lr", "params/b", "params/w", "step")
    assert status.unmatched == ("extra",)
    assert set(status.unused) == {"layers/0", "layers/1", "table", "f8", "none"}
    assert status.cast == (pc.Cast("params/b", "bfloat16", "float32"),
                           pc.Cast("step", "int", "int32"))
    assert restored["params"]["w"].sharding == cols
    _equal(restored["params"]["w"], tree["params"]["w"])
    assert type(restored["step"]) is np.int32 and restored["step"] == 3
    params, status = pc.restore(path, {"w": jnp.zeros((4, 8))}, at="params")
    assert status.mismatched == (pc.Mismatch("w", (8, 4), "float32", (4, 8), "float32"),)
    assert status.unused == ("params/b",)  # checkpoint paths
    _equal(params["w"], 0)  # kept


def test_pytree_checkpointer_strings_and_no_ocdbt(tmp_path):
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "name": "run-7", "n": 4,
            "nested": {"c": np.ones(2, np.float32)}}
    for path, handler in ((tmp_path / "ocdbt", ocp.PyTreeCheckpointHandler()),
                          (tmp_path / "plain", ocp.PyTreeCheckpointHandler(use_ocdbt=False))):
        ocp.Checkpointer(handler).save(str(path), tree)
        restored, status = pc.restore(str(path), tree)
        status.assert_consumed()
        assert restored["name"] == "run-7" and restored["n"] == 4
        _equal(restored["a"], tree["a"])
        _equal(restored["nested"]["c"], 1)
    assert os.path.exists(tmp_path / "plain" / "a" / ".zarray")  # really without OCDBT


def test_typed_prng_keys(tmp_path):
    tree = {"key": jax.random.key(42), "keys": jax.random.split(jax.random.key(1), 3),
            "rbg": jax.random.key(5, impl="rbg")}
    path = _standard(str(tmp_path / "keys"), tree)
    info = pc.metadata(path)
    assert info.leaves["keys"].kind == "prngkey" and info.leaves["keys"].shape == (3, 2)
    restored, _ = pc.restore(path)
    for name in tree:
        assert jax.random.key_impl(restored[name]) == jax.random.key_impl(tree[name])
        _equal(jax.random.key_data(restored[name]), jax.random.key_data(tree[name]))
    target = {"key": jax.random.key(0), "keys": jax.random.split(jax.random.key(0), 3),
              "rbg": jax.random.key(0)}
    restored, status = pc.restore(path, target)
    assert status.matched == ("key", "keys")
    assert status.mismatched == (pc.Mismatch("rbg", (4,), "key<rbg>", (2,), "key<threefry2x32>"),)
    _equal(jax.random.key_data(restored["keys"]), jax.random.key_data(tree["keys"]))


def test_checkpoint_manager_items_are_top_level_names(tmp_path):
    tree = _tree()
    manager = ocp.CheckpointManager(str(tmp_path / "mgr"), item_names=("state", "extra"))
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                            extra=ocp.args.JsonSave({"note": "x", "k": [1]})),
                 metrics={"loss": 0.25})
    manager.wait_until_finished()
    manager.close()
    step = str(tmp_path / "mgr" / "7")
    info = pc.metadata(step)
    assert info.format == "orbax" and info.leaves["extra/note"].value == "x"
    assert info.leaves["state/params/w"].shape == (8, 4)
    target = {"params": {"w": jnp.zeros((8, 4)), "b": jnp.zeros(3, jnp.bfloat16)}}
    restored, status = pc.restore(step, target, at="state")
    assert status.matched == ("params/b", "params/w")
    assert "state/step" in status.unused  # checkpoint paths
    _equal(restored["params"]["w"], tree["params"]["w"])
    plain, _ = pc.restore(step, at="extra")
    assert plain == {"note": "x", "k": [1]}


def test_the_v1_api_writes_zarr3(tmp_path):
    path = str(tmp_path / "v1")
    ocp_v1.save_pytree(path, {"a": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(3),
                              "s": 2})
    item = tmp_path / "v1" / "state"
    assert json.loads((item / "_METADATA").read_text())["use_zarr3"] is True
    restored, status = pc.restore(path, {"a": jnp.zeros((2, 3)), "key": jax.random.key(0),
                                         "s": 0}, at="state")
    status.assert_consumed()
    _equal(restored["a"], np.arange(6.0).reshape(2, 3))
    _equal(jax.random.key_data(restored["key"]), jax.random.key_data(jax.random.key(3)))
    assert pc.restore(str(item))[0]["s"] == 2  # the item folder itself


SAVE_2_PROCESSES = r"""
import jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("p", "d"))
sharding = NamedSharding(mesh, PartitionSpec("p", "d"))
value = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
w = jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
checkpointer = ocp.StandardCheckpointer()
checkpointer.save(args["path"], {"w": w, "step": 11})
checkpointer.wait_until_finished()
print("SAVED", process_id)
"""


def test_a_two_process_save_restores_in_one_process_onto_another_mesh(tmp_path):
    path = str(tmp_path / "two")
    results = run_multiprocess(SAVE_2_PROCESSES, num_processes=2, devices_per_process=2,
                               timeout_s=120, args={"path": path})
    assert_all_ok(results)
    assert os.path.exists(os.path.join(path, "array_metadatas", "process_1"))
    sharding = NamedSharding(_mesh((2, 4), ("a", "b")), PartitionSpec("b", "a"))
    target = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=sharding), "step": 0}
    restored, status = pc.restore(path, target)
    status.assert_consumed()
    assert restored["w"].sharding == sharding and restored["step"] == 11
    _equal(restored["w"], np.arange(8 * 6, dtype=np.float32).reshape(8, 6))


def test_names_that_collide_in_orbax_are_refused(tmp_path):
    # Orbax stores both leaves as the one array "a.b": one value is silently lost.
    path = _standard(str(tmp_path / "collide"), {"a.b": jnp.zeros(2), "a": {"b": jnp.ones(2)}})
    with pytest.raises(pc.CorruptCheckpointError,
                       match=r"collide/_METADATA: entries '.*' and '.*' share the storage name "
                             r"'a.b' \(Orbax stores them as one array\)"):
        pc.restore(path)


def test_a_missing_chunk_is_an_error_not_zeros(tmp_path):
    path = tmp_path / "plain"
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(
        str(path), {"w": jnp.arange(4.0)})
    (path / "w" / "0").unlink()
    with pytest.raises(pc.CorruptCheckpointError,
                       match="plain: entry 'w': cannot read its array data"):
        pc.restore(str(path), {"w": jnp.zeros(4)})


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(tree_metadata=[]), r"_METADATA: no 'tree_metadata' object"),
    (lambda m: m["tree_metadata"]["('w',)"]["value_metadata"].update(value_type="pickle"),
     r"_METADATA: entry 'w': value type 'pickle' is not one this library reads"),
    (lambda m: m["tree_metadata"]["('w',)"].update(key_metadata=[{"key": 1}]),
     r"_METADATA: malformed entry"),
    (lambda m: m["tree_metadata"]["('w',)"]["key_metadata"].__setitem__(0, {
        "key": "nothing", "key_type": 2}), r"entry 'nothing': cannot open its array"),
], ids=["tree", "value-type", "keys", "no-array"])
def test_malformed_metadata_is_refused(tmp_path, edit, message):
    path = _standard(str(tmp_path / "bad"), {"w": jnp.ones(2)})
    meta = json.loads((tmp_path / "bad" / "_METADATA").read_text())
    edit(meta)
    (tmp_path / "bad" / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(pc.CorruptCheckpointError, match=f"bad.*{message}"):
        pc.restore(path)


def test_a_list_child_not_named_by_its_index_is_refused(tmp_path):
    path = _standard(str(tmp_path / "bad"), {"l": {"x": jnp.ones(2)}})
    meta = json.loads((tmp_path / "bad" / "_METADATA").read_text())
    (entry,) = meta["tree_metadata"].values()
    entry["key_metadata"][1]["key_type"] = 1  # "x" as a sequence index
    (tmp_path / "bad" / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(pc.CorruptCheckpointError,
                       match="bad: 'l/x': a child of a list must be named by its index"):
        pc.restore(path)


def test_an_unfinished_save_is_refused(tmp_path):
    path = tmp_path / "3.orbax-checkpoint-tmp-17"
    _standard(str(tmp_path / "done"), {"w": jnp.ones(2)})
    os.rename(tmp_path / "done", path)
    with pytest.raises(pc.IncompleteCheckpointError, match="an Orbax save that did not finish"):
        pc.restore(str(path))


def test_object_stores(tmp_path, bucket):
    tree = _tree()
    _standard(str(tmp_path / "std"), tree)
    _upload.upload(str(tmp_path / "std"), f"{bucket}/std")
    assert pc.metadata(f"{bucket}/std").format == "orbax"
    restored, status = pc.restore(f"{bucket}/std", tree)
    status.assert_consumed()
    _equal(restored["params"]["w"], tree["params"]["w"])
    assert restored["step"] == 3


def test_a_weakly_typed_target_leaf_comes_back_weakly_typed(tmp_path):
    # As from our own format: the target's weak type is kept (a Python scalar's jax.Array
    # promotes as a scalar would); a strongly typed target gets a strongly typed leaf.
    path = _standard(str(tmp_path / "o"), {"w": jnp.asarray(2.0)})
    weak, strong = jnp.asarray(0.0), jnp.asarray(np.float32(0.0))
    assert weak.weak_type and not strong.weak_type
    restored, _ = pc.restore(path, {"w": weak})
    assert restored["w"].weak_type and float(restored["w"]) == 2.0
    restored, _ = pc.restore(path, {"w": strong})
    assert not restored["w"].weak_type and float(restored["w"]) == 2.0
