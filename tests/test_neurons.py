"""The surrogate spike and the LIF cell against hand-unrolled references (docs/semantics.md s. 2)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from aoi_jax import config, neurons, surrogate


def lif_reference(x, tau=0.5, vth=1.0, reset="hard", v0=0.0):
    """float64 numpy, line by line from the spec."""
    v, out = np.full(x.shape[1:], v0, np.float64), []
    for x_t in x.astype(np.float64):
        h = v + x_t
        s = (h > vth) * 1.0
        m = h * (1 - s) if reset == "hard" else h - vth * s
        v = tau * m
        out.append((s, m))
    return tuple(np.stack(a) for a in zip(*out))


@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("tau,vth,v0", [(0.5, 1.0, 0.0), (1.0, 0.7, 0.35), (0.9, 1.5, 0.2)])
def test_lif_matches_reference(reset, tau, vth, v0, key):
    x = jax.random.normal(key, (10, 4, 3)) + 0.8
    s, m = jax.jit(functools.partial(neurons.lif, tau=tau, vth=vth, reset=reset, v0=v0))(x)
    s_ref, m_ref = lif_reference(np.asarray(x), tau=tau, vth=vth, reset=reset, v0=v0)
    assert s_ref.sum() > 0 and (1 - s_ref).sum() > 0  # the case exercises both branches
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_allclose(m, m_ref, atol=1e-6)


def test_lif_hand_computed():
    # x = 0.6 each step, tau 0.5, vth 1, hard reset: h = 0.6, 0.9, 1.05 (spike) -> m = 0, then 0.6 ...
    x = jnp.full((4, 1), 0.6)
    s, m = neurons.lif(x)
    np.testing.assert_array_equal(s[:, 0], [0, 0, 1, 0])
    np.testing.assert_allclose(m[:, 0], [0.6, 0.9, 0.0, 0.6], atol=1e-6)
    s, m = neurons.lif(x, reset="soft")  # 1.05 - 1 = 0.05; next h = 0.025 + 0.6
    np.testing.assert_allclose(m[:, 0], [0.6, 0.9, 0.05, 0.625], atol=1e-6)


def test_threshold_is_strict():
    s, m = neurons.lif(jnp.array([[1.0], [0.5]]))  # h = 1.0 == vth: no spike; then 0.5 + 0.5 = 1.0 again
    np.testing.assert_array_equal(s[:, 0], [0, 0])


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_lif_step_iterated_equals_lif(reset, key):
    x = jax.random.normal(key, (12, 3, 5)) + 0.7
    step = jax.jit(functools.partial(neurons.lif_step, reset=reset, tau=0.8))
    v, spikes, mems = jnp.zeros(x.shape[1:]), [], []
    for x_t in x:
        v, s, m = step(v, x_t)
        spikes.append(s)
        mems.append(m)
    s_all, m_all = neurons.lif(x, reset=reset, tau=0.8)
    np.testing.assert_array_equal(jnp.stack(spikes), s_all)
    np.testing.assert_allclose(jnp.stack(mems), m_all, atol=1e-6)


def test_bad_reset_raises():
    with pytest.raises(ValueError, match="reset must be one of"):
        neurons.lif(jnp.zeros((2, 1)), reset="zero")
    with pytest.raises(ValueError, match=r"\(T, N, \.\.\.\)"):
        neurons.lif(jnp.zeros((3,)))


@pytest.mark.parametrize("width", [1.0, 0.5, 2.0])
def test_spike_gradient_is_triangle(width):
    u = jnp.linspace(-3, 3, 61)
    grad = jax.vmap(jax.grad(lambda u: surrogate.spike(u, width)))(u)
    expected = np.maximum(0.0, width - np.abs(np.asarray(u))) / width ** 2
    np.testing.assert_allclose(grad, expected, atol=1e-6)
    np.testing.assert_array_equal(surrogate.spike(u, width), (np.asarray(u) > 0) * 1.0)


@pytest.mark.parametrize("shape,formula", [
    ("sigmoid", lambda u: 4 * np.exp(-4 * u) / (1 + np.exp(-4 * u)) ** 2),
    ("arctan", lambda u: 1.0 / (1 + (np.pi * u) ** 2)),
])
def test_other_surrogates(shape, formula):
    u = jnp.linspace(-2, 2, 41)
    grad = jax.vmap(jax.grad(lambda u: surrogate.spike(u, 1.0, shape)))(u)
    np.testing.assert_allclose(grad, formula(np.asarray(u, np.float64)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown surrogate shape 'relu'"):
        surrogate.spike(u, 1.0, "relu")


def test_gradient_flows_through_reset_and_leak():
    """d m_1 / d x_0 is nonzero only because the reset and the leak are not detached."""
    def second_membrane(x0):
        x = jnp.stack([x0, jnp.array([0.3])])
        return neurons.lif(x)[1][1].sum()

    # x0 = 1.2: spike at t=0 (u0 = 0.2, surrogate 0.8); m_0 = h0 (1 - s0) = 0; v_1 = 0.5 m_0 = 0.
    # d m_0/d x0 = (1 - s0) - h0 * 0.8 = -0.96, so d h_1/d x0 = 0.5 * -0.96 = -0.48.
    # h_1 = 0.3: u1 = -0.7, surrogate 0.3, d m_1/d h_1 = (1 - s1) - h1 * 0.3 = 0.91.
    g = jax.grad(second_membrane)(jnp.array([1.2]))
    np.testing.assert_allclose(g, [-0.48 * 0.91], atol=1e-6)


def lif_autodiff(x, *, tau, vth, reset, v0, surrogate, width):
    """The plain scan of ``lif_step``, differentiated by JAX's autodiff (``lif``'s custom VJP must agree)."""
    def body(v, x_t):
        v, s, m = neurons.lif_step(v, x_t, tau=tau, vth=vth, reset=reset, surrogate=surrogate, width=width)
        return v, (s, m)

    return jax.lax.scan(body, jnp.full(x.shape[1:], v0, x.dtype), x)[1]


@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("surrogate_shape", ["triangle", "sigmoid", "arctan"])
@pytest.mark.parametrize("tau,vth,v0,width", [(0.5, 1.0, 0.0, 1.0), (1.0, 0.7, 0.35, 0.5), (0.9, 1.5, 0.2, 2.0)])
def test_lif_custom_vjp_equals_autodiff_of_the_scan(reset, surrogate_shape, tau, vth, v0, width, key):
    """``lif``'s hand-written backward scan against autodiff through the scan of ``lif_step``: a loss that
    weighs spikes and membranes with random cotangents, so both output paths, the reset and the leak count."""
    kx, ks, km = jax.random.split(key, 3)
    x = jax.random.normal(kx, (16, 3, 5)) * 0.8 + 0.6
    cs, cm = jax.random.normal(ks, x.shape), jax.random.normal(km, x.shape)
    kw = dict(tau=tau, vth=vth, reset=reset, v0=v0, surrogate=surrogate_shape, width=width)

    def loss(f, x):
        s, m = f(x, **kw)
        return jnp.sum(s * cs) + jnp.sum(m * cm)

    (s, m), (s_ref, m_ref) = neurons.lif(x, **kw), lif_autodiff(x, **kw)
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(m, m_ref)
    assert 0 < float(s.mean()) < 1
    g = jax.jit(jax.grad(functools.partial(loss, neurons.lif)))(x)
    g_ref = jax.jit(jax.grad(functools.partial(loss, lif_autodiff)))(x)
    assert float(jnp.abs(g_ref).max()) > 0.1
    np.testing.assert_allclose(g, g_ref, atol=1e-6, rtol=1e-6)
    # under vmap (the ablation vmaps the train step) and jax.checkpoint (model.remat)
    xs = jnp.stack([x, x[::-1] * 1.1])
    gv = jax.jit(jax.vmap(jax.grad(jax.checkpoint(functools.partial(loss, neurons.lif)))))(xs)
    gv_ref = jax.jit(jax.vmap(jax.grad(functools.partial(loss, lif_autodiff))))(xs)
    np.testing.assert_allclose(gv, gv_ref, atol=1e-6, rtol=1e-6)


def test_lif_keeps_only_h_for_the_backward_pass():
    """The custom VJP's residuals are h alone, one (T, N, ...) array; autodiff of the scan keeps more."""
    x = jnp.ones((8, 4, 6))
    kw = dict(tau=0.5, vth=1.0, reset="hard", v0=0.0, surrogate="triangle", width=1.0)
    res = jax.vjp(lambda x: neurons.lif(x, **kw), x)[1]
    res_ref = jax.vjp(lambda x: lif_autodiff(x, **kw), x)[1]
    big = lambda f: [a.shape for a in jax.tree.leaves(f) if getattr(a, "shape", ()) == x.shape]
    assert big(res) == [x.shape]
    assert len(big(res_ref)) > 1


