"""read_blocks: a leaf, or a region of it, read block by block from every format restore
reads, each block only what it needs (counted in the bytes TensorStore reads from disk)."""

import itertools
import re

import flax.serialization
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import pytree_ckpt as pc
from pytree_ckpt import _blocks
from pytree_ckpt._foreign import safetensors_read


def leaves() -> dict:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((37, 5, 3)).astype(np.float32),
        "bf16": rng.standard_normal((9, 11)).astype(ml_dtypes.bfloat16),
        "f8": rng.standard_normal(50).astype(ml_dtypes.float8_e4m3fn),
        "c64": (rng.standard_normal((6, 4)) + 1j * rng.standard_normal((6, 4))).astype(
            np.complex64),
        "bool": rng.random((7, 3)) > 0.5,
        "i8": rng.integers(-128, 127, (4, 9), dtype=np.int8),
        "u64": rng.integers(0, 2**63, 10, dtype=np.uint64),
        "zero_d": np.float64(2.5) * np.ones(()),
        "empty": np.zeros((0, 4), np.float32),
    }


def assemble(path, leaf, **kw) -> tuple[list, np.ndarray]:
    """The blocks of ``leaf`` and the flat concatenation of them in order."""
    got = list(pc.read_blocks(path, leaf, **kw))
    flat = np.concatenate([b.reshape(-1) for _, b in got]) if got else None
    return got, flat


def check_blocks(path, name, expected, block_bytes):
    got, flat = assemble(path, name, block_bytes=block_bytes)
    np.testing.assert_array_equal(flat, expected.reshape(-1))
    assert flat.dtype == expected.dtype, name
    for index, block in got:
        assert block.dtype == expected.dtype
        np.testing.assert_array_equal(block, expected[index])
        if block_bytes is None:
            assert len(got) == 1 and block.shape == expected.shape, name
        else:
            assert block.nbytes <= max(block_bytes, expected.itemsize), name


@pytest.mark.parametrize("block_bytes", [1, 40, 1000, None])
def test_blocks_rebuild_every_dtype_and_shape_of_our_checkpoints(tmp_path, block_bytes):
    tree = leaves()
    tree["big"] = np.arange(300_000, dtype=np.float32).reshape(1000, 300)  # a zarr array
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    tree["sharded"] = jax.device_put(jnp.arange(80_000.0).reshape(400, 200),
                                     NamedSharding(mesh, P("x", "y")))
    tree["key"] = jax.random.split(jax.random.key(3), 5)
    pc.save(tree, tmp_path / "c")
    expected = {k: np.asarray(jax.random.key_data(v) if k == "key" else v)
                for k, v in tree.items()}
    for name, value in expected.items():
        if block_bytes in (1, 40) and value.size > 2000:
            continue  # one element a block: thousands of reads
        check_blocks(tmp_path / "c", name, value, block_bytes)


def test_block_bounds_are_contiguous_runs_along_the_first_axis_whose_rows_fit():
    region = ((0, 10), (0, 4), (0, 3))
    assert list(_blocks.blocks(region, 4, 100)) == [  # rows of 48 bytes: 2 a block
        ((a, min(a + 2, 10)), (0, 4), (0, 3)) for a in range(0, 10, 2)]
    assert list(_blocks.blocks(region, 4, 20)) == [  # a row is 48 bytes: cut each by axis 1
        ((i, i + 1), (j, min(j + 1, 4)), (0, 3)) for i in range(10) for j in range(4)]
    assert list(_blocks.blocks(region, 4, 8)) == [
        ((i, i + 1), (j, j + 1), (k, min(k + 2, 3)))
        for i, j in itertools.product(range(10), range(4)) for k in (0, 2)]
    assert list(_blocks.blocks(region, 4, 480)) == [region]
    assert list(_blocks.blocks((), 8, 1)) == [()]
    assert list(_blocks.blocks(((0, 0), (0, 5)), 4, 1)) == [((0, 0), (0, 5))]
    assert list(_blocks.blocks(((3, 9),), 4, 8)) == [((3, 5),), ((5, 7),), ((7, 9),)]


