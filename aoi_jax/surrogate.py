"""Spike functions: Heaviside forward, surrogate backward (docs/semantics.md section 2).

All shapes share the forward ``spike(u) = 1[u > 0]`` (strict) and differ only in the gradient used for
``d spike / d u``. ``width`` (the reference's ``gamma``) sets how far from the threshold the gradient
reaches.
"""

import functools

import jax
import jax.numpy as jnp


def triangle_grad(u, width=1.0):
    """Triangle surrogate (the reference's ZIF)::

        d s / d u = (1 / w^2) * max(0, w - |u|)

    Args:
      u: distance to threshold, any shape.  width: w > 0.
    Returns:
      the surrogate derivative, same shape as ``u``.
    """
    return jnp.maximum(0.0, width - jnp.abs(u)) / (width * width)


def sigmoid_grad(u, width=1.0):
    """Sigmoid surrogate with slope ``k = 4 / w`` (peak 1/w, like the triangle)::

        d s / d u = k * sigma(k u) * (1 - sigma(k u))
    """
    k = 4.0 / width
    sig = jax.nn.sigmoid(k * u)
    return k * sig * (1.0 - sig)


def arctan_grad(u, width=1.0):
    """Arctan surrogate (SpikingJelly's ATan) with ``a = 2 / w`` (peak 1/w)::

        d s / d u = (a / 2) / (1 + (pi a u / 2)^2)
    """
    a = 2.0 / width
    return (a / 2.0) / (1.0 + (jnp.pi * a * u / 2.0) ** 2)


SURROGATES = {"triangle": triangle_grad, "sigmoid": sigmoid_grad, "arctan": arctan_grad}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _spike(u, width, shape):
    return (u > 0).astype(u.dtype)


def _spike_fwd(u, width, shape):
    return _spike(u, width, shape), u


def _spike_bwd(width, shape, u, g):
    return (g * SURROGATES[shape](u, width).astype(g.dtype),)


_spike.defvjp(_spike_fwd, _spike_bwd)


def spike(u, width=1.0, shape="triangle"):
    """Heaviside spike with a surrogate gradient.

    Forward and backward::

        s = 1[u > 0]                      (strict: u == 0 gives no spike)
        d s / d u = surrogate(u, width)   (triangle: (1/w^2) max(0, w - |u|))

    Args:
      u: membrane minus threshold, any shape, floating point.
      width: surrogate width w > 0 (a Python float).
      shape: "triangle" (default, the reference's ZIF), "sigmoid" or "arctan".
    Returns:
      spikes in {0, 1}, same shape and dtype as ``u``.
    Raises:
      ValueError: unknown ``shape`` or non-positive ``width``.
    """
    if shape not in SURROGATES:
        raise ValueError(f"unknown surrogate shape {shape!r}; valid: {sorted(SURROGATES)}")
    if not width > 0:
        raise ValueError(f"surrogate width must be > 0, got {width}")
    return _spike(u, float(width), shape)