def lif_by_scan(x, **kw):
    """The statement of the maths: autodiff of ``neurons.scan`` of ``lif_step``, every parameter traced."""
    v0 = kw.pop("v0")
    return neurons.scan(functools.partial(neurons.lif_step, **kw), x, v0)


def cell_params(key, C, per_channel):
    """tau, vth, v0 as arrays: scalars, or one per channel (C,)."""
    shape = (C,) if per_channel else ()
    k1, k2, k3 = jax.random.split(key, 3)
    return (jax.random.uniform(k1, shape, minval=0.4, maxval=0.95), jax.random.uniform(k2, shape, minval=0.7,
            maxval=1.3), jax.random.uniform(k3, shape, minval=0.0, maxval=0.5))


@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lif_gradients_in_every_parameter_equal_autodiff_of_the_scan(reset, per_channel, key):
    """Values and the gradients of x, tau, vth and v0 (scalar or per channel) of ``lif``'s fused backward pass
    equal autodiff through the scan of ``lif_step``; random cotangents weigh spikes and membranes."""
    kx, ks, km, kp = jax.random.split(key, 4)
    x = jax.random.normal(kx, (14, 3, 5)) * 0.8 + 0.6
    cs, cm = jax.random.normal(ks, x.shape), jax.random.normal(km, x.shape)
    params = cell_params(kp, 5, per_channel)

    def loss(f, x, tau, vth, v0):
        s, m = f(x, tau=tau, vth=vth, v0=v0, reset=reset, surrogate="triangle", width=1.0)
        return jnp.sum(s * cs) + jnp.sum(m * cm)

    (s, m), (s_ref, m_ref) = [f(x, tau=params[0], vth=params[1], v0=params[2], reset=reset)
                              for f in (neurons.lif, lif_by_scan)]
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_allclose(m, m_ref, atol=1e-6)
    assert 0 < float(s.mean()) < 1
    grad = lambda f: jax.jit(jax.grad(functools.partial(loss, f), argnums=(0, 1, 2, 3)))(x, *params)
    g, g_ref = grad(neurons.lif), grad(lif_by_scan)
    for name, a, b, p in zip(("x", "tau", "vth", "v0"), g, g_ref, (x, *params)):
        assert a.shape == p.shape, name
        assert float(jnp.abs(b).max()) > 1e-2, name                   # the parameter matters
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


