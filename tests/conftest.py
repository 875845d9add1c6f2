"""Shared test setup: CPU only, XLA:CPU with fewer optimisations, strict rank promotion, a seeded key, no
network, no data written outside the session's temporary folder, one XLA compilation cache per session (shared
with the subprocesses the tests start), one N-Digits data folder shared by the tests that train, and the two-epoch
train.py run that several test files compare with."""

import fcntl
import os
import pathlib
import shutil
import socket
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite compiles with fewer optimisations than XLA's defaults: on XLA:CPU much of the suite's time is
# compiling, and the tests check values, not speed. Measured on the 2-core machine (docs/performance.md, "Test
# suite time"), every jax process of the suite (the pytest workers and the train.py, evaluate.py and other jax
# processes the tests start, ``subprocess_env``) compiles with ``TEST_XLA_FLAGS``: XLA:CPU's legacy elemental
# emitters instead of its newer fusion emitters, which take longer to compile, and LLVM level 1 without its
# expensive passes. This process (a pytest worker) compiles thousands of small programs and runs each a few
# times: those compile at LLVM level 0 (jax's ``jax_disable_most_optimizations``, per compile), except in the
# files that train whole epochs in this process (``TRAINS_IN_PROCESS``), whose level-1 code runs faster.
# XLA_FLAGS is set here, before jax creates its CPU client (XLA reads it once, then). No setting enables fast-math
# (off by default on CPU), but transcendental functions may round differently under different settings, so no
# test compares values computed in a subprocess with values computed here (a subprocess writes what it started
# from, e.g. tests/test_checkpoint.py). The whole suite passes under each setting. AOI_JAX_TEST_OPTIMISED=1 runs
# the suite with XLA's default compilation.
OPTIMISED = os.environ.get("AOI_JAX_TEST_OPTIMISED") == "1"
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
TRAINS_IN_PROCESS = ("test_training.py", "test_sweep.py", "test_notebook.py")
if not OPTIMISED and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):      # pytest-xdist workers inherit it
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Persistent-cache settings for this process and, through the environment, for every subprocess a test starts
# (train.py, evaluate.py, a second device count): compiles over 0.1 s are stored. The subprocesses store every
# compile (``subprocess_env``): a train.py run compiles about 40 small programs (model initialisation, metrics)
# that the next run of the same settings then loads; this process compiles thousands of distinct small programs,
# which would be written and never read.
COMPILE_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def session_folder(factory) -> pathlib.Path:
    """The session's temporary folder that every pytest-xdist worker shares (each worker's own ``tmp_path``
    folders lie inside it); without xdist, the session's temporary folder."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Strict rank promotion in every process that runs tests, and one XLA compilation cache for the whole
    session, in ``<basetemp>/xla_cache``: the many tests (and the subprocesses they start) that compile the
    same program with the same shapes and options, e.g. the train step of the same tiny model built again by
    another test, load the executable XLA compiled the first time instead of compiling it again. A cache hit is
    the identical executable, so results are bit for bit those of a fresh compile; the folder is new in every
    session, so nothing is carried over between runs (unless ``$JAX_COMPILATION_CACHE_DIR`` is set already:
    then that cache is used as it is; ``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off). With pytest-xdist
    the workers share one cache, in the session's common folder: the controller, which runs no test and never
    imports jax (its workers start sooner), sets it in the environment the workers inherit. Set here, before any
    test module is imported, because jax decides at its first compile whether to use a cache."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        folder = session_folder(factory) / "xla_cache"
        folder.mkdir(exist_ok=True)
        os.environ.update(COMPILE_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=str(folder))
    if config.pluginmanager.has_plugin("dsession"):                  # the pytest-xdist controller
        return
    import jax                                                        # reads the cache settings from the environment

    jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test compiles at LLVM level 0 (``jax_disable_most_optimizations``) unless its file trains whole
    epochs in this process (``TRAINS_IN_PROCESS``): then at level 1, from ``TEST_XLA_FLAGS``. Set for the
    test's whole protocol, so that the fixtures its setup builds compile the same way."""
    if not OPTIMISED:
        import jax

        jax.config.update("jax_disable_most_optimizations", item.path.name not in TRAINS_IN_PROCESS)
    yield


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A pytest-xdist worker ends here, its last result already with the controller (pytest-xdist sends it
    from ``pytest_sessionfinish``, before this hook): without the interpreter's teardown, jax's clean-up of the
    thousands of programs the worker compiled and then every object, which the controller would wait for. That
    wait was 4-6 s after the last test of every run (docs/performance.md); nothing of the session is lost, as
    its files are written and its results reported."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (setup.cfg): one worker per usable core, at most 4. Each worker builds the session fixtures
    (the N-Digits cache, the shared tiny run) once and holds its own compiled programs, so more workers add
    memory and duplicated setup faster than they save time."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


