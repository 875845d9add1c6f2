"""Evaluation on cumulative logits and the early-exit (cutoff) rules (docs/semantics.md sections 6-8).

Every function takes cumulative logits ``cum`` of shape (T, N, K), ``Y_n(t) = sum_{s<=t} o_s[n]`` (see
``cumulative``). An exit rule is a per-step decision ``fires(y, t, param) -> bool (...)`` on the cumulative
logits ``y`` (..., K) of one step t. ``RULES`` is the registry of exit rules, {name: ``Rule``}: each entry
holds its ``fires`` and how its parameter at a tolerance epsilon is obtained (calibrated on the calibration
split, or a function of epsilon and K); ``sweep``, the evaluation, report.json, the printed table, the figures
and ``evaluate.py --serve`` score every registered rule and read nothing else. The four built-in entries are the
paper's Top-K gap, max-softmax confidence, DT-SNN entropy and SpikeCP conformal sets.
``first_exit(fires, cum, param)`` applies a rule to all T steps at once: a sample leaves at the first t whose
rule fires, or at T, and predicts ``argmax Y_n(exit)`` (first index on ties); ``apply_topk``,
``confidence_cutoff``, ``entropy_cutoff`` and ``spikecp_cutoff`` are that with one rule each. A step-by-step
server that calls the same ``fires`` on each step's running sum exits exactly where ``first_exit`` does
(``cumulative`` adds in that loop's order; ``aoi_jax.anytime.serve`` is such a server). Fixed T is the rule
that never fires (``never_fires``); ``oct`` is the oracle; ``sweep`` scores every rule over an array of
epsilons. Every public function is jitted and its shape checks raise at trace time. Inputs are assumed finite.

A new rule is one registration (``register_rule``), e.g. in a module that ``evaluate.py --rules MODULE``
imports::

    @jax.jit
    def margin_fires(y, t, epsilon):
        '''Exit when the two largest softmax probabilities differ by more than 1 - 2 epsilon.'''
        p = jnp.sort(jax.nn.softmax(y), axis=-1)
        return p[..., -1] - p[..., -2] > 1.0 - 2.0 * epsilon

    cutoff.register_rule("margin", margin_fires)            # its parameter: epsilon itself

    predictions, timesteps = first_exit(margin_fires, cum, 0.05)        # all steps at once, (N,) each

    y, done, pred = jnp.zeros((N, K)), jnp.zeros(N, bool), jnp.zeros(N, int)   # or one step at a time
    for t in range(T):
        y = y + logits[t]
        leave = ~done & (margin_fires(y, t, 0.05) | (t == T - 1))      # the same exits
        pred = jnp.where(leave, jnp.argmax(y, axis=-1), pred)
        done = done | leave

A calibrated rule also passes ``param=lambda epsilon, calib: ...`` (``Calibration``: the calibration split's
cumulative logits and labels, and the Top-K grid settings), e.g. Top-K's
``lambda e, c: calibrate_topk(c.cum, c.labels, e, c.bins, c.min_support)``.
"""

import functools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def _check_cum(cum, name="cum"):
    if cum.ndim != 3:
        raise ValueError(f"{name} must be cumulative logits (T, N, K), got shape {cum.shape}")


def _check_two_classes(cum, rule):
    if cum.shape[-1] < 2:
        raise ValueError(f"{rule} needs K >= 2 classes, got cum {cum.shape}")


def _check_labels(labels, cum, name="labels"):
    if labels.ndim != 1 or labels.shape[0] != cum.shape[1]:
        raise ValueError(f"{name} must have shape (N,) = ({cum.shape[1]},) for cum {cum.shape}, "
                         f"got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")


def _scalar(value, name):
    value = jnp.asarray(value, jnp.float32)
    if value.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
    return value


def _check_per_step(values, cum, name):
    if values.shape != (cum.shape[0],):
        raise ValueError(f"{name} must have shape (T,) = ({cum.shape[0]},) for cum {cum.shape}, "
                         f"got {values.shape}")


