"""The garbage-collector pause (_gc_pause): only around per-leaf CPU loops, never across a
wait for storage, never switching on a collector the user disabled, and overlapping pauses
in two threads end with the collector as the first found it."""

from __future__ import annotations

import gc
import threading

import jax.numpy as jnp
import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _gc_pause, _read, _storage


@pytest.fixture
def collector():
    """Restores the collector's state after the test, whatever the test did to it."""
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_a_collector_the_user_disabled_stays_disabled(collector):
    gc.disable()
    with _gc_pause.paused():
        with _gc_pause.paused():
            assert not gc.isenabled()
    assert not gc.isenabled()
    gc.enable()
    with _gc_pause.paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_overlapping_pauses_in_two_threads_end_as_the_first_found(collector):
    gc.enable()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def second():
        first_in.wait(10)
        with _gc_pause.paused():
            second_in.set()
            first_out.wait(10)
            # The first pause ended; this one's loop still runs with the collector paused.
            seen["while the other ended"] = gc.isenabled()

    thread = threading.Thread(target=second)
    thread.start()
    with _gc_pause.paused():
        first_in.set()
        second_in.wait(10)
    first_out.set()
    thread.join(10)
    assert seen == {"while the other ended": False}
    assert gc.isenabled()  # the last pause to end switched it back on


def test_no_read_waits_with_the_collector_paused(collector, monkeypatch, tmp_path):
    gc.enable()
    tree = {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.ones(3), "n": 7}
    pc.save(tree, tmp_path / "c")
    during_reads = []

    def watching(fn):
        def wrapper(*args, **kwargs):
            during_reads.append(gc.isenabled())
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(_storage, "read_key", watching(_storage.read_key))  # the commit file
    monkeypatch.setattr(_read, "_range_read", watching(_read._range_read))  # packed ranges
    restored, _ = pc.restore(tmp_path / "c")
    np.testing.assert_array_equal(restored["w"], tree["w"])
    pc.restore(tmp_path / "c", {"w": jnp.zeros((8, 8)), "b": jnp.zeros(3), "n": 0})
    pc.metadata(tmp_path / "c")
    list(pc.read_blocks(tmp_path / "c", "w"))
    assert pc.verify(tmp_path / "c").ok
    assert len(during_reads) >= 6 and all(during_reads), during_reads
    assert gc.isenabled()
