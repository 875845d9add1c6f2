"""Cutoff evaluation speed: aoi_jax.cutoff (jitted, vectorised) against the reference's loops.

The baseline does the same work the way the reference (Dengyu-Wu/snncutoff, ``snncutoff/cutoff/*.py``) does it,
in numpy: per epsilon, a fresh calibration with a Python loop over the bins and the timesteps (``TopKCutoff.setup``),
a backward loop for the settled mask, and one vectorised pass per rule over the test logits (its
``cutoff_evaluation``). Both sides start from the same cumulative logits; the network forward pass is excluded.

    python -m benchmarks.cutoff                       # T=10, N=50000 (calibration and test), K=10, 10 epsilons
    python -m benchmarks.cutoff --n 5000 --repeats 3  # smaller
"""

if __name__ == "__main__":  # first, before jax loads: it may restart this command with huge pages on
    from aoi_jax import hugepages

    hugepages.reexec_with_huge_pages()

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from aoi_jax import cutoff


def make_split(rng, T, N, K, signal=0.4):
    """Seeded random cumulative logits whose argmax drifts towards the label over time."""
    labels = rng.integers(0, K, N)
    logits = rng.normal(size=(T, N, K)).astype(np.float32)
    logits[:, np.arange(N), labels] += signal
    return np.cumsum(logits, axis=0, dtype=np.float32), labels.astype(np.int32)


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
    rules = {r: {"accuracy": [], "mean_timestep": []} for r in cutoff.RULES}
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


# ----------------------------------------------------------------------------- timing
def best_of(fn, repeats):
    """Minimum wall time over repeats (the machine is shared), and the last result."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), out


def compile_time(jitted, *args, **static):
    """Seconds to trace and compile, and the compiled function (called with the non-static arguments)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **static).compile()
    return time.perf_counter() - t0, compiled


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--n", type=int, default=50000, help="samples per split (calibration and test)")
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--epsilons", type=int, default=10, help="epsilon = 0, 0.01, ..., (E - 1) / 100")
    p.add_argument("--bins", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20, help="timed runs of the jitted functions (best is kept)")
    p.add_argument("--loop-repeats", type=int, default=2, help="timed runs of the reference loops")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    cum_c, y_c = make_split(rng, args.T, args.n, args.K)
    cum_t, y_t = make_split(rng, args.T, args.n, args.K)
    eps = np.arange(args.epsilons, dtype=np.float32) / 100
    dev = [jnp.asarray(a) for a in (cum_c, y_c, cum_t, y_t, eps)]

    topk = jax.jit(lambda cc, yc, ct: cutoff.apply_topk(ct, cutoff.calibrate_topk(cc, yc, 0.0, bins=args.bins)))
    c_topk, topk_c = compile_time(topk, *dev[:3])
    c_sweep, sweep_c = compile_time(cutoff.sweep, *dev, bins=args.bins)           # sweep is jitted, bins static

    t_topk, (pred, steps) = best_of(lambda: topk_c(*dev[:3]), args.repeats)
    t_sweep, res = best_of(lambda: sweep_c(*dev), args.repeats)
    tl_topk, (pred_l, steps_l) = best_of(
        lambda: loop_apply_topk(cum_t, loop_calibrate_topk(cum_c, y_c, 0.0, args.bins)), args.loop_repeats)
    tl_sweep, res_l = best_of(lambda: loop_sweep(cum_c, y_c, cum_t, y_t, eps, args.bins), args.loop_repeats)

    print(f"cumulative logits (T, N, K) = ({args.T}, {args.n}, {args.K}) for calibration and for test, "
          f"{args.epsilons} epsilons, {len(cutoff.RULES)} rules, {args.bins} bins; {jax.devices()[0].platform}, "
          f"best of {args.repeats} (jax) / {args.loop_repeats} (loops)")
    print(f"{'work':<34}{'compile':>10}{'aoi_jax':>12}{'ref. loop':>12}{'speed-up':>10}")
    for name, c, t, tl in (("Top-K calibrate + apply (eps 0)", c_topk, t_topk, tl_topk),
                           ("sweep (all rules, all epsilons)", c_sweep, t_sweep, tl_sweep)):
        print(f"{name:<34}{c * 1e3:>8.0f}ms{t * 1e3:>10.2f}ms{tl * 1e3:>10.1f}ms{tl / t:>9.0f}x")
    same_topk = np.array_equal(np.asarray(pred), pred_l) and np.array_equal(np.asarray(steps), steps_l)
    diff, rule = max((float(np.max(np.abs(np.asarray(res["rules"][r][m]) - np.asarray(res_l[r][m])))), r)
                     for r in cutoff.RULES for m in ("accuracy", "mean_timestep"))
    print(f"Top-K exits identical to the loop: {same_topk}; largest sweep difference from the loop: {diff:.2e} "
          f"({rule}; 1 / N = {1 / args.n:.2e})")


if __name__ == "__main__":
    main()