def _gap(y):
    """top1 - top2 of y (..., K) over K: the largest entry minus the largest of the others (0 on a tie)."""
    first = jnp.argmax(y, axis=-1)
    others = jnp.where(jax.nn.one_hot(first, y.shape[-1], dtype=bool), -jnp.inf, y)
    second = jnp.argmax(others, axis=-1)         # argmax, then take: XLA:CPU fuses the mask into an argmax, not a max
    return jnp.max(y, axis=-1) - jnp.take_along_axis(y, second[..., None], axis=-1)[..., 0]


def _entropy(y):
    """H = log S - sum_k e_k z_k / S of y (..., K), with z = y - max y, e = exp(z), S = sum_k e_k."""
    z = y - jnp.max(y, axis=-1, keepdims=True)
    e = jnp.exp(z)
    s = jnp.sum(e, axis=-1)
    return jnp.log(s) - jnp.sum(e * z, axis=-1) / s


def _settled(correct):
    """settled[t, n] = prod_{s = t}^{T-1} correct[s, n]: correct at every step from t on, (T, N) bool."""
    return jnp.flip(jnp.cumprod(jnp.flip(correct, 0), axis=0), 0) == 1


# ----------------------------------------------------------------------------- section 6
@jax.jit
def cumulative(logits):
    """Cumulative sums of per-step logits over time, added one step at a time.

    docs/semantics.md section 6::

        Y_n(0) = o_0[n],   Y_n(t) = Y_n(t-1) + o_t[n]         (float32, one add per step, in order of t)

    The order of the additions is fixed (a ``lax.scan``), so Y is bit for bit the running sum of a loop that
    adds each step's logits as they come (``aoi_jax.anytime.serve``): both exit at the same step. (A
    triangular matmul gives the same sums in exact arithmetic, but its kernel may add in another order:
    XLA:CPU's does for N K >= 10000.) A non-finite logit makes the later sums non-finite.

    Args:
      logits: per-step logits o, (T, N, K).
    Returns:
      cumulative logits Y, (T, N, K) float32.
    Raises:
      ValueError: logits are not (T, N, K).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be per-step logits (T, N, K), got shape {logits.shape}")

    def add(y, o_t):
        y = y + o_t
        return y, y

    logits = logits.astype(jnp.float32)
    return lax.scan(add, jnp.zeros(logits.shape[1:], jnp.float32), logits)[1]


@jax.jit
def accuracy_per_timestep(cum, labels):
    """Accuracy of the prediction at every timestep (the fixed-T curve).

    docs/semantics.md section 6::

        acc[t] = mean_n 1[argmax_k Y_n(t)_k == y_n]

    Args:
      cum: cumulative logits, (T, N, K).  labels: integer classes, (N,).
    Returns:
      acc, (T,) float32.
    Raises:
      ValueError: cum is not (T, N, K), or labels are not integer (N,).
    """
    _check_cum(cum)
    _check_labels(labels, cum)
    return jnp.mean(jnp.argmax(cum, axis=-1) == labels[None, :], axis=1, dtype=jnp.float32)


@jax.jit
def oct(cum, labels):
    """The optimal cutoff timestep (OCT), an oracle: the first step from which the prediction stays correct.

    docs/semantics.md section 6::

        c[t, n] = 1[argmax Y_n(t) == y_n]
        c[t, n] = prod_{s = t}^{T-1} c[s, n]          (backward running product)
        c[T-1, n] = 1                                  (forced)
        g_n = first t with c[t, n] = 1;   timesteps_n = g_n + 1
        accuracy = mean_n 1[argmax Y_n(g_n) == y_n]    (= acc[T-1] by construction)

    Args:
      cum: cumulative logits, (T, N, K).  labels: integer classes, (N,).
    Returns:
      (accuracy scalar float32, timesteps (N,) int32, 1-based).
    Raises:
      ValueError: cum is not (T, N, K), or labels are not integer (N,).
    """
    _check_cum(cum)
    _check_labels(labels, cum)
    T, N = cum.shape[:2]
    correct = jnp.argmax(cum, axis=-1) == labels[None, :]                           # (T, N)
    g = jnp.argmax(_settled(correct).at[T - 1].set(True), axis=0)                  # (N,) first True
    return jnp.mean(correct[g, jnp.arange(N)], dtype=jnp.float32), (g + 1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the rules, one step each
@jax.jit
def topk_fires(y, t, beta):
    """Top-K rule at step t (docs/semantics.md section 7): ``gap(y) > beta[t]``, strict.

    Args:
      y: cumulative logits of step t, (..., K), K >= 2.  t: int step index.  beta: thresholds, (T,).
    Returns:
      (...) bool.
    """
    return _gap(y) > beta[t]


@jax.jit
def confidence_fires(y, t, epsilon):
    """Confidence rule (section 8): ``max_k softmax(y)_k > 1 - epsilon``; epsilon = 0 never fires.

    Args:
      y: cumulative logits of one step, (..., K).  t: step index (unused).  epsilon: scalar.
    Returns:
      (...) bool.
    """
    return jnp.max(jax.nn.softmax(y, axis=-1), axis=-1) > 1.0 - epsilon


@jax.jit
def entropy_fires(y, t, threshold):
    """DT-SNN entropy rule (section 8): ``H(softmax(y)) < threshold`` (nats, see ``entropy``).

    Args:
      y: cumulative logits of one step, (..., K).  t: step index (unused).  threshold: scalar.
    Returns:
      (...) bool.
    """
    return _entropy(y) < threshold


@jax.jit
def spikecp_fires(y, t, qhat):
    """SpikeCP rule at step t (section 8): the conformal set holds at most one class (the empty set too)::

        C_t = {k : score_k <= qhat[t]},  score = -log softmax(y);   fires iff |C_t| <= 1
            iff the second smallest score > qhat[t],  second smallest = min_k score_k + gap(y)

    (score_k = log S - (y_k - max y) ranks the classes as y does, so the runner-up's score is the top class's
    plus top1 - top2.)

    Args:
      y: cumulative logits of step t, (..., K), K >= 2.  t: int step index.  qhat: thresholds, (T,).
    Returns:
      (...) bool.
    """
    return jnp.min(-jax.nn.log_softmax(y, axis=-1), axis=-1) + _gap(y) > qhat[t]


@jax.jit
def never_fires(y, t, param):
    """Fixed T: the rule that never fires, so every sample runs all T steps (``param`` is unused).

    Args:
      y: cumulative logits of one step, (..., K).  t: step index (unused).  param: anything (unused).
    Returns:
      (...) bool, all False.
    """
    return jnp.zeros(y.shape[:-1], bool)


@functools.partial(jax.jit, static_argnums=0)
def first_exit(fires, cum, param):
    """Exit every sample at the first step where a per-step rule fires.

    ::

        exit_n = first t with fires(Y_n(t), t, param), else T - 1
        predictions_n = argmax_k Y_n(exit_n)_k  (first index on ties);   timesteps_n = exit_n + 1

    The rule is applied to each step as ``fires(cum[t], t, param)`` (``jax.vmap`` over t), so a loop that
    calls it on one step at a time makes the same decisions. ``fires`` is static: pass a named function.

    Args:
      fires: ``(y (N, K), t int32 scalar, param) -> (N,) bool``, e.g. ``RULES[name].fires``.
      cum: cumulative logits, (T, N, K).  param: the rule's parameter (any pytree, shared by all steps).
    Returns:
      (predictions (N,) int32, timesteps (N,) int32, 1-based).
    Raises:
      ValueError: cum is not (T, N, K).
    """
    _check_cum(cum)
    T, N = cum.shape[:2]
    fired = jax.vmap(fires, in_axes=(0, 0, None))(cum, jnp.arange(T), param)       # (T, N)
    exit_t = jnp.argmax(fired.at[T - 1].set(True), axis=0)                         # (N,) first True
    predictions = jnp.argmax(cum[exit_t, jnp.arange(N)], axis=-1)                   # argmax Y_n(exit_n)
    return predictions.astype(jnp.int32), (exit_t + 1).astype(jnp.int32)


# ----------------------------------------------------------------------------- section 7: Top-K
@jax.jit
def topk_gap(cum):
    """Gap between the largest and second largest cumulative logit (raw, no softmax).

    docs/semantics.md section 7::

        gap[t, n] = top1(Y_n(t)) - top2(Y_n(t))        (0 when the top two tie)

    Args:
      cum: cumulative logits, (T, N, K) with K >= 2.
    Returns:
      gap, (T, N) float32, >= 0.
    Raises:
      ValueError: cum is not (T, N, K), or K < 2.
    """
    _check_cum(cum)
    _check_two_classes(cum, "the Top-K gap")
    return _gap(cum)


def _count_above(above, weights, bins):
    """sum_n weights[t, n] 1[above[t, n] > m] for m = 0..bins-1, (bins, T): a histogram of above per t
    (above in [0, bins]), summed from the top."""
    T = above.shape[0]
    hist = jnp.zeros((T, bins + 1), jnp.int32).at[jnp.arange(T)[:, None], above].add(weights)
    return jnp.flip(jnp.cumsum(jnp.flip(hist, 1), axis=1), 1)[:, 1:].T


@functools.partial(jax.jit, static_argnames="bins")
def calibrate_topk(cum, labels, epsilon=0.0, bins=100, min_support=0):
    """Per-timestep Top-K thresholds beta_t, calibrated on (training) cumulative logits.

    docs/semantics.md section 7 (as the reference's ``TopKCutoff.setup``)::

        settled[t, n] = prod_{s = t}^{T-1} 1[argmax Y_n(s) == y_n]        (the OCT rule, not forced)
        delta = max_{t, n} gap[t, n] / bins;   beta_m = m * delta,  m = 0..bins-1   (float32)
        sel = 1[gap[t, n] > beta_m]   (strict)
        support[m, t] = sum_n sel;   hits[m, t] = sum_n sel * settled[t];   conf = hits / support   (0 / 0 = NaN)
        qualifies[m, t] = conf[m, t] >= 1 - epsilon  and  support[m, t] >= min_support,   row bins-1 always
        beta_t = beta_{m*},  m* = first m that qualifies

    ``min_support = 0`` is the reference rule; ``min_support > 0`` refuses thresholds supported by fewer
    selected samples (docs/semantics.md section 9, defect 1). NaN never qualifies.
    The counts over n come from each gap's place in the (non-decreasing) grid, ``above[t, n] = #{m : beta_m <
    gap[t, n]}`` (so ``gap > beta_m  <=>  m < above``), and one histogram of ``above`` per t.

    Args:
      cum: cumulative logits, (T, N, K), K >= 2.  labels: integer classes, (N,).
      epsilon: scalar tolerance, 0 <= epsilon < 1 (may be traced, e.g. under ``jax.vmap``).
      bins: number of grid points, a Python int >= 1 (static).  min_support: scalar minimum of ``support``.
    Returns:
      beta, (T,) float32.
    Raises:
      ValueError: cum is not (T, N, K) with K >= 2, labels are not integer (N,), epsilon or min_support is
        not a scalar, or bins is not a positive int.
    """
    _check_cum(cum)
    _check_two_classes(cum, "the Top-K gap")
    _check_labels(labels, cum)
    epsilon = _scalar(epsilon, "epsilon")
    if jnp.ndim(min_support) != 0:
        raise ValueError(f"min_support must be a scalar, got shape {jnp.shape(min_support)}")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    gap = _gap(cum)                                                                 # (T, N)
    settled = _settled(jnp.argmax(cum, axis=-1) == labels[None, :])                 # (T, N)
    # XLA rewrites x / constant as x * (1 / constant), which is not exact (10 / 100 -> 0.099999994): the barrier
    # keeps bins opaque so that delta is the correctly rounded quotient, as in the reference.
    delta = jnp.max(gap) / lax.optimization_barrier(jnp.float32(bins))
    grid = jnp.arange(bins, dtype=jnp.float32) * delta                              # beta_m, (bins,)
    above = jnp.searchsorted(grid, gap, side="left", method="scan_unrolled")        # (T, N) in [0, bins]
    support = _count_above(above, 1, bins)                                          # (bins, T)
    hits = _count_above(above, settled.astype(jnp.int32), bins)
    conf = hits.astype(jnp.float32) / support.astype(jnp.float32)                  # (bins, T), NaN on 0 / 0
    last = jnp.arange(bins)[:, None] == bins - 1
    qualifies = ((conf >= 1.0 - epsilon) & (support >= min_support)) | last
    return grid[jnp.argmax(qualifies, axis=0)]


@jax.jit
def apply_topk(cum, beta):
    """Top-K cutoff: exit at the first step whose gap exceeds that step's threshold.

    docs/semantics.md section 7; ``first_exit(topk_fires, cum, beta)``::

        exit_n = first t with gap[t, n] > beta_t, else T - 1
        predictions_n = argmax Y_n(exit_n);   timesteps_n = exit_n + 1

    Args:
      cum: cumulative logits, (T, N, K), K >= 2.  beta: thresholds, (T,) (from ``calibrate_topk``).
    Returns:
      (predictions (N,) int32, timesteps (N,) int32, 1-based).
    Raises:
      ValueError: cum is not (T, N, K) with K >= 2, or beta is not (T,).
    """
    _check_cum(cum)
    _check_two_classes(cum, "the Top-K gap")
    _check_per_step(beta, cum, "beta")
    return first_exit(topk_fires, cum, beta)


# ----------------------------------------------------------------------------- section 8: other rules
@jax.jit
def confidence_cutoff(cum, epsilon):
    """Max-softmax confidence cutoff.

    docs/semantics.md section 8 (as the reference's ``ConfCutoff``); ``first_exit(confidence_fires, ...)``::

        p_n(t) = softmax(Y_n(t));   exit_n = first t with max_k p_n(t)_k > 1 - epsilon, else T - 1
        predictions_n = argmax Y_n(exit_n);   timesteps_n = exit_n + 1

    ``epsilon = 0`` never fires (max p <= 1), so every sample runs to T.

    Args:
      cum: cumulative logits, (T, N, K).  epsilon: scalar tolerance (may be traced).
    Returns:
      (predictions (N,) int32, timesteps (N,) int32, 1-based).
    Raises:
      ValueError: cum is not (T, N, K), or epsilon is not a scalar.
    """
    _check_cum(cum)
    return first_exit(confidence_fires, cum, _scalar(epsilon, "epsilon"))


@jax.jit
def entropy(cum):
    """Entropy of softmax(Y_n(t)) in nats, as DT-SNN's exit score.

    docs/semantics.md section 8::

        H[t, n] = -sum_k p_k log p_k = log S - sum_k e_k z_k / S,   z = Y - max Y, e = exp(z), S = sum_k e_k

    Both terms are >= 0, so H >= 0 exactly.

    Args:
      cum: cumulative logits, (T, N, K).
    Returns:
      H, (T, N) float32.
    Raises:
      ValueError: cum is not (T, N, K).
    """
    _check_cum(cum)
    return _entropy(cum)


@functools.partial(jax.jit, static_argnames="num_classes")
def entropy_threshold(epsilon, num_classes):
    """The entropy threshold ``sweep`` pairs with a tolerance epsilon: Fano's bound.

    ::

        threshold(epsilon) = h(epsilon) + epsilon log(K - 1),   h(x) = -x log x - (1 - x) log(1 - x)

    By Fano's inequality a distribution with max p > 1 - epsilon has entropy below this (for epsilon <=
    (K-1)/K), so at equal epsilon the entropy rule exits no later than the confidence rule.
    epsilon = 0 gives 0: the rule never fires.

    Args:
      epsilon: tolerances, any shape.  num_classes: K, a Python int >= 2 (static).
    Returns:
      thresholds in nats, float32, the shape of epsilon.
    Raises:
      ValueError: num_classes < 2.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    eps = jnp.asarray(epsilon, jnp.float32)
    h = -jax.scipy.special.xlogy(eps, eps) - jax.scipy.special.xlogy(1.0 - eps, 1.0 - eps)
    return h + eps * jnp.log(jnp.float32(num_classes - 1))


