"""Evaluation on cumulative logits and the early-exit (cutoff) rules (reference-semantics.md sections 6-8).

Every function takes cumulative logits ``cum`` of shape (T, N, K), ``Y_n(t) = sum_{s<=t} o_s[n]`` (see
``cumulative``), and returns 1-based int32 exit timesteps. An exit rule returns ``(predictions (N,),
timesteps (N,))``: a sample leaves at the first t whose rule fires, or at T, and predicts ``argmax Y_n(exit)``
(first index on ties). The rules are the paper's Top-K gap (``calibrate_topk``, ``apply_topk``), max-softmax
confidence, DT-SNN entropy and SpikeCP conformal sets; ``oct`` is the oracle. ``sweep`` scores all rules over a
whole array of epsilons E at once. All functions are pure and jit-compatible; shape checks raise at trace time.
Inputs are assumed finite.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

RULES = ("topk", "confidence", "entropy", "spikecp")


def _check_cum(cum, name="cum"):
    if cum.ndim != 3:
        raise ValueError(f"{name} must be cumulative logits (T, N, K), got shape {cum.shape}")


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


def _per_step(values, cum, name):
    if values.shape != (cum.shape[0],):
        raise ValueError(f"{name} must have shape (T,) = ({cum.shape[0]},) for cum {cum.shape}, "
                         f"got {values.shape}")


def _reduce(operands, init, combine, axis):
    """Variadic ``lax.reduce`` over one axis; a length-1 axis is squeezed instead (XLA:CPU in jax 0.10.2 aborts
    or crashes compiling some variadic reductions over a length-1 axis; every ``init`` here is an identity)."""
    if operands[0].shape[axis] == 1:
        return tuple(jnp.squeeze(x, axis) for x in operands)
    return lax.reduce(operands, init, combine, (axis,))


def _earliest(a, b):
    """Reducer over (fired, t, payload): the fired entry with the smallest t (else the smallest t)."""
    (a_fire, a_t, a_pred), (b_fire, b_t, b_pred) = a, b
    a_wins = (a_fire > b_fire) | ((a_fire == b_fire) & (a_t < b_t))
    return jnp.maximum(a_fire, b_fire), jnp.where(a_wins, a_t, b_t), jnp.where(a_wins, a_pred, b_pred)


def _exit(fire, predictions_t):
    """First t with ``fire[t, n]`` (T - 1 if none) -> (predictions_t[t, n] (N,), t + 1 (N,)).

    One variadic reduction over time carrying the prediction along (no gather).
    """
    T = fire.shape[0]
    t = lax.broadcasted_iota(jnp.int32, fire.shape, 0)
    fire = (fire | (t == T - 1)).astype(jnp.int32)
    init = (jnp.int32(0), jnp.int32(T), jnp.zeros((), predictions_t.dtype))
    _, first, predictions = _reduce((fire, t, predictions_t), init, _earliest, 0)
    return predictions, first + 1


def _merge_top2(a, b):
    """Reducer over (value, index, runner-up): the larger value (first index on ties) and the runner-up."""
    (a1, ai, a2), (b1, bi, b2) = a, b
    a_wins = (a1 > b1) | ((a1 == b1) & (ai < bi))
    return (jnp.where(a_wins, a1, b1), jnp.where(a_wins, ai, bi),
            jnp.maximum(jnp.minimum(a1, b1), jnp.maximum(a2, b2)))


def _top2(cum):
    """(top1, top2, argmax) over the last axis in one pass: a variadic ``lax.reduce`` over (value, index, runner-up).

    argmax is the first index of the maximum (as ``jnp.argmax``); top2 = top1 when the maximum is tied. One
    variadic reduce is several times faster on XLA:CPU than ``max``, ``argmax`` and a masked ``max`` apart.
    """
    index = lax.broadcasted_iota(jnp.int32, cum.shape, cum.ndim - 1)
    lowest = jnp.full_like(cum, -jnp.inf)
    init = (jnp.array(-jnp.inf, cum.dtype), jnp.int32(cum.shape[-1]), jnp.array(-jnp.inf, cum.dtype))
    top1, first, top2 = _reduce((cum, index, lowest), init, _merge_top2, cum.ndim - 1)
    return top1, top2, first


def _predictions(cum):
    return _top2(cum)[2]                                                           # (T, N) int32


def _correct(cum, labels):
    return _predictions(cum) == labels[None, :]                                    # (T, N)


def _settled(correct):
    """settled[t, n] = correct at every step t..T-1, as ``t > last wrong step`` (no scan over time)."""
    t = lax.broadcasted_iota(jnp.int32, correct.shape, 0)
    last_wrong = jnp.max(jnp.where(correct, -1, t), axis=0)                         # (N,), -1 if never wrong
    return t > last_wrong[None, :]


def cumulative(logits):
    """Cumulative sums of per-step logits over time, as one lower-triangular matmul.

    reference-semantics.md section 6::

        Y_n(t) = sum_{s <= t} o_s[n]        (float32, precision HIGHEST: exact products by 0 and 1)

    On XLA:CPU the (T, T) matmul is several times faster than ``jnp.cumsum`` over the leading axis.
    A non-finite logit makes the later sums NaN (0 * inf).

    Args:
      logits: per-step logits o, (T, N, K).
    Returns:
      cumulative logits Y, (T, N, K) float32.
    Raises:
      ValueError: logits are not (T, N, K).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be per-step logits (T, N, K), got shape {logits.shape}")
    T = logits.shape[0]
    tri = jnp.tril(jnp.ones((T, T), jnp.float32))
    flat = logits.astype(jnp.float32).reshape(T, -1)
    return jnp.matmul(tri, flat, precision=lax.Precision.HIGHEST).reshape(logits.shape)


