"""Storage faults injected for real: a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored, so writes fail with
EFBIG) on a checkpoint, a cache and a whole train.py run; a SIGKILL in the middle of a cache write; the umask;
checkpoints kept by age and by a metric; cache builds' progress."""

import json
import logging
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from flax import nnx

from aoi_jax import checkpoint, config, data, integrity, models, parallel, step as step_lib
from aoi_jax.config import DataConfig
from aoi_jax.data import ndigits
from conftest import script_args, subprocess_env, two_device_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = subprocess_env(JAX_PLATFORMS="cpu", TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
# a process under a file-size limit that compiles programs no earlier process has compiled must not write them
# to the session's XLA compilation cache: an entry over the limit is a warning on stderr, not the failure under test
LIMITED_ENV = dict(ENV, JAX_ENABLE_COMPILATION_CACHE="false")
SPE = 1438 // 128                                     # optimiser steps per epoch of conftest's TINY_SCRIPT


LAUNCH = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
          "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); os.execv(sys.argv[2], sys.argv[2:])")


def limited(limit, argv):
    """``argv`` run with a file-size limit of ``limit`` bytes (SIGXFSZ ignored: a write beyond it fails with
    EFBIG), set in a launcher that then execs ``argv`` (no fork of this multithreaded process)."""
    return [sys.executable, "-c", LAUNCH, str(limit), *argv]


def tiny_state(step=0):
    cfg = config.load(str(ROOT / "configs" / "ndigits.py"), ["model.channels=(4, 8)", "data.timesteps=3"])
    model = models.build(cfg.model, (34, 34, 2), rngs=nnx.Rngs(0))
    _, state = step_lib.init_state(model, step_lib.make_optimizer(cfg.optim, 10))
    return cfg, at(state, step)


def at(state, step):
    """``state`` at optimiser step ``step``."""
    return state._replace(step=jax.numpy.asarray(step, jax.numpy.int32))


# ----------------------------------------------------------------------------------------------- writes

def test_write_atomic_under_a_file_size_limit_names_path_bytes_and_error(tmp_path):
    code = ("import numpy as np; from aoi_jax import integrity\n"
            "try:\n"
            f"    integrity.write_atomic({str(tmp_path / 'a.npy')!r}, lambda f: np.save(f, np.zeros(5000)))\n"
            "except integrity.StorageError as e:\n"
            "    print(e)\n"
            "try:\n"
            f"    integrity.append_line({str(tmp_path / 'm.jsonl')!r}, 'x' * 3000)\n"
            "except integrity.StorageError as e:\n"
            "    print(e)\n")
    proc = subprocess.run(limited(2000, [sys.executable, "-c", code]), env=LIMITED_ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        f"cannot write '{tmp_path / 'a.npy'}' (40128 bytes): File too large [Errno 27]",
        f"cannot write '{tmp_path / 'm.jsonl'}' (3001 bytes): File too large [Errno 27]"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]       # no temporary file left


def test_checkpoint_save_under_a_file_size_limit_leaves_no_half_step_and_no_noise(tmp_path):
    """orbax fails inside tensorstore: one StorageError naming the step folder, orbax's temporary folder
    removed, the older step untouched, nothing else on stderr (no orbax traceback, no shutdown noise)."""
    cfg, state = tiny_state(1)
    checkpoint.save(tmp_path / "ck", state, cfg, (34, 34, 2))
    code = ("import sys; sys.path.insert(0, 'tests'); from test_storage_faults import tiny_state\n"
            "from aoi_jax import checkpoint, integrity\n"
            "cfg, state = tiny_state(2)\n"
            "try:\n"
            f"    checkpoint.save({str(tmp_path / 'ck')!r}, state, cfg, (34, 34, 2))\n"
            "except integrity.StorageError as e:\n"
            "    print(e)\n")
    proc = subprocess.run(limited(2000, [sys.executable, "-c", code]), cwd=ROOT, env=LIMITED_ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert proc.stdout.splitlines() == [f"cannot write '{tmp_path / 'ck' / '2'}' ({nbytes} bytes): File too large "
                                        "[Errno 27]"]
    assert proc.stderr == ""
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]
    assert checkpoint.latest_step(tmp_path / "ck") == 1


