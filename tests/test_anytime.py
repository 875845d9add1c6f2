"""The step-by-step early-exit loop equals Top-K applied to the multistep logits of the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aoi_jax import anytime, config, cutoff, models, step


@pytest.fixture(scope="module")
def trained():
    """A small SNN trained for 30 steps on a separable synthetic event task (class = hot pixel position)."""
    cfg = config.Config(model=config.ModelConfig(channels=(4, 8), num_classes=3),
                        optim=config.OptimConfig(lr=0.05, schedule="constant"))
    model = models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(0))
    opt = step.make_optimizer(cfg.optim, 100)
    graphdef, state = step.init_state(model, opt)
    train_step = step.make_train_step(graphdef, cfg, opt)
    rng = np.random.default_rng(0)

    def batch(n):
        labels = rng.integers(0, 3, n)
        frames = rng.poisson(0.3, (6, n, 8, 8, 2)).astype(np.float32)
        on = rng.random((6, n)) < 0.6                    # the evidence arrives at random steps
        frames[:, np.arange(n), labels * 3, labels * 3, 0] += 2.0 * on
        return {"frames": jnp.asarray(frames), "label": jnp.asarray(labels, jnp.int32)}

    for _ in range(30):
        state, _ = train_step(state, batch(16), step.loss_weights(cfg))
    return graphdef, state, batch(64), batch(64)


def test_anytime_equals_apply_topk(trained):
    graphdef, state, calib, test = trained
    eval_step = step.make_eval_step(graphdef)
    logits_c, _ = eval_step(state.params, state.batch_stats, calib["frames"], jax.random.key(0))
    logits_t, _ = eval_step(state.params, state.batch_stats, test["frames"], jax.random.key(0))
    cum_t = cutoff.cumulative(logits_t)
    assert float(cutoff.accuracy_per_timestep(cum_t, test["label"])[-1]) > 0.6   # it did learn
    for eps in (0.0, 0.05, 0.2):
        beta = cutoff.calibrate_topk(cutoff.cumulative(logits_c), calib["label"], epsilon=eps)
        want_pred, want_t = cutoff.apply_topk(cum_t, beta)
        res = jax.jit(anytime.run_topk)(graphdef, state.params, state.batch_stats, test["frames"], beta)
        np.testing.assert_array_equal(res.predictions, want_pred)
        np.testing.assert_array_equal(res.timesteps, want_t)
        assert int(res.steps_computed) == int(np.max(want_t))       # it stops with the last sample


def test_anytime_stops_early_and_counts_spikes(trained):
    graphdef, state, _, test = trained
    T = test["frames"].shape[0]
    res = anytime.run_topk(graphdef, state.params, state.batch_stats, test["frames"], jnp.full(T, -1.0))
    # every gap is > -1: all samples exit at t = 1 and only one step is computed
    assert int(res.steps_computed) == 1 and np.all(np.asarray(res.timesteps) == 1)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    _, layers = model(test["frames"][:1])
    np.testing.assert_allclose(res.spikes, [float(s.sum()) for s, _ in layers], rtol=1e-6)
    never = anytime.run_topk(graphdef, state.params, state.batch_stats, test["frames"], jnp.full(T, jnp.inf))
    assert int(never.steps_computed) == T and np.all(np.asarray(never.timesteps) == T)


def test_anytime_bad_beta(trained):
    graphdef, state, _, test = trained
    with pytest.raises(ValueError, match=r"beta must have shape \(T,\) = \(6,\)"):
        anytime.run_topk(graphdef, state.params, state.batch_stats, test["frames"], jnp.zeros(5))
