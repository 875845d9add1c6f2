"""Anytime inference that stops computing: continuous batching over a queue of recordings.

``serve`` runs a fixed number S of slots in one compiled ``jax.lax.while_loop``. Each iteration advances
every busy slot by one time step of its own recording (``SpikingNet.step``: its own t, its own membranes, its
own cumulative logits; BatchNorm in inference mode, TEBN's scale ``p_t`` at each slot's t). A slot whose
sample exits (its rule fires, or t = T - 1) records the prediction, the exit timestep and the spikes, and
takes the next recording of the queue with fresh state (membranes ``v0``, zero cumulative logits, t = 0),
like an LLM server that refills a finished sequence's slot. The work is S x the number of iterations, about
``sum_n timesteps_n`` (plus the drain at the end of the queue), instead of ``N x T``.

The rule is any per-step decision of ``aoi_jax.cutoff`` (``fires(y, t, param)``, e.g. ``cutoff.RULES[r].fires``
with its calibrated parameter, or ``cutoff.never_fires`` for fixed T). The running sum ``y + o_t`` is the
float32 sum ``cutoff.cumulative`` computes, and a step's logits are bit for bit those of the multistep pass
(the cells are the same float operations, and XLA:CPU computes each row of a batched conv or matrix product
alike for any number of rows >= 2; one row goes through matrix-vector kernels that add in another order,
hence S >= 2), so the predictions and exit timesteps equal
``cutoff.first_exit(fires, cumulative(logits), param)`` (``apply_topk``, ``confidence_cutoff``, ...) on the
multistep logits of the same model: tests/test_anytime.py checks it exactly, for every rule, on trained LIF,
TEBN and converted IF models, and every evaluation checks it again (``anytime`` in report.json)::

    serve_topk = anytime.make_serve(graphdef, cutoff.topk_fires, slots=32)
    result = serve_topk(params, batch_stats, test_set.frames, beta)        # frames (N, T, H, W, C)
    result.predictions, result.timesteps                                   # (N,) each, as apply_topk
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


SLOTS = 16  # the default S of evaluation's check and of evaluate.py --serve


class ServeResult(NamedTuple):
    predictions: jax.Array  # (N,) int32: argmax of the cumulative logits at exit
    timesteps: jax.Array  # (N,) int32: 1-based exit timestep
    spikes: jax.Array  # (L, N) float32: spikes of each spiking layer of sample n up to its exit
    slot_steps: jax.Array  # int32 scalar: S x loop iterations, the network steps computed (busy or idle)


class _Slots(NamedTuple):
    """The loop's carry: S slots, and the outputs for the N samples of the queue."""

    sample: jax.Array  # (S,) int32: queue index of the slot's sample; N = idle (the queue is empty)
    t: jax.Array  # (S,) int32: the slot's next step (0-based)
    membranes: tuple  # one (S, ...) array per spiking layer
    y: jax.Array  # (S, K) float32: cumulative logits of the slot's sample
    spikes: jax.Array  # (L, S) float32: the slot's spikes so far
    next: jax.Array  # int32 scalar: queue index of the next sample to load
    iterations: jax.Array  # int32 scalar
    predictions: jax.Array  # (N,) int32
    timesteps: jax.Array  # (N,) int32
    spikes_out: jax.Array  # (L, N) float32