def test_failure_message_is_short_and_says_the_checkpoint_is_kept():
    e = integrity.StorageError("/x/ck/7", 1234, 28, "No space left on device")
    lines = integrity.failure_message(e).splitlines()
    assert lines[0] == "error: cannot write '/x/ck/7' (1234 bytes): No space left on device [Errno 28]"
    assert "last good checkpoint is kept" in lines[1] and len(lines) == 2
    assert integrity.failure_message(OSError(122, "Disk quota exceeded", "/x/m")).startswith(
        "error: cannot write '/x/m' (size unknown): Disk quota exceeded [Errno 122]")
    assert integrity.failure_message(FileNotFoundError(2, "No such file", "/in")) is None
    assert isinstance(e, OSError) and e.errno == 28 and e.filename == "/x/ck/7"


@pytest.mark.parametrize("kind", ["Task", "Future", "_GatheringFuture"])
def test_orbax_leftovers_after_a_failed_save_are_dropped_and_other_asyncio_errors_kept(kind):
    """The asyncio reports of orbax's unfinished writes, whichever object is finalised first (seen under load:
    a ``Future`` or ``_GatheringFuture`` before the ``Task``), are dropped; other asyncio errors are not."""
    def record(msg):
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, msg, None, None)

    leftover = (f"{kind} exception was never retrieved\nfuture: <{kind} finished exception=ValueError('OUT_OF_RANGE: "
                "Error writing \"step/0\" at \"/r/ck/2.orbax-checkpoint-tmp/state\": File too large')>")
    assert not checkpoint._orbax_failure_record(record(leftover))
    assert checkpoint._orbax_failure_record(record(f"{kind} exception was never retrieved\nfuture: <{kind} "
                                                   "finished exception=KeyError('mine')>"))
    assert checkpoint._orbax_failure_record(record("Unclosed client session (orbax-checkpoint-tmp)"))


def test_orbax_write_coroutines_left_unawaited_after_a_failed_save_are_not_reported():
    """Run in a fresh process: after a failed save (``_after_failure``), an orbax write coroutine finalised
    unawaited prints nothing; any other unawaited coroutine still warns."""
    code = ("import asyncio, gc, warnings\n"
            "from aoi_jax import checkpoint\n"
            "checkpoint._after_failure()\n"
            "async def write_fragment(): pass\n"
            "async def mine(): pass\n"
            "write_fragment.__qualname__ = 'async_serialize_from_host.<locals>.write_fragment'\n"
            "c = write_fragment(); del c; gc.collect()\n"
            "c = mine(); del c; gc.collect()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "write_fragment" not in proc.stderr and "coroutine 'mine' was never awaited" in proc.stderr


def test_a_half_step_written_again_by_a_late_write_is_removed_too(tmp_path, monkeypatch):
    """A write still in flight after a failed save creates orbax's temporary folder again 0.2 s after it was
    removed: the half step is still gone when ``_remove_half_step`` returns, because the leftovers must then stay
    absent for ``quiet`` seconds again; a finished step (with its checksum record) is kept. The clock is a fake
    one that each 10 ms sleep advances, so the test does not wait."""
    tmp = tmp_path / "7.orbax-checkpoint-tmp-123"
    (tmp / "state").mkdir(parents=True)
    (tmp_path / "7").mkdir()                                      # no checksum record: half a step
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / checkpoint.RECORD).write_text("{}")
    now, rewritten = [0.0], []

    def sleep(seconds):
        now[0] += seconds
        if now[0] >= 0.2 and not rewritten:                       # the late write
            (tmp / "state").mkdir(parents=True)
            (tmp / "state" / "chunk").write_bytes(b"x")
            rewritten.append(now[0])

    monkeypatch.setattr(checkpoint, "time", types.SimpleNamespace(monotonic=lambda: now[0], sleep=sleep))
    checkpoint._remove_half_step(tmp_path, 7, quiet=0.5)
    assert rewritten and sorted(p.name for p in tmp_path.iterdir()) == ["5"]
    assert now[0] >= rewritten[0] + 0.5                           # a whole quiet window after the late write


# ----------------------------------------------------------------------------------------------- umask

