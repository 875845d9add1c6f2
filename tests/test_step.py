"""The regularised train step: it learns, it compiles once, its optimiser matches the recipe."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aoi_jax import config, models, step


def setup(alpha=0.002, loss="mean", optim="sgd", lr=0.05):
    cfg = config.Config(model=config.ModelConfig(channels=(4, 8), num_classes=3),
                        reg=config.RegConfig(alpha=alpha), train=config.TrainConfig(loss=loss),
                        optim=config.OptimConfig(name=optim, lr=lr, schedule="constant"))
    model = models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(0))
    opt = step.make_optimizer(cfg.optim, 100)
    graphdef, state = step.init_state(model, opt)
    return cfg, graphdef, state, opt


def fixed_batch(seed=0, T=4, N=12):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, N)
    frames = rng.poisson(0.2, (T, N, 8, 8, 2)).astype(np.float32)
    frames[:, np.arange(N), labels * 2, labels * 2, 0] += 3.0   # a class-dependent hot pixel
    return {"frames": jnp.asarray(frames), "label": jnp.asarray(labels, jnp.int32)}


def loss_at(state, batch, graphdef, cfg):
    loss = jax.jit(functools.partial(step.loss_fn, graphdef=graphdef, cfg=cfg))
    return float(loss(state.params, state.batch_stats, batch, step.loss_weights(cfg))[0])


@pytest.mark.parametrize("loss,optim", [("mean", "sgd"), ("tet", "sgd"), ("mean", "adamw")])
def test_one_step_lowers_the_loss(loss, optim):
    cfg, graphdef, state, opt = setup(loss=loss, optim=optim, lr=0.05 if optim == "sgd" else 3e-3)
    batch = fixed_batch()
    train_step = step.make_train_step(graphdef, cfg, opt)
    before = loss_at(state, batch, graphdef, cfg)
    new_state, metrics = train_step(state, batch, step.loss_weights(cfg))
    np.testing.assert_allclose(float(metrics["loss"]), before, rtol=1e-5)
    assert loss_at(new_state, batch, graphdef, cfg) < before
    assert int(new_state.step) == 1


def test_train_step_compiles_once():
    cfg, graphdef, state, opt = setup()
    train_step = step.make_train_step(graphdef, cfg, opt)
    for seed in range(3):
        state, _ = train_step(state, fixed_batch(seed), step.loss_weights(cfg))
    assert train_step._cache_size() == 1


def test_rcs_term_is_in_the_loss_and_gradient():
    batch = fixed_batch()
    cfg0, graphdef, state, _ = setup(alpha=0.0)
    cfg1 = dataclasses.replace(cfg0, reg=config.RegConfig(alpha=0.5))
    (l0, (_, m0)), g0, (l1, (_, m1)), g1 = (             # one compiled program each, not op-by-op dispatch
        x for c in (cfg0, cfg1) for x in jax.jit(jax.value_and_grad(
            functools.partial(step.loss_fn, graphdef=graphdef, cfg=c), has_aux=True))(
                state.params, state.batch_stats, batch, step.loss_weights(c)))
    np.testing.assert_allclose(float(l1), float(m1["task"]) + 0.5 * float(m1["rcs"]), rtol=1e-6)
    np.testing.assert_allclose(float(l0), float(m0["task"]), rtol=1e-6)
    if float(m1["rcs"]) > 0:   # some sample qualifies: the regulariser must move the gradient
        diff = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), g0, g1))
        assert max(float(d) for d in diff) > 0


def test_batch_stats_are_updated():
    cfg, graphdef, state, opt = setup()
    before = [np.array(x) for x in jax.tree.leaves(state.batch_stats)]   # the step donates its input
    new_state, _ = step.make_train_step(graphdef, cfg, opt)(state, fixed_batch(), step.loss_weights(cfg))
    after = jax.tree.leaves(new_state.batch_stats)
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_sgd_matches_pytorch_formula():
    """One SGD step: p <- p - lr (g + wd p) (momentum buffer starts at g + wd p, as in PyTorch)."""
    cfg = config.OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    opt = step.make_optimizer(cfg, total_steps=10)
    p, g = jnp.array([2.0, -1.0]), jnp.array([0.5, 0.25])
    s = opt.init(p)
    u1, s = opt.update(g, s, p)
    p1 = optax.apply_updates(p, u1)
    np.testing.assert_allclose(p1, p - 0.1 * (g + 5e-4 * p), rtol=1e-6)
    u2, _ = opt.update(g, s, p1)                      # second step: cosine lr at step 1, momentum
    lr1 = 0.1 * 0.5 * (1 + np.cos(np.pi * 1 / 10))
    buf = 0.9 * (g + 5e-4 * p) + (g + 5e-4 * p1)
    np.testing.assert_allclose(optax.apply_updates(p1, u2), p1 - lr1 * buf, rtol=1e-6)


def test_eval_step_spike_counts(key):
    cfg, graphdef, state, _ = setup()
    batch = fixed_batch()
    logits, counts = step.make_eval_step(graphdef)(state.params, state.batch_stats, batch["frames"], key)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    _, layers = model(batch["frames"])
    assert logits.shape == (4, 12, 3) and counts.shape == (2, 4, 12)
    np.testing.assert_allclose(counts[1], np.asarray(layers[1][0]).reshape(4, 12, -1).sum(-1))