@jax.jit
def entropy_cutoff(cum, threshold):
    """DT-SNN entropy cutoff (Li et al. 2023): exit once the softmax entropy falls below a threshold.

    docs/semantics.md section 8; ``first_exit(entropy_fires, cum, threshold)``::

        exit_n = first t with H[t, n] < threshold, else T - 1        (H from ``entropy``, nats)
        predictions_n = argmax Y_n(exit_n);   timesteps_n = exit_n + 1

    Args:
      cum: cumulative logits, (T, N, K).  threshold: scalar, nats (may be traced; see ``entropy_threshold``).
    Returns:
      (predictions (N,) int32, timesteps (N,) int32, 1-based).
    Raises:
      ValueError: cum is not (T, N, K), or threshold is not a scalar.
    """
    _check_cum(cum)
    return first_exit(entropy_fires, cum, _scalar(threshold, "threshold"))


@jax.jit
def calibrate_spikecp(cum, labels, epsilon):
    """SpikeCP (Chen et al., arXiv 2305.11322): per-timestep split-conformal thresholds.

    docs/semantics.md section 8; on a calibration split of n samples, per timestep t::

        score[t, i] = -log softmax(Y_i(t))_{y_i}                  (no 1e-5 inside the log)
        k = ceil((n + 1) (1 - epsilon))                           (float32 arithmetic)
        qhat_t = sort(score[t, :])[k - 1]   if 1 <= k <= n;   +inf if k > n;   -inf if k < 1

    Sets ``C_t(x) = {k : -log softmax(Y(t))_k <= qhat_t}`` then cover the label with probability >= 1 - epsilon
    at each t separately (no correction across timesteps, as in the reference). epsilon = 0 gives +inf.
    The reference's ``SpikeCPCutoff`` differs: it scores -log(p_y + 1e-5), appends +inf to the n scores, takes
    the (ceil((1 - epsilon)(n + 2)) - 1)-th smallest (one rank lower than ours in about an epsilon fraction of
    cases) and keeps classes with a score strictly below it.

    Args:
      cum: cumulative logits of the calibration split, (T, n, K).  labels: integer classes, (n,).
      epsilon: scalar miscoverage (may be traced).
    Returns:
      qhat, (T,) float32.
    Raises:
      ValueError: cum is not (T, N, K), labels are not integer (N,), or epsilon is not a scalar.
    """
    _check_cum(cum)
    _check_labels(labels, cum)
    epsilon = _scalar(epsilon, "epsilon")
    n = cum.shape[1]
    scores = -jax.nn.log_softmax(cum, axis=-1)[:, jnp.arange(n), labels]          # (T, n)
    k = jnp.ceil((n + 1) * (1.0 - epsilon)).astype(jnp.int32)
    qhat = jnp.sort(scores, axis=1)[:, jnp.clip(k, 1, n) - 1]
    return jnp.where(k > n, jnp.inf, jnp.where(k < 1, -jnp.inf, qhat))


