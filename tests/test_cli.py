"""The pytree-ckpt command line against real checkpoints, local and on the loopback S3 server:
its tables, its --json, its exit status, its one-line errors.

Most commands run in this process through ``_cli.main`` (what ``python -m pytree_ckpt`` and the
``pytree-ckpt`` script call), with stdout and stderr captured. A few run as a user runs them,
in a fresh process: the installed script, a closed pipe, a terminal, an environment variable
read at import, the sharding column of a process with one device, and peak memory."""

import contextlib
import fcntl
import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import termios
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pytree_ckpt as pc
from pytree_ckpt import _cli, _cli_args, _diff

SRC = pathlib.Path(pc.__file__).parents[1]


def cli(*args):
    """Runs the command line in this process; returns (exit status, stdout, stderr).

    An exception that escapes ``main`` fails the test, as a traceback on a subprocess's
    stderr would."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = _cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def cli_process(*args, env=None, script=False):
    """Runs the command line in a fresh process (one CPU device); returns (exit status,
    stdout, stderr)."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
                    PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
                    **(env or {}))
    argv = ([str(pathlib.Path(sys.executable).with_name("pytree-ckpt"))] if script
            else [sys.executable, "-m", "pytree_ckpt"])
    out = subprocess.run([*argv, *map(str, args)], capture_output=True, text=True, env=full_env,
                         timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stdout, out.stderr


def state(step: int) -> dict:
    """A training state whose dense kernel, its Adam moment, count and step change with the
    step; embed and bias do not."""
    kernel = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) + step
    return {"params": {"dense": {"kernel": kernel, "bias": jnp.zeros(4)},
                       "embed": jnp.ones((5, 2), jnp.bfloat16)},
            "opt_state": {"count": jnp.int32(step), "mu": {"kernel": kernel * 0.5}},
            "step": step, "run": "demo"}


CHANGED_ARRAYS = ["params/dense/kernel", "opt_state/count", "opt_state/mu/kernel"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli") / "run"
    with pc.CheckpointManager(directory, async_save=False) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, state(step), metrics={"loss": {10: 0.5, 20: 0.25, 30: 0.375}[step]})
    return directory


def test_ls_table_totals_pattern_and_json(run_dir, tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    sharded = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("x", "y")))
    pc.save({"w": sharded, "b": np.zeros(3, np.int8), "note": "hi"}, tmp_path / "c")
    rc, out, err = cli_process("ls", tmp_path / "c")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{tmp_path}/c: pytree_ckpt checkpoint, format ")
    assert lines[1].split() == ["path", "kind", "dtype", "shape", "bytes", "sharding", "/", "value"]
    assert lines[2].split() == ["b", "numpy", "int8", "[3]", "3", "B"]
    assert lines[3].split() == ["note", "py", "str", "[]", "0", "B", "'hi'"]
    assert lines[4].split()[:7] == ["w", "jax", "float32", "[8,", "4]", "128", "B"]
    # The CLI's process has one device: metadata() says where a restore would put it.
    assert lines[4].endswith("P('x', 'y') over mesh(x=4, y=2) (saved on devices not all "
                             "here: restores on the default device)")
    assert lines[5] == "3 leaves, 131 B"

    rc, out, _ = cli("ls", f"{run_dir}/20", "*/kernel")
    assert rc == 0
    assert [ln.split()[0] for ln in out.splitlines()[2:-1]] == [
        "opt_state/mu/kernel", "params/dense/kernel"]
    assert out.splitlines()[-1] == "2 leaves, 96 B (of 7 leaves, 136 B)"

    rc, out, _ = cli_process("ls", f"{run_dir}/20", "params", "--json", script=True)
    assert rc == 0
    doc = json.loads(out)
    assert doc["path"] == f"{run_dir}/20" and doc["format"] == "pytree_ckpt"
    assert doc["total"] == {"leaf_count": 3, "nbytes": 84}
    assert doc["leaves"][0] == {"path": "params/dense/bias", "kind": "jax", "dtype": "float32",
                                "shape": [4], "nbytes": 16, "sharding": None, "value": None}
    assert [leaf["path"] for leaf in doc["leaves"]] == [
        "params/dense/bias", "params/dense/kernel", "params/embed"]

    rc, out, err = cli("ls", f"{run_dir}/20", "nothing*", "--json")
    assert rc == 2 and json.loads(out)["exit_status"] == 2
    assert err == (f"pytree-ckpt: error: {run_dir}/20: no leaf matches 'nothing*' "
                   "(of 7 leaves)\n")


