"""Cutoff evaluation against direct numpy transcriptions of docs/semantics.md sections 6-8.

The transcriptions are plain loops in float64, except where the reference computes in float32 and a strict
comparison depends on the last bit: the Top-K gap and its threshold grid (``beta_m = m * delta``) are formed in
float32 as the reference's torch code forms them, so integer-valued logits (many ties, gaps landing exactly on
grid points) are compared bit for bit.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aoi_jax import cutoff


# ----------------------------------------------------------------------------- transcriptions of the spec
def cumulative_reference(logits):
    out, running = [], np.zeros(logits.shape[1:], np.float32)
    for o_t in logits:
        running = running + o_t                                    # float32, one step at a time
        out.append(running)
    return np.stack(out)


def correct_reference(cum, labels):
    T, N, _ = cum.shape
    return np.array([[int(np.argmax(cum[t, n])) == labels[n] for n in range(N)] for t in range(T)])


def accuracy_reference(cum, labels):
    c = correct_reference(cum, labels)
    return np.array([np.mean(c[t]) for t in range(cum.shape[0])])


def settled_reference(cum, labels):
    c = correct_reference(cum, labels).astype(np.float64)
    for t in range(cum.shape[0] - 1, 0, -1):                       # backward running product
        c[t - 1] = c[t] * c[t - 1]
    return c


def oct_reference(cum, labels):
    T, N, _ = cum.shape
    c = settled_reference(cum, labels)
    c[T - 1] = 1.0
    g = [min(t for t in range(T) if c[t, n] == 1) for n in range(N)]
    hits = [int(np.argmax(cum[g[n], n])) == labels[n] for n in range(N)]
    return np.mean(hits), np.array(g) + 1


def gap_reference(cum):
    T, N, _ = cum.shape
    gap = np.zeros((T, N), np.float32)
    for t in range(T):
        for n in range(N):
            top = sorted(cum[t, n].tolist(), reverse=True)
            gap[t, n] = np.float32(top[0]) - np.float32(top[1])    # float32, as torch.topk values subtract
    return gap


def calibrate_topk_reference(cum, labels, epsilon, bins=100, min_support=0):
    T = cum.shape[0]
    gap, settled = gap_reference(cum), settled_reference(cum, labels)
    delta = np.float32(gap.max()) / np.float32(bins)
    grid = [np.float32(m) * delta for m in range(bins)]
    beta = np.zeros(T, np.float32)
    for t in range(T):
        for m in range(bins):
            sel = gap[t] > grid[m]
            support = sel.sum()
            conf = (sel * settled[t]).sum() / support if support > 0 else math.nan
            if m == bins - 1 or (conf >= 1.0 - float(np.float32(epsilon)) and support >= min_support):
                beta[t] = grid[m]
                break
    return beta


def exit_reference(fire, cum):
    """First t with fire[t][n] (else T - 1): (argmax cum[t, n], t + 1) per sample."""
    T, N, _ = cum.shape
    pred, steps = np.zeros(N, int), np.zeros(N, int)
    for n in range(N):
        t = next((t for t in range(T) if fire[t][n]), T - 1)
        pred[n], steps[n] = int(np.argmax(cum[t, n])), t + 1
    return pred, steps


def apply_topk_reference(cum, beta):
    gap = gap_reference(cum)
    return exit_reference([[gap[t, n] > beta[t] for n in range(cum.shape[1])] for t in range(cum.shape[0])], cum)


def softmax_reference(y):
    e = np.exp(y.astype(np.float64) - y.max())
    return e / e.sum()


def confidence_reference(cum, epsilon):
    T, N, _ = cum.shape
    return exit_reference([[softmax_reference(cum[t, n]).max() > 1 - epsilon for n in range(N)] for t in range(T)],
                          cum)


def entropy_value_reference(y):
    p = softmax_reference(y)
    return -sum(q * math.log(q) for q in p if q > 0)


def entropy_reference(cum, threshold):
    T, N, _ = cum.shape
    return exit_reference([[entropy_value_reference(cum[t, n]) < threshold for n in range(N)] for t in range(T)],
                          cum)


def calibrate_spikecp_reference(cum, labels, epsilon):
    T, n, _ = cum.shape
    k = math.ceil((n + 1) * (1 - float(np.float32(epsilon))))
    qhat = np.zeros(T)
    for t in range(T):
        scores = sorted(-math.log(softmax_reference(cum[t, i])[labels[i]]) for i in range(n))
        qhat[t] = math.inf if k > n else (-math.inf if k < 1 else scores[k - 1])
    return qhat


def spikecp_reference(cum, qhat):
    T, N, K = cum.shape
    fire = [[None] * N for _ in range(T)]
    for t in range(T):
        for n in range(N):
            p = softmax_reference(cum[t, n])
            fire[t][n] = sum(-math.log(p[k]) <= qhat[t] for k in range(K)) <= 1      # |C_t| <= 1
    return exit_reference(fire, cum)


# ----------------------------------------------------------------------------- data
def integer_cum(rng, T, N, K):
    """Integer-valued per-step logits: ties in argmax and in the gap, gaps exactly on grid points."""
    labels = rng.integers(0, K, N)
    logits = rng.integers(-2, 3, (T, N, K)).astype(np.float32)
    logits[:, np.arange(N), labels] += rng.integers(0, 2, (T, N))
    return np.cumsum(logits, 0, dtype=np.float32), labels


def normal_cum(rng, T, N, K):
    labels = rng.integers(0, K, N)
    logits = rng.normal(size=(T, N, K)).astype(np.float32)
    logits[:, np.arange(N), labels] += 0.7
    return np.cumsum(logits, 0, dtype=np.float32), labels


DATA = {"integer": integer_cum, "normal": normal_cum}
SHAPES = [(1, 40, 3), (4, 60, 2), (10, 120, 10), (3, 30, 101)]        # (T, N, K): T = 1, K = 2, K = 101
EPSILONS = (0.0, 0.05, 0.1, 0.25)



def assert_exits(got, want):
    np.testing.assert_array_equal(got[0], want[0])               # predictions
    np.testing.assert_array_equal(got[1], want[1])               # 1-based timesteps
    assert got[0].dtype == jnp.int32 and got[1].dtype == jnp.int32


# ----------------------------------------------------------------------------- section 6
@pytest.mark.parametrize("shape", [(10, 30, 4), (10, 1000, 10), (3, 1, 2)])
def test_cumulative_is_the_sequential_float32_sum(shape, rng):
    """Bit-equal to adding one step at a time, as ``anytime.serve`` does, also at N K = 10000, where XLA:CPU's
    triangular matmul (the same sums in exact arithmetic) adds in another order."""
    logits = rng.normal(size=shape).astype(np.float32)
    got = cutoff.cumulative(logits)
    np.testing.assert_array_equal(got, cumulative_reference(logits))
    np.testing.assert_allclose(got, np.cumsum(logits.astype(np.float64), 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("T,N,K", SHAPES)
def test_accuracy_and_oct_match_reference(kind, T, N, K, rng):
    cum, labels = DATA[kind](rng, T, N, K)
    acc = cutoff.accuracy_per_timestep(cum, labels)
    np.testing.assert_allclose(acc, accuracy_reference(cum, labels), rtol=1e-6)
    oct_acc, steps = cutoff.oct(cum, labels)
    ref_acc, ref_steps = oct_reference(cum, labels)
    np.testing.assert_array_equal(steps, ref_steps)
    np.testing.assert_allclose(oct_acc, ref_acc, rtol=1e-6)
    np.testing.assert_allclose(oct_acc, acc[-1], rtol=1e-6)       # OCT accuracy is the accuracy at T


def test_oct_hand_computed():
    # labels all 0; each sample predicts class 0 (correct) or 1 (wrong) per step
    pattern = np.array([[1, 1, 1],                                 # always correct          -> g = 0
                        [0, 1, 1],                                 # correct from t = 1      -> g = 1
                        [1, 0, 1],                                 # correct again at t = 2  -> g = 2
                        [1, 1, 0]]).T                              # wrong at T: forced      -> g = 2
    cum = np.stack([pattern, 1 - pattern], -1).astype(np.float32)  # (T=3, N=4, K=2)
    acc, steps = cutoff.oct(cum, np.zeros(4, np.int32))
    np.testing.assert_array_equal(steps, [1, 2, 3, 3])
    assert float(acc) == 0.75


# ----------------------------------------------------------------------------- section 7
@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("T,N,K", SHAPES)
def test_topk_gap_matches_reference(kind, T, N, K, rng):
    cum, _ = DATA[kind](rng, T, N, K)
    np.testing.assert_array_equal(cutoff.topk_gap(cum), gap_reference(cum))


@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("T,N,K", SHAPES)
def test_calibrate_and_apply_topk_match_reference(kind, T, N, K, rng):
    cum, labels = DATA[kind](rng, T, N, K)
    test_cum, _ = DATA[kind](rng, T, N, K)
    for epsilon in EPSILONS:
        for min_support in (0, 5):
            beta = cutoff.calibrate_topk(cum, labels, epsilon, bins=100, min_support=min_support)
            np.testing.assert_array_equal(beta, calibrate_topk_reference(cum, labels, epsilon, 100, min_support))
        assert_exits(cutoff.apply_topk(test_cum, beta), apply_topk_reference(test_cum, np.asarray(beta)))


def test_calibrate_topk_empty_bins_fall_back_to_the_last_grid_point():
    # t = 0: every gap is 1 and half the samples are wrong; t = 1: one huge gap sets delta = 100 / 10 = 10.
    # At t = 0 the bins beta_m >= 1 select nobody (conf 0/0 = NaN, never qualifies) and the bin beta_0 = 0 has
    # conf 1/2, so only the forced last row is left; at t = 1 the bin beta_0 = 0 already has conf 1.
    cum = np.zeros((2, 4, 2), np.float32)
    cum[0, :, 0] = 1.0
    cum[1, :, 0] = [100.0, 1.0, 1.0, 1.0]
    labels = np.array([0, 0, 1, 1], np.int32)
    cum[1, 2:] = cum[1, 2:, ::-1]                                  # the wrong ones become right at t = 1
    beta = cutoff.calibrate_topk(cum, labels, 0.0, bins=10)
    np.testing.assert_array_equal(beta, calibrate_topk_reference(cum, labels, 0.0, 10))
    np.testing.assert_array_equal(beta, [90.0, 0.0])


def test_min_support_changes_the_threshold():
    # T = 1, K = 2, gaps 10 (right), 5 (wrong), 2 (right), 1 (wrong); delta = 0.1.
    # beta < 5 always selects a wrong sample; 5 <= beta < 10 selects only the gap-10 sample: conf 1, support 1.
    gaps = np.array([10.0, 5.0, 2.0, 1.0], np.float32)
    cum = np.stack([gaps, np.zeros(4, np.float32)], -1)[None]
    labels = np.array([0, 1, 0, 1], np.int32)
    reference_rule = cutoff.calibrate_topk(cum, labels, 0.0, bins=100)
    assert float(reference_rule[0]) == np.float32(50) * (np.float32(10.0) / np.float32(100))   # beta_50 = 5
    fixed = cutoff.calibrate_topk(cum, labels, 0.0, bins=100, min_support=2)
    assert float(fixed[0]) == np.float32(99) * (np.float32(10.0) / np.float32(100))           # forced last row
    lenient = cutoff.calibrate_topk(cum, labels, 0.5, bins=100, min_support=2)
    assert float(lenient[0]) == 0.0                                # conf 2/4 >= 0.5 with support 4 at beta_0
    for beta, eps, ms in ((reference_rule, 0.0, 0), (fixed, 0.0, 2), (lenient, 0.5, 2)):
        np.testing.assert_array_equal(beta, calibrate_topk_reference(cum, labels, eps, 100, ms))


@pytest.mark.parametrize("bins", [1, 7, 1000])
def test_calibrate_topk_other_grids_and_all_gaps_zero(bins, rng):
    # gaps on grid points (integer logits), grids of 1, 7 and 1000 points, and every gap 0 (delta = 0: every
    # grid point is 0, no gap exceeds it, every conf is NaN and only the forced last row qualifies)
    cum, labels = integer_cum(rng, 4, 200, 3)
    for c in (cum, np.zeros_like(cum)):
        for epsilon, min_support in ((0.0, 0), (0.1, 3)):
            beta = cutoff.calibrate_topk(c, labels, epsilon, bins=bins, min_support=min_support)
            np.testing.assert_array_equal(beta, calibrate_topk_reference(c, labels, epsilon, bins, min_support))


def test_beta_is_non_increasing_in_epsilon_and_non_decreasing_in_min_support(rng):
    # The spec implies it although conf is not monotone in beta: conf >= 1 - eps for a smaller eps implies it for
    # a larger one, so the qualifying bins of a stricter eps are a subset and their first one comes no earlier;
    # the support condition does not depend on eps and only removes bins (the forced last row is in every set).
    cum, labels = integer_cum(rng, 10, 300, 10)
    epsilons = jnp.linspace(0.0, 0.5, 26)
    betas = jax.vmap(lambda e: cutoff.calibrate_topk(cum, labels, e, bins=50))(epsilons)    # (E, T)
    assert np.all(np.diff(np.asarray(betas), axis=0) <= 0)
    supports = jnp.array([0, 1, 3, 10, 30, 100])
    by_support = jax.vmap(lambda s: cutoff.calibrate_topk(cum, labels, 0.05, bins=50, min_support=s))(supports)
    assert np.all(np.diff(np.asarray(by_support), axis=0) >= 0)


def test_apply_topk_hand_computed():
    cum = np.array([[[3, 0, 0], [1, 0, 0], [1, 1, 0], [2, 0, 0]],       # gaps 3, 1, 0, 2
                    [[3, 0, 0], [0, 2, 0.5], [1, 1, 0], [2, 0, 0]],     # gaps 3, 1.5, 0, 2
                    [[3, 0, 0], [0, 2, 0.5], [0, 0.5, 0.5], [2, 0, 0]]], np.float32)
    beta = np.array([2.0, 1.0, 0.5], np.float32)
    pred, steps = cutoff.apply_topk(cum, beta)
    # n0: 3 > 2 at t = 0.  n1: 1.5 > 1 at t = 1.  n2: never, exits at T with a tie -> first index.
    # n3: gap 2 is not > 2 at t = 0 (strict), 2 > 1 at t = 1.
    np.testing.assert_array_equal(steps, [1, 2, 3, 2])
    np.testing.assert_array_equal(pred, [0, 1, 1, 0])


# ----------------------------------------------------------------------------- section 8
@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("T,N,K", SHAPES)
def test_confidence_and_entropy_match_reference(kind, T, N, K, rng):
    cum, _ = DATA[kind](rng, T, N, K)
    for epsilon in EPSILONS:
        assert_exits(cutoff.confidence_cutoff(cum, epsilon), confidence_reference(cum, epsilon))
        threshold = float(cutoff.entropy_threshold(epsilon, K))
        assert_exits(cutoff.entropy_cutoff(cum, threshold), entropy_reference(cum, threshold))
    H = np.array([[entropy_value_reference(cum[t, n]) for n in range(N)] for t in range(T)])
    np.testing.assert_allclose(cutoff.entropy(cum), H, rtol=1e-4, atol=1e-5)


def test_entropy_threshold_is_fano_bound_and_exits_no_later_than_confidence(rng):
    cum, _ = normal_cum(rng, 10, 400, 10)
    for epsilon in (0.01, 0.05, 0.2):
        h = -epsilon * math.log(epsilon) - (1 - epsilon) * math.log(1 - epsilon) + epsilon * math.log(9)
        np.testing.assert_allclose(cutoff.entropy_threshold(epsilon, 10), h, rtol=1e-6)
        _, conf_steps = cutoff.confidence_cutoff(cum, epsilon)
        _, ent_steps = cutoff.entropy_cutoff(cum, cutoff.entropy_threshold(epsilon, 10))
        assert np.all(ent_steps <= conf_steps)
    assert float(cutoff.entropy_threshold(0.0, 10)) == 0.0


@pytest.mark.parametrize("T,N,K", SHAPES)
def test_spikecp_matches_reference(T, N, K, rng):
    # Continuous logits only: with integer logits a test score can equal a calibration score in the reals,
    # and then the rounding of either side decides ``<=``.
    cum, labels = normal_cum(rng, T, N, K)
    test_cum, _ = normal_cum(rng, T, N, K)
    for epsilon in EPSILONS + (0.5,):
        qhat = cutoff.calibrate_spikecp(cum, labels, epsilon)
        want = calibrate_spikecp_reference(cum, labels, epsilon)
        np.testing.assert_allclose(qhat, want, rtol=1e-5)
        assert_exits(cutoff.spikecp_cutoff(test_cum, qhat), spikecp_reference(test_cum, want))


def test_spikecp_epsilon_zero_never_exits_early(rng):
    cum, labels = normal_cum(rng, 5, 50, 4)
    qhat = cutoff.calibrate_spikecp(cum, labels, 0.0)              # k = n + 1 > n: +inf, every set is full
    assert np.all(np.isinf(qhat))
    np.testing.assert_array_equal(cutoff.spikecp_cutoff(cum, qhat)[1], 5)


# ----------------------------------------------------------------------------- one step at a time
def step_by_step(fires, logits, param):
    """A stepping server: add one step's logits to the running sum, ask the rule, let the samples it fires go."""
    T, N, K = logits.shape
    y, done = jnp.zeros((N, K), jnp.float32), np.zeros(N, bool)
    pred, steps = np.zeros(N, np.int32), np.zeros(N, np.int32)
    for t in range(T):
        y = y + logits[t]
        leave = ~done & (np.asarray(fires(y, t, param)) | (t == T - 1))
        pred = np.where(leave, np.asarray(jnp.argmax(y, axis=-1)), pred)
        steps = np.where(leave, t + 1, steps)
        done = done | leave
    return pred, steps


