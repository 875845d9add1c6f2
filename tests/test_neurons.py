"""The surrogate spike and the LIF cell against hand-unrolled references (reference-semantics.md s. 2)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aoi_jax import neurons, surrogate


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