def test_diff_finds_exactly_the_changed_paths_of_two_manager_steps(run_dir):
    rc, out, err = cli("diff", f"{run_dir}/10", f"{run_dir}/20")
    assert rc == 1 and err == ""
    # Without --values, the arrays by the checksums both commit files record, leaf by leaf.
    assert out.splitlines()[2:] == [
        "values differ (4):",
        "  opt_state/count      stored bytes differ (their checksums do)",
        "  opt_state/mu/kernel  stored bytes differ (their checksums do)",
        "  params/dense/kernel  stored bytes differ (their checksums do)",
        "  step                 A 10                                      B 20",
        "same stored checksums (2):",
        "  params/dense/bias",
        "  params/embed",
        "A and B differ: 0 only in A, 0 only in B, 0 changed, 4 of 7 values differ (5 arrays "
        "by their stored checksums)"]

    rc, out, _ = cli("diff", f"{run_dir}/10", f"{run_dir}/20", "--values", "--json")
    assert rc == 1
    doc = json.loads(out)
    assert [d["path"] for d in doc["values_differ"]] == sorted(CHANGED_ARRAYS) + ["step"]
    kernel = next(d for d in doc["values_differ"] if d["path"] == "params/dense/kernel")
    # Every element is 10 larger in step 20: relative to B's 20..31.
    assert kernel == {"path": "params/dense/kernel", "elements": 12, "differing": 12,
                      "max_abs": 10.0, "max_rel": 0.5}
    assert doc["only_in_a"] == doc["only_in_b"] == doc["changed"] == []
    assert doc["values_compared"] == 7 and doc["differ"] is True

    rc, out, _ = cli("diff", f"{run_dir}/10", f"{run_dir}/20", "--values")
    assert "  params/dense/kernel  12 of 12 elements  max abs 10  max rel 0.5" in out.splitlines()
    # An absolute tolerance of 5 hides the moment's difference (5), not the kernel's (10).
    rc, out, _ = cli("diff", f"{run_dir}/10", f"{run_dir}/20", "--values", "--atol", "5",
                     "--json")
    assert [d["path"] for d in json.loads(out)["values_differ"]] == [
        "opt_state/count", "params/dense/kernel", "step"]

    rc, out, _ = cli("diff", f"{run_dir}/30", f"{run_dir}/30", "--values")
    assert rc == 0
    assert out.splitlines()[-1] == ("A and B are the same: 0 only in A, 0 only in B, "
                                    "0 changed, 0 of 7 values differ")


def test_diff_of_structure_only_in_a_only_in_b_and_changed(tmp_path):
    pc.save({"w": np.ones((2, 3), np.float32), "old": 1, "same": np.arange(3)}, tmp_path / "a")
    pc.save({"w": np.ones((3, 3), np.float32), "new": 1, "same": np.arange(3)}, tmp_path / "b")
    rc, out, _ = cli("diff", tmp_path / "a", tmp_path / "b", "--values")
    assert rc == 1
    assert out.splitlines()[2:] == [
        "only in A (1):", "  old",
        "only in B (1):", "  new",
        "kind, dtype or shape differ (1):",
        "  w  A numpy float32[2, 3]  B numpy float32[3, 3]",
        "A and B differ: 1 only in A, 1 only in B, 1 changed, 0 of 1 values differ"]


def test_steps_lists_time_size_metrics_and_the_best(run_dir):
    rc, out, err = cli("steps", run_dir, "--best", "loss", "--min")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{run_dir}: 3 committed steps, latest 30, best 20 (lowest loss)"
    assert lines[1].split() == ["step", "state", "time", "(UTC)", "bytes", "written", "carried",
                                "leaves", "metrics"]
    assert [ln.split()[:2] for ln in lines[2:]] == [[str(s), "committed"] for s in (10, 20, 30)]
    assert lines[3].split()[3:] == ["136", "B", "136", "B", "0", "B", "7", "loss=0.25", "best"]
    rc, out, _ = cli("steps", run_dir, "--json")
    doc = json.loads(out)
    assert [s["step"] for s in doc["steps"]] == [10, 20, 30] and doc["latest"] == 30
    assert doc["steps"][0]["metrics"] == {"loss": 0.5} and doc["best"] is None
    assert doc["steps"][0]["nbytes"] == 136 and doc["steps"][0]["time"].endswith("Z")
    assert doc["steps"][0]["leaf_count"] == 7 and "leaves" not in doc["steps"][0]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".steps", "10", "10.metrics.msgpack", "20", "20.metrics.msgpack", "30",
        "30.metrics.msgpack", "manager.lock"]  # read only: nothing written, nothing deleted
    assert sorted(p.name for p in (run_dir / ".steps").iterdir()) == [
        "10", "20", "30", "complete"]


