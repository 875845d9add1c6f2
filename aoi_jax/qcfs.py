"""QCFS activation, for ANN-to-SNN conversion (docs/semantics.md section 3).

A QCFS network is one of the ``aoi_jax.models`` with ``ModelConfig.activation == "qcfs"``: every spiking
layer's cell is replaced by ``qcfs(u, lam_l, levels)`` with a learnable threshold ``lam_l`` per layer
(``model.thresholds``, initialised to ``LAM_INIT``). ``aoi_jax.convert`` turns the trained network into
an SNN of IF neurons with the same weights and thresholds; ``aoi_jax.method`` (``QCFS``) trains it on one
static frame with the ANN form of RCS (``regularisers.rcs_ann_scores`` of each layer's pre-activation).
"""

import jax
import jax.numpy as jnp

LAM_INIT = 8.0  # initial per-layer threshold lam (the reference's vthr)


@jax.custom_jvp
def floor_ste(a):
    """``floor(a)`` with a straight-through gradient: ``d floor(a) / d a = 1`` (the reference's GradFloor)."""
    return jnp.floor(a)


@floor_ste.defjvp
def _floor_ste_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    return jnp.floor(a), da


def qcfs(x, lam, levels=4):
    """Quantisation-clip-floor-shift activation with threshold ``lam`` and ``L = levels`` steps.

    docs/semantics.md section 3 (the reference's ``QCFSConstrs``), floor straight-through::

        z = relu(x) / lam
        q = floor(L z + 0.5) / L
        y = lam * clip(q, 0, 1)

    Gradients (clip passes the gradient where 0 <= q <= 1, both ends included, as torch.clamp does)::

        dy/dx   = 1[x > 0]                 if q <= 1,   else 0
        dy/dlam = q - relu(x) / lam        if q <= 1,   else 1

    Args:
      x: pre-activation, any shape.  lam: threshold, a scalar (> 0).  levels: L >= 1, a Python int.
    Returns:
      y, same shape as ``x``: one of the L + 1 values ``lam * k / L``, k = 0..L.
    Raises:
      ValueError: levels < 1.
    """
    if levels < 1:
        raise ValueError(f"QCFS levels must be >= 1, got {levels}")
    q = floor_ste(jax.nn.relu(x) / lam * levels + 0.5) / levels
    q = jnp.where(q <= 1.0, q, jax.lax.stop_gradient(jnp.minimum(q, 1.0)))   # q >= 0 always
    return lam * q
