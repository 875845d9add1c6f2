"""ANN-to-SNN conversion: the IF cell by hand, exactness at T = L, convergence over T on a trained ANN,
the SpikingNet interface of the converted SNN, the new architectures in all three forms."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aoi_jax import config, convert, models, neurons, step

IF = config.NeuronConfig(tau=1.0, vth=1.0, reset="soft", v0=0.5)


def if_reference(x, lam, v0_fraction=0.5):
    """IF neuron of threshold lam, line by line in float64: v_0 = lam / 2, h = v + x, s = 1[h > lam],
    v = h - lam s (soft reset). Returns (lam * s, v) over time."""
    v, out, mem = np.full(x.shape[1:], v0_fraction * lam, np.float64), [], []
    for x_t in np.asarray(x, np.float64):
        h = v + x_t
        s = (h > lam) * 1.0
        v = h - lam * s
        out.append(lam * s)
        mem.append(v)
    return np.stack(out), np.stack(mem)


def test_if_cell_by_hand():
    """lam = 2, v_0 = 1, inputs 1.5, 1.5, 0.2, 3, 0 (h = 2.0 at t = 1 is not above lam: no spike)::

        t   h     s   v after reset     output lam * s
        0   2.5   1   0.5               2
        1   2.0   0   2.0               0
        2   2.2   1   0.2               2
        3   3.2   1   1.2               2
        4   1.2   0   1.2               0

    The scaled cell (lif on x / lam with vth 1, v0 0.5, times lam) gives the same spikes, membranes / lam.
    """
    lam = 2.0
    x = jnp.asarray([1.5, 1.5, 0.2, 3.0, 0.0])[:, None]
    s, m = neurons.lif(x / lam, tau=1.0, vth=1.0, reset="soft", v0=0.5)
    np.testing.assert_array_equal(lam * s[:, 0], [2, 0, 2, 2, 0])
    np.testing.assert_allclose(lam * m[:, 0], [0.5, 2.0, 0.2, 1.2, 1.2], atol=1e-6)
    out, v = if_reference(np.asarray(x), lam)
    np.testing.assert_array_equal(lam * s, out)
    np.testing.assert_allclose(lam * m, v, atol=1e-6)


def qcfs_cfg(name="small_snn", levels=4, channels=(4, 8), classes=3):
    return config.ModelConfig(name=name, channels=channels, num_classes=classes, neuron=IF, activation="qcfs",
                              levels=levels)


def test_converted_first_layer_is_the_if_reference(key):
    """The converted model's first layer is an IF neuron of threshold lam_0 on conv+BN (powers of two keep
    u / lam exact, so spikes compare exactly with the unscaled float64 reference)."""
    cfg = qcfs_cfg()
    ann = models.build(cfg, (8, 8, 2), rngs=nnx.Rngs(0))
    ann.thresholds[...] = jnp.asarray([0.5, 4.0])
    _, params, stats = nnx.split(ann, nnx.Param, nnx.BatchStat)
    _, graphdef, params, stats = convert.convert(cfg, (8, 8, 2), params, stats)
    snn = nnx.merge(graphdef, params, stats)
    x = jax.random.normal(key, (6, 3, 8, 8, 2))
    _, layers = snn(x)
    u = jax.vmap(lambda f: snn.norms[0](snn.convs[0](f), use_running_average=True))(x)
    out, v = if_reference(np.asarray(u), 0.5)
    np.testing.assert_array_equal(0.5 * np.asarray(layers[0][0]), out)
    np.testing.assert_allclose(0.5 * np.asarray(layers[0][1]), v, atol=1e-5)


def test_if_layer_at_t_equals_l_is_the_qcfs_activation(key):
    """On a constant input, T steps of the IF neuron (v_0 = lam / 2, soft reset) emit
    clip(floor(T relu(x) / lam + 0.5), 0, T) spikes: at T = L the first layer's time-averaged output is
    the ANN's QCFS activation."""
    cfg = qcfs_cfg(levels=4)
    ann = models.build(cfg, (8, 8, 2), rngs=nnx.Rngs(0))
    ann.thresholds[...] = jnp.asarray([1.5, 8.0])
    x = jax.random.normal(key, (1, 16, 8, 8, 2)) * 2.0
    _, ann_layers = ann(x)
    snn_cfg, graphdef, params, stats = convert.convert(cfg, (8, 8, 2), *nnx.split(ann, nnx.Param, nnx.BatchStat)[1:])
    _, layers = nnx.merge(graphdef, params, stats)(jnp.broadcast_to(x, (4, *x.shape[1:])))
    np.testing.assert_allclose(1.5 * np.asarray(layers[0][0]).mean(0), ann_layers[0][0][0], atol=1e-6)
    assert snn_cfg == dataclasses.replace(cfg, activation="if")