def test_verify_names_a_flipped_leaf_and_exits_1(tmp_path):
    pc.save({"w": np.arange(100_000, dtype=np.float32), "b": np.ones(3)}, tmp_path / "c")
    rc, out, err = cli("verify", tmp_path / "c")
    assert (rc, err) == (0, "")
    assert out.startswith(f"{tmp_path}/c: ok: 2 leaves, ") and out.endswith(
        " read, every checksum and binding checked\n")
    chunk = next((tmp_path / "c").glob("d-*/a/0/c/0"))
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 1
    chunk.write_bytes(bytes(data))
    rc, out, err = cli("verify", tmp_path / "c")
    assert (rc, err) == (1, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"{tmp_path}/c: 1 problem in 2 leaves (")
    assert lines[1].startswith("  w: chunk (0,) (") and "checksum mismatch" in lines[1]
    assert len(lines) == 2
    rc, out, _ = cli("verify", tmp_path / "c", "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["ok"] is False and list(doc["problems"]) == ["w"]
    assert doc["leaf_count"] == 2 and doc["bytes_read"] > 400_000
    assert doc["format_version"] == pc.metadata(tmp_path / "c").format_version


def test_steps_lists_a_crashed_save_and_clean_removes_only_what_is_safe(tmp_path):
    directory = tmp_path / "run"
    with pc.CheckpointManager(directory, async_save=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": jnp.ones(3) * step}, metrics={"loss": 1 / step})
    (directory / "3" / "checkpoint.msgpack").unlink()  # step 3 crashed before its commit
    metrics = directory / "3.metrics.msgpack"  # written before step 3's save began
    generation = next((directory / "2").glob("d-*"))
    orphan = directory / "2" / "d-0123456789abc0123456789abcdef0"  # a crashed overwrite's
    orphan.mkdir()
    (orphan / "blob").write_bytes(b"x" * 10)
    old = {"PYTREE_CKPT_CLEAN_AFTER_S": "0"}  # every leftover counts as old, not a live save

    # Recent: step 3 and the orphan may be a save still writing; clean --yes keeps them.
    # PYTREE_CKPT_CLEAN_AFTER_S is read at import: the commands given it run in a process.
    rc, out, err = cli("steps", directory)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{directory}: 2 committed steps, latest 2"
    assert lines[4].split() == ["3", "saving?"]
    assert f"  {orphan}" in lines
    rc, out, _ = cli("clean", directory, "--yes", "--json")
    assert json.loads(out) == {"path": str(directory), "incomplete": [], "orphaned": [],
                               "kept": [str(orphan), f"{directory}/3", str(metrics)],
                               "deleted": True}
    assert orphan.is_dir() and (directory / "3").is_dir() and metrics.is_file()

    rc, out, _ = cli_process("steps", directory, "--json", env=old)
    doc = json.loads(out)
    assert [(r["step"], r["state"]) for r in doc["steps"]] == [
        (1, "committed"), (2, "committed"), (3, "incomplete")]
    assert doc["latest"] == 2 and doc["orphaned"] == [str(orphan)]
    rc, out, err = cli_process("clean", directory, env=old)
    assert (rc, err) == (0, "")
    assert out.splitlines() == ["leftovers of interrupted saves:",
                                f"  incomplete  {directory}/3",
                                f"  incomplete  {metrics}",
                                f"  orphaned    {orphan}",
                                f"{directory}: 3 can be deleted: run again with --yes"]
    assert (directory / "3").is_dir() and orphan.is_dir()  # listed, not deleted
    rc, out, _ = cli_process("clean", directory, "--yes", env=old)
    assert rc == 0 and out.splitlines()[-1] == f"{directory}: deleted 3"
    assert not orphan.exists() and not metrics.exists()
    assert sorted(p.name for p in directory.glob("*.metrics.msgpack")) == [
        "1.metrics.msgpack", "2.metrics.msgpack"]
    assert sorted(p.name for p in directory.iterdir() if not p.name.endswith(".msgpack")) == [
        ".steps", "1", "2", "manager.lock"]
    assert generation.is_dir()  # the committed step's own generation stays
    np.testing.assert_array_equal(pc.restore(directory / "2")[0]["w"], [2, 2, 2])
    rc, out, _ = cli("clean", directory)
    assert rc == 0 and out == f"{directory}: nothing to clean\n"
    rc, _, err = cli("clean", tmp_path / "nothing")
    assert rc == 2 and err == (f"pytree-ckpt: error: {tmp_path}/nothing: no checkpoint or "
                               "CheckpointManager directory there\n")


def test_bad_input_is_one_line_and_exit_2_corruption_exit_1(run_dir, tmp_path, capsys):
    rc, out, err = cli("ls", tmp_path / "nothing")
    assert (rc, out) == (2, "")
    assert err == f"pytree-ckpt: error: {tmp_path}/nothing: no checkpoint there (nothing exists)\n"
    rc, _, err = cli("ls", run_dir)
    assert rc == 2 and err.count("\n") == 1
    assert err.endswith(f"a CheckpointManager's directory: name a step, e.g. {run_dir}/30, or "
                        "run pytree-ckpt steps\n")
    rc, _, err = cli("steps", tmp_path)
    assert (rc, err) == (2, f"pytree-ckpt: error: {tmp_path}: no committed steps there\n")
    # Usage errors are argparse's (exit 2, usage and one line); in-process, as they need no
    # checkpoint.
    assert _cli.main(["steps", f"{run_dir}/10"]) == 2
    assert "a checkpoint, not a CheckpointManager's directory (try: pytree-ckpt ls)\n" in (
        capsys.readouterr().err)
    for argv, message in ((["diff", "a"], "the following arguments are required: B"),
                          (["diff", "a", "b", "--atol", "-1"], "argument --atol: must be >= 0, "
                                                               "not -1"),
                          (["steps", "d", "--min"], None)):
        if message is None:
            assert _cli.main(argv) == 2
            assert capsys.readouterr().err == "pytree-ckpt: error: --min needs --best METRIC\n"
            continue
        with pytest.raises(SystemExit) as exit_:
            _cli.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err

    pc.save({"w": np.ones(3)}, tmp_path / "c")
    commit = tmp_path / "c" / "checkpoint.msgpack"
    data = bytearray(commit.read_bytes())
    data[len(data) // 2] ^= 0x10
    commit.write_bytes(bytes(data))
    rc, out, err = cli("ls", tmp_path / "c", "--json")
    assert rc == 1 and err.startswith(f"pytree-ckpt: error: {commit}") and err.count("\n") == 1
    assert json.loads(out)["exit_status"] == 1


def test_commands_read_the_loopback_s3_server(s3_server, monkeypatch):
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_REGION": s3_server.region}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    directory = f"{s3_server.url}/cli/run"
    with pc.CheckpointManager(s3_server.spec("cli/run/"), async_save=False) as mgr:
        mgr.save(1, state(1), metrics={"loss": 2.0})
        mgr.save(2, state(2), metrics={"loss": 1.0})
    # The first in a fresh process, as a user runs it (given the variables on the command line).
    rc, out, err = cli_process("ls", f"{directory}/2", "params/dense",
                               env={**env, **s3_server.env()})
    assert rc == 0, err
    assert out.splitlines()[0].startswith(f"{directory}/2: pytree_ckpt checkpoint")
    assert [ln.split()[0] for ln in out.splitlines()[2:]] == [
        "params/dense/bias", "params/dense/kernel", "2"]
    rc, out, err = cli("diff", f"{directory}/1", f"{directory}/2", "--values", "--json")
    assert rc == 1, err
    assert [d["path"] for d in json.loads(out)["values_differ"]] == sorted(CHANGED_ARRAYS) + ["step"]
    rc, out_blocks, err = cli("diff", f"{directory}/1", f"{directory}/2", "--values", "--json",
                              "--block-bytes", "16")  # arrays of 3 or more floats
    assert (rc, out_blocks) == (1, out), err  # read block by block: the same numbers
    rc, out, err = cli("verify", f"{directory}/2", "--json")
    assert rc == 0, err
    assert json.loads(out)["ok"] is True and json.loads(out)["leaf_count"] == 7
    rc, out, err = cli("clean", directory)
    assert (rc, out, err) == (0, f"{directory}: nothing to clean\n", "")
    rc, out, err = cli("steps", directory, "--best", "loss", "--min", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert [s["step"] for s in doc["steps"]] == [1, 2] and doc["best"] == 2
    rc, out, err = cli("convert", f"{directory}/2", f"{directory}/params.safetensors", "--at",
                       "params")
    assert rc == 0, err
    assert out.endswith(f"-> {directory}/params.safetensors (safetensors)\n")
    rc, out, err = cli("ls", f"{directory}/params.safetensors", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["format"] == "safetensors" and doc["total"]["nbytes"] == 84


def test_diff_values_reads_small_leaves_in_batches_and_large_ones_in_blocks(
        tmp_path, monkeypatch, capsys):
    """In-process, with --block-bytes 1000 and a small chunk: each restore reads one batch of
    small leaves (about a block a side), a larger leaf is read block by block from each side
    and never whole, and the comparison by chunks and blocks gives a whole-array one's
    numbers."""
    rng = np.random.default_rng(0)
    a = {f"x{i}": rng.standard_normal(100).astype(np.float32) for i in range(10)}
    a["big"] = rng.standard_normal(5000)
    b = {k: v.copy() for k, v in a.items()}
    b["x3"][7] += 0.5
    b["big"][::100] *= 3.0
    a["big"][1], b["big"][1] = np.nan, np.nan  # NaN equals NaN
    pc.save(a, tmp_path / "a")
    pc.save(b, tmp_path / "b")
    monkeypatch.setattr(_diff, "_CHUNK_ELEMENTS", 64)
    read_bytes, blocks = [], []
    real_restore, real_blocks = pc.restore, pc.read_blocks

    def counting_restore(path, target=None, **kw):
        tree, status = real_restore(path, target, **kw)
        read_bytes.append(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
        return tree, status

    def counting_blocks(path, leaf, **kw):
        for index, block in real_blocks(path, leaf, **kw):
            blocks.append((leaf, block.nbytes))
            yield index, block

    monkeypatch.setattr(pc, "restore", counting_restore)
    monkeypatch.setattr(pc, "read_blocks", counting_blocks)
    assert _cli.main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--values", "--json",
                      "--block-bytes", "1000"]) == 1
    assert sorted(read_bytes) == [800] * 10  # the 400-byte leaves two at a time
    assert blocks == [("big", 1000)] * 80  # 40,000 bytes: 40 blocks a side
    big = np.delete(np.arange(5000), 1)
    gap = np.abs(a["big"][big] - b["big"][big])
    expected_rel = float(np.max(gap[gap > 0] / np.abs(b["big"][big][gap > 0])))
    doc = json.loads(capsys.readouterr().out)
    found = {d["path"]: d for d in doc["values_differ"]}
    assert sorted(found) == ["big", "x3"]
    assert found["big"]["differing"] == 50 and found["big"]["elements"] == 5000
    assert found["big"]["max_abs"] == pytest.approx(float(gap.max()))
    assert found["big"]["max_rel"] == pytest.approx(expected_rel)
    assert found["x3"]["differing"] == 1 and found["x3"]["max_abs"] == pytest.approx(0.5)


def value_pair() -> tuple[dict, dict]:
    """Two trees of every kind of array leaf, differing in most of them."""
    rng = np.random.default_rng(1)
    a = {"f32": rng.standard_normal((6, 5)).astype(np.float32),
         "bf16": jnp.asarray(rng.standard_normal(40), jnp.bfloat16),
         "c64": (rng.standard_normal(12) + 1j * rng.standard_normal(12)).astype(np.complex64),
         "bool": rng.random((4, 4)) > 0.5, "i8": rng.integers(-9, 9, 30, dtype=np.int8),
         "u32": np.arange(20, dtype=np.uint32), "zero_d": np.float32(1.5),
         "empty": np.zeros((0, 3), np.float32), "same": np.ones((5, 5), np.float64),
         "key": jax.random.split(jax.random.key(0), 3), "zeros": np.zeros(10, np.float32)}
    b = dict(a)
    a["f32"][0, 0] = np.nan
    b["f32"] = a["f32"].copy()  # NaN on both sides: equal
    b["f32"][2, 3] += 0.25
    b["f32"][5, 4] = np.nan  # NaN against a number: differs, no difference measured
    b["bf16"] = a["bf16"].at[::7].multiply(2)
    b["c64"] = a["c64"] * np.complex64(1 + 1e-3j)
    b["bool"] = ~a["bool"]
    b["i8"] = a["i8"].copy()
    b["i8"][-1] += 5
    b["zero_d"] = np.float32(-1.5)
    b["key"] = jax.random.split(jax.random.key(1), 3)
    b["zeros"] = np.arange(10, dtype=np.float32)  # relative to B's value, not A's 0
    b["u32"] = a["u32"].copy()
    b["u32"][3] = 0  # B's value 0: no relative difference there
    return a, b


def test_diff_values_block_by_block_gives_whole_array_numbers(tmp_path, capsys):
    """Blocks of 16 bytes (each leaf but the smallest read block by block) and of 64 MiB
    (each leaf read whole) give the same document, with and without tolerances: counts,
    largest absolute and relative differences, NaN equal to NaN, bool, complex, PRNG keys,
    0-d and empty arrays."""
    a, b = value_pair()
    pc.save(a, tmp_path / "a")
    pc.save(b, tmp_path / "b")
    docs = {}
    for extra in ([], ["--atol", "0.1", "--rtol", "0.01"]):
        for block in ("16", "64M"):
            assert _cli.main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--values",
                              "--json", "--block-bytes", block, *extra]) == 1
            docs[block, bool(extra)] = json.loads(capsys.readouterr().out)
        assert docs["16", bool(extra)] == docs["64M", bool(extra)]
    found = {d["path"]: d for d in docs["16", False]["values_differ"]}
    assert sorted(found) == ["bf16", "bool", "c64", "f32", "i8", "key", "u32", "zero_d", "zeros"]
    assert (found["f32"]["differing"], found["f32"]["elements"]) == (2, 30)
    assert found["f32"]["max_abs"] == pytest.approx(0.25, rel=1e-6)
    assert found["bool"] == {"path": "bool", "elements": 16, "differing": 16, "max_abs": 1.0,
                             "max_rel": 0.0}
    assert found["zero_d"]["max_abs"] == 3.0 and found["zero_d"]["max_rel"] == 2.0
    assert found["zeros"]["max_rel"] == 1.0  # |0 - x| / |x|
    assert found["u32"]["max_abs"] == 3.0 and found["u32"]["max_rel"] == 0.0
    assert found["c64"]["max_rel"] == pytest.approx(1e-3, rel=1e-3)
    assert found["key"]["elements"] == 6
    tolerant = {d["path"] for d in docs["16", True]["values_differ"]}
    assert tolerant == {"bf16", "bool", "f32", "i8", "key", "u32", "zero_d", "zeros"}
    assert [_cli_args.byte_count(t) for t in ("4096", "4K", "64MiB", "1g")] == [
        4096, 4096, 64 << 20, 1 << 30]
    with pytest.raises(SystemExit, match="^2$"):
        _cli.main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--block-bytes", "0"])
    assert "not a positive size such as 4096 or 64M: '0'" in capsys.readouterr().err


# Runs the command line in a child of its own and prints that child's peak RSS (getrusage of
# the only process it waited for) with its exit status and output.
PEAK = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10  # KiB on Linux
print(json.dumps({"rc": done.returncode, "out": done.stdout, "err": done.stderr, "peak": peak}))
"""


def cli_peak(*args) -> tuple[int, str, str, int]:
    """As :func:`cli`, and the command's peak RSS in bytes."""
    # glibc keeps freed buffers of TensorStore's threads in an arena per thread, as many as
    # 8 per core: two arenas make the peak the same on machines with more cores.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", MALLOC_ARENA_MAX="2",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "pytree_ckpt",
                          *map(str, args)], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    doc = json.loads(out.stdout)
    assert "Traceback" not in doc["err"], doc["err"]
    return doc["rc"], doc["out"], doc["err"], doc["peak"]


def test_diff_values_of_a_leaf_far_larger_than_a_block_holds_about_two_blocks(tmp_path):
    """A 128 MiB leaf on each side, compared in blocks of 4 MiB: the command's peak RSS is
    within 64 MiB of a diff of two tiny checkpoints' (reading the leaf whole from both sides
    takes 256 MiB more), and the numbers are exact."""
    a = np.arange(32 << 20, dtype=np.float32).reshape(4096, 8192)
    a[100, 3] = np.nan
    b = a.copy()  # NaN on both sides at [100, 3]: equal
    b[5, 7] += 1.0
    b[4000, :10] *= 3.0  # another block
    b[2000, 1] = np.nan  # NaN in B only: differs, no difference measured
    for name, table in (("a", a), ("b", b), ("tiny_a", np.zeros(4)), ("tiny_b", np.ones(4))):
        pc.save({"table": table, "bias": np.ones(8, np.float32)}, tmp_path / name)
    rc, out, err, base = cli_peak("diff", tmp_path / "tiny_a", tmp_path / "tiny_b", "--values",
                                  "--json", "--block-bytes", "4M")
    assert rc == 1, err
    rc, out, err, peak = cli_peak("diff", tmp_path / "a", tmp_path / "b", "--values", "--json",
                                  "--block-bytes", "4M")
    assert rc == 1, err
    [table] = json.loads(out)["values_differ"]
    changed = [(5, 7), *((4000, j) for j in range(10))]
    gaps = [abs(float(a[i]) - float(b[i])) for i in changed]
    rels = [gap / abs(float(b[i])) for gap, i in zip(gaps, changed, strict=True)]
    assert table == {"path": "table", "elements": 32 << 20, "differing": 12,
                     "max_abs": max(gaps), "max_rel": max(rels)}
    assert peak - base < 64 << 20, (peak - base) / 2**20


def test_diff_values_of_a_safetensors_file_and_our_conversion_of_it(tmp_path):
    """A foreign file against our checkpoint, its large tensor compared block by block."""
    from safetensors.numpy import save_file

    weights = {"model.embed": np.random.default_rng(2).standard_normal((300, 64)).astype(
        np.float32), "model.bias": np.arange(5, dtype=np.int32)}
    save_file(weights, str(tmp_path / "m.safetensors"))
    rc, _, err = cli("convert", tmp_path / "m.safetensors", tmp_path / "ours")
    assert rc == 0, err
    rc, out, err = cli("diff", tmp_path / "m.safetensors", tmp_path / "ours", "--values",
                       "--block-bytes", "4K")
    assert rc == 0, err
    assert out.splitlines()[-1] == ("A and B are the same: 0 only in A, 0 only in B, 0 changed, "
                                    "0 of 2 values differ")
    old = float(weights["model.embed"][250, 3])
    weights["model.embed"][250, 3] = 7.0
    save_file(weights, str(tmp_path / "changed.safetensors"))
    rc, out, err = cli("diff", tmp_path / "ours", tmp_path / "changed.safetensors", "--values",
                       "--json", "--block-bytes", "4K")
    assert rc == 1, err
    assert json.loads(out)["values_differ"] == [
        {"path": "model/embed", "elements": 300 * 64, "differing": 1, "max_abs": abs(old - 7.0),
         "max_rel": abs(old - 7.0) / 7.0}]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Orbax's own
def test_convert_round_trips_foreign_to_ours_and_ours_to_safetensors(tmp_path):
    import flax.serialization
    import orbax.checkpoint as ocp
    import safetensors.numpy

    kernel = np.arange(12, dtype=np.float32).reshape(3, 4)
    weights = {"dense.kernel": kernel, "dense.bias": np.array([1, 2], np.int64)}
    safetensors.numpy.save_file(weights, str(tmp_path / "hf.safetensors"))
    rc, out, err = cli("convert", tmp_path / "hf.safetensors", tmp_path / "from_hf")
    assert rc == 0, err
    assert out == (f"{tmp_path}/hf.safetensors (safetensors, 2 leaves, 64 B) -> "
                   f"{tmp_path}/from_hf (pytree_ckpt)\n")
    restored, _ = pc.restore(tmp_path / "from_hf")
    np.testing.assert_array_equal(restored["dense"]["kernel"], kernel)
    np.testing.assert_array_equal(restored["dense"]["bias"], [1, 2])
    rc, out, err = cli("verify", tmp_path / "hf.safetensors")  # no checksums to check there
    assert (rc, out) == (2, "") and err == (
        f"pytree-ckpt: error: {tmp_path}/hf.safetensors: a safetensors file, not a pytree_ckpt "
        "checkpoint: verify checks the checksums a pytree_ckpt checkpoint records, and this "
        "format records none (restore and metadata read it; pytree-ckpt convert makes a "
        "pytree_ckpt checkpoint of it)\n")
    rc, out, err = cli("verify", tmp_path / "from_hf")
    assert rc == 0 and out.startswith(f"{tmp_path}/from_hf: ok: 2 leaves"), err

    state = {"params": {"w": kernel, "b": np.ones(2, np.float32)}, "step": 7}
    (tmp_path / "state.msgpack").write_bytes(flax.serialization.to_bytes(state))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", state)
    checkpointer.wait_until_finished()
    for source, name in (("state.msgpack", "flax_msgpack"), ("orbax", "orbax")):
        rc, out, err = cli("convert", tmp_path / source, tmp_path / f"from_{name}", "--json")
        assert rc == 0, err
        assert json.loads(out) == {
            "source": f"{tmp_path}/{source}", "source_format": name, "at": None,
            "destination": f"{tmp_path}/from_{name}", "format": "pytree_ckpt", "leaf_count": 3,
            "nbytes": 56, "left_out": [], "metadata_dropped": {}}
        restored, _ = pc.restore(tmp_path / f"from_{name}")
        np.testing.assert_array_equal(restored["params"]["w"], kernel)
        assert int(restored["step"]) == 7

    # Ours to safetensors: arrays only, so a training state needs --at; then the real reader.
    rc, _, err = cli("convert", tmp_path / "from_flax_msgpack", tmp_path / "out.safetensors")
    assert rc == 2
    assert err.endswith("(safetensors holds arrays only: leave such leaves out with --exclude "
                        "REGEX, or convert a subtree of arrays, e.g. --at params)\n")
    assert "'step'" in err
    assert not (tmp_path / "out.safetensors").exists()
    rc, out, err = cli("convert", tmp_path / "from_flax_msgpack", tmp_path / "out.safetensors",
                       "--at", "params")
    assert rc == 0, err
    loaded = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
    assert sorted(loaded) == ["b", "w"]
    np.testing.assert_array_equal(loaded["w"], kernel)
    rc, _, err = cli("convert", tmp_path / "from_flax_msgpack", tmp_path / "out.safetensors",
                     "--at", "params")
    assert rc == 2 and "out.safetensors" in err and err.count("\n") == 1
    rc, _, err = cli("convert", tmp_path / "from_flax_msgpack", tmp_path / "out.safetensors",
                     "--at", "params", "--overwrite")
    assert rc == 0, err


def test_json_goes_before_or_after_the_command_and_a_closed_pipe_is_quiet(tmp_path, capsys):
    pc.save({"w": np.ones(2)}, tmp_path / "c")
    for argv in (["--json", "ls", str(tmp_path / "c")], ["ls", str(tmp_path / "c"), "--json"]):
        assert _cli.main(argv) == 0
        assert json.loads(capsys.readouterr().out)["total"] == {"leaf_count": 1, "nbytes": 16}
    pc.save({f"k{i}": np.zeros(2) for i in range(3000)}, tmp_path / "many")
    out = subprocess.run(
        f"{sys.executable} -m pytree_ckpt ls {tmp_path / 'many'} | head -n 1; "
        "echo status ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
                            PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH",
                                                                                  "")])))
    assert out.stdout.splitlines()[1] == "status 0" and out.stderr == ""