@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("T,N,K", SHAPES)
def test_each_rule_one_step_at_a_time_equals_the_multistep_rule(kind, T, N, K, rng):
    cum_c, labels_c = DATA[kind](rng, T, N, K)
    cum, _ = DATA[kind](rng, T, N, K)
    logits = np.diff(cum, axis=0, prepend=np.zeros((1, N, K), np.float32))
    cum = cutoff.cumulative(logits)                                # bit-equal to the running sum (test above)
    for epsilon in EPSILONS:
        beta = cutoff.calibrate_topk(cum_c, labels_c, epsilon)
        qhat = cutoff.calibrate_spikecp(cum_c, labels_c, epsilon)
        threshold = cutoff.entropy_threshold(epsilon, K)
        for rule, param, multistep in (("topk", beta, cutoff.apply_topk(cum, beta)),
                                       ("confidence", epsilon, cutoff.confidence_cutoff(cum, epsilon)),
                                       ("entropy", threshold, cutoff.entropy_cutoff(cum, threshold)),
                                       ("spikecp", qhat, cutoff.spikecp_cutoff(cum, qhat))):
            assert_exits(multistep, step_by_step(cutoff.RULES[rule].fires, logits, param))
            assert_exits(cutoff.first_exit(cutoff.RULES[rule].fires, cum, param), multistep)
    assert tuple(cutoff.RULES) == ("topk", "confidence", "entropy", "spikecp")


