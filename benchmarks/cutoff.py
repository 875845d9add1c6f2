"""Cutoff evaluation speed: aoi_jax.cutoff (jitted, vectorised) against the reference's loops.

The baseline does the same work the way the reference (Dengyu-Wu/snncutoff, ``snncutoff/cutoff/*.py``) does it,
in numpy: cumulative sums, then per epsilon a fresh calibration with a Python loop over the bins and the
timesteps (``TopKCutoff.setup``), a backward loop for the settled mask, and one vectorised pass per rule over the
test logits (its ``cutoff_evaluation``). Both sides start from the same per-step logits; the network forward
pass is excluded. Two pieces of work are timed, each side in turn within every repeat:

- README: the README's example calls (``cumulative`` of both splits, ``calibrate_topk`` at epsilon 0,
  ``apply_topk``), called from Python as the README does, after one warm-up call (its time is the first column);
- sweep: ``cutoff.sweep`` (compiled ahead: the first column is trace + compile) on the cumulative logits.

Each is the median over interleaved rounds of the wall time and, in parentheses, of this process's CPU time
(all threads), which on a shared machine compares the work done rather than the share of the cores each side got.

    python -m benchmarks.cutoff                              # T=10, N=50000 per split, K=10, 10 epsilons
    python -m benchmarks.cutoff --n 1438 --n-test 359        # the N-Digits split sizes
    python -m benchmarks.cutoff --block 5                    # 5 calls of each side per turn, back to back
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from aoi_jax import cutoff


def make_split(rng, T, N, K, signal=0.4):
    """Seeded random per-step logits whose cumulative argmax drifts towards the label over time."""
    labels = rng.integers(0, K, N)
    logits = rng.normal(size=(T, N, K)).astype(np.float32)
    logits[:, np.arange(N), labels] += signal
    return logits, labels.astype(np.int32)


# ----------------------------------------------------------------------------- the reference's way, in numpy
def _np_gap(cum):
    top2 = np.sort(cum, axis=-1)[..., -2:]                     # the reference uses torch.topk(outputs, 2)
    return top2[..., 1] - top2[..., 0]


def _np_exit(fire, cum):
    fire = fire.copy()
    fire[-1] = True
    index = fire.argmax(0)
    return cum[index, np.arange(cum.shape[1])].argmax(-1), index + 1


def _np_softmax(cum):
    e = np.exp(cum - cum.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def loop_calibrate_topk(cum, labels, epsilon, bins):
    """``TopKCutoff.setup``: backward loop for settled, then a Python loop over bins and timesteps."""
    T = cum.shape[0]
    settled = (cum.argmax(-1) == labels).astype(np.float32)
    for t in range(T - 1, 0, -1):
        settled[t - 1] = settled[t] * settled[t - 1]
    gap = _np_gap(cum)
    delta = gap.max() / np.float32(bins)
    beta, samples = [], []
    for m in range(bins):
        beta_m = np.float32(m) * delta
        row = []
        for t in range(T):
            sel = (gap[t] > beta_m).astype(np.float32)
            row.append([(sel * settled[t]).sum(), sel.sum()])
        beta.append(beta_m)
        samples.append(row)
    beta, samples = np.array(beta, np.float32), np.array(samples, np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = samples[..., 0] / samples[..., 1]
    conf[-1] = 1.0
    return beta[(conf >= np.float32(1.0) - np.float32(epsilon)).argmax(0)]


def loop_apply_topk(cum, beta):
    return _np_exit(_np_gap(cum) > beta[:, None], cum)


def loop_calibrate_spikecp(cum, labels, epsilon):
    n = cum.shape[1]
    scores = -np.log(_np_softmax(cum)[:, np.arange(n), labels])
    k = math.ceil((n + 1) * (1.0 - float(epsilon)))
    if k > n:
        return np.full(cum.shape[0], np.inf, np.float32)
    return np.partition(scores, k - 1, axis=1)[:, k - 1]


def loop_sweep(cum_c, y_c, cum_t, y_t, epsilons, bins):
    """All four rules, each re-run per epsilon as the reference's ``cutoff_evaluation`` is."""
    K = cum_t.shape[-1]
    rules = {r: {"accuracy": [], "mean_timestep": []} for r in ("topk", "confidence", "entropy", "spikecp")}
    for e in epsilons:
        e = float(e)
        h = (-e * math.log(e) - (1 - e) * math.log(1 - e) if e > 0 else 0.0) + e * math.log(K - 1)
        p = _np_softmax(cum_t)
        outs = {
            "topk": loop_apply_topk(cum_t, loop_calibrate_topk(cum_c, y_c, e, bins)),
            "confidence": _np_exit(p.max(-1) > 1 - e, cum_t),
            "entropy": _np_exit(-(p * np.log(np.maximum(p, 1e-45))).sum(-1) < h, cum_t),
            "spikecp": _np_exit(((-np.log(_np_softmax(cum_t))) <= loop_calibrate_spikecp(cum_c, y_c, e)[:, None, None])
                                .sum(-1) <= 1, cum_t),
        }
        for rule, (pred, steps) in outs.items():
            rules[rule]["accuracy"].append(np.mean(pred == y_t))
            rules[rule]["mean_timestep"].append(np.mean(steps))
    return rules