def quadrants(n, rng, size=16):
    """4 classes: a bright square in one quadrant of noisy 2-channel images."""
    y = rng.integers(0, 4, n)
    x = rng.normal(0.0, 0.5, (n, size, size, 2)).astype(np.float32)
    h = size // 2
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, r * h:(r + 1) * h, q * h:(q + 1) * h] += 0.7
    return x, y


@pytest.fixture(scope="module")
def trained_ann():
    """A 3-layer QCFS ANN (L = 4) trained briefly with the jitted ANN step, RCS on (alpha 0.002)."""
    rng = np.random.default_rng(0)
    x, y = quadrants(512, rng)
    mcfg = qcfs_cfg(channels=(8, 16, 16), classes=4)
    cfg = config.Config(model=mcfg, reg=config.RegConfig(alpha=0.002), optim=config.OptimConfig(lr=0.05))
    opt = step.make_optimizer(cfg.optim, 120)
    graphdef, state = step.init_state(models.build(mcfg, (16, 16, 2), rngs=nnx.Rngs(0)), opt)
    train = step.make_train_step(graphdef, cfg, opt)
    for _ in range(120):
        idx = rng.integers(0, len(y), 64)
        state, metrics = train(state, {"frames": jnp.asarray(x[idx])[None], "label": jnp.asarray(y[idx])},
                               step.loss_weights(cfg))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["accuracy"]) > 0.9
    return mcfg, graphdef, state, x[:128], y[:128]


def rel_error(a, b):
    return float(np.abs(a - b).mean() / np.abs(b).mean())


def test_snn_approaches_the_ann_as_t_grows(trained_ann):
    """The converted SNN's time-averaged logits over T = 4, 8, 16, 32 on a fixed batch.

    As T grows each IF layer's rate tends to lam clip(relu(x) / lam, 0, 1), the QCFS activation without
    its quantisation (L -> infinity; first layer exactly: T-level quantisation). Measured against that
    network (the same weights, L = 2^16) the relative error falls monotonically, to < 0.03 at T = 32
    (measured 0.014). Against the quantised (L = 4) ANN itself the error levels off at the quantisation
    gap between the two ANNs, so there the test asks that the SNN predicts as the ANN does: on >= 98% of
    the batch at every T >= L (measured 100%).
    """
    mcfg, ann_graphdef, state, x, _ = trained_ann
    quant = np.asarray(nnx.merge(ann_graphdef, state.params, state.batch_stats)(x[None])[0][0])
    fine_graphdef = nnx.split(nnx.eval_shape(lambda: models.build(
        dataclasses.replace(mcfg, levels=2 ** 16), (16, 16, 2), rngs=nnx.Rngs(0))), nnx.Param, nnx.BatchStat)[0]
    clip = np.asarray(nnx.merge(fine_graphdef, state.params, state.batch_stats)(x[None])[0][0])
    _, graphdef, params, stats = convert.convert(mcfg, (16, 16, 2), state.params, state.batch_stats)
    run = jax.jit(lambda frames: nnx.merge(graphdef, params, stats)(frames)[0])
    errors = []
    for T in (4, 8, 16, 32):
        avg = np.asarray(run(jnp.broadcast_to(x[None], (T, *x.shape))).mean(0))
        errors.append(rel_error(avg, clip))
        assert np.mean(avg.argmax(-1) == quant.argmax(-1)) >= 0.98, T
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.03, errors


def test_converted_snn_step_by_step_equals_multistep(trained_ann, key):
    """The anytime loop's path: init_membranes (v0 = 0.5 in units of lam) and step give __call__'s logits."""
    mcfg, _, state, x, _ = trained_ann
    _, graphdef, params, stats = convert.convert(mcfg, (16, 16, 2), state.params, state.batch_stats)
    snn = nnx.merge(graphdef, params, stats)
    frames = jnp.broadcast_to(x[None, :4], (5, 4, *x.shape[1:]))
    logits, layers = snn(frames)
    v = snn.init_membranes(frames.shape[1:])
    assert len(v) == len(snn.fan_out) == 3 and all(np.all(np.asarray(m) == 0.5) for m in v)
    one = jax.jit(lambda v, f: snn.step(v, f))
    for t in range(5):
        v, logit_t, counts = one(v, frames[t])
        np.testing.assert_allclose(logit_t, logits[t], atol=1e-4)
        np.testing.assert_array_equal(counts, [np.asarray(s[t]).reshape(4, -1).sum(-1) for s, _ in layers])


