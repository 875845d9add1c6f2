"""Spiking cells as pure functions (reference-semantics.md sections 2 and 3).

``lif_step`` advances one time step; ``lif`` scans it over the leading (time) axis with one
``jax.lax.scan``. An IF cell (ANN-to-SNN conversion) is ``lif(x, tau=1.0, reset="soft", v0=vth / 2)``.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from aoi_jax.surrogate import SURROGATES, spike

RESETS = ("hard", "soft")


def lif_step(v, x, *, tau=0.5, vth=1.0, reset="hard", surrogate="triangle", width=1.0):
    """One step of the leaky integrate-and-fire cell.

    reference-semantics.md section 2; ``v`` already holds the leaked membrane ``tau * m_{t-1}``::

        h = v + x,   s = S(h - vth)                # forward: 1[h > vth]
        m = h (1 - s)  (hard)  |  h - vth s  (soft)
        v_next = tau m

    The spike is not detached in the reset: gradients flow through the reset and the leak.

    Args:
      v: membrane carried in from the previous step, (N, ...).
      x: input current of this step, (N, ...).
      tau: leak multiplier in (0, 1]; 1 gives an IF cell.  vth: threshold.  reset: "hard" | "soft".
      surrogate, width: surrogate gradient shape and width (``aoi_jax.surrogate.spike``).
    Returns:
      (v_next, spike, membrane), each (N, ...); membrane = m, after reset, before the leak.
    Raises:
      ValueError: reset is neither "hard" nor "soft".
    """
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    h = v + x
    s = spike(h - vth, width, surrogate)
    m = h * (1.0 - s) if reset == "hard" else h - vth * s
    return tau * m, s, m


def lif(x, *, tau=0.5, vth=1.0, reset="hard", v0=0.0, surrogate="triangle", width=1.0):
    """Leaky integrate-and-fire cell scanned over the leading (time) axis.

    reference-semantics.md section 2; v_0 = v0, S the surrogate spike::

        h_t = v_t + x_t,   s_t = S(h_t - vth)            # forward: 1[h_t > vth]
        m_t = h_t (1 - s_t)  (hard)  |  h_t - vth s_t  (soft)
        v_{t+1} = tau m_t

    The gradient is that of autodiff through the scan (BPTT, spike not detached in the reset), computed
    by a ``jax.custom_vjp`` that keeps only h (T, N, ...) for the backward pass (autodiff of the scan
    keeps several per-step residuals); the scan itself stacks only h, and s_t, m_t are elementwise in
    h_t. With cotangents ``gs_t``, ``gm_t`` of the outputs, S' the surrogate derivative at h_t - vth and
    ``gv_T = 0``, a reverse loop gives (``_lif_bwd``)::

        gM_t = gm_t + tau gv_{t+1}
        gh_t = gM_t (1 - s_t) + (gs_t - h_t gM_t) S'   (hard)  |  gM_t + (gs_t - vth gM_t) S'   (soft)
        gv_t = gh_t,   d loss / d x_t = gh_t

    Args:
      x: input currents, (T, N, ...).
      tau: leak multiplier in (0, 1]; 1 gives an IF cell.  vth: threshold.  reset: "hard" | "soft".
      v0: initial membrane (IF conversion uses vth / 2).
      surrogate, width: surrogate gradient shape and width.
      tau, vth, v0 and width are Python numbers (static), not traced arrays.
    Returns:
      (spikes, membranes), each (T, N, ...); membranes[t] = m_t, after reset, before the leak.
    Raises:
      ValueError: reset is neither "hard" nor "soft", x has no time axis, or unknown surrogate / bad width.
    """
    if x.ndim < 2:
        raise ValueError(f"lif expects x of shape (T, N, ...), got shape {x.shape}")
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"unknown surrogate shape {surrogate!r}; valid: {sorted(SURROGATES)}")
    if not width > 0:
        raise ValueError(f"surrogate width must be > 0, got {width}")
    cell = _Cell(float(tau), float(vth), reset, float(v0), surrogate, float(width))
    return _lif(cell, x)


class _Cell(NamedTuple):
    """The static settings of ``lif`` (hashable: a ``nondiff_argnums`` argument of ``_lif``)."""

    tau: float
    vth: float
    reset: str
    v0: float
    surrogate: str
    width: float


def _spike_and_membrane(cell: _Cell, h):
    """``lif_step``'s s = 1[h - vth > 0] and m (after reset) from h, elementwise, for any shape."""
    s = (h - cell.vth > 0).astype(h.dtype)
    return s, h * (1.0 - s) if cell.reset == "hard" else h - cell.vth * s