def test_lif_parameter_gradients_match_finite_differences():
    """With a narrow surrogate and h never within its width of the threshold, the surrogate gradient is 0 and
    the loss is smooth in tau, vth and v0 (soft reset: m = h - vth s): central differences must agree."""
    x = jnp.asarray(np.random.default_rng(8).normal(0.5, 1.0, (8, 2, 3)), jnp.float32)
    tau, vth, v0 = jnp.array(0.8), jnp.array([0.9, 1.0, 1.1]), jnp.array(0.2)
    kw = dict(reset="soft", width=0.01)
    h = np.asarray(x) + np.concatenate([np.full((1, 2, 3), 0.2), 0.8 * np.asarray(neurons.lif(x, tau=tau, vth=vth,
                                                                                    v0=v0, **kw)[1][:-1])])
    assert np.abs(h - np.asarray(vth)).min() > 0.05          # every h far from the threshold (no surrogate)
    loss = lambda tau, vth, v0: jnp.sum(neurons.lif(x, tau=tau, vth=vth, v0=v0, **kw)[1] ** 2)
    grads = jax.grad(loss, argnums=(0, 1, 2))(tau, vth, v0)
    assert float(jnp.abs(neurons.lif(x, tau=tau, vth=vth, v0=v0, **kw)[0]).sum()) > 0
    eps = 1e-3
    for i, p in enumerate((tau, vth, v0)):
        for j in np.ndindex(p.shape):
            e = jnp.zeros_like(p).at[j].set(eps)
            args_p, args_m = [tau, vth, v0], [tau, vth, v0]
            args_p[i], args_m[i] = p + e, p - e
            fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
            np.testing.assert_allclose(grads[i][j], fd, rtol=2e-3, atol=2e-3)