@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, mask):
    cfg, state = tiny_state(3)
    old = os.umask(mask)
    try:
        integrity.write_json_atomic(tmp_path / "report.json", {"a": 1})
        folder = integrity.make_temp_folder(tmp_path, ".tmp-x-")
        checkpoint.save(tmp_path / "ck", state, cfg, (34, 34, 2))
    finally:
        os.umask(old)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "ck" / "3" / checkpoint.RECORD).stat().st_mode & 0o777 == 0o666 & ~mask
    assert integrity.umask() == old


# ----------------------------------------------------------------------------------------------- keeping

def test_keeps_the_newest_and_the_best_and_resolves_steps(tmp_path):
    """Five steps with a validation accuracy; keep 2 + best: the best (step 2) and the two newest remain."""
    cfg, state = tiny_state()
    acc = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6, 5: 0.8}
    for s, a in acc.items():
        checkpoint.save(tmp_path, at(state, s), cfg, (34, 34, 2),
                        record={"epoch": s, "val_accuracy": a}, max_to_keep=2, best_metric=("val_accuracy", "max"))
    assert checkpoint.all_steps(tmp_path) == [2, 4, 5]
    assert checkpoint.records(tmp_path) == {s: {"epoch": s, "val_accuracy": acc[s]} for s in (2, 4, 5)}
    assert checkpoint.resolve_step(tmp_path, "best") == 2
    assert checkpoint.resolve_step(tmp_path, "last") == checkpoint.resolve_step(tmp_path, None) == 5
    assert checkpoint.resolve_step(tmp_path, 4) == checkpoint.resolve_step(tmp_path, "4") == 4
    assert int(checkpoint.restore(tmp_path, "best")[1].step) == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
        checkpoint.resolve_step(tmp_path, 3)
    with pytest.raises(ValueError, match="'last', 'best' or a step number, got 'newest'"):
        checkpoint.resolve_step(tmp_path, "newest")


def test_best_by_a_minimum_and_without_a_metric(tmp_path):
    cfg, state = tiny_state()
    for s, loss in ((1, 0.3), (2, None), (3, 0.4)):
        checkpoint.save(tmp_path / "a", at(state, s), cfg, (34, 34, 2),
                        record={"val_loss": loss}, max_to_keep=1, best_metric=("val_loss", "min"))
    assert checkpoint.all_steps(tmp_path / "a") == [1, 3]                 # step 2 has no value: never best
    assert checkpoint.resolve_step(tmp_path / "a", "best") == 1
    checkpoint.save(tmp_path / "b", state, cfg, (34, 34, 2), record={"val_loss": 0.1})
    with pytest.raises(ValueError, match="was saved without one"):
        checkpoint.resolve_step(tmp_path / "b", "best")
    checkpoint.save(tmp_path / "c", state, cfg, (34, 34, 2), record={}, best_metric=("val_loss", "min"))
    with pytest.raises(ValueError, match="no intact step carries a finite 'val_loss'"):
        checkpoint.resolve_step(tmp_path / "c", "best")
    with pytest.raises(ValueError, match="best_metric must be None or"):
        checkpoint.save(tmp_path / "d", state, cfg, (34, 34, 2), best_metric=("val_loss", "lowest"))


# ----------------------------------------------------------------------------------------------- caches