def accuracy_per_timestep(cum, labels):
    """Accuracy of the prediction at every timestep (the fixed-T curve).

    reference-semantics.md section 6::

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
    return jnp.mean(_correct(cum, labels), axis=1, dtype=jnp.float32)


def oct(cum, labels):
    """The optimal cutoff timestep (OCT), an oracle: the first step from which the prediction stays correct.

    reference-semantics.md section 6::

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
    correct = _correct(cum, labels)
    settled = _settled(correct)
    hit, timesteps = _exit(settled, correct.astype(jnp.int32))
    return jnp.mean(hit, dtype=jnp.float32), timesteps


def topk_gap(cum):
    """Gap between the largest and second largest cumulative logit (raw, no softmax).

    reference-semantics.md section 7::

        gap[t, n] = top1(Y_n(t)) - top2(Y_n(t))        (0 when the top two tie)

    Computed in one variadic reduction over K (``lax.top_k`` is ~100x slower on XLA:CPU).

    Args:
      cum: cumulative logits, (T, N, K) with K >= 2 (any leading shape (..., K) works the same).
    Returns:
      gap, (T, N) float32, >= 0.
    Raises:
      ValueError: cum is not (T, N, K), or K < 2.
    """
    _check_cum(cum)
    if cum.shape[-1] < 2:
        raise ValueError(f"the Top-K gap needs K >= 2 classes, got cum {cum.shape}")
    top1, top2, _ = _top2(cum)
    return top1 - top2


def _grid_count(gap, delta, bins):
    """cnt = #{m < bins : m * delta < gap} exactly, m * delta rounded to float32 as in the grid.

    q = ceil(gap / delta) is within 1 of cnt (each rounding is relative 2^-24 and gap / delta <= bins), so all
    m <= q - 2 count and no m >= q + 2 does; the grid points q - 1, q, q + 1 are compared directly. Ten times
    faster than ``jnp.searchsorted`` on CPU. delta = 0 (every grid point 0): cnt = bins where gap > 0.
    """
    q = jnp.where(delta > 0, jnp.clip(jnp.ceil(gap / delta), 0, bins + 1), 0).astype(jnp.int32)
    cnt = jnp.clip(q - 1, 0, bins)
    for m in (q - 1, q, q + 1):
        cnt = cnt + ((m >= 0) & (m < bins) & (m.astype(jnp.float32) * delta < gap))
    return jnp.where(delta > 0, cnt, jnp.where(gap > 0, bins, 0))


