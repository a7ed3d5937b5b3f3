"""gs:// and s3:// for real: fake-gcs-server and moto's S3 server on loopback."""

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

import pytree_ckpt as pc
from pytree_ckpt import _format

TREE = {"params": {"w": jnp.arange(600 * 600, dtype=jnp.float32).reshape(600, 600),
                   "b": jnp.ones(7)}, "step": 3, "name": "run"}


@pytest.fixture(params=["gcs", "s3", "memory"])
def bucket_path(request, monkeypatch):
    """A fresh checkpoint path per test on each backend, as a user would type it."""
    name = request.node.name.replace("[", "_").replace("]", "")
    if request.param == "gcs":
        server = request.getfixturevalue("gcs_server")
        return f"{server.url}/{name}/ckpt"
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_REGION", server.region)
        return f"{server.url}/{name}/ckpt"
    return f"memory://{name}/ckpt"


def check(restored):
    np.testing.assert_array_equal(restored["params"]["w"], TREE["params"]["w"])
    np.testing.assert_array_equal(restored["params"]["b"], TREE["params"]["b"])
    assert restored["step"] == 3 and restored["name"] == "run"


def test_save_restore_metadata(bucket_path):
    assert pc.save(TREE, bucket_path) == bucket_path
    restored, status = pc.restore(bucket_path, TREE)
    status.assert_consumed()
    check(restored)
    check(pc.restore(bucket_path)[0])
    info = pc.metadata(bucket_path)
    assert info.leaves["params/w"].shape == (600, 600) and info.tree["step"].value == 3


def test_save_async_and_overwrite(bucket_path):
    pc.save_async({"a": 1}, bucket_path).result()
    with pytest.raises(pc.CheckpointExistsError):
        pc.save(TREE, bucket_path)
    fut = pc.save_async(TREE, bucket_path, overwrite=True)
    assert fut.result() == bucket_path
    check(pc.restore(bucket_path)[0])


def test_incomplete_checkpoint_is_refused(bucket_path):
    pc.save(TREE, bucket_path)
    loc = pc._storage.location(bucket_path)
    kv = pc._storage.open_kvstore(loc)
    kv.delete_range(ts.KvStore.KeyRange(_format.COMMIT_FILE, _format.COMMIT_FILE + "\0")).result()
    with pytest.raises(pc.IncompleteCheckpointError, match="incomplete checkpoint"):
        pc.restore(bucket_path)
    with pytest.raises(pc.CheckpointNotFoundError, match="nothing exists"):
        pc.restore(bucket_path + "_never_written")


def test_flipped_byte_is_detected(bucket_path):
    pc.save(TREE, bucket_path)
    loc = pc._storage.location(bucket_path)
    kv = pc._storage.open_kvstore(loc)
    for kind, leaf in (("/a/", "params/w"), ("/p/", "params/b")):
        key = next(k.decode() for k in kv.list().result()
                   if kind in k.decode() and not k.endswith(b"zarr.json"))
        raw = bytearray(kv.read(key).result().value)
        raw[len(raw) // 2] ^= 1
        kv.write(key, bytes(raw)).result()
        with pytest.raises(pc.CorruptCheckpointError, match=f"leaf '{leaf}'"):
            pc.restore(bucket_path)
        raw[len(raw) // 2] ^= 1
        kv.write(key, bytes(raw)).result()
    check(pc.restore(bucket_path)[0])


@pytest.mark.parametrize("server", ["gcs_server", "s3_server"])
def test_a_spec_dicts_paths_name_its_bucket(request, server, monkeypatch):
    # A kvstore spec is how a bucket is reached with options no URL says (an endpoint):
    # the paths handed back (pc.latest, save) and named in errors must still be the
    # bucket's, usable as gs:// or s3:// URLs where the environment gives the endpoint.
    srv = request.getfixturevalue(server)
    if server == "s3_server":
        monkeypatch.setenv("AWS_ENDPOINT_URL", srv.endpoint)
        monkeypatch.setenv("AWS_REGION", srv.region)
    directory = f"{srv.url}/spec_paths/run"
    with pc.CheckpointManager(srv.spec("spec_paths/run/"), async_save=False) as mgr:
        mgr.save(4, {"w": jnp.arange(3.0)})
    latest = pc.latest(srv.spec("spec_paths/run"))
    assert latest == f"{directory}/4"
    np.testing.assert_array_equal(pc.restore(latest)[0]["w"], np.arange(3.0))
    assert pc.save({"a": 1}, srv.spec("spec_paths/other")) == f"{srv.url}/spec_paths/other"
    with pytest.raises(pc.CheckpointExistsError, match=f"^{srv.url}/spec_paths/other: "):
        pc.save({"a": 1}, srv.spec("spec_paths/other"))
