"""Rematerialisation (``model.remat``): the same loss and gradients, fewer temporaries, same interface."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from aoi_jax import config, models, regularisers, step, xla_tuning


def setup(remat, activation="lif", tebn_steps=0):
    neuron = config.NeuronConfig(**models.IF_NEURON) if activation != "lif" else config.NeuronConfig()
    cfg = config.Config(model=config.ModelConfig(channels=(8, 16), num_classes=3, remat=remat, neuron=neuron,
                                                 activation=activation, tebn_steps=tebn_steps),
                        reg=config.RegConfig(alpha=0.5), optim=config.OptimConfig(lr=0.05))
    model = models.build(cfg.model, (16, 16, 2), rngs=nnx.Rngs(0))
    opt = step.make_optimizer(cfg.optim, 10)
    graphdef, state = step.init_state(model, opt)
    return cfg, graphdef, state, opt


def batch(T=6, N=8):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, N)
    frames = rng.poisson(0.3, (T, N, 16, 16, 2)).astype(np.float32)
    frames[:, np.arange(N), labels * 4, labels * 4, 0] += 4.0
    return {"frames": frames, "label": labels.astype(np.int32)}


@pytest.mark.parametrize("activation,tebn", [("lif", 0), ("lif", 6), ("qcfs", 0)])
def test_remat_gives_the_same_outputs_loss_and_gradients(activation, tebn, key):
    """Recomputation repeats the same float32 ops: the model's outputs (logits, every layer's spikes and
    membranes, with calibration dropout), the loss, the gradients and the BatchNorm statistics agree to
    1e-6 (absolute; gradients are O(0.1)); spikes are recomputed from the same inputs, so none flips."""
    b = batch(T=1) if activation == "qcfs" else batch()
    objective = step.loss_fn
    out = {}
    for remat in (False, True):
        cfg, graphdef, state, _ = setup(remat, activation, tebn)

        def run(p, s, k, cfg=cfg, g=graphdef):
            weights = step.loss_weights(cfg)
            grads = jax.value_and_grad(lambda p: objective(p, s, b, weights, graphdef=g, cfg=cfg), has_aux=True)(p)
            return grads, nnx.merge(g, p, s)(b["frames"], dropout=0.3, key=k)

        out[remat] = jax.jit(run)(state.params, state.batch_stats, key)
    ((l0, (bs0, m0)), g0), forward0 = out[False]
    ((l1, (bs1, m1)), g1), forward1 = out[True]
    np.testing.assert_allclose(l1, l0, atol=1e-6)
    assert float(m0["rcs"]) > 0 or activation == "qcfs"
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6), (g1, bs1), (g0, bs0))
    np.testing.assert_allclose(forward1[0], forward0[0], atol=1e-6)
    for (sa, ma), (sb, mb) in zip(forward1[1], forward0[1], strict=True):
        np.testing.assert_allclose(sa, sb, atol=1e-6)                 # lif spikes: 0/1, so equal
        np.testing.assert_allclose(ma, mb, atol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_layer_fn_equals_mapping_the_returned_layers(remat, key):
    """``model(x, layer_fn=f)`` returns ``f(s, m)`` per layer, computed inside the (rematerialised) forward:
    the same values and the same gradients (w.r.t. parameters) as applying f to the layers returned
    without it, the second code path."""
    cfg, graphdef, state, _ = setup(remat)
    b = batch()
    f = lambda s, m: regularisers.rcs_scores(s, m, vth=1.0, window=0.3)          # (N,) per layer

    def inside(p):
        _, scores = nnx.merge(graphdef, p, state.batch_stats, copy=True)(b["frames"], train=True, layer_fn=f)
        return jnp.stack(scores)

    def outside(p):
        _, layers = nnx.merge(graphdef, p, state.batch_stats, copy=True)(b["frames"], train=True)
        return jnp.stack([f(s, m) for s, m in layers])

    a, c = jax.jit(inside)(state.params), jax.jit(outside)(state.params)
    assert a.shape == (2, 8) and bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_allclose(a, c, rtol=1e-6)
    w = jnp.linspace(0.5, 1.5, a.size).reshape(a.shape)
    ga = jax.jit(jax.grad(lambda p: jnp.sum(w * inside(p))))(state.params)
    gc = jax.jit(jax.grad(lambda p: jnp.sum(w * outside(p))))(state.params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(gc)) > 1e-3
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), ga, gc)


def test_remat_keeps_only_each_layers_input_and_changes_nothing(key, capsys):
    """ResNet-20 (19 spiking layers): with remat the activations the backward pass keeps
    (``print_saved_residuals``: those of the folded (T*N, H, W, C) batch) are what the layers read, the
    input frames and each of the 18 first layers' output (the second layer of a block reads two, ``(o, h)``,
    both kept once), where the plain step keeps its conv, BatchNorm and cell intermediates. The loss and
    every gradient equal the plain step's."""
    rng = np.random.default_rng(1)
    b = {"frames": rng.poisson(0.5, (4, 4, 8, 8, 2)).astype(np.float32), "label": np.array([0, 1, 2, 0], np.int32)}
    out, kept = {}, {}
    for remat in (False, True):
        cfg = config.Config(model=config.ModelConfig(name="resnet20", channels=(), num_classes=3, remat=remat),
                            reg=config.RegConfig(alpha=0.5))
        model = models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(0))
        graphdef, state = step.init_state(model, step.make_optimizer(cfg.optim, 10))
        loss = lambda p, s=state, g=graphdef, cfg=cfg: step.loss_fn(p, s.batch_stats, b, step.loss_weights(cfg),
                                                                    graphdef=g, cfg=cfg)[0]
        out[remat] = jax.jit(jax.value_and_grad(loss))(state.params)
        print_saved_residuals(loss, state.params)
        kept[remat] = [r for r in (line.split()[0] for line in capsys.readouterr().out.splitlines())
                       if re.fullmatch(r"\w+\[16,\d+,\d+,\d+\]", r)]
    assert sorted(kept[True]) == sorted(["f32[16,8,8,2]"] + ["f32[16,8,8,16]"] * 7 + ["f32[16,4,4,32]"] * 6
                                        + ["f32[16,2,2,64]"] * 5), kept[True]
    assert kept[False].count("f32[16,8,8,16]") > 7
    np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(out[False][1])) > 1e-3
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), out[True][1], out[False][1])


def test_remat_step_needs_fewer_temporaries():
    """XLA's own accounting of the compiled train step (deterministic for a given jax): remat keeps each
    spiking layer's input instead of its conv, BatchNorm and cell intermediates, and really recomputes
    them: about one more forward pass of FLOPs. Both steps are compiled with the XLA:CPU options that
    remat needs (``xla_tuning.compiler_options``), so the scheduler's share counts for neither; on this tiny
    model inputs and parameters weigh more than activations (VGGSNN at T=40: ``benchmarks/memory.py``)."""
    temp, flops = {}, {}
    b = batch(T=16, N=16)
    options = xla_tuning.compiler_options("auto", remat=True, backend="cpu")
    for remat in (False, True):
        cfg, graphdef, state, opt = setup(remat)
        compiled = step.make_train_step(graphdef, cfg, opt, compiler_options=options).lower(
            state, b, step.loss_weights(cfg)).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
        flops[remat] = compiled.cost_analysis()["flops"]
    assert temp[True] < 0.85 * temp[False], temp
    assert flops[True] > 1.3 * flops[False], flops
