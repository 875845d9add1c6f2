"""Model shapes, the folded layout, calibration dropout, name resolution and the protocol for adding a model."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aoi_jax import config, models, neurons, step


def small(channels=(4, 8), **neuron):
    cfg = config.ModelConfig(name="small_snn", channels=channels, num_classes=5,
                             neuron=config.NeuronConfig(**neuron))
    return models.build(cfg, (12, 12, 2), rngs=nnx.Rngs(0))


def test_small_snn_shapes_and_layers(key):
    model = small()
    x = (jax.random.uniform(key, (6, 3, 12, 12, 2)) < 0.3).astype(jnp.float32)
    logits, layers = model(x)
    assert logits.shape == (6, 3, 5)
    assert [s.shape for s, _ in layers] == [(6, 3, 12, 12, 4), (6, 3, 6, 6, 8)]
    assert model.fan_out == (9 * 8, 5)


def test_folded_batch_equals_per_sample(key):
    """Samples are independent: running them one by one gives the same logits (eval-mode BN)."""
    model = small()
    x = (jax.random.uniform(key, (5, 3, 12, 12, 2)) < 0.3).astype(jnp.float32)
    full, _ = model(x)
    for n in range(3):
        one, _ = model(x[:, n:n + 1])
        np.testing.assert_allclose(one[:, 0], full[:, n], atol=1e-5)


def test_first_layer_is_lif_of_conv_bn(key):
    """The first layer's spikes equal neurons.lif applied to the first conv+BN of each frame."""
    model = small(tau=0.7, reset="soft")
    x = (jax.random.uniform(key, (4, 2, 12, 12, 2)) < 0.3).astype(jnp.float32)
    _, layers = model(x)
    u = jax.vmap(lambda f: model.norms[0](model.convs[0](f), use_running_average=True))(x)
    s, m = neurons.lif(u, tau=0.7, reset="soft")
    np.testing.assert_array_equal(layers[0][0], s)
    np.testing.assert_allclose(layers[0][1], m, atol=1e-5)


def test_dropout_is_seeded_and_scaled(key):
    model = small()
    x = (jax.random.uniform(key, (4, 2, 12, 12, 2)) < 0.5).astype(jnp.float32)
    a, _ = model(x, dropout=0.3, key=jax.random.key(1))
    b, _ = model(x, dropout=0.3, key=jax.random.key(1))
    c, _ = model(x, dropout=0.3, key=jax.random.key(2))
    d, _ = model(x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        model(x, dropout=0.3)


def test_inverted_dropout_keeps_mean():
    # input 5 > vth at every step: all spikes are 1, so dropout leaves 0 or 1 / (1 - p)
    h, (s, _) = models.spiking(jnp.full((2 * 4000, 1), 5.0), 2, config.NeuronConfig(), dropout=0.3,
                               key=jax.random.key(0))
    kept = np.asarray(h)
    assert np.all(s == 1)
    assert np.all(np.isclose(kept, 0.0) | np.isclose(kept, 1 / 0.7))
    assert abs(kept.mean() - 1.0) < 0.05  # 8000 Bernoulli(0.7) draws: std of the mean ~ 0.007


@pytest.mark.parametrize("name,shape,classes,flat", [
    ("vggsnn", (128, 128, 2), 10, 512 * 2 * 2),
    ("vggsnn", (180, 240, 2), 101, 512 * 2 * 3),
    ("gesture_snn", (128, 128, 2), 11, 512),
])
def test_reference_models_shapes(name, shape, classes, flat):
    cfg = config.ModelConfig(name=name, channels=(), num_classes=classes)
    model = models.build(cfg, shape, rngs=nnx.Rngs(0))
    assert model.head.in_features == flat
    out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((2, 1, *shape), jnp.float32))
    assert out[0].shape == (2, 1, classes)
    assert len(out[1]) == len(model.fan_out)


@pytest.mark.parametrize("shape", [(3, 6, 8, 2), (2, 5, 7, 3)])
def test_avg_pool_equals_nnx_avg_pool(shape, key):
    """The models' 2x2 average pool (a reshape and a mean) against ``nnx.avg_pool`` (a reduce_window),
    an odd last row / column dropped by both; the same for the gradient."""
    x = jax.random.normal(key, shape)
    ref = lambda x: nnx.avg_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_allclose(models.avg_pool(x), ref(x), rtol=1e-6, atol=1e-7)
    w = jax.random.normal(jax.random.fold_in(key, 1), ref(x).shape)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(w * models.avg_pool(x)))(x),
                               jax.grad(lambda x: jnp.sum(w * ref(x)))(x), rtol=1e-6, atol=1e-7)


