"""Shared pytest setup: 8 virtual CPU devices (set before JAX is imported) and fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Hypothesis draws its examples from a fixed seed (derandomize) and keeps no database between
# runs: every run tries the same examples, so a failure replays. Set
# PYTREE_CKPT_HYPOTHESIS=random to explore (a failure then prints the seed to replay it with
# --hypothesis-seed).
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("random", database=None)
settings.load_profile(os.environ.get("PYTREE_CKPT_HYPOTHESIS", "fixed"))

# ---- Object-storage servers on loopback (helpers and TensorStore notes: tests/_servers.py) ----
# Session-scoped: TensorStore reads GOOGLE_AUTH_TOKEN_FOR_TESTING once per process, at the first
# gs:// request, so the variables are set before any test that asks for `gcs_server` runs and
# stay set until the session ends. Each test should write under its own path in the bucket.
from _proxy import FaultProxy  # noqa: E402
from _servers import (  # noqa: E402
    GcsServer,
    S3Server,
    fake_gcs_server,
    moto_s3_server,
    patched_environ,
)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    """fake-gcs-server with an empty bucket; TensorStore's gs:// goes there meanwhile."""
    with fake_gcs_server() as server, patched_environ(server.env()):
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server with an empty bucket; use ``s3_server.spec(path)`` (not a URL)."""
    with moto_s3_server() as server, patched_environ(server.env()):
        yield server


@pytest.fixture(params=["gcs", "s3"])
def proxied(request, monkeypatch) -> Iterator[tuple[FaultProxy, str]]:
    """``(proxy, url)``: a fresh folder URL per test whose every request goes through a
    :class:`_proxy.FaultProxy` in front of fake-gcs-server or moto's S3 (stopped after).

    TensorStore caches an open gcs driver, with the endpoint it read, per context: the
    library's context is dropped before and after, so the next one reads the variable."""
    import pytree_ckpt._storage as storage

    name = request.node.name.replace("[", "_").replace("]", "")
    server = request.getfixturevalue(f"{request.param}_server")
    with FaultProxy(server.endpoint) as proxy:
        if request.param == "gcs":
            monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.endpoint)
        else:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            monkeypatch.setenv("AWS_REGION", server.region)
        storage.forget_contexts()
        try:
            yield proxy, f"{server.url}/{name}"
        finally:
            storage.forget_contexts()


@pytest.fixture
def deadline():
    """``set(seconds)``: the storage deadline for this test (the default again after)."""
    import pytree_ckpt as pc

    def set_(seconds):
        pc.configure(storage_deadline_s=seconds)
        return seconds
    yield set_
    pc.configure(storage_deadline_s=None)


# ---- End of object-storage servers ----


@pytest.fixture(scope="session")
def zygote():
    """A warm process that forks a fresh child per ``zygote.run(code, argv)`` (tests/_zygote.py):
    a process of its own without the start-up of an interpreter and JAX each time."""
    from _zygote import Zygote

    with Zygote() as warm:
        yield warm


@pytest.fixture(params=["gcs", "s3"])
def bucket(request, monkeypatch) -> str:
    """A fresh folder URL per test on fake-gcs-server and on moto's S3, as a user types it."""
    name = request.node.name.replace("[", "_").replace("]", "")
    if request.param == "gcs":
        return f"{request.getfixturevalue('gcs_server').url}/{name}"
    server = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_REGION", server.region)
    return f"{server.url}/{name}"


def pytest_collection_modifyitems(items):
    """Tests marked slow (the benchmark scripts' smoke runs, minutes each) run first: in 2
    workers given whole files, a long file left to the end would run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable otherwise
