"""Shared test setup: CPU only, strict rank promotion, a seeded key, no network, no data written outside the
session's temporary folder, and one N-Digits data folder shared by the tests that train."""

import os
import socket

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def guard(*args, **kwargs):
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)


@pytest.fixture(scope="session", autouse=True)
def default_data_dir(tmp_path_factory):
    """``$AOI_JAX_DATA`` (the default ``data.data_dir``) points into the session's temporary folder, so that
    nothing is written outside it even where a test leaves ``data.data_dir`` at its default."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("AOI_JAX_DATA", str(tmp_path_factory.mktemp("default_data_dir")))
        yield


@pytest.fixture(scope="session")
def ndigits_dir(tmp_path_factory):
    """A data folder holding the N-Digits events cache, built once per session (frames of each T are built from
    it on first use). Shared: a test that damages a cache file works on a copy."""
    from aoi_jax.data import ndigits

    root = tmp_path_factory.mktemp("ndigits_data")
    ndigits.load_events(root)
    return root
