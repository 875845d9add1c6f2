"""QCFS activation (values and straight-through gradients by hand), the ANN form of RCS, the ANN step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aoi_jax import config, method, models, qcfs, regularisers, step

IF = config.NeuronConfig(tau=1.0, vth=1.0, reset="soft", v0=0.5)

# lam = 2, L = 4: a = 2 relu(x) + 0.5, q = floor(a) / 4, y = 2 clip(q, 0, 1)
X = [-1.0, 0.0, 0.2, 0.25, 0.3, 0.74, 0.76, 1.0, 1.9, 2.1, 2.5, 3.0]
Y = [0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
DY_DX = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]            # 1[x > 0] where q <= 1 (q = 1 included), else 0
DY_DLAM = [0, 0, -0.1, 0.125, 0.1, -0.12, 0.12, 0.0, 0.05, -0.05, 1, 1]   # q - relu(x) / lam, or 1 if clipped


def test_qcfs_values_by_hand():
    y = jax.jit(qcfs.qcfs, static_argnums=2)(jnp.asarray(X), jnp.float32(2.0), 4)
    np.testing.assert_array_equal(y, Y)


def test_qcfs_straight_through_gradients_by_hand():
    grad = jax.vmap(jax.grad(qcfs.qcfs, argnums=(0, 1)), in_axes=(0, None, None))
    dx, dlam = grad(jnp.asarray(X), jnp.float32(2.0), 4)
    np.testing.assert_array_equal(dx, DY_DX)
    np.testing.assert_allclose(dlam, DY_DLAM, atol=1e-6)


def test_floor_ste():
    a = jnp.asarray([-1.5, 0.2, 0.99, 3.0])
    np.testing.assert_array_equal(qcfs.floor_ste(a), [-2.0, 0.0, 0.0, 3.0])
    np.testing.assert_array_equal(jax.grad(lambda a: qcfs.floor_ste(a).sum())(a), np.ones(4))


def test_qcfs_matches_numpy_for_levels_8(key):
    x = jax.random.normal(key, (1000,)) * 3.0
    y = qcfs.qcfs(x, 1.7, 8)
    want = 1.7 * np.clip(np.floor(8 * np.maximum(np.asarray(x, np.float64), 0) / 1.7 + 0.5) / 8, 0, 1)
    np.testing.assert_allclose(y, want, atol=1e-6)
    assert len(np.unique(np.round(np.asarray(y) / 1.7 * 8))) == 9      # the L + 1 levels all occur
    with pytest.raises(ValueError, match="levels must be >= 1"):
        qcfs.qcfs(x, 1.0, 0)


def rcs_ann_reference(pre, logits, labels):
    """numpy transcription of the reference's RCSANN (per layer) and RCSANNLoss (assembly), T = 1."""
    scores = []
    for x in pre:
        xp = np.maximum(np.asarray(x, np.float64), 0.0)
        scores.append(xp.max() / np.sqrt((xp.reshape(len(xp), -1) ** 2).mean(-1) + 1e-5))
    mask = (np.asarray(logits)[0].argmax(-1) == labels).astype(np.float64)
    return np.mean([np.max(s * mask) for s in scores])


def test_ann_rcs_loss_matches_reference(key):
    """The QCFS method's RCS (``method.QCFS.layer_score`` of each layer's (activation, pre-activation) pair,
    then ``rcs_loss``, as ``step.loss_fn`` computes it) against the numpy transcription."""
    k1, k2, k3 = jax.random.split(key, 3)
    pre = [jax.random.normal(k1, (6, 4, 4, 3)), jax.random.normal(k2, (6, 5))]
    logits = jax.random.normal(k3, (1, 6, 3))
    labels = np.array([0, 1, 2, 0, 1, 2])
    score = method.QCFS.layer_score(config.Config())

    @jax.jit
    def ann_rcs(pre, logits, labels):
        return regularisers.rcs_loss(jnp.stack([score(None, x[None]) for x in pre]), logits, labels)

    np.testing.assert_allclose(ann_rcs(pre, logits, labels), rcs_ann_reference(pre, logits, labels), rtol=1e-5)


def test_rcs_ann_scores_gradient_flows_to_the_max_only():
    """d score[n] / d x = 1[x is the batch max] / sigma_n - max * x+ / (D sigma_n^3), no 0/0 under jit."""
    x = jnp.asarray([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]])
    g = jax.jit(jax.grad(lambda x: regularisers.rcs_ann_scores(x).sum()))(x)
    xp = np.maximum(np.asarray(x, np.float64), 0)
    sigma = np.sqrt((xp ** 2).mean(-1) + 1e-5)
    want = -3.0 * xp / (3 * sigma[:, None] ** 3) * (np.asarray(x) > 0)
    want[0, 2] += (1 / sigma).sum()
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def ann(levels=4, **kw):
    cfg = config.ModelConfig(name="small_snn", channels=(4, 8), num_classes=3, neuron=IF, activation="qcfs",
                             levels=levels, **kw)
    return cfg, models.build(cfg, (8, 8, 2), rngs=nnx.Rngs(0))


def test_qcfs_model_layers_and_thresholds(key):
    _, model = ann()
    np.testing.assert_array_equal(model.thresholds[...], [8.0, 8.0])
    x = jax.random.normal(key, (1, 5, 8, 8, 2))
    logits, layers = model(x, train=True)
    assert logits.shape == (1, 5, 3) and len(layers) == 2
    y, u = layers[0]
    assert y.shape == u.shape == (1, 5, 8, 8, 4)
    np.testing.assert_array_equal(y, qcfs.qcfs(u, 8.0, 4))        # layers hold (activation, pre-activation)
    with pytest.raises(ValueError, match="QCFS ANN .* convert it first"):
        model.step(None, x[0])


def test_ann_train_step_loss_and_update(key):
    mcfg, model = ann()
    cfg = config.Config(model=mcfg, reg=config.RegConfig(alpha=0.5))
    opt = step.make_optimizer(cfg.optim, 10)
    graphdef, state = step.init_state(model, opt)
    batch = {"frames": jax.random.normal(key, (1, 6, 8, 8, 2)), "label": jnp.asarray([0, 1, 2, 0, 1, 2])}
    # second code path: the loss from the model's outputs and the numpy RCS reference
    logits, layers = nnx.merge(graphdef, state.params, state.batch_stats, copy=True)(batch["frames"], train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[0], batch["label"]).mean()
    rcs = rcs_ann_reference([u[0] for _, u in layers], logits, np.asarray(batch["label"]))
    lam0 = np.asarray(state.params["thresholds"][...])
    new, metrics = step.make_train_step(graphdef, cfg, opt)(state, batch, step.loss_weights(cfg))
    np.testing.assert_allclose(metrics["rcs"], rcs, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ce + 0.5 * rcs, rtol=1e-5)
    assert int(new.step) == 1 and not np.allclose(new.params["thresholds"][...], lam0)   # lam is learnt
    with pytest.raises(ValueError, match=r"one static frame: frames must be \(1, N, H, W, C\)"):
        step.loss_fn(new.params, new.batch_stats, {**batch, "frames": jnp.tile(batch["frames"], (2, 1, 1, 1, 1))},
                         step.loss_weights(cfg), graphdef=graphdef, cfg=cfg)