def test_lif_rejects_parameters_of_another_shape():
    with pytest.raises(ValueError, match=r"vth must be a scalar or one value per channel, shape \(\) or \(3,\)"):
        neurons.lif(jnp.zeros((2, 1, 3)), vth=jnp.ones((2,)))


def alif_step(state, x, *, tau, rho, beta):
    """An adaptive-threshold LIF written as a user would: the threshold rises by beta per spike, decays by rho."""
    v, a = state
    h = v + x
    s = surrogate.spike(h - (1.0 + beta * a))
    m = h * (1.0 - s)
    return (tau * m, rho * a + s), s, m


def test_user_step_function_trains_through_the_generic_scan(key):
    """A step function nobody wrote a gradient for: forward equals a numpy loop; the gradients of x, tau,
    rho and beta equal autodiff of the Python-unrolled loop; one gradient step lowers the loss."""
    x = jax.random.normal(key, (10, 2, 4)) * 0.7 + 0.8
    p = dict(tau=jnp.array(0.6), rho=jnp.array(0.9), beta=jnp.array(0.5))

    def run(x, p, scan):
        if scan:
            return neurons.scan(functools.partial(alif_step, **p), x, (0.0, 0.0))
        state, out = (jnp.zeros(x.shape[1:]), jnp.zeros(x.shape[1:])), []
        for x_t in x:
            state, s, m = alif_step(state, x_t, **p)
            out.append((s, m))
        return tuple(jnp.stack(a) for a in zip(*out))

    v, a, want_s = np.zeros((2, 4)), np.zeros((2, 4)), []
    for x_t in np.asarray(x, np.float64):
        h = v + x_t
        s = (h > 1.0 + 0.5 * a) * 1.0
        v, a = 0.6 * h * (1 - s), 0.9 * a + s
        want_s.append(s)
    s, m = jax.jit(lambda x, p: run(x, p, True))(x, p)
    np.testing.assert_array_equal(s, np.stack(want_s))
    assert 0 < float(s.mean()) < 1

    loss = lambda x, p, scan: jnp.mean((jnp.mean(run(x, p, scan)[0], 0) - 0.2) ** 2) + jnp.mean(run(x, p, scan)[1])
    g = jax.jit(jax.grad(lambda x, p: loss(x, p, True), argnums=(0, 1)))(x, p)
    g_ref = jax.grad(lambda x, p: loss(x, p, False), argnums=(0, 1))(x, p)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert float(jnp.abs(b).max()) > 1e-4
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, p, g[1])
    assert float(loss(x, stepped, True)) < float(loss(x, p, True))


def plif_spikingjelly(x, w, vth=1.0):
    """SpikingJelly's ParametricLIFNode(decay_input=False, v_reset=0.0), its equations transcribed in float64
    numpy: charge v = v - (v - v_reset) sigmoid(w) + x; fire s = 1[v - vth >= 0]; reset v = (1 - s) v + s v_reset."""
    sig = 1.0 / (1.0 + np.exp(-np.asarray(w, np.float64)))
    v, spikes, mems = np.zeros(x.shape[1:]), [], []
    for x_t in np.asarray(x, np.float64):
        v = v - (v - 0.0) * sig + x_t
        s = (v - vth >= 0) * 1.0
        v = (1 - s) * v + s * 0.0
        spikes.append(s)
        mems.append(v)
    return np.stack(spikes), np.stack(mems)