@jax.jit
def spikecp_cutoff(cum, qhat):
    """SpikeCP cutoff: exit once the conformal set holds at most one class.

    docs/semantics.md section 8; ``first_exit(spikecp_fires, cum, qhat)``::

        C_t(x_n) = {k : -log softmax(Y_n(t))_k <= qhat_t}
        exit_n = first t with |C_t(x_n)| <= 1, else T - 1         (the empty set exits too)
        predictions_n = argmax Y_n(exit_n);   timesteps_n = exit_n + 1

    Args:
      cum: cumulative logits, (T, N, K), K >= 2.  qhat: thresholds, (T,) (from ``calibrate_spikecp``).
    Returns:
      (predictions (N,) int32, timesteps (N,) int32, 1-based).
    Raises:
      ValueError: cum is not (T, N, K) with K >= 2, or qhat is not (T,).
    """
    _check_cum(cum)
    _check_per_step(qhat, cum, "qhat")
    _check_two_classes(cum, "SpikeCP")
    return first_exit(spikecp_fires, cum, qhat)


# ----------------------------------------------------------------------------- the registry
class Calibration(NamedTuple):
    """What a rule's parameter is calibrated from (``Rule.param``'s second argument)."""

    cum: jax.Array  # (T, Nc, K) float32: cumulative logits of the calibration split
    labels: jax.Array  # (Nc,) int: its labels
    bins: int  # the Top-K grid (eval.bins), a Python int
    min_support: Any  # scalar: Top-K's minimum support (eval.min_support)


