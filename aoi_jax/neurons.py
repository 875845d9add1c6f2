"""Spiking cells as pure functions, and the NNX modules that hold their parameters (docs/semantics.md
sections 2 and 3).

``lif_step`` advances one time step. ``scan`` runs any one-step cell ``step(v, x, **params) -> (v_next,
spike, membrane)`` over the leading (time) axis with one ``jax.lax.scan``; its gradient is JAX's autodiff
through the scan, the statement of the maths. ``lif`` is the LIF cell's fast path: the same forward scan
with a backward pass that keeps only h (T, N, ...), tested equal to autodiff of ``scan(lif_step, ...)`` in
its values and in the gradients of x, tau, vth and v0. Every parameter may be a Python number or a traced
array (a scalar per layer, or one value per channel on the trailing feature axis), so ``jax.grad`` reaches
it. An IF cell (ANN-to-SNN conversion) is ``lif(x, tau=1.0, reset="soft", v0=vth / 2)``.

The modules (``LIF``, ``PLIF``; ``cell`` builds one from a ``NeuronConfig``) share one interface::

    cell(x (T, N, ...)) -> (spikes, membranes), each (T, N, ...)     # multistep, one scan
    cell.step(v (N, ...), x (N, ...)) -> (v_next, spike, membrane)   # one time step, the same maths
    cell.initial(shape) -> v0 broadcast to shape
    cell.values() -> {"tau": ..., "vth": ..., "v0": ...}            # plain floats, or lists per channel
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aoi_jax.config import NeuronConfig
from aoi_jax.surrogate import SURROGATES, spike

RESETS = ("hard", "soft")


def _lift(p, ndim):
    """p (a scalar or per-channel array) with leading 1-axes up to ``ndim``, so it broadcasts over the trailing
    feature axis without rank promotion."""
    p = jnp.asarray(p)
    return p.reshape((1,) * (ndim - p.ndim) + p.shape) if 0 < p.ndim < ndim else p


def _fire(h, tau, vth, reset, surrogate, width):
    """The LIF maths after the input is added, for h of any shape: ``(tau m, s, m)`` (``lif_step``'s formula).
    The one place it is written: ``lif_step`` calls it on v + x, ``lif`` on h (T, N, ...) and its backward
    pass differentiates it."""
    tau, vth = _lift(tau, h.ndim), _lift(vth, h.ndim)
    s = spike(h - vth, width, surrogate)
    m = h * (1.0 - s) if reset == "hard" else h - vth * s
    return tau * m, s, m


def lif_step(v, x, *, tau=0.5, vth=1.0, reset="hard", surrogate="triangle", width=1.0):
    """One step of the leaky integrate-and-fire cell.

    docs/semantics.md section 2; ``v`` already holds the leaked membrane ``tau * m_{t-1}``::

        h = v + x,   s = S(h - vth)                # forward: 1[h > vth]
        m = h (1 - s)  (hard)  |  h - vth s  (soft)
        v_next = tau m

    The spike is not detached in the reset: gradients flow through the reset and the leak.

    Args:
      v: membrane carried in from the previous step, (N, ...).
      x: input current of this step, (N, ...).
      tau: leak multiplier in (0, 1]; 1 gives an IF cell.  vth: threshold.  Each a number or an array, () or
        (C,) (one per channel of the trailing axis), traced or not.  reset: "hard" | "soft".
      surrogate, width: surrogate gradient shape and width (``aoi_jax.surrogate.spike``; width a number).
    Returns:
      (v_next, spike, membrane), each (N, ...); membrane = m, after reset, before the leak.
    Raises:
      ValueError: reset is neither "hard" nor "soft".
    """
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    return _fire(v + x, tau, vth, reset, surrogate, width)


def scan(step, x, v0, **params):
    """Runs a one-step cell over the leading (time) axis with one ``jax.lax.scan``; autodiff gives BPTT.

    Any ``step(v, x_t, **params) -> (v_next, s_t, m_t)`` trains through it with no hand-written gradient
    (the state v may be a pytree, for example a membrane and an adaptive threshold)::

        v_0 = v0 (broadcast to x_t's shape),   (v_{t+1}, s_t, m_t) = step(v_t, x_t, **params)

    ``scan(lif_step, x, v0, tau=..., vth=..., reset=...)`` is the LIF cell by plain autodiff, the reference
    ``lif`` is tested against.

    Args:
      step: the one-step cell.  x: inputs, (T, N, ...).
      v0: initial state: a number, an array broadcastable to (N, ...), or a pytree of them.
      params: keyword arguments passed to every ``step`` call (arrays are traced and differentiable).
    Returns:
      (spikes, membranes), each (T, N, ...) (stacked s_t and m_t).
    Raises:
      ValueError: x has no time axis.
    """
    if x.ndim < 2:
        raise ValueError(f"scan expects x of shape (T, N, ...), got shape {x.shape}")
    v0 = jax.tree.map(lambda a: jnp.broadcast_to(_lift(jnp.asarray(a, x.dtype), x.ndim - 1), x.shape[1:]), v0)

    def body(v, x_t):
        v, s, m = step(v, x_t, **params)
        return v, (s, m)

    return jax.lax.scan(body, v0, x)[1]


def lif(x, *, tau=0.5, vth=1.0, reset="hard", v0=0.0, surrogate="triangle", width=1.0):
    """Leaky integrate-and-fire cell scanned over the leading (time) axis.

    docs/semantics.md section 2; v_0 = v0, S the surrogate spike::

        h_t = v_t + x_t,   s_t = S(h_t - vth)            # forward: 1[h_t > vth]
        m_t = h_t (1 - s_t)  (hard)  |  h_t - vth s_t  (soft)
        v_{t+1} = tau m_t

    The values and gradients are those of autodiff through ``scan(lif_step, x, v0, ...)`` (BPTT, spike not
    detached in the reset). A ``jax.custom_vjp`` computes them keeping only h (T, N, ...) for the backward
    pass (autodiff of the scan keeps several per-step residuals): s_t, m_t and v_{t+1} are functions of
    h_t alone (``lif_step`` with the input already added), so with F(h) = (v_next, s, m) that function,
    cotangents ``gs_t``, ``gm_t`` of the outputs and ``gv_T = 0`` (``_lif_bwd``)::

        gh_t = dF/dh(h_t)^T (gv_{t+1}, gs_t, gm_t),   gv_t = gh_t,   d loss / d x_t = gh_t
        d loss / d (tau, vth) = sum_t dF/d(tau, vth)(h_t)^T (gv_{t+1}, gs_t, gm_t)   (reduced to their shapes)
        d loss / d v0 = gv_0 reduced to v0's shape

    Args:
      x: input currents, (T, N, ...).
      tau: leak multiplier in (0, 1]; 1 gives an IF cell.  vth: threshold.  v0: initial membrane (IF
        conversion uses vth / 2).  Each a number or an array, () or (C,) with C = x.shape[-1], traced or not.
      reset: "hard" | "soft".  surrogate, width: surrogate gradient shape and width (width a number).
    Returns:
      (spikes, membranes), each (T, N, ...); membranes[t] = m_t, after reset, before the leak.
    Raises:
      ValueError: reset is neither "hard" nor "soft", x has no time axis, a parameter is neither a scalar nor
        one value per channel, or unknown surrogate / bad width.
    """
    if x.ndim < 2:
        raise ValueError(f"lif expects x of shape (T, N, ...), got shape {x.shape}")
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"unknown surrogate shape {surrogate!r}; valid: {sorted(SURROGATES)}")
    if not width > 0:
        raise ValueError(f"surrogate width must be > 0, got {width}")
    params = []
    for name, p in (("tau", tau), ("vth", vth), ("v0", v0)):
        p = jnp.asarray(p, x.dtype)
        if p.shape not in ((), (x.shape[-1],)):
            raise ValueError(f"lif's {name} must be a scalar or one value per channel, shape () or "
                             f"({x.shape[-1]},), got shape {p.shape}")
        params.append(p)
    return _lif((reset, surrogate, float(width)), x, *params)


def _lif_h(static, x, tau, vth, v0):
    """The forward scan; returns only h (T, N, ...): the spikes and membranes are elementwise in h (``_fire``),
    so XLA can fuse them into their users.

    h is written into a copy of x that the scan carries, not into the scan's own zero-filled output (XLA:CPU
    shared one such zero buffer per layer between the forward pass and remat's recomputation, alive for the
    whole step). x_t is read from the scan's input, so the carried buffer is only written
    (docs/performance.md has the measurements).
    """
    def body(carry, x_t):
        t, v, buf = carry
        h = v + x_t
        v, _, _ = _fire(h, tau, vth, *static)
        return (t + 1, v, jax.lax.dynamic_update_index_in_dim(buf, h, t, 0)), None

    v0 = jnp.broadcast_to(_lift(v0, x.ndim - 1), x.shape[1:])
    return jax.lax.scan(body, (jnp.zeros((), jnp.int32), v0, x), x)[0][2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lif(static, x, tau, vth, v0):
    return _fire(_lif_h(static, x, tau, vth, v0), tau, vth, *static)[1:]


def _lif_fwd(static, x, tau, vth, v0):
    h = _lif_h(static, x, tau, vth, v0)
    return _fire(h, tau, vth, *static)[1:], (h, tau, vth, v0)


def _lif_bwd(static, residuals, cotangents):
    """``lif``'s backward pass from h (T, N, ...) alone, by autodiff of ``_fire``; the part without the carry is
    elementwise over all steps at once::

        (d_t, dtau, dvth) = dF/d(h, tau, vth)^T (0, gs_t, gm_t)           all t at once, (T, N, ...)
        gh_t = d_t + dv_next/dh(h_t)^T gh_{t+1},   gh_T = 0                reverse loop
        (tau, vth) also collect dv_next/d(tau, vth)(h_t)^T gh_{t+1} in the loop

    XLA fuses d into the producers of gs and gm; the reverse loop overwrites d_t with gh_t in place, so no
    other (T, N, ...) buffer is needed.
    """
    h, tau, vth, v0 = residuals
    gs, gm = cotangents
    outputs = lambda h, tau, vth: _fire(h, tau, vth, *static)[1:]        # (s, m)
    leak = lambda h, tau, vth: _fire(h, tau, vth, *static)[0]            # v_next
    d, gtau, gvth = jax.vjp(outputs, h, tau, vth)[1]((gs, gm))
    T = h.shape[0]

    def body(i, carry):
        g_next, gtau, gvth, g = carry
        t = T - 1 - i
        a, gtau_t, gvth_t = jax.vjp(leak, h[t], tau, vth)[1](g_next)
        g_t = g[t] + a
        return g_t, gtau + gtau_t, gvth + gvth_t, jax.lax.dynamic_update_index_in_dim(g, g_t, t, 0)

    gv0, gtau, gvth, gx = jax.lax.fori_loop(0, T, body, (jnp.zeros_like(h[0]), gtau, gvth, d))
    gv0 = jax.vjp(lambda v0: jnp.broadcast_to(_lift(v0, h.ndim - 1), h.shape[1:]), v0)[1](gv0)[0]
    return gx, gtau, gvth, gv0


_lif.defvjp(_lif_fwd, _lif_bwd)


def _plain(p):
    """A parameter as plain Python: a float, or a list of floats (one per channel)."""
    a = np.asarray(p[...] if isinstance(p, nnx.Variable) else p, np.float64)
    return float(a) if a.ndim == 0 else a.tolist()


class LIF(nnx.Module):
    """LIF cell module: ``lif`` / ``lif_step`` with the settings of a ``NeuronConfig`` (docs/semantics.md
    section 2); with ``learn_vth`` the threshold is an ``nnx.Param`` (per layer (), or (C,) with
    ``per_channel``), initialised to ``neuron.vth``::

        h_t = v_t + x_t,   s_t = S(h_t - vth),   m_t = h_t (1 - s_t) | h_t - vth s_t,   v_{t+1} = tau m_t

    ``__call__(x (T, N, ..., C)) -> (spikes, membranes)`` runs ``lif`` (one scan); ``step(v, x (N, ..., C))
    -> (v_next, spike, membrane)`` runs ``lif_step``, the same maths; ``initial(shape)`` is v0 broadcast to
    ``shape``; ``values()`` the current tau, vth and v0 as plain floats (lists when per channel).
    """

    def __init__(self, neuron: NeuronConfig, features: int, *, rngs: nnx.Rngs | None = None):
        self.features = features
        self.reset, self.surrogate, self.width, self.v0 = neuron.reset, neuron.surrogate, neuron.width, neuron.v0
        self.vth = nnx.Param(jnp.full(self._shape(neuron), neuron.vth, jnp.float32)) if neuron.learn_vth \
            else neuron.vth
        self._init_leak(neuron)

    def _shape(self, neuron):
        return (self.features,) if neuron.per_channel else ()

    def _init_leak(self, neuron):
        self.tau = neuron.tau

    def _tau(self):
        return self.tau

    def params(self):
        """``{"tau", "vth"}`` as ``lif_step`` takes them (numbers or arrays)."""
        return {"tau": self._tau(), "vth": self.vth[...] if isinstance(self.vth, nnx.Variable) else self.vth}

    def __call__(self, x):
        return lif(x, **self.params(), v0=self.v0, reset=self.reset, surrogate=self.surrogate, width=self.width)

    def step(self, v, x):
        return lif_step(v, x, **self.params(), reset=self.reset, surrogate=self.surrogate, width=self.width)

    def initial(self, shape):
        return jnp.full(shape, self.v0, jnp.float32)

    def values(self):
        return {k: _plain(p) for k, p in {**self.params(), "v0": self.v0}.items()}


class PLIF(LIF):
    """Parametric LIF (Fang et al., ICCV 2021): the leak learnt, as SpikingJelly's ``ParametricLIFNode(
    decay_input=False, v_reset=0)``; otherwise ``LIF`` (docs/semantics.md section 2)::

        tau = 1 - sigmoid(w),   w an nnx.Param, () or (C,) with ``per_channel``
        w_0 = log((1 - tau_0) / tau_0),   tau_0 = neuron.tau   (0.5 -> w_0 = 0, SpikingJelly's init_tau = 2)

    For the same w its spikes equal SpikingJelly's ``v = v - v sigmoid(w) + x``, then fire and reset to 0
    (up to rounding, and SpikingJelly fires at h == vth where this cell needs h > vth).
    """

    def _init_leak(self, neuron):
        self.w = nnx.Param(jnp.full(self._shape(neuron), math.log((1.0 - neuron.tau) / neuron.tau), jnp.float32))

    def _tau(self):
        return 1.0 - jax.nn.sigmoid(self.w[...])


CELLS = {"lif": LIF, "plif": PLIF}


def cell(neuron: NeuronConfig, features: int, *, rngs: nnx.Rngs):
    """The cell module of ``neuron.kind`` (``CELLS``) for ``features`` channels on the trailing axis.

    Raises:
      ValueError: unknown ``neuron.kind``.
    """
    if neuron.kind not in CELLS:
        raise ValueError(f"model.neuron.kind must be one of {sorted(CELLS)}, got {neuron.kind!r}")
    return CELLS[neuron.kind](neuron, features, rngs=rngs)