def cli_on_terminal(*args, process=False):
    """Runs the command line with its stderr on a pseudo-terminal and its stdout piped, in
    this process or (``process``) in a fresh one; returns (exit status, stdout, what the
    terminal received)."""
    terminal, child_end = os.openpty()
    # 24 rows of 100 columns (a new pseudo-terminal has 0, and tqdm draws nothing in 0).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    shown = []

    def drain():  # until EIO: every copy of the other end is closed
        try:
            while data := os.read(terminal, 1 << 16):
                shown.append(data)
        except OSError:
            pass

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        if process:
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
                       PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
            proc = subprocess.Popen([sys.executable, "-m", "pytree_ckpt", *map(str, args)],
                                    stdout=subprocess.PIPE, stderr=child_end, env=env)
            os.close(child_end)
            out = proc.stdout.read().decode()
            proc.stdout.close()
            rc = proc.wait(timeout=120)
        else:
            with open(child_end, "w") as stderr:  # closes child_end
                stdout = io.StringIO()
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                    rc = _cli.main([str(a) for a in args])
            out = stdout.getvalue()
    finally:
        reader.join(timeout=120)
        os.close(terminal)
    return rc, out, b"".join(shown).decode()


def test_bars_are_drawn_on_a_terminal_only_and_never_with_json(tmp_path):
    pc.save({"w": np.arange(100_000, dtype=np.float32), "b": np.ones(3)}, tmp_path / "c")
    rc, out, shown = cli_on_terminal("verify", tmp_path / "c", process=True)
    assert rc == 0 and out.startswith(f"{tmp_path}/c: ok: 2 leaves, ")
    assert shown.startswith("\rverify:   0%|") and "/391k [" in shown, shown  # its chunks and blob
    assert cli("verify", tmp_path / "c")[2] == ""  # piped: no bar
    rc, out, shown = cli_on_terminal("verify", tmp_path / "c", "--json")
    assert (rc, shown) == (0, "") and json.loads(out)["ok"] is True

    rc, out, shown = cli_on_terminal("convert", tmp_path / "c", tmp_path / "copy")
    assert rc == 0 and out == (f"{tmp_path}/c (pytree_ckpt, 2 leaves, 390.6 KiB) -> "
                               f"{tmp_path}/copy (pytree_ckpt)\n")
    assert "\rrestore:   0%|" in shown and "\rsave:   0%|" in shown, shown
    rc, out, shown = cli_on_terminal("convert", tmp_path / "c", tmp_path / "copy2", "--json")
    assert (rc, shown) == (0, "") and json.loads(out)["nbytes"] == 400_024
    rc, _, err = cli("convert", tmp_path / "c", tmp_path / "copy3")
    assert (rc, err) == (0, "")
    np.testing.assert_array_equal(pc.restore(tmp_path / "copy2")[0]["w"], np.arange(100_000))


