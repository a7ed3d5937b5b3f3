"""safetensors files written by the ``safetensors`` package, read by pytree_ckpt (and back)."""

import json
import os

import _upload
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save, save_file

import pytree_ckpt as pc
from pytree_ckpt import _build, _open, _source, _storage
from pytree_ckpt._foreign import safetensors as _safetensors
from pytree_ckpt._foreign import safetensors_read

# Every dtype the package writes from NumPy, with the name our reader gives it.
DTYPE_MATRIX = {
    "bool": np.array([True, False, True]),
    "uint8": np.arange(3, dtype=np.uint8), "int8": np.array([-1, 0, 1], np.int8),
    "uint16": np.arange(3, dtype=np.uint16), "int16": np.array([-7, 0, 7], np.int16),
    "uint32": np.arange(3, dtype=np.uint32), "int32": np.array([-2**31, 0, 5], np.int32),
    "uint64": np.array([2**64 - 1, 0, 1], np.uint64),
    "int64": np.array([-2**63, 0, 2**62], np.int64),
    "float16": np.array([0.5, -1, 65504], np.float16),
    "bfloat16": np.array([1.5, -2, 3], ml_dtypes.bfloat16),
    "float32": np.array([1e-30, -2.5, np.inf], np.float32),
    "float64": np.array([np.pi, -0.0, 1e300], np.float64),
    "complex64": np.array([1 + 2j, -3j, 0], np.complex64),
    "float8_e4m3fn": np.array([1, -2, 0.5], ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.array([1, -2, 0.25], ml_dtypes.float8_e5m2),
}

HF = {  # Hugging-Face-style names; PyTorch Linear weights are (out, in)
    "model.embed_tokens.weight": np.arange(24, dtype=np.float32).reshape(6, 4),
    "model.layers.0.mlp.up_proj.weight": np.full((8, 4), 0.5, np.float32),
    "model.layers.1.mlp.up_proj.weight": np.full((8, 4), 1.5, np.float32),
    "model.norm.weight": np.ones(4, np.float32),
}


def test_a_file_written_by_the_package_restores_without_a_target(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file(HF, path, metadata={"format": "pt"})
    info = pc.metadata(path)
    assert info.format == "safetensors" and info.format_version == 0
    assert info.writer["metadata"] == {"format": "pt"}
    assert info.leaves["model/layers/1/mlp/up_proj/weight"].shape == (8, 4)
    assert info.leaves["model/norm/weight"].dtype == "float32"
    assert info.nbytes == sum(a.nbytes for a in HF.values())
    tree, status = pc.restore(path)
    assert set(status.matched) == {_safetensors.path_of(n) for n in HF}
    # Without a target, digit names stay dict keys: only a target can say "list".
    layer = tree["model"]["layers"]["1"]["mlp"]["up_proj"]["weight"]
    assert type(layer) is np.ndarray
    np.testing.assert_array_equal(layer, HF["model.layers.1.mlp.up_proj.weight"])


def test_every_dtype_reads_back_exactly(tmp_path):
    path = str(tmp_path / "dtypes.safetensors")
    save_file(DTYPE_MATRIX, path)
    tree, _ = pc.restore(path)
    for name, value in DTYPE_MATRIX.items():
        assert tree[name].dtype == value.dtype, name
        np.testing.assert_array_equal(tree[name], value)
    target = {name: jnp.zeros(3, value.dtype) for name, value in DTYPE_MATRIX.items()
              if name not in ("uint64", "int64", "float64")}  # x64 is off: JAX narrows them
    restored, status = pc.restore(path, target)
    status.assert_existing_matched()
    for name in target:
        np.testing.assert_array_equal(np.asarray(restored[name]), DTYPE_MATRIX[name])


def test_target_kinds_lists_status_and_at(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file(HF, path)
    target = {"embed_tokens": {"weight": jnp.zeros((6, 4))},
              "layers": [{"mlp": {"up_proj": {"weight": np.zeros((8, 4), np.float32)}}},
                         {"mlp": {"up_proj": {"weight": jnp.zeros((4, 8))}}}],
              "norm": {"weight": jnp.zeros(4, jnp.bfloat16)}, "head": jnp.zeros(2)}
    tree, status = pc.restore(path, target, at="model")
    assert status.matched == ("embed_tokens/weight", "layers/0/mlp/up_proj/weight",
                              "norm/weight")
    assert status.unmatched == ("head",)
    assert status.mismatched == (pc.Mismatch("layers/1/mlp/up_proj/weight", (8, 4), "float32",
                                             (4, 8), "float32"),)
    assert status.cast == (pc.Cast("norm/weight", "float32", "bfloat16"),)
    assert status.unused == ()
    assert type(tree["layers"][0]["mlp"]["up_proj"]["weight"]) is np.ndarray
    np.testing.assert_array_equal(tree["embed_tokens"]["weight"], HF["model.embed_tokens.weight"])
    assert tree["norm"]["weight"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(tree["layers"][1]["mlp"]["up_proj"]["weight"], 0)  # kept


def test_regex_rename_rules_map_hugging_face_names(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file(HF, path)
    rules = [(r"^model/", ""), (r"^layers/(\d+)/mlp/", r"block\1/"), (r"/weight$", "/kernel")]
    target = {"block0": {"up_proj": {"kernel": jnp.zeros((8, 4))}},
              "block1": {"up_proj": {"kernel": jnp.zeros((8, 4))}}}
    tree, status = pc.restore(path, target, rename=rules)
    assert status.matched == ("block0/up_proj/kernel", "block1/up_proj/kernel")
    assert status.unused == ("model/embed_tokens/weight", "model/norm/weight")
    np.testing.assert_array_equal(tree["block1"]["up_proj"]["kernel"], 1.5)
    with pytest.raises(ValueError, match=r"rename rule '\(': not a regular expression"):
        pc.restore(path, target, rename=[("(", "x")])
    with pytest.raises(TypeError, match="expected a .pattern, replacement. pair"):
        pc.restore(path, target, rename=[("a", "b", "c")])
    with pytest.raises(pc.PathCollisionError, match="both map to 'x'"):
        pc.restore(path, target, rename=[("^.*$", "x")])


def test_a_sharded_target_reads_only_its_rows(tmp_path):
    path = str(tmp_path / "big.safetensors")
    weight = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)
    save_file({"w": weight}, path)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(4, 1), ("x", "y"))
    sharding = NamedSharding(mesh, PartitionSpec("x", None))
    target = {"w": jax.ShapeDtypeStruct((16, 6), jnp.float32, sharding=sharding)}
    tree, status = pc.restore(path, target)
    status.assert_consumed()
    assert tree["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(tree["w"]), weight)
    # What is read: four ranges of four rows (4 x 6 x 4 bytes each), one per device.
    rec = _open.open_source(_storage.location(path)).leaves["w"]
    want = _build.Want("jax", np.dtype(np.float32), (16, 6), sharding)
    files = [_source.file_at(_storage.location(path))]
    ranges = sorted(r for _leaf, _buf, r, _f in safetensors_read._pieces(
        files, [("w", rec, want)], _build.Layouts()))
    start = rec.storage.offset
    assert ranges == [(start + k * 96, start + (k + 1) * 96) for k in range(4)]
    # Split along the second axis: whole rows are read, each device keeps its columns.
    cols = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("y",)), PartitionSpec(None, "y"))
    tree, _ = pc.restore(path, {"w": jax.ShapeDtypeStruct((16, 6), jnp.float32,
                                                          sharding=cols)})
    assert tree["w"].sharding == cols
    np.testing.assert_array_equal(np.asarray(tree["w"]), weight)


def _write_sharded_set(folder, write):
    shards = {"model-00001-of-00002.safetensors": dict(list(HF.items())[:2]),
              "model-00002-of-00002.safetensors": dict(list(HF.items())[2:])}
    weight_map = {}
    for file, tensors in shards.items():
        write(f"{folder}/{file}", save(tensors))
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {"total_size": sum(a.nbytes for a in HF.values())},
             "weight_map": weight_map}
    write(f"{folder}/{_safetensors.INDEX_FILE}", json.dumps(index).encode())


def _local_write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_a_sharded_set_restores_from_its_folder_or_index(tmp_path):
    _write_sharded_set(str(tmp_path), _local_write)
    for path in (str(tmp_path), str(tmp_path / _safetensors.INDEX_FILE)):
        info = pc.metadata(path)
        assert info.format == "safetensors" and info.writer["files"] == 2
        assert info.writer["metadata"]["total_size"] == 368 == info.nbytes
        tree, status = pc.restore(path)
        assert len(status.matched) == 4
        np.testing.assert_array_equal(tree["model"]["norm"]["weight"], 1)
        np.testing.assert_array_equal(tree["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"],
                                      0.5)


def test_save_safetensors_is_read_by_the_package(tmp_path):
    tree = {"params": {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3),
                                 "bias": jnp.ones(3, jnp.bfloat16)}},
            "table": np.arange(4, dtype=np.int8), "scale": np.float32(2.5)}
    path = str(tmp_path / "out.safetensors")
    assert pc.save_safetensors(tree, path, metadata={"note": "hi"}) == path
    back = load_file(path)
    assert set(back) == {"params.dense.kernel", "params.dense.bias", "table", "scale"}
    np.testing.assert_array_equal(back["params.dense.kernel"], np.arange(6.0).reshape(2, 3))
    assert back["params.dense.bias"].dtype == ml_dtypes.bfloat16
    assert back["scale"].shape == () and back["scale"] == 2.5
    assert pc.metadata(path).writer["metadata"] == {"note": "hi"}
    with pytest.raises(pc.CheckpointExistsError, match="out.safetensors: the file exists"):
        pc.save_safetensors(tree, path)
    pc.save_safetensors({"x": np.zeros(2)}, path, overwrite=True)
    assert set(load_file(path)) == {"x"}