def test_plif_initial_leak_is_spikingjellys_init_tau_2():
    c = neurons.cell(config.NeuronConfig(kind="plif"), 4, rngs=nnx.Rngs(0))
    assert isinstance(c, neurons.PLIF) and float(c.w[...]) == 0.0             # -log(init_tau - 1), init_tau = 2
    assert c.values() == {"tau": 0.5, "vth": 1.0, "v0": 0.0}
    c = neurons.cell(config.NeuronConfig(kind="plif", tau=0.8), 4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(c.values()["tau"], 0.8, rtol=1e-6)


@pytest.mark.parametrize("w", [0.0, 0.8, -1.3])
def test_plif_spikes_equal_spikingjelly(w, key):
    c = neurons.cell(config.NeuronConfig(kind="plif"), 6, rngs=nnx.Rngs(0))
    c.w[...] = jnp.asarray(w, jnp.float32)
    x = jax.random.normal(key, (20, 3, 6)) * 0.6 + 0.5
    s, m = c(x)
    s_ref, m_ref = plif_spikingjelly(x, w)
    assert 0 < s_ref.mean() < 1
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_allclose(m, m_ref, atol=1e-5)


@pytest.mark.parametrize("neuron", [dict(kind="plif"), dict(learn_vth=True, per_channel=True, reset="soft"),
                                    dict(kind="plif", learn_vth=True, per_channel=True, v0=0.3)])
def test_learnable_cell_step_equals_multistep_and_gradients_reach_its_parameters(neuron, key):
    kx, kw = jax.random.split(key)
    c = neurons.cell(config.NeuronConfig(**neuron), 4, rngs=nnx.Rngs(0))
    if neuron.get("kind") == "plif":                      # per-channel w away from 0, so channels differ
        c.w[...] = jax.random.normal(kw, c.w.shape) * 0.5
    x = jax.random.normal(kx, (12, 3, 4)) * 0.7 + 0.7
    s_all, m_all = c(x)
    v, spikes, mems = c.initial((3, 4)), [], []
    for x_t in x:
        v, s, m = c.step(v, x_t)
        spikes.append(s)
        mems.append(m)
    np.testing.assert_array_equal(jnp.stack(spikes), s_all)
    np.testing.assert_allclose(jnp.stack(mems), m_all, atol=1e-6)
    assert 0 < float(s_all.mean()) < 1

    # nnx.grad through the module's fused call equals autodiff of its step scanned by neurons.scan
    loss_multi = lambda c: jnp.sum(jnp.mean(c(x)[0], 0) ** 2) + jnp.mean(c(x)[1])
    loss_steps = lambda c: (lambda s, m: jnp.sum(jnp.mean(s, 0) ** 2) + jnp.mean(m))(
        *neurons.scan(c.step, x, c.v0))
    g, g_ref = nnx.grad(loss_multi)(c), nnx.grad(loss_steps)(c)
    leaves, leaves_ref = jax.tree.leaves(g), jax.tree.leaves(g_ref)
    assert len(leaves) == (neuron.get("kind") == "plif") + bool(neuron.get("learn_vth")) > 0
    for a, b in zip(leaves, leaves_ref):
        assert float(jnp.abs(b).max()) > 1e-4
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fixed_lif_cell_is_lif():
    n = config.NeuronConfig(tau=0.9, vth=0.8, reset="soft", v0=0.2, surrogate="sigmoid")
    c = neurons.cell(n, 3, rngs=nnx.Rngs(0))
    assert type(c) is neurons.LIF and not jax.tree.leaves(nnx.state(c, nnx.Param))
    assert c.values() == {"tau": 0.9, "vth": 0.8, "v0": 0.2}
    x = jnp.linspace(-1, 2, 24).reshape(4, 2, 3)
    for a, b in zip(c(x), neurons.lif(x, tau=0.9, vth=0.8, reset="soft", v0=0.2, surrogate="sigmoid")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c.initial((2, 3)), np.full((2, 3), 0.2, np.float32))


@pytest.mark.parametrize("kw,match", [
    (dict(kind="alif"), r"model.neuron.kind must be one of \['lif', 'plif'\], got 'alif'"),
    (dict(kind="plif", tau=1.0), r"model.neuron.tau \(the initial leak of kind 'plif'\) must be in \(0, 1\)"),
    (dict(per_channel=True), r"model.neuron.per_channel needs a learnt parameter"),
])
def test_neuron_config_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        config.NeuronConfig(**kw)
