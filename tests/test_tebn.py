"""TEBN: BatchNorm statistics over (N, T, H, W) per channel, then a learnt scale p_t per time step."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aoi_jax import config, models, step

T = 3


def tebn_model(tebn_steps=T, **neuron):
    cfg = config.ModelConfig(name="small_snn", channels=(4, 8), num_classes=3, tebn_steps=tebn_steps,
                             neuron=config.NeuronConfig(**neuron))
    return cfg, models.build(cfg, (8, 8, 2), rngs=nnx.Rngs(0))


def frames_with_a_drift(key, N=5):
    """Each time step has its own offset, so per-step statistics would differ from pooled ones."""
    x = jax.random.normal(key, (T, N, 8, 8, 2))
    return x + jnp.asarray([0.0, 3.0, -2.0]).reshape(T, 1, 1, 1, 1)


def tebn_reference(u, gamma, beta, p, eps=1e-5):
    """numpy TEBN on u (T, N, H, W, C): statistics over (T, N, H, W) per channel, then p_t * y_t."""
    u = np.asarray(u, np.float64)
    mean, var = u.mean(axis=(0, 1, 2, 3)), u.var(axis=(0, 1, 2, 3))
    y = np.asarray(gamma) * (u - mean) / np.sqrt(var + eps) + np.asarray(beta)
    return y * np.asarray(p).reshape(-1, 1, 1, 1, 1), mean, var


def test_tebn_statistics_span_time_and_p_scales_each_step(key):
    """The first layer's input current, read back from a cell that never fires (IF, vth huge: membranes
    integrate it), equals the numpy TEBN of conv(x); the running statistics move towards the pooled
    (T, N, H, W) mean and variance, not any single step's."""
    _, model = tebn_model(tau=1.0, vth=1e9)
    bn = model.norms[0]
    assert isinstance(bn, models.TEBatchNorm) and bn.time_scale[...].shape == (T,)
    np.testing.assert_array_equal(bn.time_scale[...], np.ones(T))            # p_t initialised to 1
    bn.time_scale[...] = jnp.asarray([0.5, 2.0, 3.0])
    bn.scale[...] = jnp.asarray([1.0, 0.5, 2.0, 1.5])
    x = frames_with_a_drift(key)
    u = jax.vmap(model.convs[0])(x)                                           # conv output (T, N, 8, 8, 4)
    _, layers = model(x, train=True)
    current = np.diff(np.asarray(layers[0][1]), axis=0, prepend=0.0)         # m_t - m_{t-1} = input at t
    want, mean, var = tebn_reference(u, bn.scale[...], bn.bias[...], bn.time_scale[...])
    np.testing.assert_allclose(current, want, atol=1e-4)
    # running averages after one step (momentum 0.9, initial 0 and 1): pooled (biased) batch statistics
    np.testing.assert_allclose(bn.mean[...], 0.1 * mean, atol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var, rtol=1e-5)
    per_step = np.asarray(u, np.float64).mean(axis=(1, 2, 3))                # (T, C): what per-step BN would use
    assert np.abs(per_step - mean).max() > 0.5


def test_p_t_is_learnt_per_timestep(key):
    cfg, model = tebn_model()
    full = config.Config(model=cfg)
    graphdef, state = step.init_state(model, step.make_optimizer(full.optim, 10))
    batch = {"frames": frames_with_a_drift(key, N=6), "label": jnp.asarray([0, 1, 2, 0, 1, 2])}
    grads, _ = jax.jit(jax.grad(functools.partial(step.loss_fn, graphdef=graphdef, cfg=full), has_aux=True))(
        state.params, state.batch_stats, batch, step.loss_weights(full))
    g = np.asarray(grads["norms"][0]["time_scale"][...])
    assert g.shape == (T,) and len(np.unique(g)) == T                         # one free scale per step


def test_tebn_step_by_step_needs_t_and_matches_multistep(key):
    _, model = tebn_model()
    model.norms[1].time_scale[...] = jnp.asarray([1.0, 1.7, 0.6])
    x = frames_with_a_drift(key) * 2.0
    logits, _ = model(x)
    v = model.init_membranes(x.shape[1:])
    for t in range(T):
        v, logit_t, _ = model.step(v, x[t], t)
        np.testing.assert_allclose(logit_t, logits[t], atol=1e-5)
    with pytest.raises(ValueError, match="give T .folded batch. or t .one step."):
        model.step(v, x[0])
    with pytest.raises(ValueError, match=r"3 per-timestep scales \(model.tebn_steps\) but the input has T = 2"):
        model(x[:2])


def test_tebn_step_takes_one_t_per_sample(key):
    """Continuous batching: samples at different steps in one batch, t (N,); row n equals row n of the
    batch's step at the scalar t[n] (the scale p_t multiplies each sample's rows by its own p_t)."""
    _, model = tebn_model()
    model.norms[0].time_scale[...] = jnp.asarray([0.5, 1.7, 3.0])
    model.norms[1].time_scale[...] = jnp.asarray([1.0, 0.6, 2.0])
    frame = frames_with_a_drift(key)[1] * 2.0                                 # (N, 8, 8, 2), N = 5
    v = tuple(m + 0.3 for m in model.init_membranes(frame.shape))
    t = jnp.asarray([2, 0, 1, 1, 2])
    new, logits, counts = model.step(v, frame, t)
    for n in range(5):
        at_t = model.step(v, frame, int(t[n]))
        np.testing.assert_array_equal(logits[n], at_t[1][n])
        np.testing.assert_array_equal(counts[:, n], at_t[2][:, n])
        for m, m_at_t in zip(new, at_t[0]):
            np.testing.assert_array_equal(m[n], m_at_t[n])


def test_tebn_config_checks():
    with pytest.raises(ValueError, match="tebn_steps must be >= 0"):
        config.ModelConfig(tebn_steps=-1)
    cfg = config.ModelConfig(name="small_snn", channels=(4,), num_classes=3, tebn_steps=2, activation="qcfs",
                             neuron=config.NeuronConfig(tau=1.0, reset="soft", v0=0.5))
    with pytest.raises(ValueError, match="tebn_steps is for directly trained SNNs"):
        models.build(cfg, (8, 8, 2), rngs=nnx.Rngs(0))
    _, plain = tebn_model(tebn_steps=0)
    assert type(plain.norms[0]) is nnx.BatchNorm                              # off: the same modules as before