def test_a_rule_that_never_fires_is_fixed_t_and_traces_once(rng):
    cum, labels = normal_cum(rng, 5, 30, 4)
    traces = []

    def never(y, t, param):
        traces.append(y.shape)
        return jnp.zeros(y.shape[:-1], bool)

    for _ in range(2):
        pred, steps = cutoff.first_exit(never, cum, None)
        np.testing.assert_array_equal(steps, 5)
        np.testing.assert_array_equal(pred, np.argmax(cum[-1], axis=-1))
    assert traces == [(30, 4)]                                     # traced once, on one step's (N, K) logits
    pred, steps = cutoff.first_exit(cutoff.never_fires, cum, None)  # the library's own never-firing rule
    np.testing.assert_array_equal(steps, 5)
    np.testing.assert_array_equal(pred, np.argmax(cum[-1], axis=-1))


PUBLIC = ("cumulative", "accuracy_per_timestep", "oct", "topk_gap", "calibrate_topk", "apply_topk",
          "confidence_cutoff", "entropy", "entropy_threshold", "entropy_cutoff", "calibrate_spikecp",
          "spikecp_cutoff", "sweep", "first_exit", "topk_fires", "confidence_fires", "entropy_fires",
          "spikecp_fires", "never_fires")


REGISTRY = ("register_rule", "Rule", "Calibration")          # the registry's function and its two records