# The test files that take longest (measured with ``--durations=0``, docs/performance.md), in that order.
# pytest-xdist (``--dist loadfile``) hands out whole files, by default those with the most tests first, which
# need not be the longest: a long file started late keeps one worker busy while the other has nothing left.
# With ``--no-loadscope-reorder`` (setup.cfg) it keeps the order below, and the short files fill in behind the
# long ones. test_models (no data)
# comes second, so that the second worker does not wait for the N-Digits folder the first worker is building.
LONGEST_FIRST = ("test_training.py", "test_models.py", "test_storage_faults.py", "test_cli.py", "test_remat.py",
                 "test_neurons.py", "test_cutoff.py", "test_anytime.py", "test_convert.py", "test_sweep.py")


def pytest_collection_modifyitems(config, items):
    """Runs the files of ``LONGEST_FIRST`` first, in that order; every other file follows in collection order,
    and the tests of a file keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))          # stable: other orders kept


@pytest.fixture
def key():
    import jax

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
    it on first use). Shared by all tests and all pytest-xdist workers: the first worker builds it while the
    others wait on a lock, then they read it (the data caches are written atomically, so workers that build
    the same frames at once are safe). A test that damages a cache file works on a copy."""
    from aoi_jax.data import ndigits

    root = session_folder(tmp_path_factory) / "ndigits_data"
    with open(root.with_name("ndigits_data.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ndigits.load_events(root)
    return root


def subprocess_env(**extra) -> dict:
    """The environment of a jax process a test starts: this one's (``TEST_XLA_FLAGS`` included, and LLVM level 1:
    ``jax_disable_most_optimizations`` is this process's setting, not the environment's), ``extra`` added and,
    where the session's cache is in use, every compile stored."""
    env = dict(os.environ, **extra)
    if env.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS") == COMPILE_CACHE_ENV[
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]:                   # set by pytest_configure
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


# The tiny run of the script tests (``--set`` overrides of configs/ndigits.py): small_snn with channels (4, 8),
# T = 3, batch 128 (1438 // 128 = 11 optimiser steps per epoch), evaluated at epsilons (0, 0.05) with 20 bins.
TINY_SCRIPT = ("model.channels=(4, 8)", "train.batch_size=128", "data.timesteps=3", "eval.epsilons=(0.0, 0.05)",
               "eval.bins=20", "eval.batch_size=2048")


def script_args(data_dir, workdir, *overrides) -> list[str]:
    """train.py's arguments for configs/ndigits.py with ``TINY_SCRIPT`` and then ``overrides`` set, reading the
    data in ``data_dir`` and writing into ``workdir``."""
    args = ["--config", str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "ndigits.py"), "--workdir",
            str(workdir), "--data-dir", str(data_dir)]
    for item in (*TINY_SCRIPT, *overrides):
        args += ["--set", item]
    return args


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, ndigits_dir) -> pathlib.Path:
    """The workdir of one uninterrupted ``train.py --config configs/ndigits.py --no-eval`` run of ``TINY_SCRIPT``
    and ``train.epochs=2``: what a run killed with SIGKILL (tests/test_cli.py) and a run stopped by a file-size
    limit (tests/test_storage_faults.py) must end equal to, bit for bit, once resumed with the same command.
    Its stdout and stderr go to the file ``reference_run.log`` beside the workdir, with $TQDM_DISABLE unset, as a
    batch job's would: the log that tests/test_progress.py reads (no other test reads the output). Built once
    per session by the first pytest-xdist worker that asks (the others wait on a lock, then read it). Shared
    and read-only."""
    root = session_folder(tmp_path_factory)
    workdir = root / "reference_run"
    with open(root / "reference_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "reference_run.done").exists():
            shutil.rmtree(workdir, ignore_errors=True)            # what a failed attempt left
            args = [sys.executable, str(pathlib.Path(__file__).resolve().parents[1] / "train.py"), "--no-eval",
                    *script_args(ndigits_dir, workdir, "train.epochs=2")]
            env = {k: v for k, v in subprocess_env(JAX_PLATFORMS="cpu").items() if k != "TQDM_DISABLE"}
            with open(root / "reference_run.log", "w") as log:
                proc = subprocess.run(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
            assert proc.returncode == 0, (root / "reference_run.log").read_text()[-3000:]
            (root / "reference_run.done").touch()
    return workdir


def two_device_env(env: dict) -> dict:
    """``env`` for a subprocess with two CPU host devices: the device flag added to the suite's XLA_FLAGS."""
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    return dict(env, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
