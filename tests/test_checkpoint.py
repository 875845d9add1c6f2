"""Checkpoints: exact round trip, the config travels with them, mismatches are refused; every step has a
checksum record, so that truncated, altered or unfinished steps are found before orbax reads them, and a
save interrupted by SIGKILL leaves the previous steps intact."""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from aoi_jax import checkpoint, config, models, step
from conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 2)


def make_state(cfg, at=0):
    model = models.build(cfg.model, SHAPE, rngs=nnx.Rngs(1))
    state = step.init_state(model, step.make_optimizer(cfg.optim, 10))[1]
    return state._replace(step=jax.numpy.asarray(at, jax.numpy.int32),
                          params=jax.tree.map(lambda x: x + at, state.params))


def small_cfg(**neuron):
    return config.Config(model=config.ModelConfig(channels=(4,), num_classes=3,
                                                  neuron=config.NeuronConfig(**neuron)))


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_roundtrip_with_neuron_settings_and_record(tmp_path):
    cfg = small_cfg(reset="soft", tau=0.8)
    state = make_state(cfg, at=7)
    checkpoint.save(tmp_path, state, cfg, SHAPE, record={"epoch": 1, "loss": 0.5})
    graphdef, restored, cfg2, shape = checkpoint.restore(tmp_path)
    assert cfg2 == cfg and cfg2.model.neuron.reset == "soft" and shape == SHAPE
    assert isinstance(restored.opt_state, tuple)   # optax state restored as its own types, not lists
    jax.tree.map(np.testing.assert_array_equal, state, restored)
    model = nnx.merge(graphdef, restored.params, restored.batch_stats)
    assert model.neuron.reset == "soft"
    assert checkpoint.stored_meta(tmp_path, 7)["record"] == {"epoch": 1, "loss": 0.5}
    assert checkpoint.check(tmp_path, 7) is None and (tmp_path / "7" / checkpoint.RECORD).is_file()


def test_abstract_state_is_the_initialised_state_without_computing_it():
    """What ``restore`` restores against: the graphdef and every leaf's shape and dtype of a real
    initialisation (learnt thresholds included), as ShapeDtypeStructs."""
    cfg = small_cfg(kind="plif", learn_vth=True)
    graphdef, state = step.init_state(models.build(cfg.model, SHAPE, rngs=nnx.Rngs(1)),
                                      step.make_optimizer(cfg.optim, 10))
    abstract_graphdef, abstract = checkpoint.abstract_state(cfg, SHAPE, 10)
    assert abstract_graphdef == graphdef
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), state)


def test_keeps_last_two_and_ignores_unfinished(tmp_path):
    cfg = small_cfg()
    for s in (1, 2, 3):
        checkpoint.save(tmp_path, make_state(cfg, at=s), cfg, SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
    # a save that crashed half-way leaves only a temporary folder; it is never taken for a checkpoint
    (tmp_path / "4.orbax-checkpoint-tmp-123").mkdir()
    assert checkpoint.latest_step(tmp_path) == 3
    assert int(checkpoint.restore(tmp_path)[1].step) == 3


def test_a_failed_save_is_an_error_and_overwrites_nothing(tmp_path):
    """Orbax skips a step that exists, or one older than the newest, and says so only by its return value."""
    cfg = small_cfg()
    checkpoint.save(tmp_path, make_state(cfg, at=3), cfg, SHAPE)
    before = files(tmp_path)
    for at in (3, 2):
        with pytest.raises(FileExistsError, match=rf"cannot save step {at} into '{tmp_path}': it already holds "
                                                  r"step\(s\) \[3\]"):
            checkpoint.save(tmp_path, make_state(cfg, at=at), small_cfg(reset="soft"), SHAPE)
    assert files(tmp_path) == before


def test_architecture_mismatch_is_refused(tmp_path):
    """The weights of one model stored under the config of another (an intact checkpoint that does not fit)."""
    cfg = small_cfg()
    wider = config.Config(model=config.ModelConfig(channels=(6,), num_classes=3))
    checkpoint.save(tmp_path, make_state(cfg), wider, SHAPE)
    with pytest.raises(ValueError, match=r"does not match the model its config builds.*convs/0"):
        checkpoint.restore(tmp_path)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-7])
    return "bytes, recorded"