def test_diff_values_draws_its_bar_on_a_terminal_only_and_never_with_json(tmp_path):
    w = np.arange(100_000, dtype=np.float32)
    pc.save({"w": w, "b": np.ones(3)}, tmp_path / "a")
    pc.save({"w": w + 1, "b": np.ones(3)}, tmp_path / "b")
    args = ("diff", tmp_path / "a", tmp_path / "b", "--values", "--block-bytes", "100K")
    rc, out, shown = cli_on_terminal(*args)
    assert rc == 1 and "w  100,000 of 100,000 elements  max abs 1" in out
    assert shown.startswith("\rcomparing:   0%|") and "/400k [" in shown, shown
    rc, out, shown = cli_on_terminal(*args, "--json")
    assert (rc, shown) == (1, "") and json.loads(out)["values_differ"][0]["differing"] == 100_000
    assert cli(*args)[2] == ""  # piped: no bar


def test_diff_never_says_the_same_of_values_it_did_not_compare(tmp_path):
    # A safetensors file records no checksums to compare with ours: without --values its
    # arrays are "not compared", and nothing is called the same; with --values they are read.
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    pc.save(tree, tmp_path / "ours")
    pc.save_safetensors({"w": tree["w"], "b": tree["b"] + 1}, tmp_path / "m.safetensors")
    rc, out, _ = cli("diff", tmp_path / "ours", tmp_path / "m.safetensors")
    assert rc == 0 and "the same" not in out
    assert out.splitlines()[2:] == [
        "values not compared (2):", "  b", "  w",
        "No difference found: 0 only in A, 0 only in B, 0 changed, 0 of 0 values differ; "
        "2 arrays' values not compared (add --values)"]
    rc, out, _ = cli("diff", tmp_path / "ours", tmp_path / "m.safetensors", "--json")
    doc = json.loads(out)
    assert doc["values_not_compared"] == ["b", "w"] and doc["checksums"] == {}
    assert doc["differ"] is False
    rc, out, _ = cli("diff", tmp_path / "ours", tmp_path / "m.safetensors", "--values")
    assert rc == 1 and out.splitlines()[-1].startswith("A and B differ: ")


