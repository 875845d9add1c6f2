"""Continuous batching against fixed-T batched inference: samples/s of anytime.serve on a trained run.

Both sides are ``aoi_jax.anytime.serve`` with the same S slots, the same model step and the same XLA options
on the run's whole test set (queued in file order): with each exit rule at one epsilon (its parameter
calibrated as evaluation does, ``cutoff.sweep`` on the training split with the calibration dropout) and with
``cutoff.never_fires``, i.e. fixed T: every batch of S samples runs all T steps. Rounds alternate the two
sides; the ratio of the median times is the speed-up, against the ideal T / mean exit timestep (the ratio of
the useful work; the slots that fall idle while the queue drains, and fixed T's partial last batch, separate
the two: compare the slot-steps). Each served result is compared with the
rule on the multistep logits (``cutoff.first_exit``, as ``apply_topk``, ``confidence_cutoff``, ...). One line per
registered rule (``cutoff.RULES``):

    topk eps 0: continuous batching 3.05x samples/s over fixed T (ideal 3.44x), equal to the multistep rule: True

then a table of the medians (samples/s of both sides; the ratio of this process's CPU time, all threads,
which on a shared machine compares the work done rather than the share of the cores each side got), the
slot-steps (S x loop iterations), the time per iteration and of the first (compiling) call, and the
multistep fixed-T evaluation step (T x S frames folded into each conv) on batches of S for reference.

    python -m benchmarks.anytime --workdir runs/ndigits [--slots 16] [--epsilon 0] [--rounds 5]
"""

import argparse
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from aoi_jax import anytime, checkpoint, cutoff, data, evaluation, parallel, step, xla_tuning

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a train.py workdir (its newest checkpoint)")
    p.add_argument("--slots", type=int, default=anytime.SLOTS, help="S, the same for both sides")
    p.add_argument("--epsilon", type=float, default=0.0, help="the rules' tolerance")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each side once per round)")
    p.add_argument("--xla-tuning", default="auto", choices=xla_tuning.TUNINGS)
    return p.parse_args(argv)


def seconds(fn):
    """(wall seconds, this process's CPU seconds over all threads, result) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv=None):
    args = parse_args(argv)
    graphdef, state, cfg, input_shape = checkpoint.restore(pathlib.Path(args.workdir) / "checkpoints")
    train_set, test_set = data.load(cfg.data)
    graphdef, state, cfg = evaluation.spiking_run(graphdef, state, cfg, input_shape)
    fns = evaluation.make_eval_functions(graphdef, cfg, compiler_options=xla_tuning.compiler_options(args.xla_tuning))
    mesh = parallel.data_mesh()
    key = step.run_keys(cfg.seed).calibration
    logits_c, labels_c, _ = evaluation.collect(fns.calib_step, state, train_set, cfg.eval.batch_size, key, mesh)
    logits_t, labels_t, _ = evaluation.collect(fns.test_step, state, test_set, cfg.eval.batch_size, key, mesh)
    cum_t = cutoff.cumulative(jnp.asarray(logits_t))
    result = cutoff.sweep(cutoff.cumulative(jnp.asarray(logits_c)), jnp.asarray(labels_c), cum_t,
                          jnp.asarray(labels_t), jnp.asarray([args.epsilon], jnp.float32), bins=cfg.eval.bins,
                          min_support=cfg.eval.min_support)
    params = {rule: values[0] for rule, values in evaluation.rule_params(jax.device_get(result)).items()}
    queue = jnp.asarray(test_set.frames)
    N, T = queue.shape[:2]
    S = args.slots
    print(f"{cfg.data.name}, {cfg.model.name}: N = {N} test samples, T = {T}, S = {S} slots, {args.rounds} rounds, "
          f"epsilon {args.epsilon:g}; {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start")

    fixed = fns.serve(cutoff.never_fires, S)
    seconds(lambda: fixed(state.params, state.batch_stats, queue, None))                    # compiles
    rows = []
    for rule, entry in cutoff.RULES.items():
        serve = fns.serve(entry.fires, S)
        first_s, _, out = seconds(lambda: serve(state.params, state.batch_stats, queue, params[rule]))  # compiles
        t_rule, t_fixed = [], []
        for _ in range(args.rounds):
            t_rule.append(seconds(lambda: serve(state.params, state.batch_stats, queue, params[rule]))[:2])
            t_fixed.append(seconds(lambda: fixed(state.params, state.batch_stats, queue, None))[:2])
        want_pred, want_t = cutoff.first_exit(entry.fires, cum_t, params[rule])
        equal = bool(np.array_equal(out.predictions, want_pred) and np.array_equal(out.timesteps, want_t))
        mean_exit = float(np.mean(out.timesteps))
        (rule_s, rule_cpu), (fixed_s, fixed_cpu) = np.median(t_rule, axis=0), np.median(t_fixed, axis=0)
        print(f"{rule} eps {args.epsilon:g}: continuous batching {fixed_s / rule_s:.2f}x samples/s over fixed T "
              f"(ideal {T / mean_exit:.2f}x), equal to the multistep rule: {equal}", flush=True)
        rows.append((rule, N / rule_s, N / fixed_s, fixed_cpu / rule_cpu, mean_exit, int(out.slot_steps), rule_s,
                     first_s))

    print(f"\n{'rule':<12}{'samples/s':>11}{'fixed T':>9}{'CPU-time ratio':>16}{'mean exit':>11}{'slot-steps':>12}"
          f"{'of N x T':>10}{'ms/iter':>9}{'1st call s':>12}")
    for rule, rate, fixed_rate, cpu_ratio, mean_exit, slot_steps, rule_s, first_s in rows:
        print(f"{rule:<12}{rate:>11.0f}{fixed_rate:>9.0f}{cpu_ratio:>15.2f}x{mean_exit:>11.3f}{slot_steps:>12}"
              f"{slot_steps / (N * T):>10.1%}{1000 * rule_s / (slot_steps // S):>9.2f}{first_s:>12.1f}")

    batches = [jnp.swapaxes(queue[a:a + S], 0, 1).astype(jnp.float32) for a in range(0, N, S)]
    multistep = lambda: [fns.test_step(state.params, state.batch_stats, b, key)[0] for b in batches]  # noqa: E731
    seconds(multistep)
    t_multi = float(np.median([seconds(multistep)[0] for _ in range(args.rounds)]))
    print(f"\nfixed T, multistep eval step on batches of S (T x S frames per conv): {N / t_multi:.0f} samples/s; "
          f"load average {os.getloadavg()[0]:.1f} at the end (the machine may be shared)")


if __name__ == "__main__":
    main()
