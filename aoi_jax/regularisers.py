"""RCS, the Regularising Cosine Similarity regulariser (docs/semantics.md section 5).

``rcs_scores`` scores each sample of one spiking layer by how little its activity changes over time;
``rcs_loss`` masks the scores to samples that are already correct late in time and penalises each
layer's worst one. ``rcs_ann_scores`` is the ANN form used with QCFS pre-activations.
"""

import jax
import jax.numpy as jnp


def _num_last(T, fraction):
    """``int(T * fraction)``, with 0 meaning all T steps."""
    k = int(T * fraction)
    return T if k == 0 else k


def _max_by_argmax(x, axis=None):
    """``jnp.max(x, axis)`` whose gradient flows to the (first) maximal entry only.

    ``jnp.max`` differentiates as ``1[x == max] / count(x == max)``; under ``jax.jit`` XLA may fuse the
    recomputed operand differently from the forward pass, so that no entry equals the max and the gradient
    is 0/0 = NaN (it happened in QCFS training, and a NaN times alpha = 0 is still NaN). A gather at the
    argmax has no such division; it routes the gradient like torch's ``max(dim)``.
    """
    if axis is None:
        flat = x.reshape(-1)
        return flat[jnp.argmax(flat)]
    idx = jnp.expand_dims(jnp.argmax(x, axis=axis), axis)
    return jnp.take_along_axis(x, idx, axis=axis).squeeze(axis)


def rcs_scores(spikes, membranes, vth=1.0, window=0.3):
    """Per-sample RCS score of one spiking layer (docs/semantics.md section 5; plain jnp, autodiff)::

        r_t   = s_t + relu(V_t / vth)                                  (T, N, ...)
        k     = int(T * window)   (k == 0 -> all T steps)
        r_d   = stop_gradient(mean of r_t over the last k steps)        (N, ...)
        cos_t = <r_t, r_d> / (sqrt(sum r_t^2 + 1e-5) sqrt(sum r_d^2 + 1e-5))   sums over all non-(T, N) axes
        score = 1 / (mean_t cos_t + 1e-5)                                (N,)

    Args:
      spikes: s, (T, N, ...).  membranes: V after reset, (T, N, ...).
      vth: the layer's threshold, a number or an array, () or (C,) (per channel of the trailing axis; a learnt
        threshold receives the gradient).  window: fraction of last steps in the delayed target.
    Returns:
      scores, (N,); large when the layer's response changes over time.
    Raises:
      ValueError: spikes and membranes differ in shape, or lack a (T, N) prefix.
    """
    if spikes.shape != membranes.shape or spikes.ndim < 2:
        raise ValueError(f"spikes and membranes must share a (T, N, ...) shape, got {spikes.shape} "
                         f"and {membranes.shape}")
    T, N = spikes.shape[:2]
    vth = jnp.asarray(vth)
    vth = vth.reshape((1,) * (membranes.ndim - vth.ndim) + vth.shape)          # () or (C,): per channel
    r = (spikes + jax.nn.relu(membranes / vth)).reshape(T, N, -1)
    r_d = jax.lax.stop_gradient(r[T - _num_last(T, window):].mean(0))          # (N, D)
    exact = jax.lax.Precision.HIGHEST                                            # no TF32 on GPUs
    dot = jnp.einsum("tnd,nd->tn", r, r_d, precision=exact)                      # (T, N)
    square = jnp.einsum("tnd,tnd->tn", r, r, precision=exact)                    # (T, N)
    norm_t = jnp.sqrt(square + 1e-5)
    norm_d = jnp.sqrt(jnp.sum(r_d * r_d, axis=-1) + 1e-5)                        # (N,)
    cos = dot / (norm_t * norm_d[None, :])
    return 1.0 / (cos.mean(0) + 1e-5)


def rcs_ann_scores(preactivations):
    """Per-sample RCS score of one ANN layer (QCFS conversion), on pre-activations x::

        x+       = relu(x)                                               (N, ...)
        score[n] = max(x+ over the whole batch) / sqrt(mean over (C, H, W) of x+[n]^2 + 1e-5)

    Args:
      preactivations: x, (N, ...).
    Returns:
      scores, (N,).
    """
    xp = jax.nn.relu(preactivations.reshape(preactivations.shape[0], -1))
    return _max_by_argmax(xp) / jnp.sqrt(jnp.mean(xp * xp, axis=-1) + 1e-5)


def correct_late_mask(logits, labels, rcs_n=0.3):
    """1 for samples whose per-step prediction is correct at each of the last j steps::

        j       = int(T * rcs_n)   (j == 0 -> all T steps)
        mask[n] = prod over the last j steps of 1[argmax o_t[n] == y_n]      (no gradient)

    Args:
      logits: per-step logits o, (T, N, K).  labels: (N,).
    Returns:
      mask, (N,) float32.
    """
    T = logits.shape[0]
    correct = jnp.argmax(logits[T - _num_last(T, rcs_n):], axis=-1) == labels[None, :]
    return jax.lax.stop_gradient(jnp.all(correct, axis=0).astype(jnp.float32))


def rcs_loss(scores, logits, labels, rcs_n=0.3):
    """Assembles the RCS loss over layers and the batch::

        mask[n]  = correct_late_mask(logits, labels, rcs_n)[n]
        rcs_loss = mean over layers l of ( max over n of scores[l, n] * mask[n] )

    A layer with no qualifying sample contributes 0.

    Args:
      scores: (L, N) from ``rcs_scores`` (or ``rcs_ann_scores``), one row per layer.
      logits: per-step logits, (T, N, K) (for the ANN form use T = 1).  labels: (N,).
      rcs_n: fraction of last steps that must be correct.
    Returns:
      scalar loss.
    Raises:
      ValueError: shapes do not match.
    """
    if scores.ndim != 2 or logits.ndim != 3 or scores.shape[1] != logits.shape[1] \
            or labels.shape != (logits.shape[1],):
        raise ValueError(f"expected scores (L, N), logits (T, N, K), labels (N,), got {scores.shape}, "
                         f"{logits.shape}, {labels.shape}")
    mask = correct_late_mask(logits, labels, rcs_n)
    return jnp.mean(_max_by_argmax(scores * mask[None, :], axis=1))