def _topk_table(cum, labels, bins):
    """Grid and per-(bin, t) counts of calibration samples above each grid point, without a (bins, T, N) tensor.

    cnt[t, n] = #{m < bins : beta_m < gap[t, n]} (``_grid_count``, exact strict comparisons), so
    ``gap[t, n] > beta_m  <=>  cnt[t, n] > m``; one histogram of cnt per t then gives every bin's counts.
    Returns grid (bins,), support[m, t] = sum_n sel, hits[m, t] = sum_n sel * settled, both int32 (bins, T).
    """
    T, N = cum.shape[:2]
    gap = topk_gap(cum)
    settled = _settled(_correct(cum, labels))
    # XLA rewrites x / constant as x * (1 / constant), which is not exact (10 / 100 -> 0.099999994): the barrier
    # keeps bins opaque so that delta is the correctly rounded quotient, as in the reference.
    delta = jnp.max(gap) / lax.optimization_barrier(jnp.float32(bins))
    grid = jnp.arange(bins, dtype=jnp.float32) * delta                             # beta_m = m * delta
    cnt = _grid_count(gap, delta, bins)                                             # (T, N) in [0, bins]
    t = lax.broadcasted_iota(jnp.int32, (T, N), 0)
    weights = jnp.stack([jnp.ones((T, N), jnp.int32), settled.astype(jnp.int32)], axis=-1)
    hist = jax.ops.segment_sum(weights.reshape(T * N, 2), (t * (bins + 1) + cnt).reshape(-1),
                               num_segments=T * (bins + 1)).reshape(T, bins + 1, 2)
    above = jnp.flip(jnp.cumsum(jnp.flip(hist, 1), axis=1), 1)[:, 1:]             # sum over cnt >= m + 1
    return grid, above[..., 0].T, above[..., 1].T


def calibrate_topk(cum, labels, epsilon=0.0, bins=100, min_support=0):
    """Per-timestep Top-K thresholds beta_t, calibrated on (training) cumulative logits.

    reference-semantics.md section 7 (as the reference's ``TopKCutoff.setup``)::

        settled[t, n] = 1[correct at every step t..T-1]          (the OCT rule, not forced)
        delta = max_{t, n} gap[t, n] / bins;   beta_m = m * delta,  m = 0..bins-1   (float32)
        sel = 1[gap[t, n] > beta_m]   (strict)
        conf[m, t] = sum_n sel * settled[t] / sum_n sel           (0 / 0 = NaN, which never qualifies)
        conf[bins-1, :] = 1
        qualifies[m, t] = conf[m, t] >= 1 - epsilon  and  sum_n sel >= min_support,   row bins-1 always
        beta_t = beta_{m*},  m* = first m that qualifies

    ``min_support = 0`` is the reference rule; ``min_support > 0`` refuses thresholds supported by fewer
    selected samples (reference-semantics.md section 9, defect 1). The last grid row qualifies for any epsilon.
    Counts come from each gap's position in the grid and one histogram per t: no (bins, T, N) tensor.

    Args:
      cum: cumulative logits, (T, N, K), K >= 2.  labels: integer classes, (N,).
      epsilon: scalar tolerance, 0 <= epsilon < 1 (may be traced, e.g. under ``jax.vmap``).
      bins: number of grid points, a Python int >= 1.  min_support: scalar minimum of ``sum_n sel``.
    Returns:
      beta, (T,) float32.
    Raises:
      ValueError: cum is not (T, N, K) with K >= 2, labels are not integer (N,), epsilon or min_support is
        not a scalar, or bins is not a positive int.
    """
    _check_cum(cum)
    _check_labels(labels, cum)
    epsilon = _scalar(epsilon, "epsilon")
    if jnp.ndim(min_support) != 0:
        raise ValueError(f"min_support must be a scalar, got shape {jnp.shape(min_support)}")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    grid, support, hits = _topk_table(cum, labels, bins)
    conf = hits.astype(jnp.float32) / support.astype(jnp.float32)                   # (bins, T), NaN on 0/0
    last = lax.broadcasted_iota(jnp.int32, conf.shape, 0) == bins - 1
    qualifies = ((conf >= 1.0 - epsilon) & (support >= min_support)) | last
    return grid[jnp.argmax(qualifies, axis=0)]