def test_every_public_function_is_jitted():
    public = {name for name, value in vars(cutoff).items()
              if callable(value) and not name.startswith("_") and getattr(value, "__module__", "") == cutoff.__name__}
    assert public == set(PUBLIC) | set(REGISTRY)
    for name in PUBLIC:
        assert hasattr(getattr(cutoff, name), "lower"), name     # a jax.jit function
    assert all(hasattr(rule.fires, "lower") for rule in cutoff.RULES.values())


# ----------------------------------------------------------------------------- sweep
@pytest.mark.parametrize("kind", DATA)
def test_sweep_equals_per_epsilon_calls(kind, rng):
    cum_c, y_c = DATA[kind](rng, 6, 80, 5)
    cum_t, y_t = DATA[kind](rng, 6, 90, 5)
    epsilons = np.array([0.0, 0.02, 0.1, 0.3], np.float32)
    res = cutoff.sweep(cum_c, y_c, cum_t, y_t, epsilons, bins=20, min_support=2)
    for i, e in enumerate(epsilons):                                 # eager per-epsilon calls
        beta = cutoff.calibrate_topk(cum_c, y_c, e, bins=20, min_support=2)
        qhat = cutoff.calibrate_spikecp(cum_c, y_c, e)
        np.testing.assert_array_equal(res["topk_beta"][i], beta)
        np.testing.assert_array_equal(res["spikecp_qhat"][i], qhat)
        threshold = cutoff.entropy_threshold(e, 5)
        np.testing.assert_array_equal(res["entropy_threshold"][i], threshold)
        for rule, (pred, steps) in {"topk": cutoff.apply_topk(cum_t, beta),
                                    "confidence": cutoff.confidence_cutoff(cum_t, e),
                                    "entropy": cutoff.entropy_cutoff(cum_t, threshold),
                                    "spikecp": cutoff.spikecp_cutoff(cum_t, qhat)}.items():
            np.testing.assert_allclose(res["rules"][rule]["accuracy"][i], np.mean(pred == y_t), rtol=1e-6)
            np.testing.assert_allclose(res["rules"][rule]["mean_timestep"][i], np.mean(steps), rtol=1e-6)
            np.testing.assert_array_equal(res["rules"][rule]["timesteps"][i], steps)
    np.testing.assert_array_equal(res["fixed_t_accuracy"], cutoff.accuracy_per_timestep(cum_t, y_t))
    oct_acc, oct_steps = cutoff.oct(cum_t, y_t)
    assert float(res["oct_accuracy"]) == float(oct_acc)
    np.testing.assert_allclose(res["oct_timestep"], np.mean(oct_steps), rtol=1e-6)
    assert set(res["rules"]) == set(cutoff.RULES)