def test_convert_refuses_what_does_not_convert():
    lif = config.ModelConfig(name="small_snn", channels=(4,), num_classes=3)
    with pytest.raises(ValueError, match="only a QCFS ANN"):
        convert.snn_config(lif)
    cfg = qcfs_cfg()
    ann = models.build(cfg, (8, 8, 2), rngs=nnx.Rngs(0))
    _, params, stats = nnx.split(ann, nnx.Param, nnx.BatchStat)
    with pytest.raises(ValueError, match="do not fit small_snn with input"):
        convert.convert(cfg, (12, 12, 2), params, stats)
    ann.thresholds[...] = jnp.asarray([1.0, -0.5])
    with pytest.raises(ValueError, match=r"thresholds must be positive.*-0.5"):
        convert.convert(cfg, (8, 8, 2), *nnx.split(ann, nnx.Param, nnx.BatchStat)[1:])
    with pytest.raises(ValueError, match="max pooling, which has no IF equivalent"):
        models.build(dataclasses.replace(cfg, name="gesture_snn", channels=()), (128, 128, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model.neuron needs .*'tau': 1.0.*got \{'tau': 0.5"):
        models.build(dataclasses.replace(cfg, neuron=config.NeuronConfig(reset="soft")), (8, 8, 2),
                     rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.activation must be one of"):
        config.ModelConfig(activation="relu")


@pytest.mark.parametrize("name,layers,params", [("resnet18", 17, 11_173_962), ("resnet20", 19, 272_474),
                                                ("vgg16", 15, 33_646_666)])
@pytest.mark.parametrize("activation", ["lif", "qcfs", "if"])
def test_cifar_models_in_three_forms(name, layers, params, activation):
    """Each CIFAR architecture as a LIF SNN, a QCFS ANN and a converted IF SNN: shapes only (traced)."""
    neuron = config.NeuronConfig() if activation == "lif" else IF
    cfg = config.ModelConfig(name=name, channels=(), num_classes=10, neuron=neuron, activation=activation)
    graphdef, p, rest = nnx.split(nnx.eval_shape(lambda: models.build(cfg, (32, 32, 3), rngs=nnx.Rngs(0))),
                                  nnx.Param, ...)
    logits, out = jax.eval_shape(lambda p, r, x: nnx.merge(graphdef, p, r)(x), p, rest,
                                 jax.ShapeDtypeStruct((2, 3, 32, 32, 3), jnp.float32))
    model = nnx.merge(graphdef, p, rest)
    assert logits.shape == (2, 3, 10) and len(out) == len(model.fan_out) == layers
    n_thresholds = 0 if activation == "lif" else layers
    assert sum(x.size for x in jax.tree.leaves(p)) == params + n_thresholds


def test_resnet_converted_step_equals_multistep(key):
    """Residual additions convert too: a converted ResNet-20 runs step by step as it runs multistep."""
    cfg = qcfs_cfg(name="resnet20", channels=(), classes=5)
    ann = models.build(cfg, (8, 8, 3), rngs=nnx.Rngs(0))
    ann.thresholds[...] = jnp.linspace(0.5, 2.0, len(ann.fan_out))
    _, graphdef, params, stats = convert.convert(cfg, (8, 8, 3), *nnx.split(ann, nnx.Param, nnx.BatchStat)[1:])
    snn = nnx.merge(graphdef, params, stats)
    frames = jnp.broadcast_to(jax.random.normal(key, (1, 2, 8, 8, 3)), (3, 2, 8, 8, 3))
    logits, layers = jax.jit(functools.partial(snn.__call__))(frames)
    assert sum(float(s.sum()) for s, _ in layers) > 0
    v = snn.init_membranes(frames.shape[1:])
    one = jax.jit(lambda v, f: snn.step(v, f))
    for t in range(3):
        v, logit_t, _ = one(v, frames[t])
        np.testing.assert_allclose(logit_t, logits[t], atol=1e-4)