def test_an_index_reads_that_region(tmp_path):
    value = np.arange(600, dtype=np.int32).reshape(20, 30)
    pc.save({"m": {"w": value}}, tmp_path / "c")
    for index in [np.s_[3:7], np.s_[:, 5:9], np.s_[-4:, -3:-1], np.s_[2:2], np.s_[0:20, 29:30],
                  (slice(5, 6), slice(None, None, 1))]:
        got, flat = assemble(tmp_path / "c", "m/w", index=index, block_bytes=48)
        np.testing.assert_array_equal(flat, value[index].reshape(-1))
        for where, block in got:
            np.testing.assert_array_equal(block, value[where])
    [(where, whole)] = pc.read_blocks(tmp_path / "c", "m/w", index=np.s_[4:10], block_bytes=None)
    assert where == (slice(4, 10), slice(0, 30))
    np.testing.assert_array_equal(whole, value[4:10])


def test_bad_leaf_index_or_block_size_is_a_typed_error_naming_the_path_and_leaf(tmp_path):
    pc.save({"m": {"w": np.zeros((20, 30), np.float32)}, "step": 3}, tmp_path / "c")
    url = re.escape(str(tmp_path / "c"))
    with pytest.raises(pc.PathNotFoundError, match=rf"^{url}: leaf 'm/b' is not in the "):
        pc.read_blocks(tmp_path / "c", "m/b")
    with pytest.raises(pc.PathNotFoundError,
                       match=r"leaf 'm' is not in the checkpoint \(it is a subtree of 1 leaves, "
                             r"e.g. 'm/w'\)"):
        pc.read_blocks(tmp_path / "c", "m")
    with pytest.raises(pc.UnsupportedLeafError,
                       match=rf"^{url}: leaf 'step' is a Python int, not an array"):
        pc.read_blocks(tmp_path / "c", "step")
    where = rf"^{url}: leaf 'm/w' of shape \(20, 30\): index "
    for index, why in [
            (np.s_[10:21], r"reaches outside axis 0 of length 20 \(from 10 to 21\)"),
            (np.s_[:, -31:], r"reaches outside axis 1 of length 30 \(from -1 to 30\)"),
            (np.s_[5:3], r"reaches outside axis 0 of length 20 \(from 5 to 3\)"),
            (np.s_[::2], "has step 2 on axis 0"),
            (np.s_[1:2, 3:4, 5:6], "has 3 entries for 2 axes"),
            (3, "has 3 for axis 0: give slices"),
            ((None,), "has None for axis 0: give slices"),
            (np.s_[1.5:3], "has a bound on axis 0 that is not an integer")]:
        with pytest.raises(pc.RegionError, match=where + ".*" + why):
            pc.read_blocks(tmp_path / "c", "m/w", index=index)
    with pytest.raises(IndexError):  # what callers catching the built-in get
        pc.read_blocks(tmp_path / "c", "m/w", index=np.s_[30:])
    with pytest.raises(ValueError, match="block_bytes must be at least 1, not 0"):
        pc.read_blocks(tmp_path / "c", "m/w", block_bytes=0)
    with pytest.raises(pc.CheckpointNotFoundError, match="no checkpoint there"):
        pc.read_blocks(tmp_path / "none", "m/w")


def bytes_read() -> int:
    (metric,) = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return metric["values"][0]["value"]


def test_a_small_region_of_a_large_leaf_reads_only_its_chunks(tmp_path):
    """32 MiB saved in chunks of at most 4 MiB: 64 rows read, one chunk's bytes and the
    commit file from disk, not the leaf's; a block at a time, the whole leaf once."""
    value = np.arange(8 << 20, dtype=np.float32).reshape(1024, 8192)  # rows of 32 KiB
    pc.save({"embed": value}, tmp_path / "c")
    before = bytes_read()
    [(_, rows)] = pc.read_blocks(tmp_path / "c", "embed", index=np.s_[512:576], block_bytes=None)
    used = bytes_read() - before
    np.testing.assert_array_equal(rows, value[512:576])
    assert 2 << 20 <= used < 5 << 20, used  # 2 MiB asked, within one 4 MiB chunk
    before = bytes_read()
    count = 0
    for index, block in pc.read_blocks(tmp_path / "c", "embed", block_bytes=4 << 20):
        np.testing.assert_array_equal(block, value[index])
        count += 1
    assert count == 8
    assert 32 << 20 <= bytes_read() - before < 34 << 20


