"""A forged commit file costs at most a small multiple of its own size and of the data it
truly names: each forgery is restored in a fresh process (forked from a warm one) under an RSS
ceiling and a time ceiling, and must end in a typed ``CorruptCheckpointError`` well within
both: its CPU time, not its wall-clock time, so that a loaded machine does not count.

The forgeries, as found by hand: a 16 MiB leaf declared in chunks of one element (4 million
requests: a minute and ~4 GB before it failed); 24 leaves naming one 16 MiB zarr array
(read 24 times); 4,000 leaves naming one 256 KiB packed range (1 GB); a body of nothing but
empty arrays or maps (71x its size in Python objects before it was refused).
"""

from __future__ import annotations

import json
import shutil
import zlib

import msgpack
import numpy as np
import pytest
from _commit_body import from_rows, to_rows

import pytree_ckpt as pc
from pytree_ckpt import _format

_CEILING_MB = 300  # RSS growth allowed to a restore: the real tree is ~25 MB
_SECONDS = 60  # the child's wall-clock limit; a typed error must come within 10 CPU seconds

# The child restores (without a target) and reads metadata; a watchdog thread ends it with
# exit status 3 once its RSS grows past the ceiling, so a forgery that would take gigabytes
# takes no more than the ceiling from the machine running the tests.
_CHILD = """
import json, os, sys, threading, time
import jax
import pytree_ckpt as pc
path, ceiling = sys.argv[1], int(sys.argv[2]) << 20
jax.devices()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
base = rss()
def watch():
    while True:
        if rss() - base > ceiling:
            print(json.dumps({"killed": "RSS ceiling"}), flush=True)
            os._exit(3)
        time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
out, peak = {}, 0
start = time.process_time()  # every thread's CPU time: what the work costs, whatever the load
for name, call in (("restore", lambda: pc.restore(path)), ("metadata", lambda: pc.metadata(path))):
    try:
        call()
        out[name] = "returned"
    except pc.CheckpointError as e:
        out[name] = type(e).__name__ + ": " + str(e)[:300]
    except BaseException as e:
        out[name] = "UNTYPED " + type(e).__name__ + ": " + str(e)[:300]
out["seconds"] = time.process_time() - start
out["rss_growth_mb"] = (rss() - base) / 2**20
print(json.dumps(out), flush=True)
"""


def run_child(zygote, path) -> dict:
    proc = zygote.run(_CHILD, [path, _CEILING_MB], timeout=_SECONDS)
    lines = proc.stdout.strip().splitlines()
    assert lines, (proc.returncode, proc.stderr[-2000:])
    return json.loads(lines[-1])