class Rule(NamedTuple):
    """An entry of ``RULES`` (made by ``register_rule``)."""

    fires: Callable  # (y (..., K), t int32 scalar, param) -> (...) bool
    param: Callable | None  # (epsilon scalar, Calibration) -> param at epsilon (jax.vmap-able); None: epsilon
    key: str | None  # the sweep result's and report.json's field of the param per epsilon, (E, ...); None: none


RULES: dict[str, Rule] = {}
_SWEEP_KEYS = ("epsilons", "rules", "fixed_t_accuracy", "oct_accuracy", "oct_timestep", "oct_timesteps")


def register_rule(name: str, fires: Callable, *, param: Callable | None = None, key: str | None = None) -> Rule:
    """Adds an exit rule to ``RULES``: every later ``sweep``, evaluation, report, table, figure and
    ``evaluate.py --serve`` scores it with the others.

    ::

        param is None:  param(epsilon) = epsilon                          (nothing stored)
        else:           param(epsilon) = param(epsilon, Calibration(cum_calib, labels_calib, bins, min_support))
                        stored per epsilon as result[key] / report[key], key = f"{name}_param" by default

    Args:
      name: the rule's name in reports and tables (letters, digits, ``_``; not registered yet).
      fires: ``(y (..., K), t int32 scalar, param) -> (...) bool``; a jitted function (``first_exit`` and
        ``anytime.serve`` take it as a static argument).
      param: how the rule's parameter at a tolerance epsilon is obtained (traced epsilon, vmapped over the
        epsilons); None: the parameter is epsilon itself.
      key: the result/report field of the parameters (only with ``param``).
    Returns:
      the new ``Rule``.
    Raises:
      ValueError: name is not an identifier or is registered; fires or param is not callable; key without
        param, or key taken by another rule or by ``sweep``'s own fields.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"an exit rule's name must be letters, digits and _, got {name!r}")
    if name in RULES:
        raise ValueError(f"exit rule {name!r} is already registered (registered: {list(RULES)})")
    if not callable(fires) or (param is not None and not callable(param)):
        raise ValueError(f"exit rule {name!r}: fires and param must be callables, got {fires!r} and {param!r}")
    if param is None and key is not None:
        raise ValueError(f"exit rule {name!r}: key {key!r} needs a param (without one the parameter is epsilon)")
    if param is not None:
        key = f"{name}_param" if key is None else key
        taken = {r.key: n for n, r in RULES.items() if r.key is not None}
        if key in taken or key in _SWEEP_KEYS:
            raise ValueError(f"exit rule {name!r}: key {key!r} is taken "
                             f"({'by rule ' + repr(taken[key]) if key in taken else 'by sweep'})")
    RULES[name] = Rule(fires, param, key)
    sweep.clear_cache()                            # sweep reads RULES when it traces: trace again with this one
    return RULES[name]


# ----------------------------------------------------------------------------- all rules, all epsilons
@functools.partial(jax.jit, static_argnames="bins")
def sweep(cum_calib, labels_calib, cum_test, labels_test, epsilons, *, bins=100, min_support=0, params=None):
    """Every registered exit rule over a whole array of tolerances at once (``jax.vmap`` over E), plus fixed T
    and OCT.

    docs/semantics.md sections 6-8. Per rule r of ``RULES`` and epsilon e (calibration split c, test split t)::

        param_r(e) = params[r][e]  if given,  else  e  (r.param None),  else  r.param(e, Calibration(cum_c, y_c,
                     bins, min_support))
        exits:       first_exit(r.fires, cum_t, param_r(e))
        accuracy = mean_n 1[prediction_n == y_n];   mean_timestep = mean_n timesteps_n

    The built-in rules give: topk ``apply_topk(cum_t, calibrate_topk(cum_c, y_c, e, bins, min_support))``,
    confidence ``confidence_cutoff(cum_t, e)``, entropy ``entropy_cutoff(cum_t, entropy_threshold(e, K))``,
    spikecp ``spikecp_cutoff(cum_t, calibrate_spikecp(cum_c, y_c, e))``. Under ``jax.vmap`` the work that does
    not depend on epsilon (gaps, softmax, the Top-K histograms, the sorted conformal scores) runs once.
    Jitted, ``bins`` static; ``RULES`` is read when it traces (``register_rule`` clears the compiled ones).

    Args:
      cum_calib: (T, Nc, K) calibration (training) cumulative logits.  labels_calib: (Nc,).
      cum_test: (T, N, K) test cumulative logits.  labels_test: (N,).
      epsilons: tolerances, (E,).  bins, min_support: as in ``calibrate_topk``.
      params: {rule: its parameters per epsilon, (E, ...)} used instead of the registry's (e.g. explicit
        entropy thresholds in nats), or None.
    Returns:
      dict with ``epsilons`` (E,); ``rules``: {rule: {"accuracy": (E,), "mean_timestep": (E,), "timesteps":
      (E, N) int32 (each test sample's 1-based exit)}} for every rule of ``RULES``; ``fixed_t_accuracy`` (T,)
      (test accuracy per timestep); ``oct_accuracy`` and ``oct_timestep`` (scalars: test OCT accuracy and mean
      timestep); ``oct_timesteps`` (N,) int32 (each test sample's OCT exit); and for every rule with a ``key``,
      its parameters per epsilon under that key: ``topk_beta`` (E, T), ``entropy_threshold`` (E,),
      ``spikecp_qhat`` (E, T).
    Raises:
      ValueError: a cum is not (T, N, K), the two splits differ in T or K, labels do not match their split,
        epsilons is not (E,), or params names an unregistered rule or is not (E, ...).
    """
    _check_cum(cum_calib, "cum_calib")
    _check_cum(cum_test, "cum_test")
    if cum_calib.shape[0] != cum_test.shape[0] or cum_calib.shape[2] != cum_test.shape[2]:
        raise ValueError(f"cum_calib and cum_test must share T and K, got {cum_calib.shape} and {cum_test.shape}")
    _check_labels(labels_calib, cum_calib, "labels_calib")
    _check_labels(labels_test, cum_test, "labels_test")
    epsilons = jnp.asarray(epsilons, jnp.float32)
    if epsilons.ndim != 1:
        raise ValueError(f"epsilons must have shape (E,), got {epsilons.shape}")
    given = dict(params or {})
    unknown = sorted(set(given) - set(RULES))
    if unknown:
        raise ValueError(f"params names rules {unknown} that are not registered (registered: {list(RULES)})")
    calib = Calibration(cum_calib, labels_calib, bins, min_support)
    params = {}                                                                      # each rule's param per epsilon
    for name, rule in RULES.items():
        if name in given:
            params[name] = jax.tree.map(jnp.asarray, given[name])
            bad = [x.shape for x in jax.tree.leaves(params[name]) if x.shape[:1] != epsilons.shape]
            if bad:
                raise ValueError(f"params[{name!r}] must have leading axis E = {epsilons.shape[0]} (one per "
                                 f"epsilon), got shapes {bad}")
        elif rule.param is None:
            params[name] = epsilons
        else:
            params[name] = jax.vmap(lambda e, rule=rule: rule.param(e, calib))(epsilons)

    def score(fires, param):
        predictions, timesteps = first_exit(fires, cum_test, param)
        return {"accuracy": jnp.mean(predictions == labels_test, dtype=jnp.float32),
                "mean_timestep": jnp.mean(timesteps, dtype=jnp.float32), "timesteps": timesteps}

    oct_accuracy, oct_timesteps = oct(cum_test, labels_test)
    return {
        "epsilons": epsilons,
        "rules": {name: jax.vmap(functools.partial(score, rule.fires))(params[name]) for name, rule in RULES.items()},
        "fixed_t_accuracy": accuracy_per_timestep(cum_test, labels_test),
        "oct_accuracy": oct_accuracy,
        "oct_timestep": jnp.mean(oct_timesteps, dtype=jnp.float32),
        "oct_timesteps": oct_timesteps,
        **{rule.key: params[name] for name, rule in RULES.items() if rule.key is not None},
    }

register_rule("topk", topk_fires, param=lambda e, c: calibrate_topk(c.cum, c.labels, e, c.bins, c.min_support),
              key="topk_beta")
register_rule("confidence", confidence_fires)
register_rule("entropy", entropy_fires, param=lambda e, c: entropy_threshold(e, c.cum.shape[2]),
              key="entropy_threshold")
register_rule("spikecp", spikecp_fires, param=lambda e, c: calibrate_spikecp(c.cum, c.labels, e), key="spikecp_qhat")