def test_sweep_takes_explicit_entropy_thresholds(rng):
    cum, y = normal_cum(rng, 4, 50, 3)
    thresholds = np.array([0.1, 0.5], np.float32)
    res = cutoff.sweep(cum, y, cum, y, np.array([0.0, 0.1], np.float32), bins=10, params={"entropy": thresholds})
    for i, h in enumerate(thresholds):
        _, steps = cutoff.entropy_cutoff(cum, h)
        np.testing.assert_allclose(res["rules"]["entropy"]["mean_timestep"][i], np.mean(steps), rtol=1e-6)


# ----------------------------------------------------------------------------- the registry
@pytest.fixture
def registry():
    """``cutoff.RULES`` as it is, restored after the test (registrations are for the whole process)."""
    before = dict(cutoff.RULES)
    yield cutoff.RULES
    cutoff.RULES.clear()
    cutoff.RULES.update(before)
    cutoff.sweep.clear_cache()


@jax.jit
def margin_fires(y, t, epsilon):
    """Exit when the two largest softmax probabilities differ by more than 1 - 2 epsilon."""
    p = jnp.sort(jax.nn.softmax(y), axis=-1)
    return p[..., -1] - p[..., -2] > 1.0 - 2.0 * epsilon


@jax.jit
def gap_quantile_fires(y, t, q):
    """Exit when top1 - top2 exceeds q[t] (a per-step quantile of the calibration split's gaps)."""
    s = jnp.sort(y, axis=-1)
    return s[..., -1] - s[..., -2] > q[t]