def test_diff_compares_zarr_leaves_by_their_chunks_checksums(tmp_path):
    # Large leaves are zarr arrays; one element changed changes one chunk's checksum.
    big = np.arange(300_000, dtype=np.float32)
    pc.save({"big": big}, tmp_path / "a")
    pc.save({"big": big}, tmp_path / "same")
    changed = big.copy()
    changed[-1] = -1
    pc.save({"big": changed}, tmp_path / "b")
    rc, out, _ = cli("diff", tmp_path / "a", tmp_path / "b", "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["checksums"] == {"big": "differ"} and doc["differ"] is True
    rc, out, _ = cli("diff", tmp_path / "a", tmp_path / "same")
    assert rc == 0 and out.splitlines()[-1] == (
        "A and B are the same: 0 only in A, 0 only in B, 0 changed, 0 of 1 values differ "
        "(1 arrays by their stored checksums)")
    # Another chunking (sharded over 8 devices): the checksums cover other bytes.
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    pc.save({"big": jax.device_put(big, NamedSharding(mesh, P("x")))}, tmp_path / "sharded")
    pc.save({"big": jnp.asarray(big)}, tmp_path / "one")
    rc, out, _ = cli("diff", tmp_path / "one", tmp_path / "sharded", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["checksums"] == {} and doc["values_not_compared"] == ["big"]


def test_diff_at_a_compares_an_orbax_steps_item_with_our_root(tmp_path):
    import orbax.checkpoint as ocp

    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    manager = ocp.CheckpointManager(str(tmp_path / "orbax"))
    manager.save(5, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
    pc.save(tree, tmp_path / "ours")
    step = tmp_path / "orbax" / "5"
    rc, out, _ = cli("diff", step, tmp_path / "ours", "--at-a", "default", "--values")
    assert rc == 0 and out.splitlines()[0] == f"A = {step} under default"
    assert out.splitlines()[-1] == ("A and B are the same: 0 only in A, 0 only in B, "
                                    "0 changed, 0 of 2 values differ")
    pc.save({"w": tree["w"], "b": tree["b"] * 2}, tmp_path / "other")
    rc, out, _ = cli("diff", step, tmp_path / "other", "--at-a", "default", "--values",
                     "--json")
    assert rc == 1 and [d["path"] for d in json.loads(out)["values_differ"]] == ["b"]
    rc, out, err = cli("diff", step, tmp_path / "ours", "--at-a", "nothing")
    assert rc == 2 and "no leaf under 'nothing'; its top-level names are ['default']" in err
