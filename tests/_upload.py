"""Copying files another tool wrote on a local disk to any URL pytree_ckpt reads (gs://,
s3://, memory://), through TensorStore, the way those files would lie in a bucket."""

import os

import tensorstore as ts

from pytree_ckpt import _storage


def write(url: str, data: bytes) -> None:
    """Writes one file at ``url``."""
    loc = _storage.location(url)
    folder, _, name = loc.spec["path"].rstrip("/").rpartition("/")
    kv = ts.KvStore.open(dict(loc.spec, path=folder + "/"), context=_storage.context()).result()
    kv.write(name, data).result()


def upload(local: str, url: str) -> None:
    """Copies the folder ``local`` (every file below it) to ``url``."""
    for root, _dirs, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local)
            with open(os.path.join(root, name), "rb") as f:
                write(f"{url}/{rel}", f.read())