def loop_readme(logits_c, y_c, logits_t, bins):
    """The README's example the reference's way: cumulative sums, Top-K calibration at epsilon 0, exit."""
    cum_c, cum_t = np.cumsum(logits_c, axis=0), np.cumsum(logits_t, axis=0)
    return loop_apply_topk(cum_t, loop_calibrate_topk(cum_c, y_c, 0.0, bins))


# ----------------------------------------------------------------------------- aoi_jax
def readme(logits_c, y_c, logits_t, bins):
    """The README's example calls, each a jitted library function called from Python."""
    cum_c, cum_t = cutoff.cumulative(logits_c), cutoff.cumulative(logits_t)
    beta = cutoff.calibrate_topk(cum_c, y_c, epsilon=0.0, bins=bins)
    return cutoff.apply_topk(cum_t, beta)


# ----------------------------------------------------------------------------- timing
def seconds(fn):
    """Wall time of one call (results fetched), and its result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def interleaved(fns, repeats, block=1):
    """Median wall and CPU (this process, all threads) seconds of each function over ``repeats`` rounds that
    call them in turn, and their last results. On a shared machine the CPU times compare the work done.

    ``block > 1``: each turn calls the function ``block`` times in a row and times all but the first (back
    to back, as in a loop; a single call after the other side's work also pays for waking XLA's threads
    and refilling the caches)."""
    wall, cpu, outs = [[] for _ in fns], [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            for k in range(block):
                c0 = time.process_time()
                t, outs[i] = seconds(fn)
                if block == 1 or k > 0:
                    wall[i].append(t)
                    cpu[i].append(time.process_time() - c0)
    return [float(np.median(t)) for t in wall], [float(np.median(c)) for c in cpu], outs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--n", type=int, default=50000, help="calibration samples (and test samples unless --n-test)")
    p.add_argument("--n-test", type=int, help="test samples (default: --n)")
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--epsilons", type=int, default=10, help="epsilon = 0, 0.01, ..., (E - 1) / 100")
    p.add_argument("--bins", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians are printed)")
    p.add_argument("--block", type=int, default=1, help="calls of each side per turn; all but the first "
                   "are timed (1: strictly alternating single calls)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n_test = args.n if args.n_test is None else args.n_test

    rng = np.random.default_rng(args.seed)
    logits_c, y_c = make_split(rng, args.T, args.n, args.K)
    logits_t, y_t = make_split(rng, args.T, n_test, args.K)
    eps = np.arange(args.epsilons, dtype=np.float32) / 100
    dev_logits = [jnp.asarray(a) for a in (logits_c, y_c, logits_t)]
    dev_sweep = [cutoff.cumulative(dev_logits[0]), dev_logits[1], cutoff.cumulative(dev_logits[2]),
                 jnp.asarray(y_t), jnp.asarray(eps)]
    cum_c, cum_t = np.cumsum(logits_c, axis=0), np.cumsum(logits_t, axis=0)      # the loops' own sums

    warm_readme, _ = seconds(lambda: readme(*dev_logits, args.bins))
    t0 = time.perf_counter()
    sweep_c = cutoff.sweep.lower(*dev_sweep, bins=args.bins).compile()
    compile_sweep = time.perf_counter() - t0
    wall_readme, cpu_readme, ((pred, steps), (pred_l, steps_l)) = interleaved(
        [lambda: readme(*dev_logits, args.bins), lambda: loop_readme(logits_c, y_c, logits_t, args.bins)],
        args.repeats, args.block)
    wall_sweep, cpu_sweep, (res, res_l) = interleaved(
        [lambda: sweep_c(*dev_sweep), lambda: loop_sweep(cum_c, y_c, cum_t, y_t, eps, args.bins)], args.repeats,
        args.block)

    print(f"per-step logits (T, N, K) = ({args.T}, {args.n}, {args.K}) calibration, ({args.T}, {n_test}, "
          f"{args.K}) test, {args.epsilons} epsilons, {len(res_l)} rules, {args.bins} bins; "
          f"{jax.devices()[0].platform}, medians of {args.repeats} interleaved rounds"
          f"{f' of {args.block} calls each' if args.block > 1 else ''}, wall (CPU) times")
    print(f"{'work':<40}{'first call':>11}{'aoi_jax':>19}{'ref. loop':>21}{'speed-up':>15}")
    for name, c, (t, tl), (u, ul) in (("README calls (cumulative, Top-K eps 0)", warm_readme, wall_readme, cpu_readme),
                                      ("sweep (all rules, all epsilons)", compile_sweep, wall_sweep, cpu_sweep)):
        print(f"{name:<40}{c * 1e3:>9.0f}ms{t * 1e3:>9.1f} ({u * 1e3:5.1f}) ms{tl * 1e3:>9.1f} ({ul * 1e3:6.1f}) ms"
              f"{tl / t:>7.1f}x ({ul / u:.1f}x)")
    same_topk = np.array_equal(np.asarray(pred), pred_l) and np.array_equal(np.asarray(steps), steps_l)
    diff, rule = max((float(np.max(np.abs(np.asarray(res["rules"][r][m]) - np.asarray(res_l[r][m])))), r)
                     for r in res_l for m in ("accuracy", "mean_timestep"))
    print(f"Top-K exits identical to the loop: {same_topk}; largest sweep difference from the loop: {diff:.2e} "
          f"({rule}; 1 / N = {1 / n_test:.2e})")


if __name__ == "__main__":
    main()