def test_a_region_of_a_safetensors_tensor_reads_its_bytes_only(tmp_path):
    value = np.arange(4 << 20, dtype=np.float32).reshape(512, 8192)  # 16 MiB
    save_file({"model.embed": value}, str(tmp_path / "m.safetensors"))
    before = bytes_read()
    [(_, rows)] = pc.read_blocks(tmp_path / "m.safetensors", "model/embed",
                                 index=np.s_[100:104], block_bytes=None)
    used = bytes_read() - before
    np.testing.assert_array_equal(rows, value[100:104])
    assert 128 << 10 <= used < 256 << 10, used  # 128 KiB asked, and the header
    before = bytes_read()
    [(_, column)] = pc.read_blocks(tmp_path / "m.safetensors", "model/embed",
                                   index=np.s_[10:12, 5:6], block_bytes=None)
    np.testing.assert_array_equal(column, value[10:12, 5:6])
    assert bytes_read() - before < 64 << 10  # from [10, 5] to [11, 5]: one row of 32 KiB
    check_blocks(tmp_path / "m.safetensors", "model/embed", value, 3 << 20)


def test_a_column_of_a_large_safetensors_tensor_reads_its_rows_not_the_tensor(tmp_path):
    """64 MiB in rows of 32 KiB: a column is read row by row (its rows lie 32 KiB apart),
    a few KiB, not the 64 MiB from its first element to its last; columns of rows 4 KiB
    apart are read as shared ranges, in pieces, still equal to NumPy's slices."""
    value = np.arange(16 << 20, dtype=np.float32).reshape(2048, 8192)
    save_file({"model.embed": value}, str(tmp_path / "m.safetensors"))
    before = bytes_read()
    [(index, column)] = pc.read_blocks(tmp_path / "m.safetensors", "model/embed",
                                       index=np.s_[:, 5:6], block_bytes=4 << 20)
    used = bytes_read() - before
    assert index == (slice(0, 2048), slice(5, 6))
    np.testing.assert_array_equal(column, value[:, 5:6])
    assert used < 64 << 10, used  # 8 KiB of column, and the header
    before = bytes_read()
    [(_, columns)] = pc.read_blocks(tmp_path / "m.safetensors", "model/embed",
                                    index=np.s_[3:2000, 100:164], block_bytes=4 << 20)
    used = bytes_read() - before
    np.testing.assert_array_equal(columns, value[3:2000, 100:164])
    assert used < 1 << 20, used  # 500 KiB of columns
    narrow = value.reshape(16384, 1024)  # rows 4 KiB apart: read in shared ranges
    save_file({"t": narrow}, str(tmp_path / "n.safetensors"))
    [(_, column)] = pc.read_blocks(tmp_path / "n.safetensors", "t", index=np.s_[1:-1, -1:],
                                   block_bytes=4 << 20)
    np.testing.assert_array_equal(column, narrow[1:-1, -1:])
    # Requests: one a row 32 KiB apart; one per 8 MiB piece for rows 4 KiB apart.
    assert len(list(safetensors_read._parts(((0, 2048), (5, 6)), value.shape, 4))) == 2048
    parts = list(safetensors_read._parts(((1, 16383), (1023, 1024)), narrow.shape, 4))
    assert parts[:2] == [((1, 2049), (1023, 1024)), ((2049, 4097), (1023, 1024))]
    assert len(parts) == 8


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Orbax's own
def test_blocks_of_orbax_flax_msgpack_and_safetensors_files(tmp_path):
    tree = {k: v for k, v in leaves().items() if k not in ("empty", "f8", "u64")}
    tree["f32"] = jnp.asarray(tree["f32"])  # Orbax: a jax.Array leaf
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", tree)
    checkpointer.wait_until_finished()
    (tmp_path / "state.msgpack").write_bytes(flax.serialization.to_bytes(leaves()))
    save_file({k: v for k, v in leaves().items() if k != "zero_d"},
              str(tmp_path / "model.safetensors"))
    for path, names in [(tmp_path / "orbax", tree), (tmp_path / "state.msgpack", leaves()),
                        (tmp_path / "model.safetensors", leaves().keys() - {"zero_d"})]:
        info = pc.metadata(path)
        for name in names:
            value = np.asarray(leaves()[name])
            assert info.leaves[name].shape == value.shape, (path, name)
            for block_bytes in (40, None):
                check_blocks(path, name, value, block_bytes)
        with pytest.raises(pc.RegionError, match=r"leaf 'c64' of shape \(6, 4\): index "):
            pc.read_blocks(path, "c64", index=np.s_[:7])
