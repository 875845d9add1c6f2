"""Anytime inference that really stops: one frame per step, every layer's membrane carried.

``run_topk`` feeds a batch one time step at a time through ``SpikingNet.step`` inside a
``jax.lax.while_loop``, accumulates the logits, and lets each sample exit at the first step whose Top-K
gap exceeds that step's threshold (reference-semantics.md section 7). The loop ends as soon as every
sample of the batch has exited, so later frames are never computed. Its predictions and exit timesteps
equal ``cutoff.apply_topk`` on the multistep logits of the same model and data.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aoi_jax import cutoff


class AnytimeResult(NamedTuple):
    predictions: jax.Array  # (N,) int32: argmax of the cumulative logits at exit
    timesteps: jax.Array  # (N,) int32: 1-based exit timestep
    steps_computed: jax.Array  # int32 scalar: time steps the network actually ran for this batch
    spikes: jax.Array  # (L,) spikes emitted per layer over the steps computed, summed over the batch


def run_topk(graphdef, params, batch_stats, frames, beta) -> AnytimeResult:
    """Step-by-step Top-K inference with early termination.

    For t = 0, 1, ... while some sample is still running::

        Y_n(t) = Y_n(t-1) + o_t[n]                   (o_t from one network step, membranes carried)
        exit n at t if gap(Y_n(t)) > beta[t] or t == T - 1;   prediction = argmax Y_n(t)

    Args:
      graphdef, params, batch_stats: the split model (a ``models.SpikingNet``).
      frames: (T, N, H, W, C).  beta: Top-K thresholds (T,) from ``cutoff.calibrate_topk``.
    Returns:
      AnytimeResult with predictions (N,), timesteps (N,), steps_computed and per-layer spikes (L,).
    Raises:
      ValueError: beta does not have one entry per timestep.
    """
    T, N = frames.shape[:2]
    if beta.shape != (T,):
        raise ValueError(f"beta must have shape (T,) = ({T},), got {beta.shape}")
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    membranes = model.init_membranes(frames.shape[1:])
    n_layers = len(membranes)
    K = jax.eval_shape(lambda v, f: model.step(v, f, jnp.int32(0))[1], membranes, frames[0]).shape[-1]

    def cond(carry):
        t, _, _, done, _, _, _ = carry
        return (t < T) & ~jnp.all(done)

    def body(carry):
        t, v, cum, done, pred, exit_t, spikes = carry
        v, logits, counts = model.step(v, jax.lax.dynamic_index_in_dim(frames, t, keepdims=False), t)
        cum = cum + logits
        gap = cutoff.topk_gap(cum[None])[0]
        leave = ~done & ((gap > beta[t]) | (t == T - 1))
        pred = jnp.where(leave, jnp.argmax(cum, -1).astype(jnp.int32), pred)
        exit_t = jnp.where(leave, t + 1, exit_t)
        spikes = spikes + jnp.sum(counts * (~done)[None, :], axis=1)
        return t + 1, v, cum, done | leave, pred, exit_t, spikes

    init = (jnp.int32(0), membranes, jnp.zeros((N, K), jnp.float32), jnp.zeros(N, bool),
            jnp.zeros(N, jnp.int32), jnp.full(N, T, jnp.int32), jnp.zeros(n_layers, jnp.float32))
    t, _, _, _, pred, exit_t, spikes = jax.lax.while_loop(cond, body, init)
    return AnytimeResult(pred, exit_t, t, spikes)