def serve(graphdef, params, batch_stats, queue, param, *, fires, slots) -> ServeResult:
    """Continuous-batching anytime inference of a queue of recordings with an exit rule.

    Per iteration, for every slot s holding sample n = sample_s at step t = t_s (one network step on the S
    frames ``queue[sample_s, t_s]``)::

        y_s <- y_s + o_t[n]                     (o: the step's logits, membranes carried per slot)
        leave_s = busy_s and (fires(y_s, t_s, param) or t_s == T - 1)
        leaving:  predictions[n] = argmax y_s,  timesteps[n] = t_s + 1,  spikes[:, n] = spikes up to t_s
                  slot s takes the next queued sample (slots in index order), with v0, y = 0, t = 0
        else:     t_s <- t_s + 1

    Slots start with samples 0..S-1; the loop ends when every slot is idle. ``fires`` is applied to each
    slot on its own (``jax.vmap`` over slots), one step's logits (K,) and a scalar t, as ``first_exit``
    applies it to each step, so the decisions are those of ``cutoff.first_exit(fires, cum, param)``.

    Args:
      graphdef, params, batch_stats: the split spiking model (a ``models.SpikingNet``; a QCFS ANN converts
        first, ``aoi_jax.convert``).
      queue: the recordings in arrival order, sample-major (N, T, H, W, C) as ``FrameSet.frames``, float32 or
        integer counts (each gathered frame is cast to float32).
      param: the rule's parameter (a pytree: Top-K's beta (T,), an epsilon, a threshold, SpikeCP's qhat (T,)).
      fires: ``(y (..., K), t int32 scalar, param) -> (...) bool``, e.g. ``cutoff.RULES[r].fires`` or
        ``cutoff.never_fires`` (fixed T).  slots: S >= 2 (may exceed N: the extra slots stay idle).
    Returns:
      ``ServeResult``: predictions and 1-based exit timesteps (N,), spikes (L, N) up to each exit, and the
      slot-steps computed (S x iterations, at least ``sum(timesteps)``).
    Raises:
      ValueError: queue is not (N, T, H, W, C) with N, T >= 1, or slots < 2.
    """
    if queue.ndim != 5 or queue.shape[0] < 1 or queue.shape[1] < 1:
        raise ValueError(f"queue must be recordings (N, T, H, W, C) with N, T >= 1, got shape {queue.shape}")
    if not isinstance(slots, int) or slots < 2:
        raise ValueError(f"slots must be an int >= 2, got {slots!r} (with one row XLA:CPU computes the dense layers "
                         "as matrix-vector products, which add in another order than the multistep pass)")
    N, T = queue.shape[:2]
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    v0 = model.init_membranes((slots, *queue.shape[2:]))
    logits_shape = jax.eval_shape(lambda v, f: model.step(v, f, jnp.zeros(slots, jnp.int32))[1], v0,
                                  jax.ShapeDtypeStruct((slots, *queue.shape[2:]), jnp.float32))
    decide = jax.vmap(fires, in_axes=(0, 0, None))

    def reset(leave, fresh, value):
        return jnp.where(leave.reshape(leave.shape + (1,) * (value.ndim - 1)), fresh, value)

    def body(c: _Slots) -> _Slots:
        frame = queue[jnp.minimum(c.sample, N - 1), c.t].astype(jnp.float32)            # (S, H, W, C)
        membranes, logits, counts = model.step(c.membranes, frame, c.t)
        y = c.y + logits
        spikes = c.spikes + counts                                                       # (L, S)
        busy = c.sample < N
        leave = busy & (decide(y, c.t, param) | (c.t == T - 1))
        out = jnp.where(leave, c.sample, N)                                              # N: not written
        incoming = c.next + jnp.cumsum(leave, dtype=jnp.int32) - 1                       # k-th leaver takes next + k
        return _Slots(
            sample=jnp.where(leave, jnp.minimum(incoming, N), c.sample),
            t=jnp.where(leave | ~busy, 0, c.t + 1),
            membranes=jax.tree.map(lambda fresh, v: reset(leave, fresh, v), v0, membranes),   # any cell state
            y=reset(leave, 0.0, y),
            spikes=reset(leave, 0.0, spikes.T).T,
            next=jnp.minimum(c.next + jnp.sum(leave, dtype=jnp.int32), N),
            iterations=c.iterations + 1,
            predictions=c.predictions.at[out].set(jnp.argmax(y, axis=-1).astype(jnp.int32), mode="drop"),
            timesteps=c.timesteps.at[out].set(c.t + 1, mode="drop"),
            spikes_out=c.spikes_out.at[:, out].set(spikes, mode="drop"),
        )

    first = jnp.arange(slots, dtype=jnp.int32)
    init = _Slots(sample=jnp.minimum(first, N), t=jnp.zeros(slots, jnp.int32), membranes=v0,
                  y=jnp.zeros(logits_shape.shape, jnp.float32), spikes=jnp.zeros((len(v0), slots), jnp.float32),
                  next=jnp.int32(min(slots, N)), iterations=jnp.int32(0), predictions=jnp.zeros(N, jnp.int32),
                  timesteps=jnp.zeros(N, jnp.int32), spikes_out=jnp.zeros((len(v0), N), jnp.float32))
    c = jax.lax.while_loop(lambda c: jnp.any(c.sample < N), body, init)
    return ServeResult(c.predictions, c.timesteps, c.spikes_out, c.iterations * slots)


def make_serve(graphdef, fires, *, slots, compiler_options: dict | None = None):
    """``serve`` for one model structure, rule and S, jitted: ``(params, batch_stats, queue, param) ->
    ServeResult``. ``compiler_options``: XLA options for ``jax.jit`` (pass the evaluation step's, so that a
    step's logits are computed by the same kernels as the multistep logits)."""
    return jax.jit(functools.partial(serve, graphdef, fires=fires, slots=slots), compiler_options=compiler_options)