def _tree():
    return {
        "big": np.arange(4 << 20, dtype=np.float32),  # 16 MiB: a zarr array of 4 chunks
        "z": [np.full(65_600, i, np.float32) for i in range(24)],  # just over packing size
        "r": np.arange(65_536, dtype=np.float32),  # 256 KiB, packed
        "p": [np.full(1, i, np.float32) for i in range(4_000)],  # packed
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("forged_costs") / "c"
    pc.save(_tree(), path)
    raw = (path / _format.COMMIT_FILE).read_bytes()
    return path, msgpack.unpackb(msgpack.unpackb(raw)[3])


def _write(path, body: dict | bytes) -> int:
    packed = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    raw = msgpack.packb([_format.MAGIC, _format.FORMAT_VERSION, zlib.crc32(packed), packed],
                        use_bin_type=True)
    (path / _format.COMMIT_FILE).write_bytes(raw)
    return len(raw)


def _forged(saved, tmp_path, change) -> tuple:
    path = tmp_path / "c"
    shutil.copytree(saved[0], path)
    rows = to_rows(saved[1])
    by_path = {r[0]: r for r in rows}
    change(by_path)
    return path, _write(path, from_rows(saved[1], rows))


def _tiny_chunks(rows):
    rows["big"][5][2] = [1]


def _one_array_24_times(rows):
    for i in range(24):
        rows[f"z/{i}"][3] = list(rows["big"][3])
        rows[f"z/{i}"][5] = list(rows["big"][5])


def _one_range_4000_times(rows):
    for i in range(4_000):
        rows[f"p/{i}"][3] = list(rows["r"][3])
        rows[f"p/{i}"][5] = list(rows["r"][5])


FORGERIES = {
    "16 MiB in chunks of 4 bytes": (_tiny_chunks, "too many chunks for its size"),
    "one zarr array named 24 times": (_one_array_24_times, "an array another leaf uses"),
    "one packed range named 4,000 times": (_one_range_4000_times,
                                           "bytes another leaf uses"),
}


def test_the_real_checkpoint_restores_under_the_ceiling(zygote, saved):
    """The harness itself: the unforged checkpoint restores within both ceilings."""
    result = run_child(zygote, saved[0])
    assert result["restore"] == "returned" and result["metadata"] == "returned", result
    assert result["rss_growth_mb"] < _CEILING_MB, result


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_forged_leaf_record_is_refused_at_little_cost(zygote, saved, tmp_path, name):
    change, message = FORGERIES[name]
    path, size = _forged(saved, tmp_path, change)
    assert size < 200_000  # a few KB to 155 KB of commit file
    result = run_child(zygote, path)
    for call in ("restore", "metadata"):
        assert result.get(call, "").startswith("CorruptCheckpointError"), result
        assert message in result[call] and "checkpoint.msgpack: leaf '" in result[call], result
    assert result["seconds"] < 10, result


@pytest.mark.parametrize("container", [b"\x90", b"\x80"], ids=["empty arrays", "empty maps"])
def test_a_body_of_empty_containers_is_refused_within_a_few_times_its_size(zygote, tmp_path,
                                                                            container):
    """16 MiB of one-byte containers (8 arrays of 2 million, each as long as a body of that
    size may hold): refused at ~7x the file's size (it took 71x), within the ceiling."""
    path = tmp_path / "c"
    path.mkdir()
    n = 2 << 20
    inner = b"\xdd" + n.to_bytes(4, "big") + container * n  # array32 of n
    body = b"\x98" + inner * 8
    size = _write(path, body)
    assert size > 16 << 20
    result = run_child(zygote, path)
    for call in ("restore", "metadata"):
        assert result[call].startswith("CorruptCheckpointError"), result
        assert "not a valid commit file" in result[call], result
    assert result["seconds"] < 10 and result["rss_growth_mb"] < 200, result


@pytest.mark.parametrize("kind", ["empty dicts", "complex values", "None values"])
def test_legitimate_trees_dense_in_containers_stay_within_the_limits(tmp_path, kind):
    """The limits that refuse the forgeries admit what the writer makes, at its densest:
    a node record or a complex value per few bytes, or a leaf of one byte's value."""
    leaf = {"empty dicts": lambda i: {}, "complex values": lambda i: complex(i, -i),
            "None values": lambda i: None}[kind]
    tree = {str(i): leaf(i) for i in range(20_000)}
    pc.save(tree, tmp_path / "c")
    restored, _ = pc.restore(tmp_path / "c")
    assert restored == tree


def test_the_writer_never_cuts_more_chunks_than_the_reader_allows():
    """choose_chunks over shard shapes with prime and awkward lengths (along sharded and
    unsharded axes), up to 8 shards per axis: the chunk grid stays within most_chunks."""
    from pytree_ckpt import _storage

    rng = np.random.default_rng(0)
    lengths = [1, 2, 3, 7, 127, 4099, 65_537, 1_048_583]
    for _ in range(2_000):
        rank = int(rng.integers(1, 4))
        shard = [int(rng.choice(lengths)) for _ in range(rank)]
        shards = [int(rng.integers(1, 9)) for _ in range(rank)]
        itemsize = int(rng.choice([1, 2, 4, 8]))
        shape = [s * k for s, k in zip(shard, shards, strict=True)]
        if np.prod(shape, dtype=float) * itemsize > 2**40:
            continue
        chunks = _storage.choose_chunks(shard, itemsize, shape)
        count = np.prod([-(-d // c) for d, c in zip(shape, chunks, strict=True)], dtype=float)
        nbytes = int(np.prod(shape, dtype=float)) * itemsize
        assert count <= _storage.most_chunks(nbytes), (shard, shards, itemsize, chunks)


# -- other tools' files: a cost bounded whatever they declare -----------------------------


def _nils(path) -> None:
    """A Flax msgpack file of 2 million nils (2 MB): 19.5 s and 1.5 GB before."""
    n = 2_000_000
    (path / "nils.msgpack").write_bytes(b"\x81\xa1w\xdd" + n.to_bytes(4, "big") + b"\xc0" * n)


def _safetensors_header(path) -> None:
    """A 20 MB safetensors header of small entries: ~28x its size before (90 MB: 2.5 GB)."""
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
                       for i in range(400_000))
    text = ("{" + entries + "}").encode()
    text += b" " * (-len(text) % 8)
    (path / "h.safetensors").write_bytes(len(text).to_bytes(8, "little") + text)


def _orbax_metadata(path) -> None:
    """A 15 MB Orbax _METADATA of None leaves: ~30x its size before (45 MB: 1.35 GB)."""
    tree = {f"('p', 'l{i}')": {"key_metadata": [{"key": "p", "key_type": 2},
                                                {"key": f"l{i}", "key_type": 2}],
                               "value_metadata": {"value_type": "None"}}
            for i in range(110_000)}
    (path / "orbax").mkdir()
    (path / "orbax" / "_METADATA").write_text(json.dumps({"tree_metadata": tree}))


FOREIGN = {"Flax msgpack of 2 million nils": (_nils, "nils.msgpack", "more than 500000 values"),
           "safetensors header of 20 MB": (_safetensors_header, "h.safetensors",
                                           "bytes of JSON would take"),
           "Orbax _METADATA of 15 MB": (_orbax_metadata, "orbax",
                                        "_METADATA: 1")}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_another_tools_file_is_refused_at_little_cost(zygote, tmp_path, name):
    """Inputs a fifth of the sizes found by hand: each took over the ceiling (300 MB) before;
    now refused in a fraction of it (the 100 MB versions: see the README's Reliability)."""
    make, file, message = FOREIGN[name]
    make(tmp_path)
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size >= 2_000_000
    result = run_child(zygote, tmp_path / file)
    for call in ("restore", "metadata"):
        assert result.get(call, "").startswith("CorruptCheckpointError"), result
        assert message in result[call] and str(tmp_path / file) in result[call], result
    assert result["seconds"] < 10 and result["rss_growth_mb"] < 150, result
