"""Spiking cells as pure functions (reference-semantics.md sections 2 and 3).

``lif_step`` advances one time step; ``lif`` scans it over the leading (time) axis with one
``jax.lax.scan``. An IF cell (ANN-to-SNN conversion) is ``lif(x, tau=1.0, reset="soft", v0=vth / 2)``.
"""

import jax
import jax.numpy as jnp

from aoi_jax.surrogate import spike

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

    Args:
      x: input currents, (T, N, ...).
      tau: leak multiplier in (0, 1]; 1 gives an IF cell.  vth: threshold.  reset: "hard" | "soft".
      v0: initial membrane (IF conversion uses vth / 2).
      surrogate, width: surrogate gradient shape and width.
    Returns:
      (spikes, membranes), each (T, N, ...); membranes[t] = m_t, after reset, before the leak.
    Raises:
      ValueError: reset is neither "hard" nor "soft", or x has no time axis.
    """
    if x.ndim < 2:
        raise ValueError(f"lif expects x of shape (T, N, ...), got shape {x.shape}")

    def body(v, x_t):
        v, s, m = lif_step(v, x_t, tau=tau, vth=vth, reset=reset, surrogate=surrogate, width=width)
        return v, (s, m)

    v_init = jnp.full(x.shape[1:], v0, x.dtype)
    _, (spikes, membranes) = jax.lax.scan(body, v_init, x)
    return spikes, membranes
