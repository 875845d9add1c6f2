"""Task losses on per-step logits (docs/semantics.md section 4)."""

import jax.numpy as jnp
import optax


def _check(logits, labels):
    if logits.ndim != 3 or labels.shape != logits.shape[1:2]:
        raise ValueError(f"expected logits (T, N, K) and labels (N,), got {logits.shape} and {labels.shape}")


def mean_loss(logits, labels):
    """Cross-entropy of the time-mean logits::

        L = mean_n CE( (1/T) sum_t o_t[n], y_n )

    Args:
      logits: per-step logits, (T, N, K).  labels: integer classes, (N,).
    Returns:
      scalar loss.
    Raises:
      ValueError: shapes do not match.
    """
    _check(logits, labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits.mean(0), labels).mean()


def tet_loss(logits, labels, lam=1e-3, target=1.0):
    """Temporal efficient training loss (Deng et al. 2022)::

        L = (1 - lam) * mean_t mean_n CE(o_t[n], y_n) + lam * mean_{t,n,k} (o_t[n,k] - target)^2

    Args:
      logits: per-step logits, (T, N, K).  labels: integer classes, (N,).
      lam: weight of the MSE term (reference 1e-3).  target: the constant the MSE pulls logits towards.
    Returns:
      scalar loss.
    Raises:
      ValueError: shapes do not match.
    """
    _check(logits, labels)
    per_step = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.broadcast_to(labels, logits.shape[:2]))
    return (1.0 - lam) * per_step.mean() + lam * jnp.mean((logits - target) ** 2)
