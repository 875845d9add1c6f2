"""Checkpoints: exact round trip, config travels with them, mismatches are refused."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from aoi_jax import checkpoint, config, models, step

SHAPE = (8, 8, 2)


def make_state(cfg):
    model = models.build(cfg.model, SHAPE, rngs=nnx.Rngs(1))
    return step.init_state(model, step.make_optimizer(cfg.optim, 10))[1]


def small_cfg(**neuron):
    return config.Config(model=config.ModelConfig(channels=(4,), num_classes=3,
                                                  neuron=config.NeuronConfig(**neuron)))


def test_roundtrip_with_neuron_settings(tmp_path):
    cfg = small_cfg(reset="soft", tau=0.8)
    state = make_state(cfg)._replace(step=jax.numpy.asarray(7, jax.numpy.int32))
    checkpoint.save(tmp_path, state, cfg, SHAPE)
    graphdef, restored, cfg2, shape = checkpoint.restore(tmp_path)
    assert cfg2 == cfg and cfg2.model.neuron.reset == "soft" and shape == SHAPE
    assert isinstance(restored.opt_state, tuple)   # optax state restored as its own types, not lists
    jax.tree.map(np.testing.assert_array_equal, state, restored)
    model = nnx.merge(graphdef, restored.params, restored.batch_stats)
    assert model.neuron.reset == "soft"


def test_keeps_last_two_and_ignores_unfinished(tmp_path):
    cfg = small_cfg()
    state = make_state(cfg)
    for s in (1, 2, 3):
        checkpoint.save(tmp_path, state._replace(step=jax.numpy.asarray(s, jax.numpy.int32)), cfg, SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
    # a save that crashed half-way leaves only a temporary folder; it is never taken for a checkpoint
    (tmp_path / "4.orbax-checkpoint-tmp-123").mkdir()
    assert checkpoint.latest_step(tmp_path) == 3
    assert int(checkpoint.restore(tmp_path)[1].step) == 3


def test_architecture_mismatch_is_refused(tmp_path):
    cfg = small_cfg()
    checkpoint.save(tmp_path, make_state(cfg), cfg, SHAPE)
    meta = next(pathlib.Path(tmp_path, "0", "meta").glob("metadata"))
    data = json.loads(meta.read_text())
    data["config"]["model"]["channels"] = [6]          # the stored weights no longer fit the config
    meta.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"does not match the model its config builds.*convs/0"):
        checkpoint.restore(tmp_path)


def test_damaged_state_metadata_is_named(tmp_path):
    """A checkpoint whose state lost its _METADATA (an incomplete copy) is reported as such, naming the
    missing file, not as a model mismatch."""
    cfg = small_cfg()
    checkpoint.save(tmp_path, make_state(cfg), cfg, SHAPE)
    (tmp_path / "0" / "state" / "_METADATA").unlink()
    with pytest.raises(ValueError, match=r"has no readable state metadata \(expected .*0/state/_METADATA'\)"):
        checkpoint.restore(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.restore(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path)