def test_save_safetensors_round_trips_a_flax_model(tmp_path):
    model = nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(2)])
    x = jnp.ones((3, 4))
    params = model.init(jax.random.key(0), x)["params"]
    path = str(tmp_path / "flax.safetensors")
    pc.save_safetensors(params, path)
    fresh = model.init(jax.random.key(1), x)["params"]
    restored, status = pc.restore(path, fresh)
    status.assert_consumed()
    np.testing.assert_array_equal(model.apply({"params": restored}, x),
                                  model.apply({"params": params}, x))


def test_save_safetensors_refuses_what_it_cannot_name(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    with pytest.raises(pc.UnsupportedLeafError, match="leaf 'step' has type builtins.int"):
        pc.save_safetensors({"w": np.zeros(2), "step": 3}, path)
    with pytest.raises(pc.UnsupportedLeafError, match="leaf 'k' is a PRNG key"):
        pc.save_safetensors({"k": jax.random.key(0)}, path)
    with pytest.raises(pc.UnsupportedLeafError, match="leaf 'q' has dtype int4"):
        pc.save_safetensors({"q": np.zeros(2, ml_dtypes.int4)}, path)
    with pytest.raises(pc.PathCollisionError, match="both give the tensor name 'a.b'"):
        pc.save_safetensors({"a.b": np.zeros(1), "a": {"b": np.ones(1)}}, path)
    with pytest.raises(pc.PathCollisionError, match="needs a name"):
        pc.save_safetensors(np.zeros(2), path)
    assert not os.path.exists(path)


# -- untrusted files -----------------------------------------------------------------------


def _text(text, data):
    return len(text).to_bytes(8, "little") + text + data


def _raw(header, data=b""):
    return _text(json.dumps(header).encode(), data)


@pytest.mark.parametrize("contents, message", [
    (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     r"entry 'w': bytes \d+-\d+ lie past the end of the file"),
    (_raw({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
     r"entry 'w': 8 bytes for shape \[3\] of F32 \(12 bytes\)"),
    (_raw({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"),
     r"entry 'w': unknown or unsupported dtype 'F4'"),
    (_raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
     r"entry 'w': bad shape \[-1\]"),
    (_raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
     r"entry 'w': bad data_offsets \[4, 0\]"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
     r"entries 'a' and 'b' overlap in the file"),
    (_text(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": 1}', b"\0" * 4),
     r"entry 'w' appears twice"),
    (_raw({"a.b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
     r"entry 'a' is both a value and a container"),
    ((2**40).to_bytes(8, "little") + b"{" + b" " * 40,
     r"header of 1099511627776 bytes is larger than 100000000"),
    ((100).to_bytes(8, "little") + b"{" + b" " * 40, r"header: bytes 8-108 lie past the end"),
    ((8).to_bytes(8, "little") + b"{nope:1}", r"malformed JSON header"),
], ids=["past-end", "size", "dtype", "shape", "offsets", "overlap", "twice", "leaf-and-node",
        "huge-header", "short-header", "json"])
def test_malformed_files_are_refused_naming_file_and_entry(tmp_path, contents, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(contents)
    with pytest.raises(pc.CorruptCheckpointError, match=f"bad.safetensors: {message}"):
        pc.restore(str(path))


def test_a_malformed_index_is_refused(tmp_path):
    _write_sharded_set(str(tmp_path), _local_write)
    index = tmp_path / _safetensors.INDEX_FILE
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(pc.CorruptCheckpointError,
                       match=r"entry 'model.norm.weight': file '../elsewhere.safetensors' is "
                             "not a file name in the index's folder"):
        pc.restore(str(tmp_path))
    doc["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(pc.CorruptCheckpointError,
                       match=r"entry 'model.norm.weight' is not in .*model-00001-of-00002"):
        pc.restore(str(tmp_path))


# -- object stores ---------------------------------------------------------------------------


def test_object_stores(bucket):
    tree = {"a": {"w": jnp.arange(12.0).reshape(3, 4)}, "b": np.ones(2, np.int32)}
    path = f"{bucket}/one.safetensors"
    pc.save_safetensors(tree, path)
    restored, status = pc.restore(path, tree)
    status.assert_consumed()
    np.testing.assert_array_equal(restored["a"]["w"], tree["a"]["w"])

    _write_sharded_set(f"{bucket}/set", _upload.write)
    assert pc.metadata(f"{bucket}/set").format == "safetensors"
    tree, status = pc.restore(f"{bucket}/set/{_safetensors.INDEX_FILE}")
    assert len(status.matched) == 4
    np.testing.assert_array_equal(tree["model"]["embed_tokens"]["weight"],
                                  HF["model.embed_tokens.weight"])