def test_a_registered_rule_is_swept_with_its_parameter(registry, rng):
    """One registration each: an uncalibrated rule (param = epsilon) and a calibrated one (a quantile of the
    calibration gaps per step, stored under its key). sweep, already compiled for these shapes, scores them
    after registration as first_exit does, per epsilon; the built-in rules and their fields are unchanged."""
    cum_c, y_c = normal_cum(rng, 5, 60, 4)
    cum_t, y_t = normal_cum(rng, 5, 70, 4)
    epsilons = np.array([0.0, 0.1, 0.3], np.float32)
    before = cutoff.sweep(cum_c, y_c, cum_t, y_t, epsilons, bins=10)
    assert "margin" not in before["rules"]
    cutoff.register_rule("margin", margin_fires)
    rule = cutoff.register_rule("gapq", gap_quantile_fires,
                                param=lambda e, c: jnp.quantile(cutoff.topk_gap(c.cum), 1.0 - e, axis=1))
    assert rule == cutoff.Rule(gap_quantile_fires, rule.param, "gapq_param")
    assert tuple(registry) == ("topk", "confidence", "entropy", "spikecp", "margin", "gapq")
    res = cutoff.sweep(cum_c, y_c, cum_t, y_t, epsilons, bins=10)
    assert set(res["rules"]) == set(registry) and "margin_param" not in res
    gaps = np.sort(cum_c, axis=-1)[..., -1] - np.sort(cum_c, axis=-1)[..., -2]               # (T, Nc)
    for i, e in enumerate(epsilons):
        q = np.quantile(gaps, 1.0 - e, axis=1)
        np.testing.assert_allclose(res["gapq_param"][i], q, rtol=1e-5)
        for name, param in (("margin", e), ("gapq", res["gapq_param"][i])):
            pred, steps = cutoff.first_exit(registry[name].fires, cum_t, param)
            np.testing.assert_array_equal(res["rules"][name]["timesteps"][i], steps)
            np.testing.assert_allclose(res["rules"][name]["accuracy"][i], np.mean(pred == y_t), rtol=1e-6)
    for key in ("topk_beta", "entropy_threshold", "spikecp_qhat", "oct_timesteps"):
        np.testing.assert_array_equal(res[key], before[key])
    for name in before["rules"]:
        np.testing.assert_array_equal(res["rules"][name]["timesteps"], before["rules"][name]["timesteps"])