def apply_topk(cum, beta):
    """Top-K cutoff: exit at the first step whose gap exceeds that step's threshold.

    reference-semantics.md section 7::

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
    _per_step(beta, cum, "beta")
    return _exit(topk_gap(cum) > beta[:, None], _predictions(cum))


class _Stats(NamedTuple):
    """Per-(t, n) statistics of Y = cum over K, each (T, N)."""

    top1: jax.Array
    top2: jax.Array
    first: jax.Array  # int32 argmax, the prediction
    total: jax.Array  # S = sum_k exp(Y_k - top1)
    weighted: jax.Array  # sum_k exp(Y_k - top1) (Y_k - top1)


def _add_pairs(a, b):
    return a[0] + b[0], a[1] + b[1]


def _stats(cum):
    """Two passes over K. The barrier keeps the five statistics together: without it XLA:CPU splits the
    summing reduce, recomputes the exponentials per consumer and broadcasts them over E in ``sweep`` (2x slower)."""
    top1, top2, first = _top2(cum)
    z = cum - top1[..., None]
    e = jnp.exp(z)
    total, weighted = _reduce((e, e * z), (jnp.float32(0), jnp.float32(0)), _add_pairs, cum.ndim - 1)
    return _Stats(*lax.optimization_barrier((top1, top2, first, total, weighted)))


def confidence_cutoff(cum, epsilon):
    """Max-softmax confidence cutoff.

    reference-semantics.md section 8 (as the reference's ``ConfCutoff``)::

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
    epsilon = _scalar(epsilon, "epsilon")
    st = _stats(cum)
    return _exit(1.0 / st.total > 1.0 - epsilon, st.first)                        # max softmax = 1 / S


def entropy(cum):
    """Entropy of softmax(Y_n(t)) in nats, as DT-SNN's exit score.

    reference-semantics.md section 8::

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
    return _entropy(_stats(cum))


def _entropy(st):
    return jnp.log(st.total) - st.weighted / st.total


def entropy_threshold(epsilon, num_classes):
    """The entropy threshold ``sweep`` pairs with a tolerance epsilon: Fano's bound.

    ::

        threshold(epsilon) = h(epsilon) + epsilon log(K - 1),   h(x) = -x log x - (1 - x) log(1 - x)

    By Fano's inequality a distribution with max p > 1 - epsilon has entropy below this (for epsilon <=
    (K-1)/K), so at equal epsilon the entropy rule exits no later than the confidence rule.
    epsilon = 0 gives 0: the rule never fires.

    Args:
      epsilon: tolerances, any shape.  num_classes: K, a Python int >= 2.
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


