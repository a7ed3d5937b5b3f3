"""restore(transform=...): declared per-path changes of layout, checked after the transform."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

import pytree_ckpt as pc

RNG = np.random.default_rng(0)
# PyTorch's Linear weights are (out, in); Flax's kernels are (in, out). Square ones match
# either way: only a declared transform gets them right.
TORCH = {"q": {"weight": RNG.standard_normal((4, 4), np.float32)},
         "up": {"weight": RNG.standard_normal((6, 4), np.float32)},
         "ln": {"scale": RNG.standard_normal(4).astype(np.float32)}}
FLAX_TARGET = {"q": {"kernel": jnp.zeros((4, 4))}, "up": {"kernel": jnp.zeros((4, 6))},
               "ln": {"scale": jnp.zeros(4)}}
RENAME = [(r"/weight$", "/kernel")]
TRANSPOSE = [(r".*/kernel", np.transpose)]


def _write(fmt, tmp_path):
    if fmt == "pytree_ckpt":
        path = str(tmp_path / "ours")
        pc.save(TORCH, path)
    elif fmt == "orbax":
        path = str(tmp_path / "orbax")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, TORCH)
        checkpointer.wait_until_finished()
    elif fmt == "flax_msgpack":
        path = str(tmp_path / "state.msgpack")
        (tmp_path / "state.msgpack").write_bytes(flax.serialization.to_bytes(TORCH))
    else:
        path = str(tmp_path / "model.safetensors")
        save_file({"q.weight": TORCH["q"]["weight"], "up.weight": TORCH["up"]["weight"],
                   "ln.scale": TORCH["ln"]["scale"]}, path)
    assert pc.metadata(path).format == fmt
    return path


@pytest.mark.parametrize("fmt", ["pytree_ckpt", "orbax", "flax_msgpack", "safetensors"])
def test_a_transform_applies_to_every_matching_leaf_of_every_format(fmt, tmp_path):
    path = _write(fmt, tmp_path)
    tree, status = pc.restore(path, FLAX_TARGET, rename=RENAME, transform=TRANSPOSE)
    status.assert_consumed()
    np.testing.assert_array_equal(tree["q"]["kernel"], TORCH["q"]["weight"].T)
    np.testing.assert_array_equal(tree["up"]["kernel"], TORCH["up"]["weight"].T)
    np.testing.assert_array_equal(tree["ln"]["scale"], TORCH["ln"]["scale"])
    assert isinstance(tree["q"]["kernel"], jax.Array)
    assert status.transformed == ("q/kernel", "up/kernel")
    assert set(status.matched) == {"q/kernel", "up/kernel", "ln/scale"}
    assert "2 transformed" in str(status) and "transformed" in status._repr_html_()


def test_without_the_transform_a_square_matrix_matches_untransposed(tmp_path):
    # The trap the transform is for: the status cannot tell a square matrix's layout.
    path = _write("pytree_ckpt", tmp_path)
    tree, status = pc.restore(path, {"q": {"kernel": jnp.zeros((4, 4))}}, rename=RENAME)
    assert status.matched == ("q/kernel",) and status.transformed == ()
    np.testing.assert_array_equal(tree["q"]["kernel"], TORCH["q"]["weight"])


def test_a_sharded_target_is_placed_after_the_transform(tmp_path):
    path = _write("safetensors", tmp_path)
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
    target = {"up": {"kernel": jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=sharding)}}
    tree, status = pc.restore(path, target, rename=RENAME, transform=TRANSPOSE)
    kernel = tree["up"]["kernel"]
    assert kernel.sharding == sharding and status.transformed == ("up/kernel",)
    np.testing.assert_array_equal(kernel, TORCH["up"]["weight"].T)
    for shard in kernel.addressable_shards:
        np.testing.assert_array_equal(shard.data, TORCH["up"]["weight"].T[shard.index])


def test_patterns_match_whole_paths_and_the_first_matching_rule_applies(tmp_path):
    path = str(tmp_path / "c")
    pc.save({"kernel": np.ones(2), "kernel_scale": np.ones(2)}, path)
    tree, status = pc.restore(
        path, {"kernel": np.zeros(2), "kernel_scale": np.zeros(2)},
        transform=[("kernel", lambda a: a * 2), ("kernel.*", lambda a: a * 3),
                   ("kernel", lambda a: a * 5)])
    np.testing.assert_array_equal(tree["kernel"], [2.0, 2.0])
    np.testing.assert_array_equal(tree["kernel_scale"], [3.0, 3.0])
    assert status.transformed == ("kernel", "kernel_scale")


def test_a_transform_gets_numpy_as_saved_and_its_result_is_cast_as_a_saved_leaf_would_be(
        tmp_path):
    path = str(tmp_path / "c")
    pc.save({"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)}, path)
    seen = []

    def fn(a):
        seen.append((type(a), a.dtype, a.shape))
        return a.T.astype(np.float32)

    tree, status = pc.restore(path, {"w": jnp.zeros((3, 2), jnp.bfloat16)}, transform=[("w", fn)])
    assert seen == [(np.ndarray, jnp.bfloat16, (2, 3))]
    assert tree["w"].dtype == jnp.bfloat16
    assert [str(c) for c in status.cast] == ["w: float32 -> bfloat16"]
    np.testing.assert_array_equal(tree["w"], np.arange(6).reshape(2, 3).T)


def test_a_transform_into_numpy_and_python_targets(tmp_path):
    path = str(tmp_path / "c")
    pc.save({"w": np.arange(4.0), "n": np.array([3])}, path)
    tree, _ = pc.restore(path, {"w": np.zeros((2, 2)), "n": 0},
                         transform=[("w", lambda a: a.reshape(2, 2)), ("n", lambda a: a[0])])
    np.testing.assert_array_equal(tree["w"], [[0.0, 1.0], [2.0, 3.0]])
    assert tree["n"] == 3 and type(tree["n"]) is int


def test_a_restore_without_target_transforms_too(tmp_path):
    path = _write("safetensors", tmp_path)
    tree, status = pc.restore(path, rename=RENAME, transform=TRANSPOSE)
    np.testing.assert_array_equal(tree["up"]["kernel"], TORCH["up"]["weight"].T)
    assert status.transformed == ("q/kernel", "up/kernel")


def test_a_transform_that_raises_names_the_leaf(tmp_path):
    path = _write("pytree_ckpt", tmp_path)

    def boom(a):
        raise RuntimeError("no")

    with pytest.raises(pc.TransformError, match=r"leaf 'up/kernel': its transform raised on "
                       r"the saved float32\[6, 4\]: RuntimeError: no"):
        pc.restore(path, FLAX_TARGET, rename=RENAME, transform=[("up/kernel", boom)])


def test_a_transform_returning_the_wrong_shape_names_the_leaf(tmp_path):
    path = _write("pytree_ckpt", tmp_path)
    with pytest.raises(pc.TransformError, match=r"leaf 'up/kernel': its transform turned the "
                       r"saved float32\[6, 4\] into float32\[6, 4\]; the target is "
                       r"float32\[4, 6\]"):
        pc.restore(path, FLAX_TARGET, rename=RENAME, transform=[(".*kernel", lambda a: a)])


def test_a_transform_returning_an_unsafe_dtype_or_no_array_names_the_leaf(tmp_path):
    path = _write("pytree_ckpt", tmp_path)
    with pytest.raises(pc.TransformError, match=r"leaf 'ln/scale': .* into int64\[4\]; "
                       r"the target is float32\[4\]"):
        pc.restore(path, FLAX_TARGET, rename=RENAME,
                   transform=[("ln/scale", lambda a: a.astype(np.int64))])
    with pytest.raises(pc.TransformError, match=r"leaf 'ln/scale': .* dtype <U1, which is not"):
        pc.restore(path, FLAX_TARGET, rename=RENAME, transform=[("ln/scale", lambda a: "x")])


def test_a_transform_of_a_python_value_is_refused(tmp_path):
    path = str(tmp_path / "c")
    pc.save({"step": 3}, path)
    with pytest.raises(pc.TransformError, match=r"leaf 'step': a transform applies to arrays; "
                       "the checkpoint holds a Python int there"):
        pc.restore(path, {"step": 0}, transform=[("step", lambda a: a)])


def test_malformed_rules_are_refused():
    with pytest.raises(TypeError, match="expected a list of"):
        pc.restore("memory://nowhere", transform="w")
    with pytest.raises(TypeError, match=r"transform rule \('w',\): expected"):
        pc.restore("memory://nowhere", transform=[("w",)])
    with pytest.raises(ValueError, match="not a regular expression"):
        pc.restore("memory://nowhere", transform=[("(", np.transpose)])


def test_the_manager_passes_transform_through(tmp_path):
    with pc.CheckpointManager(str(tmp_path / "run"), async_save=False) as mgr:
        mgr.save(1, TORCH)
        tree, status = mgr.restore(1, FLAX_TARGET, rename=RENAME, transform=TRANSPOSE)
    assert status.transformed == ("q/kernel", "up/kernel")
    np.testing.assert_array_equal(tree["q"]["kernel"], TORCH["q"]["weight"].T)