# ----------------------------------------------------------------------------- errors
CUM = np.zeros((3, 4, 5), np.float32)
LABELS = np.zeros(4, np.int32)


@pytest.mark.parametrize("call,match", [
    (lambda: cutoff.cumulative(np.zeros((3, 4))), r"logits must be per-step logits \(T, N, K\), got shape \(3, 4\)"),
    (lambda: cutoff.accuracy_per_timestep(CUM[0], LABELS), r"cum must be cumulative logits \(T, N, K\)"),
    (lambda: cutoff.oct(CUM, LABELS[None]), r"labels must have shape \(N,\) = \(4,\) .* got \(1, 4\)"),
    (lambda: cutoff.oct(CUM, np.zeros(5, np.int32)), r"labels must have shape \(N,\) = \(4,\)"),
    (lambda: cutoff.oct(CUM, np.zeros(4, np.float32)), r"labels must be integer class indices"),
    (lambda: cutoff.topk_gap(CUM[..., :1]), r"K >= 2 classes, got cum \(3, 4, 1\)"),
    (lambda: cutoff.apply_topk(CUM, np.zeros(4)), r"beta must have shape \(T,\) = \(3,\) .* got \(4,\)"),
    (lambda: cutoff.calibrate_topk(CUM, LABELS, np.zeros(2)), r"epsilon must be a scalar, got shape \(2,\)"),
    (lambda: cutoff.calibrate_topk(CUM, LABELS, bins=0), r"bins must be a positive int, got 0"),
    (lambda: cutoff.calibrate_topk(CUM, LABELS, min_support=np.ones(2)), r"min_support must be a scalar"),
    (lambda: cutoff.confidence_cutoff(CUM, np.zeros(3)), r"epsilon must be a scalar, got shape \(3,\)"),
    (lambda: cutoff.entropy_cutoff(CUM, np.zeros(3)), r"threshold must be a scalar"),
    (lambda: cutoff.entropy_threshold(0.1, 1), r"num_classes must be >= 2, got 1"),
    (lambda: cutoff.calibrate_spikecp(CUM, LABELS, np.zeros(1)), r"epsilon must be a scalar, got shape \(1,\)"),
    (lambda: cutoff.spikecp_cutoff(CUM, np.zeros(2)), r"qhat must have shape \(T,\) = \(3,\) .* got \(2,\)"),
    (lambda: cutoff.sweep(CUM, LABELS, CUM, LABELS, np.zeros((2, 2))),
     r"epsilons must have shape \(E,\), got \(2, 2\)"),
    (lambda: cutoff.sweep(CUM, LABELS, CUM[..., :4], LABELS, np.zeros(2)),
     r"must share T and K, got \(3, 4, 5\) and \(3, 4, 4\)"),
    (lambda: cutoff.sweep(CUM, LABELS, CUM[:, :2], LABELS, np.zeros(2)),
     r"labels_test must have shape \(N,\) = \(2,\)"),
    (lambda: cutoff.sweep(CUM, LABELS, CUM, LABELS, np.zeros(2), params={"entropy": np.zeros(3)}),
     r"params\['entropy'\] must have leading axis E = 2 \(one per epsilon\), got shapes \[\(3,\)\]"),
    (lambda: cutoff.sweep(CUM, LABELS, CUM, LABELS, np.zeros(2), params={"nope": np.zeros(2)}),
     r"params names rules \['nope'\] that are not registered"),
    (lambda: cutoff.register_rule("topk", cutoff.topk_fires), r"exit rule 'topk' is already registered"),
    (lambda: cutoff.register_rule("a b", cutoff.topk_fires), r"letters, digits and _, got 'a b'"),
    (lambda: cutoff.register_rule("new", cutoff.topk_fires, key="k"), r"key 'k' needs a param"),
    (lambda: cutoff.register_rule("new", cutoff.topk_fires, param=lambda e, c: e, key="topk_beta"),
     r"key 'topk_beta' is taken \(by rule 'topk'\)"),
    (lambda: cutoff.register_rule("new", cutoff.topk_fires, param=lambda e, c: e, key="rules"),
     r"key 'rules' is taken \(by sweep\)"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_checks_run_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"beta must have shape \(T,\)"):
        jax.jit(cutoff.apply_topk)(CUM, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"epsilon must be a scalar"):
        jax.jit(functools.partial(cutoff.calibrate_topk, bins=10))(CUM, LABELS, np.zeros(2, np.float32))
