"""Model shapes, the folded layout, calibration dropout, name resolution and the protocol for adding a model
(README.md's example, run as written)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aoi_jax import anytime, config, cutoff, models, neurons, step


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
    # all spikes 1 (an input of 5 > vth at every step): dropout leaves 0 or 1 / (1 - p)
    s, _ = neurons.lif(jnp.full((2, 4000, 1), 5.0))
    kept = np.asarray(models.dropout(s, 0.3, jax.random.key(0)))
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
    """docs/semantics.md section 2: single-step inference gives exactly the multistep spikes."""
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


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- new-model example: tests/test_models.py executes the next block -->"


def readme_example(monkeypatch):
    """Runs the README's new-model example (the fenced block after ``MARKER``) as written; its registration
    goes into a copy of ``MODELS`` that the test's end undoes. Returns its namespace."""
    text = README.read_text()
    assert text.count(MARKER) == 1, "README.md must hold the new-model example once, after its marker"
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER)[1], re.S)
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))
    namespace = {}
    exec(block.group(1), namespace)
    return namespace


def toy_batch(rng, T=4, N=12):
    """A separable toy batch: class c has a bright 2x2 patch at row 2c."""
    labels = np.arange(N) % 3
    frames = (rng.random((T, N, 8, 8, 2)) < 0.1).astype(np.float32)
    for n, c in enumerate(labels):
        frames[:, n, 2 * c:2 * c + 2, 2:4, 0] = 1.0
    return {"frames": frames, "label": labels.astype(np.int32)}


@pytest.mark.parametrize("remat", [False, True])
def test_readme_example_model_trains_and_steps(remat, monkeypatch, rng):
    """The documented way to add an architecture works as documented: the example registers ``TinySNN``,
    ``models.build`` builds it by name, its fan_out is the documented (3*3*16, K) with one
    (spikes, membranes) pair per spiking layer; ``step.make_train_step`` trains it (with and without
    remat): on a separable toy batch the loss is finite and falls; the trained model's step-by-step path
    gives the multistep logits and spike counts."""
    example = readme_example(monkeypatch)
    assert models.MODELS["tiny_snn"] is example["TinySNN"] and isinstance(example["model"], example["TinySNN"])
    assert example["model"].remat
    cfg = config.Config(model=config.ModelConfig(name="tiny_snn", channels=(), num_classes=3, remat=remat),
                        optim=config.OptimConfig(lr=0.05, schedule="constant"))
    model = models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(0))
    assert type(model) is example["TinySNN"] and model.fan_out == (9 * 16, 3)

    T, N = 4, 12
    batch = toy_batch(rng, T, N)
    frames = batch["frames"]
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


def test_readme_example_remat_gives_equal_gradients_and_serves(monkeypatch, rng):
    """The README's model (natural NNX, closures over ``self``): one train step's loss and gradients with
    remat on equal those with remat off (the same float32 ops recomputed), and ``anytime.serve`` on it gives
    ``cutoff.apply_topk`` of its multistep logits, predictions and exit steps alike."""
    readme_example(monkeypatch)
    batch = toy_batch(rng)
    out = {}
    for remat in (False, True):
        cfg = config.Config(model=config.ModelConfig(name="tiny_snn", channels=(), num_classes=3, remat=remat),
                            reg=config.RegConfig(alpha=0.5))
        graphdef, state = step.init_state(models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(0)),
                                          step.make_optimizer(cfg.optim, 10))
        loss = lambda p, s=state, g=graphdef, cfg=cfg: step.loss_fn(p, s.batch_stats, batch, step.loss_weights(cfg),
                                                                    graphdef=g, cfg=cfg)
        out[remat] = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)
    (l0, (bs0, _)), g0 = out[False]
    (l1, (bs1, _)), g1 = out[True]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), (g1, bs1), (g0, bs0))

    logits, _ = step.make_eval_step(graphdef)(state.params, state.batch_stats, batch["frames"], jax.random.key(0))
    cum = cutoff.cumulative(logits)
    beta = cutoff.calibrate_topk(cum, batch["label"], 0.2)
    served = anytime.serve(graphdef, state.params, state.batch_stats, jnp.swapaxes(batch["frames"], 0, 1), beta,
                           fires=cutoff.topk_fires, slots=3)
    want_pred, want_t = cutoff.apply_topk(cum, beta)
    np.testing.assert_array_equal(served.predictions, want_pred)
    np.testing.assert_array_equal(served.timesteps, want_t)


def test_forward_must_return_one_record_per_fan_out_entry(monkeypatch):
    """``fan_out`` has one entry per spiking layer ``forward`` runs; a mismatch is an error naming both."""
    model = readme_example(monkeypatch)["model"]
    model.fan_out = (9 * 16,)
    with pytest.raises(ValueError, match=r"TinySNN.forward returns 2 spiking layers' records, so fan_out needs 2 "
                                         r"entries \(one per spiking layer\), got 1"):
        model(jnp.zeros((2, 1, 8, 8, 2)))


def test_a_spiking_layer_owns_its_modules():
    """A closure as ``pre`` would keep the modules of the model it was built in: refused, with what to do."""
    cfg = config.ModelConfig(channels=(), num_classes=3)
    conv = nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"pre must be an nnx.Module owning its modules \(e.g. nnx.Sequential"):
        models.SpikingLayer(lambda x: conv(x), cfg, 4, rngs=nnx.Rngs(0))
