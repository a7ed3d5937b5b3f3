"""Hostile inputs of other tools' formats (Orbax, Flax msgpack, safetensors) and of
save_safetensors' output: a FIFO in any file a reader opens, a link or a stale temporary
file where save_safetensors writes, absurd shapes and deep nesting. Each is a typed error
naming the file (and the entry), within a second; nothing is written through a link, and
nothing read ever blocks (a read that does is released after a few seconds and the test
fails)."""

from __future__ import annotations

import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

import pytree_ckpt as pc
from pytree_ckpt import _cli

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.timeout(120)]

VICTIM_BYTES = b"precious data that is not a checkpoint\n"


def _orbax_tree():
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(2), ("x",))
    return {"w": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, PartitionSpec("x"))),
            "note": "text", "step": 3}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One checkpoint of each kind a reader opens, to be copied and damaged."""
    root = tmp_path_factory.mktemp("foreign")
    ocdbt = root / "ocdbt"
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(str(ocdbt), _orbax_tree())
    plain = root / "plain"
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(
        str(plain), {"w": jnp.arange(4.0)})
    steps = root / "steps"
    with ocp.CheckpointManager(str(steps)) as mgr:
        mgr.save(1, args=ocp.args.StandardSave({"w": jnp.arange(4.0)}))
        mgr.wait_until_finished()
    flax = root / "model.msgpack"
    flax.write_bytes(serialization.to_bytes({"w": np.arange(4.0), "b": np.ones(2)}))
    single = root / "model.safetensors"
    save_file({"w": np.arange(4.0), "b": np.ones(2)}, str(single))
    sharded = root / "sharded"
    sharded.mkdir()
    save_file({"w": np.arange(4.0)}, str(sharded / "a.safetensors"))
    save_file({"b": np.ones(2)}, str(sharded / "b.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "a.safetensors", "b": "b.safetensors"}}')
    return root


def _one(root, pattern: str) -> str:
    """The one file below ``root`` whose path relative to it matches ``pattern``."""
    import fnmatch

    found = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
             for f in files]
    matches = [p for p in found if fnmatch.fnmatch(p, pattern)]
    assert matches, (pattern, found)
    return sorted(matches, key=len)[0]


# (checkpoint in ``inputs``, the path to open below it, the file to replace: a pattern)
PLACEMENTS = {
    "Orbax _METADATA": ("ocdbt", "", "_METADATA"),
    "Orbax _sharding": ("ocdbt", "", "_sharding"),
    "Orbax _strings.json": ("ocdbt", "", "_strings.json"),
    "Orbax array_metadatas": ("ocdbt", "", "array_metadatas/process_0"),
    "Orbax OCDBT manifest": ("ocdbt", "", "manifest.ocdbt"),
    "Orbax OCDBT data file": ("ocdbt", "", "*/d/*"),
    "Orbax .zarray": ("plain", "", "w/.zarray"),
    "Orbax chunk": ("plain", "", "w/0"),
    "Orbax _CHECKPOINT_METADATA": ("steps", "1", "1/_CHECKPOINT_METADATA"),
    "Orbax item _METADATA in a step": ("steps", "1", "1/default/_METADATA"),
    "Flax msgpack file": ("model.msgpack", "", ""),
    "safetensors file": ("model.safetensors", "", ""),
    "safetensors index": ("sharded", "", "model.safetensors.index.json"),
    "safetensors shard": ("sharded", "", "b.safetensors"),
    "safetensors index opened as a file": ("sharded", "model.safetensors.index.json",
                                           "b.safetensors"),
}


def _released_or_raises(call, fifo):
    """``(call()'s exception or None, seconds)``; if still blocked after 10 s the FIFO is
    opened for writing and closed (the blocked read then ends) and the test fails."""
    outcome: list = []

    def run():
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # handed to the test
            outcome.append(e)

    start = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    seconds = time.perf_counter() - start
    if thread.is_alive():
        for _ in range(3):
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            os.close(fd)
            thread.join(1)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return outcome[0], seconds


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_a_fifo_in_another_tools_checkpoint_is_refused_within_a_second(inputs, tmp_path,
                                                                       placement, capsys):
    import shutil

    name, inner, pattern = PLACEMENTS[placement]
    src = inputs / name
    if src.is_dir():
        shutil.copytree(src, tmp_path / name, symlinks=True)
    else:
        shutil.copy(src, tmp_path / name)
    top = tmp_path / name
    fifo = top / _one(top, pattern) if pattern else top
    os.unlink(fifo)
    os.mkfifo(fifo)
    path = str(top / inner) if inner else str(top)
    calls = {"restore": lambda: pc.restore(path), "metadata": lambda: pc.metadata(path),
             "read_blocks": lambda: next(pc.read_blocks(path, "w")),
             "pytree-ckpt ls": lambda: _exit(_cli.main(["ls", path]))}
    for what, call in calls.items():
        error, seconds = _released_or_raises(call, fifo)
        if what == "pytree-ckpt ls":
            assert isinstance(error, SystemExit) and error.code == 2, (what, error)
            assert f"{fifo}: not a regular file" in capsys.readouterr().err
        else:
            assert isinstance(error, pc.NotACheckpointError), (what, error)
            assert f"{fifo}: not a regular file" in str(error), (what, error)
        assert seconds < 1, (what, seconds)


def _exit(status: int) -> None:
    raise SystemExit(status)


def test_verify_refuses_a_fifo_chunk_of_a_pytree_ckpt_checkpoint(tmp_path):
    ckpt = tmp_path / "c"
    pc.save({"w": np.arange(1 << 20, dtype=np.float32), "b": np.ones(3)}, ckpt)
    chunks = [os.path.join(d, f) for d, _, files in os.walk(ckpt) for f in files
              if "/a/" in d + "/" and f != "zarr.json"]
    fifo = sorted(chunks)[0]
    os.unlink(fifo)
    os.mkfifo(fifo)
    report, seconds = None, 0.0

    def call():
        nonlocal report
        report = pc.verify(ckpt)

    error, seconds = _released_or_raises(call, fifo)
    assert error is None, error
    assert not report.ok and f"{fifo}: not a regular file" in report.problems["w"], report
    assert seconds < 1, seconds
    error, _ = _released_or_raises(lambda: pc.verify(ckpt, strict=True), fifo)
    assert isinstance(error, pc.CorruptCheckpointError), error
    assert f"{fifo}: not a regular file" in str(error)


# -- save_safetensors' temporary file ----------------------------------------------------------


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM_BYTES)
    return path


def test_save_safetensors_refuses_a_link_at_its_temporary_file(tmp_path, victim):
    out = tmp_path / "out.safetensors"
    link = tmp_path / "out.safetensors.__lock"
    link.symlink_to(victim)
    with pytest.raises(pc.NotACheckpointError,
                       match=r"out.safetensors.__lock: a symbolic link"):
        pc.save_safetensors({"w": np.arange(4.0)}, out)
    assert victim.read_bytes() == VICTIM_BYTES and link.is_symlink() and not out.exists()


def test_convert_refuses_a_link_at_the_safetensors_temporary_file(tmp_path, victim, capsys):
    pc.save({"w": np.arange(4.0)}, tmp_path / "c")
    (tmp_path / "out.safetensors.__lock").symlink_to(victim)
    status = _cli.main(["convert", str(tmp_path / "c"), str(tmp_path / "out.safetensors")])
    assert status == 2
    assert "out.safetensors.__lock: a symbolic link" in capsys.readouterr().err
    assert victim.read_bytes() == VICTIM_BYTES and not (tmp_path / "out.safetensors").exists()


def test_a_stale_temporary_file_does_not_spoil_the_next_save(tmp_path):
    """A killed save_safetensors leaves ``out.safetensors.__lock``; the next save's file is
    exactly what the safetensors package reads (the stale tail was kept before)."""
    out = tmp_path / "out.safetensors"
    (tmp_path / "out.safetensors.__lock").write_bytes(b"\xff" * (1 << 20))
    tree = {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(2, np.float32)}
    pc.save_safetensors(tree, out)
    loaded = load_file(str(out))
    assert sorted(loaded) == ["b", "w"]
    np.testing.assert_array_equal(loaded["w"], tree["w"])
    assert not (tmp_path / "out.safetensors.__lock").exists()
    pc.save_safetensors({"w": np.zeros(1)}, out, overwrite=True)  # shorter: no tail kept
    assert list(load_file(str(out))) == ["w"] and out.stat().st_size < 200


_SAVE_CHILD = r"""
import json, resource, sys
import numpy as np
import pytree_ckpt as pc
tree = {str(i): np.full(8 << 20, i, np.float32) for i in range(8)}  # 8 x 32 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pc.save_safetensors(tree, sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth_mb": (after - before) / 1024}))
"""


def test_save_safetensors_streams_the_file(tmp_path):
    """A 256 MiB tree is written leaf by leaf: the peak grows by far less than the file
    (the whole file was built in memory first: +256 MiB and more)."""
    import json
    import subprocess
    import sys

    src = os.path.dirname(os.path.dirname(pc.__file__))
    out = tmp_path / "big.safetensors"
    proc = subprocess.run([sys.executable, "-c", _SAVE_CHILD, str(out)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth_mb"]
    assert growth < 64, growth
    assert out.stat().st_size > 256 << 20
    assert float(load_file(str(out))["7"][-1]) == 7.0


# -- absurd shapes and deep nesting -------------------------------------------------------


def _ext(arr):
    return msgpack.ExtType(1, msgpack.packb([list(arr.shape), arr.dtype.name, arr.tobytes()]))


def _safetensors(path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


HUGE = [2**61, 2**61, 0]  # no bytes, and still more than NumPy can describe


def _absurd_safetensors(tmp_path, inputs):
    path = tmp_path / "x.safetensors"
    _safetensors(path, {"w": {"dtype": "F32", "shape": HUGE, "data_offsets": [0, 0]},
                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    return path, "w", "bad shape [2305843009213693952, 2305843009213693952, 0]: too large"


def _absurd_chunked_msgpack(tmp_path, inputs):
    path = tmp_path / "x.msgpack"
    path.write_bytes(msgpack.packb({"p": {"w": {
        "__msgpack_chunked_array__": True, "shape": {str(i): d for i, d in enumerate(HUGE)},
        "chunks": {"0": _ext(np.zeros(0, np.float32))}}}}))
    return path, "p/w", "bad shape [2305843009213693952, 2305843009213693952, 0]: too large"


def _absurd_msgpack_array(tmp_path, inputs):
    path = tmp_path / "x.msgpack"
    path.write_bytes(msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb(
        [HUGE, "float32", b""]))}))
    return path, "w", "bad shape [2305843009213693952, 2305843009213693952, 0]: too large"


def _absurd_zarray(tmp_path, inputs):
    import shutil

    path = tmp_path / "plain"
    shutil.copytree(inputs / "plain", path)
    meta = json.loads((path / "w" / ".zarray").read_text())
    meta["shape"] = meta["chunks"] = [2**50]  # 4 PiB
    (path / "w" / ".zarray").write_text(json.dumps(meta))
    return path, "w", "cannot be allocated"


def _deep_sharding(tmp_path, inputs):
    import base64
    import shutil

    path = tmp_path / "ocdbt"
    shutil.copytree(inputs / "ocdbt", path)
    table = json.loads((path / "_sharding").read_text())
    key = base64.urlsafe_b64encode(b"w").decode()
    assert key in table
    table[key] = "[" * 100_000 + "]" * 100_000 + " NamedSharding"
    (path / "_sharding").write_text(json.dumps(table))
    return path, "w", "_sharding: entry 'w': nested too deep"


ABSURD = {"safetensors dims of 2**61": _absurd_safetensors,
          "msgpack chunked array of 2**61 x 2**61 x 0": _absurd_chunked_msgpack,
          "msgpack array of 2**61 x 2**61 x 0": _absurd_msgpack_array,
          "Orbax .zarray of shape 2**50": _absurd_zarray,
          "Orbax _sharding nested 100,000 deep": _deep_sharding}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_shapes_and_deep_nesting_are_corrupt_checkpoints(inputs, tmp_path, case,
                                                                capsys):
    """CorruptCheckpointError naming the file and the entry (numpy's MemoryError,
    ValueError 'array is too big' and RecursionError before), and the CLI's exit 1."""
    path, entry, message = ABSURD[case](tmp_path, inputs)
    with pytest.raises(pc.CorruptCheckpointError) as caught:
        pc.restore(str(path))
    assert str(caught.value).startswith(str(path)), caught.value
    assert f"entry {entry!r}" in str(caught.value) and message in str(caught.value)
    assert _cli.main(["convert", str(path), str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