def entropy_cutoff(cum, threshold):
    """DT-SNN entropy cutoff (Li et al. 2023): exit once the softmax entropy falls below a threshold.

    reference-semantics.md section 8::

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
    threshold = _scalar(threshold, "threshold")
    st = _stats(cum)
    return _exit(_entropy(st) < threshold, st.first)


_RADIX_LEVELS = ((21, 11), (10, 11), (0, 10))  # (shift, width) of the key digits, most significant first


def _radix_select(x, ks):
    """The ks-th smallest entry of every row of x, exactly, by radix selection (no sort).

    Keys are the float32 bit patterns made order-preserving as uint32 (-0 orders before +0, which compare
    equal). Each pass takes one digit (11, 11, 10 bits): a histogram per row and per prefix group, its
    cumulative counts give the digit holding the wanted rank; ranks that share a prefix share a group, so
    one histogram serves them all. Three histogram passes replace a sort (~14 ms for (10, 50000) on CPU,
    float sorts ~75 ms) with ~2-3 ms for any number of ranks.

    Args:
      x: (T, N) float32.  ks: (R,) int32 1-based ranks, each in [1, N].
    Returns:
      (R, T) float32, entry [r, t] = the ks[r]-th smallest of x[t].
    """
    T, N = x.shape
    R, G = ks.shape[0], ks.shape[0] + 1                                         # group R: no rank's prefix
    bits = lax.bitcast_convert_type(x, jnp.int32)
    keys = lax.bitcast_convert_type(jnp.where(bits < 0, ~bits, bits ^ jnp.int32(-2 ** 31)), jnp.uint32)
    t = lax.broadcasted_iota(jnp.int32, (T, N), 0)
    t_r = lax.broadcasted_iota(jnp.int32, (R, T), 1)
    r_other = lax.broadcasted_iota(jnp.int32, (R, R, T), 1)
    slot = jnp.zeros((T, N), jnp.int32)                                          # each entry's prefix group
    group = jnp.zeros((R, T), jnp.int32)                                         # each rank's prefix group
    rank = jnp.broadcast_to(ks[:, None], (R, T)).astype(jnp.int32)               # rank left within the group
    prefix = jnp.zeros((R, T), jnp.uint32)
    for shift, width in _RADIX_LEVELS:
        B = 1 << width
        digit_x = ((keys >> shift) & jnp.uint32(B - 1)).astype(jnp.int32)
        hist = jax.ops.segment_sum(jnp.ones((T * N,), jnp.int32), ((t * G + slot) * B + digit_x).reshape(-1),
                                   num_segments=T * G * B).reshape(T, G, B)
        counts = jnp.cumsum(hist, axis=2)[t_r, group]                            # (R, T, B)
        digit = jnp.argmax(counts >= rank[..., None], axis=-1).astype(jnp.int32)  # first digit reaching rank
        below = jnp.take_along_axis(counts, jnp.maximum(digit - 1, 0)[..., None], axis=-1)[..., 0]
        rank = rank - jnp.where(digit > 0, below, 0)
        prefix = prefix | (digit.astype(jnp.uint32) << shift)
        key = group * B + digit
        new_group = jnp.min(jnp.where(key[:, None, :] == key[None, :, :], r_other, R), axis=1)
        table = jnp.full((T, G, B), R, jnp.int32).at[t_r, group, digit].min(new_group)
        slot, group = table[t, slot, digit_x], new_group
    bits = lax.bitcast_convert_type(prefix, jnp.int32)
    return lax.bitcast_convert_type(jnp.where(bits < 0, bits ^ jnp.int32(-2 ** 31), ~bits), jnp.float32)


@jax.custom_batching.custom_vmap
def _kth_smallest(x, k):
    """The k-th smallest entry of every row of x (T, N), k a 1-based int32 scalar; (T,).

    Under ``jax.vmap`` over k alone, all the ranks are selected in one ``_radix_select`` call.
    """
    return _radix_select(x, k[None])[0]


@_kth_smallest.def_vmap
def _kth_smallest_vmap(axis_size, in_batched, x, k):
    x_batched, k_batched = in_batched
    if x_batched:
        k = k if k_batched else jnp.broadcast_to(k, (axis_size,))
        return jax.vmap(lambda x, k: _radix_select(x, k[None])[0])(x, k), True
    return _radix_select(x, k), True


def calibrate_spikecp(cum, labels, epsilon):
    """SpikeCP (Chen et al., arXiv 2305.11322): per-timestep split-conformal thresholds.

    reference-semantics.md section 8; on a calibration split of n samples, per timestep t::

        score[t, i] = -log softmax(Y_i(t))_{y_i}                  (no 1e-5 inside the log)
        k = ceil((n + 1) (1 - epsilon))                           (float32 arithmetic)
        qhat_t = k-th smallest of score[t, :]   if 1 <= k <= n;   +inf if k > n;   -inf if k < 1

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
    idx = jnp.broadcast_to(labels[None, :, None], (cum.shape[0], n, 1))
    st = _stats(cum)
    label_z = jnp.take_along_axis(cum, idx, axis=-1)[..., 0] - st.top1
    scores = jnp.log(st.total) - label_z                                            # (T, n)
    k = jnp.ceil((n + 1) * (1.0 - epsilon)).astype(jnp.int32)
    qhat = _kth_smallest(scores, jnp.clip(k, 1, n))
    return jnp.where(k > n, jnp.inf, jnp.where(k < 1, -jnp.inf, qhat))


def spikecp_cutoff(cum, qhat):
    """SpikeCP cutoff: exit once the conformal set holds at most one class.

    reference-semantics.md section 8::

        C_t(x_n) = {k : -log softmax(Y_n(t))_k <= qhat_t}
        exit_n = first t with |C_t(x_n)| <= 1, else T - 1         (the empty set exits too)
        predictions_n = argmax Y_n(exit_n);   timesteps_n = exit_n + 1

    |C| <= 1 iff the second smallest score (the runner-up class's) exceeds qhat_t, so no (T, N, K) comparison.

    Args:
      cum: cumulative logits, (T, N, K), K >= 2.  qhat: thresholds, (T,) (from ``calibrate_spikecp``).
    Returns:
      (predictions (N,) int32, timesteps (N,) int32, 1-based).
    Raises:
      ValueError: cum is not (T, N, K) with K >= 2, or qhat is not (T,).
    """
    _check_cum(cum)
    _per_step(qhat, cum, "qhat")
    if cum.shape[-1] < 2:
        raise ValueError(f"SpikeCP needs K >= 2 classes, got cum {cum.shape}")
    st = _stats(cum)
    second_score = jnp.log(st.total) - (st.top2 - st.top1)                         # the runner-up's score
    return _exit(second_score > qhat[:, None], st.first)