def flip(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    return "different bytes than recorded, at the recorded size (altered in place)"


def delete(path):
    path.unlink()
    return "missing"


@pytest.mark.parametrize("damage", [truncate, flip, delete])
def test_damaged_newest_step_is_named_and_skipped(tmp_path, damage, caplog):
    cfg = small_cfg()
    for s in (1, 2):
        checkpoint.save(tmp_path, make_state(cfg, at=s), cfg, SHAPE)
    victim = max((p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    what = damage(victim)
    name = victim.relative_to(tmp_path / "2").as_posix()
    assert what in checkpoint.check(tmp_path, 2) and checkpoint.check(tmp_path, 2).startswith(f"{name}: ")
    with pytest.raises(checkpoint.DamagedCheckpointError) as e:
        checkpoint.restore(tmp_path, 2)
    assert str(e.value) == (f"checkpoint step 2 in '{tmp_path}' is damaged: {checkpoint.check(tmp_path, 2)}; "
                            f"restore another step (intact: [1]) or delete '{tmp_path / '2'}'")
    assert len(str(e.value).splitlines()) == 1 and e.value.__cause__ is None
    with caplog.at_level(logging.WARNING, logger="aoi_jax"):
        _, state, _, _ = checkpoint.restore(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, state, make_state(cfg, at=1))
    assert caplog.messages == [f"checkpoint {tmp_path}: step 2 is damaged ({checkpoint.check(tmp_path, 2)}); "
                               "using step 1, the newest intact one"]
    assert checkpoint.latest_step(tmp_path) == 1 and checkpoint.all_steps(tmp_path) == [1, 2]


def test_a_step_without_record_is_unfinished_and_all_damaged_is_an_error(tmp_path):
    cfg = small_cfg()
    checkpoint.save(tmp_path, make_state(cfg, at=1), cfg, SHAPE)
    (tmp_path / "1" / checkpoint.RECORD).unlink()                    # killed between orbax's rename and the record
    assert checkpoint.check(tmp_path, 1) == "no readable checksum record sha256.json (its save did not finish)"
    assert checkpoint.latest_step(tmp_path) is None
    with pytest.raises(checkpoint.DamagedCheckpointError,
                       match=rf"^no intact checkpoint in '{tmp_path}': step 1 is damaged \(no readable checksum "
                             r"record sha256.json \(its save did not finish\)\); train again in a new workdir"):
        checkpoint.restore(tmp_path)
    moved = checkpoint.set_aside(tmp_path, 1)
    assert moved == tmp_path / "1.set-aside-1" and checkpoint.all_steps(tmp_path) == []
    checkpoint.save(tmp_path, make_state(cfg, at=1), cfg, SHAPE)      # the step can be saved anew
    assert checkpoint.set_aside(tmp_path, 1) == tmp_path / "1.set-aside-2"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.restore(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path)


SAVER = """
import sys
import jax
import numpy as np
from flax import nnx
from aoi_jax import checkpoint, config, models, step
cfg = config.Config(model=config.ModelConfig(channels=(256, 512), num_classes=3))
init = step.init_state(models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(1)), step.make_optimizer(cfg.optim, 10))[1]
np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(init.params)])
for s in range(1, 10000):
    state = init._replace(step=jax.numpy.asarray(s, jax.numpy.int32), params=jax.tree.map(lambda x: x + s, init.params))
    checkpoint.save(sys.argv[1], state, cfg, (8, 8, 2))
    print(s, flush=True)
"""


def test_save_killed_mid_write_keeps_the_previous_steps(tmp_path):
    """A process saving step after step (10 MB each) is killed with SIGKILL while orbax writes a step: the
    steps before it restore exactly, the half-written one is never listed, and it can be saved anew."""
    directory = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(directory), str(tmp_path / "init.npz")], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env(JAX_PLATFORMS="cpu"))
    try:
        assert proc.stdout.readline() == "1\n"                            # step 1 saved and recorded
        deadline = time.time() + 120
        while not (tmp := [p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
    writing = int(tmp[0].split(".")[0])                                   # the step being written when killed
    latest = checkpoint.latest_step(directory)
    assert latest in (writing - 1, writing)             # (writing: the save finished between the look and the kill)
    cfg = config.Config(model=config.ModelConfig(channels=(256, 512), num_classes=3))
    init = step.init_state(models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(1)), step.make_optimizer(cfg.optim, 10))[1]
    _, state, _, _ = checkpoint.restore(directory)
    assert int(state.step) == latest
    with np.load(tmp_path / "init.npz") as saved:                        # the saver's initial parameters
        for got, x in zip(jax.tree.leaves(state.params), [saved[f"arr_{i}"] for i in range(len(saved.files))],
                          strict=True):
            np.testing.assert_array_equal(got, x + latest)
    redo = init._replace(step=jax.numpy.asarray(latest + 1, jax.numpy.int32))
    for s in checkpoint.all_steps(directory):
        if s > latest:
            checkpoint.set_aside(directory, s)              # as a resumed run does with a step it cannot use
    checkpoint.save(directory, redo, cfg, (8, 8, 2))
    assert checkpoint.latest_step(directory) == latest + 1
