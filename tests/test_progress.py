"""progress=True draws a bar of the bytes a save writes, or a restore or verify reads (and
they do what they do without it); without it the library prints nothing. A failing save's bar
is closed."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import pytree_ckpt as pc
from pytree_ckpt import _progress

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")

TREE = {"w": jnp.arange(4096.0).reshape(64, 64), "small": [np.full(10, i) for i in range(5)],
        "step": 3}


def test_progress_bar_only_when_asked_and_the_same_tree(tmp_path, capfd, monkeypatch):
    pc.save(TREE, tmp_path / "c")
    capfd.readouterr()
    plain, plain_status = pc.restore(tmp_path / "c", TREE)
    saved, _ = pc.restore(tmp_path / "c")
    assert capfd.readouterr() == ("", "")  # restore prints nothing by default

    monkeypatch.setattr(_progress, "_BATCH_BYTES", 100)  # an array a batch (step joins one)
    reads = []
    real = _progress.read_with_bar

    def counting(read, jobs, what):
        return real(lambda batch: reads.append(len(batch)) or read(batch), jobs, what)

    monkeypatch.setattr(_progress, "read_with_bar", counting)
    tree, status = pc.restore(tmp_path / "c", TREE, progress=True)
    err = capfd.readouterr().err
    # The bar is drawn (and cleared when done: leave=False) over all 16.4 KiB of arrays.
    assert err.startswith("\rrestore:   0%|") and "/16.4k [" in err, err
    assert reads == [1, 1, 1, 1, 2, 1] and status == plain_status
    jax.tree.map(np.testing.assert_array_equal, tree, plain)
    with pc.CheckpointManager(tmp_path / "run", async_save=False) as mgr:
        mgr.save(1, TREE)
        capfd.readouterr()
        again, _ = mgr.restore(1, progress=True)
    assert "restore:   0%|" in capfd.readouterr().err
    jax.tree.map(np.testing.assert_array_equal, again, saved)


class _Recorded:
    """tqdm.auto's bar, each one kept to be looked at (it still draws as it would)."""

    def __init__(self, monkeypatch):
        import tqdm.auto

        self.bars = bars = []

        class Recording(tqdm.auto.tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                bars.append(self)

        monkeypatch.setattr(tqdm.auto, "tqdm", Recording)

    def take(self):
        """(desc, total, n, closed) of every bar made since the last take."""
        out = [(b.desc, b.total, b.n, b.disable) for b in self.bars]
        self.bars.clear()
        return out


def _files_bytes(folder, pattern):
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def test_save_and_verify_bars_count_every_byte_and_nothing_is_drawn_unasked(
        tmp_path, capfd, monkeypatch):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
    sharded = jax.device_put(jnp.arange(128 * 1024, dtype=jnp.float32).reshape(128, 1024),
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    tree = {**TREE, "big": np.arange(100_000, dtype=np.float64), "sharded": sharded}
    recorded = _Recorded(monkeypatch)
    pc.save(tree, tmp_path / "quiet")
    pc.save_async(tree, tmp_path / "quiet_async").result()
    report = pc.verify(tmp_path / "quiet")
    with pc.CheckpointManager(tmp_path / "run", async_save=False) as mgr:
        mgr.save(1, tree)
    assert capfd.readouterr() == ("", "") and recorded.take() == []  # nothing unless asked

    # Written: every array's bytes (zarr chunks hold the shards' bytes, packed blobs the
    # small leaves); the bar reaches that total and is closed.
    written = tree["big"].nbytes + sharded.nbytes + _files_bytes(tmp_path / "quiet", "d-*/p/**/*")
    for save in (lambda p: pc.save(tree, p, progress=True),
                 lambda p: pc.save_async(tree, p, progress=True).result()):
        save(tmp_path / "loud")
        assert recorded.take() == [("save", written, written, True)]
        err = capfd.readouterr().err
        shown = tqdm.tqdm.format_sizeof(written, divisor=1024)  # 1.28M
        assert err.startswith("\rsave:   0%|") and f"/{shown} [" in err, err
        shutil.rmtree(tmp_path / "loud")
    with pc.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        mgr.save(2, tree, progress=True)
    assert recorded.take() == [("save", written, written, True)]
    assert "\rsave:   0%|" in capfd.readouterr().err

    # Read: every chunk (with its 4-byte checksum) and blob, as the commit file names them.
    data = (_files_bytes(tmp_path / "quiet", "d-*/a/*/c/**/*")
            + _files_bytes(tmp_path / "quiet", "d-*/p/**/*"))
    assert pc.verify(tmp_path / "quiet", progress=True) == report
    assert recorded.take() == [("verify", data, data, True)]
    assert "\rverify:   0%|" in capfd.readouterr().err
    assert report.bytes_read > data


# A child's preamble: every tqdm.auto bar it draws is kept in ``bars``.
_RECORD_BARS = """
import numpy as np, tqdm.auto
import pytree_ckpt as pc
bars = []
class Recording(tqdm.auto.tqdm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        bars.append(self)
tqdm.auto.tqdm = Recording
"""


# Writes fail past 1 MiB a file (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG, as on a full disk).
_FAILING_SAVE = _RECORD_BARS + """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
tree = {"w": np.ones((1024, 1024), np.float32), "small": np.ones(3)}
for n, save in enumerate([pc.save, lambda t, p, **k: pc.save_async(t, p, **k).result()]):
    try:
        save(tree, f"{sys.argv[1]}/{n}", progress=True)
    except pc.SaveError as e:
        print("SaveError", "File too large" in str(e))
print([(b.desc, b.total, b.disable) for b in bars], len(Recording._instances))
"""


def test_the_bar_of_a_failing_save_is_closed(tmp_path):
    child = subprocess.run([sys.executable, "-c", _FAILING_SAVE, str(tmp_path)],
                           capture_output=True, text=True, timeout=240,
                           env=dict(os.environ, PYTHONPATH=SRC, JAX_PLATFORMS="cpu"))
    assert child.returncode == 0, child.stderr[-3000:]
    pc.save({"small": np.ones(3)}, tmp_path / "packed")  # the packed blob of 3 float64s
    total = 1024 * 1024 * 4 + _files_bytes(tmp_path / "packed", "d-*/p/**/*")
    shutil.rmtree(tmp_path / "packed")
    assert child.stdout.splitlines() == [
        "SaveError True", "SaveError True",
        f"[('save', {total}, True), ('save', {total}, True)] 0"]
    assert "save:   0%|" in child.stderr  # drawn, then cleared
    assert not any(p.name.startswith("d-") for d in tmp_path.iterdir() for p in d.iterdir())


# Each process writes its half of "x" (and reads it back); process 0 also writes the packed
# "small".
_MULTIPROCESS = _RECORD_BARS + r"""
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x"))
full = np.arange(8 * 1000, dtype=np.float32).reshape(8, 1000)
x = jax.make_array_from_callback(full.shape, sharding, lambda i: full[i])
pc.save({"x": x, "small": np.ones(3), "step": 1}, args["path"], progress=True)
tree, status = pc.restore(args["path"], {"x": x, "small": np.zeros(3), "step": 0},
                          progress=True)
np.testing.assert_array_equal(np.asarray(tree["x"].addressable_data(0)), full[4 * process_id:][:4])
print("BARS", [(b.desc, b.total, b.n, b.disable) for b in bars])
"""


def test_in_a_multiprocess_job_only_process_0_draws(tmp_path):
    from _multiprocess import assert_all_ok, run_multiprocess

    path = tmp_path / "c"
    results = run_multiprocess(_MULTIPROCESS, num_processes=2, timeout_s=90,
                               args={"path": str(path)})
    assert_all_ok(results)
    half = 4 * 1000 * 4
    written = half + _files_bytes(path, "d-*/p/0/*")  # its half of "x", the packed blob
    read = 2 * half + 3 * 8  # restore's bar: the leaves' whole sizes
    assert results[0].stdout.splitlines()[-1] == (
        f"BARS [('save', {written}, {written}, True), ('restore', {read}, {read}, True)]")
    assert "save:   0%|" in results[0].stderr and "restore:   0%|" in results[0].stderr
    assert results[1].stdout.splitlines()[-1] == "BARS []"
    assert "save:" not in results[1].stderr and "restore:" not in results[1].stderr


def test_bars_land_in_the_notebook_cell_that_asked(tmp_path, monkeypatch):
    # A save's bar is drawn by the background writer thread: it must still show in the cell
    # (as text on stderr without ipywidgets; tqdm.auto draws a widget where it is installed).
    from _notebooks import execute_cells

    cells = execute_cells([
        "import numpy as np, pytree_ckpt as pc\ntree = {'w': np.arange(300_000.0)}",
        f"pc.save(tree, {str(tmp_path / 'a')!r})",
        f"pc.save(tree, {str(tmp_path / 'b')!r}, progress=True)",
        f"pc.save_async(tree, {str(tmp_path / 'c')!r}, progress=True).result()",
        f"pc.verify({str(tmp_path / 'a')!r}, progress=True).ok",
    ], tmp_path, monkeypatch)

    def stderr(outputs):
        return "".join(o.text for o in outputs if o.get("name") == "stderr")

    assert [o.output_type for o in cells[1]] == ["execute_result"]  # nothing unless asked
    for outputs, what, result in [(cells[2], "save", repr(str(tmp_path / "b"))),
                                  (cells[3], "save", repr(str(tmp_path / "c"))),
                                  (cells[4], "verify", "True")]:
        assert f"\r{what}:   0%|          | 0.00/2.29M [" in stderr(outputs), outputs
        assert outputs[-1].data["text/plain"] == result