def _score(predictions, timesteps, labels):
    return {"accuracy": jnp.mean(predictions == labels, dtype=jnp.float32),
            "mean_timestep": jnp.mean(timesteps, dtype=jnp.float32)}


@functools.partial(jax.jit, static_argnames=("bins",))
def sweep(cum_calib, labels_calib, cum_test, labels_test, epsilons, *, bins=100, min_support=0,
          entropy_thresholds=None):
    """Every exit rule over a whole array of tolerances at once (``jax.vmap`` over E), plus fixed T and OCT.

    reference-semantics.md sections 6-8. Per epsilon e (calibration split c, test split t)::

        topk:        apply_topk(cum_t, calibrate_topk(cum_c, y_c, e, bins, min_support))
        confidence:  confidence_cutoff(cum_t, e)
        entropy:     entropy_cutoff(cum_t, entropy_thresholds[e] or entropy_threshold(e, K))
        spikecp:     spikecp_cutoff(cum_t, calibrate_spikecp(cum_c, y_c, e))
        accuracy = mean_n 1[prediction_n == y_n];   mean_timestep = mean_n timesteps_n

    The work that does not depend on epsilon (gaps, softmax statistics, the Top-K histograms) runs once, and
    the conformal quantiles of all epsilons come from one radix selection. Jitted, ``bins`` static.

    Args:
      cum_calib: (T, Nc, K) calibration (training) cumulative logits.  labels_calib: (Nc,).
      cum_test: (T, N, K) test cumulative logits.  labels_test: (N,).
      epsilons: tolerances, (E,).  bins, min_support: as in ``calibrate_topk``.
      entropy_thresholds: explicit entropy thresholds (E,) in nats, or None for ``entropy_threshold``.
    Returns:
      dict with ``epsilons`` (E,); ``rules``: {rule: {"accuracy": (E,), "mean_timestep": (E,)}} for rule in
      ``RULES``; ``fixed_t_accuracy`` (T,) (test accuracy per timestep); ``oct_accuracy`` and ``oct_timestep``
      (scalars: test OCT accuracy and mean timestep); ``topk_beta`` (E, T); ``spikecp_qhat`` (E, T);
      ``entropy_threshold`` (E,).
    Raises:
      ValueError: a cum is not (T, N, K), the two splits differ in T or K, labels do not match their split,
        epsilons is not (E,), or entropy_thresholds is not (E,).
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
    if entropy_thresholds is None:
        entropy_thresholds = entropy_threshold(epsilons, cum_test.shape[2])
    entropy_thresholds = jnp.asarray(entropy_thresholds, jnp.float32)
    if entropy_thresholds.shape != epsilons.shape:
        raise ValueError(f"entropy_thresholds must have shape (E,) = {epsilons.shape}, "
                         f"got {entropy_thresholds.shape}")

    def topk(e):
        beta = calibrate_topk(cum_calib, labels_calib, e, bins=bins, min_support=min_support)
        return _score(*apply_topk(cum_test, beta), labels_test), beta

    def spikecp(e):
        qhat = calibrate_spikecp(cum_calib, labels_calib, e)
        return _score(*spikecp_cutoff(cum_test, qhat), labels_test), qhat

    topk_scores, beta = jax.vmap(topk)(epsilons)
    spikecp_scores, qhat = jax.vmap(spikecp)(epsilons)
    oct_accuracy, oct_timesteps = oct(cum_test, labels_test)
    return {
        "epsilons": epsilons,
        "rules": {
            "topk": topk_scores,
            "confidence": jax.vmap(lambda e: _score(*confidence_cutoff(cum_test, e), labels_test))(epsilons),
            "entropy": jax.vmap(lambda h: _score(*entropy_cutoff(cum_test, h), labels_test))(entropy_thresholds),
            "spikecp": spikecp_scores,
        },
        "fixed_t_accuracy": accuracy_per_timestep(cum_test, labels_test),
        "oct_accuracy": oct_accuracy,
        "oct_timestep": jnp.mean(oct_timesteps, dtype=jnp.float32),
        "topk_beta": beta,
        "spikecp_qhat": qhat,
        "entropy_threshold": entropy_thresholds,
    }