def test_unknown_model_and_unused_channels():
    with pytest.raises(ValueError, match=r"unknown model.name 'resnet'; valid: \['gesture_snn'"):
        models.build(config.ModelConfig(name="resnet"), (34, 34, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.channels is only read by small_snn"):
        models.build(config.ModelConfig(name="vggsnn"), (128, 128, 2), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name,shape,neuron", [
    ("small_snn", (12, 12, 2), {}),
    ("small_snn", (12, 12, 2), {"tau": 1.0, "reset": "soft", "v0": 0.5}),
    ("gesture_snn", (128, 128, 2), {}),
])
def test_step_by_step_equals_multistep(name, shape, neuron, key):
    """reference-semantics.md section 2: single-step inference gives exactly the multistep spikes."""
    cfg = config.ModelConfig(name=name, channels=(4, 8) if name == "small_snn" else (), num_classes=5,
                             neuron=config.NeuronConfig(**neuron))
    model = models.build(cfg, shape, rngs=nnx.Rngs(0))
    x = (jax.random.uniform(key, (5, 2, *shape)) < 0.3).astype(jnp.float32) * 2.0
    logits, layers = model(x)
    v = model.init_membranes(x.shape[1:])
    assert all(np.all(np.asarray(m) == cfg.neuron.v0) for m in v)
    step = jax.jit(lambda v, f: model.step(v, f))
    for t in range(5):
        v, logit_t, counts = step(v, x[t])
        np.testing.assert_allclose(logit_t, logits[t], atol=1e-5)
        want = np.stack([np.asarray(s[t]).reshape(2, -1).sum(-1) for s, _ in layers])
        np.testing.assert_array_equal(counts, want)


def docstring_example(monkeypatch):
    """Runs the worked example of ``aoi_jax.models``' docstring (the code block that ends it) as written;
    its registration goes into a copy of ``MODELS`` that the test's end undoes. Returns its namespace."""
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))
    namespace = {}
    exec(textwrap.dedent(models.__doc__.rsplit("::\n", 1)[1]), namespace)
    return namespace


@pytest.mark.parametrize("remat", [False, True])
def test_docstring_example_model_trains_and_steps(remat, monkeypatch, rng):
    """The documented way to add an architecture works as documented: the example registers ``TinySNN``,
    ``models.build`` builds it by name, its fan_out is the documented (3*3*16, K) with one
    (spikes, membranes) pair per spiking layer; ``step.make_train_step`` trains it (with and without
    remat): on a separable toy batch (class c: a bright 2x2 patch at row 2c) the loss is finite and falls;
    the trained model's step-by-step path gives the multistep logits and spike counts."""
    example = docstring_example(monkeypatch)
    assert models.MODELS["tiny_snn"] is example["TinySNN"] and isinstance(example["model"], example["TinySNN"])
    cfg = config.Config(model=config.ModelConfig(name="tiny_snn", channels=(), num_classes=3, remat=remat),
                        optim=config.OptimConfig(lr=0.05, schedule="constant"))
    model = models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(0))
    assert type(model) is example["TinySNN"] and model.fan_out == (9 * 16, 3)

    T, N = 4, 12
    labels = np.arange(N) % 3
    frames = (rng.random((T, N, 8, 8, 2)) < 0.1).astype(np.float32)
    for n, c in enumerate(labels):
        frames[:, n, 2 * c:2 * c + 2, 2:4, 0] = 1.0
    batch = {"frames": frames, "label": labels.astype(np.int32)}
    opt = step.make_optimizer(cfg.optim, 10)
    graphdef, state = step.init_state(model, opt)
    train_step = step.make_train_step(graphdef, cfg, opt)
    losses = []
    for _ in range(8):
        state, metrics = train_step(state, batch, step.loss_weights(cfg))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses

    trained = nnx.merge(graphdef, state.params, state.batch_stats)
    logits, layers = trained(frames)
    assert [s.shape for s, _ in layers] == [(T, N, 8, 8, 8), (T, N, 4, 4, 16)]
    v = trained.init_membranes(frames.shape[1:])
    for t in range(T):
        v, logit_t, counts = trained.step(v, frames[t])
        np.testing.assert_allclose(logit_t, logits[t], atol=1e-5)
        np.testing.assert_array_equal(counts, [np.asarray(s[t]).reshape(N, -1).sum(-1) for s, _ in layers])


def test_forward_must_call_layer_once_per_fan_out_entry(monkeypatch):
    """``fan_out`` has one entry per ``layer`` call of ``forward``; a mismatch is an error naming both."""
    model = docstring_example(monkeypatch)["model"]
    model.fan_out = (9 * 16,)
    with pytest.raises(ValueError, match=r"TinySNN.forward calls layer 2 times, so fan_out needs 2 entries "
                                         r"\(one per spiking layer\), got 1"):
        model(jnp.zeros((2, 1, 8, 8, 2)))