def test_cache_write_killed_with_sigkill_leaves_files_the_next_build_removes(tmp_path, ndigits_dir, caplog):
    """A SIGKILL while the frame cache is being written leaves ``frames_T2_<key>.npy.<host>-<pid>.<r>.tmp``;
    the next build removes it, logging its name, and writes the cache."""
    shutil.copytree(ndigits_dir / "ndigits", tmp_path / "ndigits")
    code = ("import sys, numpy as np\n"
            "from aoi_jax.data import ndigits\n"
            "def stuck(f, a):\n"
            "    f.write(b'x' * 100000); f.flush(); print('writing', flush=True); sys.stdin.read()\n"
            "np.save = stuck\n"
            f"ndigits.load_frames({str(tmp_path)!r}, 2)\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        assert child.wait() == -signal.SIGKILL
    (left,) = [p for p in (tmp_path / "ndigits").iterdir() if p.name.endswith(".tmp")]
    assert left.name.startswith(f"frames_T2_{ndigits.cache_key(ndigits.NDigitsParams(), 0)}.npy.")
    with caplog.at_level(logging.WARNING, logger="aoi_jax"):
        frames, _ = ndigits.load_frames(tmp_path, 2)
    assert not left.exists() and frames.shape[1] == 2
    assert any(left.name in m and "interrupted write" in m for m in caplog.messages)
    assert not [p for p in (tmp_path / "ndigits").iterdir() if p.name.endswith(".tmp")]


def test_leftovers_of_live_processes_are_kept(tmp_path):
    mine = tmp_path / f"f.npy.{integrity.temp_tag()}.abc.tmp"
    other_host = tmp_path / "f.npy.elsewhere-1.abc.tmp"
    mine.write_bytes(b"1")
    other_host.write_bytes(b"1")
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    theirs = tmp_path / f"f.npy.{integrity.temp_tag().rsplit('-', 1)[0]}-{live.pid}.abc.tmp"
    theirs.write_bytes(b"1")
    try:
        assert integrity.leftovers(tmp_path, "f.npy.", ".tmp") == []
    finally:
        live.kill()
        live.wait()
    assert integrity.leftovers(tmp_path, "f.npy.", ".tmp") == [theirs]


def test_load_passes_a_progress_to_the_build(tmp_path, monkeypatch):
    """``data.load(cfg, progress)`` calls ``progress(iterable, total=N, desc=)`` once per build and walks the
    iterable through all N items; a cached load calls nothing."""
    calls = []

    def progress(iterable, total, desc):
        calls.append({"total": total, "desc": desc, "items": 0})
        for item in iterable:
            calls[-1]["items"] += 1
            yield item

    images, labels = ndigits.digits()
    monkeypatch.setattr(ndigits, "digits", lambda: (images[:60], labels[:60]))     # 60 samples: fast
    cfg = DataConfig(data_dir=str(tmp_path), timesteps=2)
    data.load(cfg, progress=progress)                     # generates the events
    assert calls == [{"total": 60, "desc": "building the ndigits cache", "items": 60}]
    calls.clear()
    data.load(cfg, progress=progress)
    assert calls == []


# ----------------------------------------------------------------------------------------------- train.py

def train(data_dir, workdir, *overrides):
    return [sys.executable, str(ROOT / "train.py"), "--no-eval", *script_args(data_dir, workdir, *overrides)]


def final_state(workdir):
    return checkpoint.restore(workdir / "checkpoints")[1]


def learnt(workdir):
    keys = ("epoch", "step", "train_loss", "train_accuracy", "test_accuracy")
    return [{k: json.loads(x)[k] for k in keys} for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_storage_message(proc, path):
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) <= 10, proc.stderr[-3000:]
    assert lines[-2].startswith(f"error: cannot write '{path}' (") and lines[-2].endswith(
        "bytes): File too large [Errno 27]"), proc.stderr[-3000:]
    assert "last good checkpoint is kept" in lines[-1]


def test_train_under_a_file_size_limit_at_the_first_save_and_mid_run_then_ends_bit_identical(tmp_path,
                                                                                             ndigits_dir,
                                                                                             reference_run):
    """train.py (2 epochs) with a 4 KiB file-size limit: the first checkpoint cannot be written, exit 1 with a
    short message naming its step folder and no step left. Again without a limit until the first checkpoint
    exists, then with the limit (``prlimit`` on the running process): the second save fails the same way
    and step 1 is kept. Without a limit, the same command ends exactly as an uninterrupted run (the session's
    ``reference_run``, tests/conftest.py: the same command in another folder).

    The uninterrupted run goes first: it leaves every program the limited runs compile in the session's XLA
    compilation cache (tests/conftest.py), which they then only read (an entry written under the limit would
    be a warning on stderr, not the failure under test)."""
    ndigits.load_frames(ndigits_dir, 3)                   # the frame cache exists: the limit hits checkpoints
    ckpts = tmp_path / "run" / "checkpoints"
    args = train(ndigits_dir, tmp_path / "run", "train.epochs=2")
    proc = subprocess.run(limited(4096, args), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert_storage_message(proc, ckpts / str(SPE))
    assert checkpoint.all_steps(ckpts) == [] and not list(ckpts.glob("*tmp*"))

    child = subprocess.Popen(limited(-1, args), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not (ckpts / str(SPE) / checkpoint.RECORD).exists():
            assert time.time() < deadline and child.poll() is None
            time.sleep(0.01)
        resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (4096, 4096))
        err = child.communicate(timeout=600)[1]
    finally:
        child.kill()
    assert_storage_message(subprocess.CompletedProcess(args, child.returncode, "", err), ckpts / str(2 * SPE))
    assert checkpoint.all_steps(ckpts) == [SPE] and not list(ckpts.glob("*tmp*"))

    proc = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert learnt(tmp_path / "run") == learnt(reference_run)
    jax.tree.map(np.testing.assert_array_equal, final_state(tmp_path / "run"), final_state(reference_run))


# ----------------------------------------------------------------------------------------------- devices

TWO = two_device_env(ENV)
DUMP = r"""
import sys, jax, numpy as np
from aoi_jax import checkpoint
assert jax.device_count() == 2
for src, out in zip(sys.argv[1::2], sys.argv[2::2]):
    state = checkpoint.restore(src)[1]
    np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(state)])
"""


@pytest.fixture(scope="module")
def on_two(tmp_path_factory, ndigits_dir):
    """A one-epoch train.py run on two CPU devices."""
    root = tmp_path_factory.mktemp("two_devices")
    proc = subprocess.run(train(ndigits_dir, root / "run", "train.epochs=1"), cwd=root, env=TWO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_a_checkpoint_restores_value_for_value_from_2_to_1_and_from_1_to_2_devices(on_two, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="aoi_jax"):
        _, state, cfg, shape = checkpoint.restore(on_two / "checkpoints")         # 2 -> 1 (this process)
    assert f"checkpoint {on_two / 'checkpoints'} step {SPE} was saved on 2 devices; restoring it onto 1" in \
        caplog.messages
    checkpoint.save(tmp_path / "one", state, cfg, shape)                           # saved on 1
    proc = subprocess.run([sys.executable, "-c", DUMP, str(on_two / "checkpoints"), str(tmp_path / "a.npz"),
                           str(tmp_path / "one"), str(tmp_path / "b.npz")], cwd=ROOT, env=TWO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("a.npz", "b.npz"):                                                # 2 -> 2 and 1 -> 2
        with np.load(tmp_path / name) as z:
            for i, leaf in enumerate(jax.tree.leaves(state)):
                np.testing.assert_array_equal(z[f"arr_{i}"], np.asarray(leaf))


def test_resume_from_2_to_1_and_back_to_2_devices_continues_and_evaluates_the_same(on_two, tmp_path, ndigits_dir):
    workdir = shutil.copytree(on_two, tmp_path / "run")
    proc = subprocess.run(train(ndigits_dir, workdir, "train.epochs=2"), cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "was saved on 2 devices; restoring it onto 1" in proc.stdout
    assert [r["epoch"] for r in learnt(workdir)] == [1, 2] and learnt(workdir)[0] == learnt(on_two)[0]
    proc = subprocess.run(train(ndigits_dir, workdir, "train.epochs=3"), cwd=tmp_path, env=TWO,    # 1 -> 2
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step {2 * SPE} was saved on 1 devices; restoring it onto 2" in proc.stdout
    assert [r["epoch"] for r in learnt(workdir)] == [1, 2, 3] and learnt(workdir)[1]["step"] == 2 * SPE
    reports = {}
    for n, env in ((1, ENV), (2, TWO)):
        proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--workdir", str(on_two), "--out",
                               str(tmp_path / f"eval{n}"), "--set", "eval.calib_dropout=0.0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[n] = json.loads((tmp_path / f"eval{n}" / "report.json").read_text())
        assert reports[n]["config"]["eval"]["calib_dropout"] == 0.0          # trained with configs/ndigits.py's 0.3
    np.testing.assert_allclose(reports[1]["accuracy_per_timestep"], reports[2]["accuracy_per_timestep"], atol=1e-6)
    for rule in reports[1]["rules"]:
        np.testing.assert_allclose(reports[1]["rules"][rule]["accuracy"], reports[2]["rules"][rule]["accuracy"],
                                   atol=2e-3)


def test_a_batch_the_devices_cannot_split_is_refused_naming_both():
    parallel.check_batch_size(6, 2)
    parallel.check_batch_size(7)                                  # this process: one device
    with pytest.raises(ValueError, match=r"^batch size 7 is not a multiple of the 2 devices"):
        parallel.check_batch_size(7, 2)