def _lif_h(cell: _Cell, x):
    """The scan of ``lif_step``; returns only h (T, N, ...): the spikes and membranes are elementwise in h
    (``_spike_and_membrane``, the same float ops), so XLA can fuse them into their users.

    h is written into a copy of x that the scan carries, not into the scan's own zero-filled output (XLA:CPU
    shared one such zero buffer per layer between the forward pass and remat's recomputation, alive for the
    whole step). x_t is read from the scan's input, so the carried buffer is only written
    (docs/performance.md has the measurements).
    """
    def body(carry, x_t):
        t, v, buf = carry
        h = v + x_t
        v, _, _ = lif_step(v, x_t, tau=cell.tau, vth=cell.vth, reset=cell.reset, surrogate=cell.surrogate,
                           width=cell.width)
        return (t + 1, v, jax.lax.dynamic_update_index_in_dim(buf, h, t, 0)), None

    v0 = jnp.full(x.shape[1:], cell.v0, x.dtype)
    return jax.lax.scan(body, (jnp.zeros((), jnp.int32), v0, x), x)[0][2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lif(cell: _Cell, x):
    return _spike_and_membrane(cell, _lif_h(cell, x))


def _lif_fwd(cell: _Cell, x):
    h = _lif_h(cell, x)
    return _spike_and_membrane(cell, h), h


def _lif_bwd(cell: _Cell, h, cotangents):
    """``lif``'s backward pass from h (T, N, ...) alone; the terms without the carry are elementwise::

        d_t  = gm_t (1 - s_t) + (gs_t - h_t gm_t) S'_t    (hard)  |  gm_t + (gs_t - vth gm_t) S'_t   (soft)
        a_t  = (1 - s_t) - h_t S'_t                        (hard)  |  1 - vth S'_t                     (soft)
        gh_t = d_t + tau a_t gh_{t+1},   gh_T = 0,   d loss / d x_t = gh_t

    (``lif``'s formula with gM_t = gm_t + tau gh_{t+1} expanded). XLA fuses d into the producers of gs and
    gm; the reverse loop overwrites d_t with gh_t in place, so no other (T, N, ...) buffer is needed.
    """
    gs, gm = cotangents
    s, _ = _spike_and_membrane(cell, h)
    sg = SURROGATES[cell.surrogate](h - cell.vth, cell.width).astype(h.dtype)
    d = gm * (1.0 - s) + (gs - h * gm) * sg if cell.reset == "hard" else gm + (gs - cell.vth * gm) * sg
    T = h.shape[0]

    def body(i, carry):
        g_next, g = carry
        t = T - 1 - i
        h_t = h[t]
        s_t, _ = _spike_and_membrane(cell, h_t)
        sg_t = SURROGATES[cell.surrogate](h_t - cell.vth, cell.width).astype(h.dtype)
        a = (1.0 - s_t) - h_t * sg_t if cell.reset == "hard" else 1.0 - cell.vth * sg_t
        g_t = g[t] + cell.tau * g_next * a
        return g_t, jax.lax.dynamic_update_index_in_dim(g, g_t, t, 0)

    _, gx = jax.lax.fori_loop(0, T, body, (jnp.zeros_like(h[0]), d))
    return (gx,)


_lif.defvjp(_lif_fwd, _lif_bwd)
