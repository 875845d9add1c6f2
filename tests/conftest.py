"""Shared test setup: CPU only, strict rank promotion, a seeded key, no network, no data written outside the
session's temporary folder, one XLA compilation cache per session (shared with the subprocesses the tests
start), and one N-Digits data folder shared by the tests that train."""

import os
import socket

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Persistent-cache settings for this process and, through the environment, for every subprocess a test starts
# (train.py, evaluate.py, a second device count): compiles over 0.1 s are stored.
COMPILE_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """One XLA compilation cache for the whole session, in ``<basetemp>/xla_cache``: the many tests (and the
    subprocesses they start) that compile the same program with the same shapes and options, e.g. the train
    step of the same tiny model built again by another test, load the executable XLA compiled the first time
    instead of compiling it again. A cache hit is the identical executable, so results are bit for bit those
    of a fresh compile; the folder is new in every session, so nothing is carried over between runs (unless
    ``$JAX_COMPILATION_CACHE_DIR`` is set already: then that cache is used as it is). Set
    here, before any test module is imported, because jax decides at its first compile whether to use a
    cache."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    folder = factory.getbasetemp() / "xla_cache"
    folder.mkdir(exist_ok=True)
    os.environ.update(COMPILE_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=str(folder))
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(COMPILE_CACHE_ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
