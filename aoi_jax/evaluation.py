"""Evaluation of a trained SNN with every exit rule: accuracy against latency, as a report dict.

One pass over the calibration split (``input_pipeline.calibration_set``: the training samples or a held-out
validation split, with the configured dropout on spikes, seeded) and one over the test split give per-step
logits; ``aoi_jax.cutoff`` scores every exit rule at every epsilon on their
cumulative sums, with the cost of each exit (synaptic operations, energy and decision time up to it,
``aoi_jax.cost``); the continuous-batching server (``aoi_jax.anytime.serve``) is checked against the
multistep Top-K, and ``serve_throughput`` times it for every rule. Nothing here writes files:
``aoi_jax.reporting`` writes the report and its figures.

A QCFS ANN is evaluated as the SNN it converts to: ``spiking_run`` is the one place that converts.

A model whose parameters, batch statistics or logits hold non-finite values (e.g. a diverged run) is still
evaluated, but each such finding is a ``RuntimeWarning`` and a line of the report's ``warnings`` list (its
numbers are then meaningless).
"""

import functools
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aoi_jax import anytime, config as config_lib, cost, cutoff, input_pipeline, method, parallel, step


def no_progress(iterable, **_):
    """The default ``progress``: the iterable itself (a shell passes e.g. ``tqdm.tqdm``)."""
    return iterable


class EvalFunctions(NamedTuple):
    """The compiled functions of one model structure; members of a sweep share them (one compile)."""

    calib_step: Callable  # step.make_eval_step with calibration dropout
    test_step: Callable  # step.make_eval_step without dropout
    serve: Callable  # serve(fires, slots): anytime.make_serve for the rule and S, built once per pair


def make_eval_functions(graphdef, cfg: config_lib.Config, *, compiler_options: dict | None = None) -> EvalFunctions:
    """``EvalFunctions`` for ``graphdef``, all compiled with the same XLA options (so the continuous-batching
    server and the multistep logits see the same arithmetic)."""
    serve = functools.cache(lambda fires, slots: anytime.make_serve(graphdef, fires, slots=slots,
                                                                    compiler_options=compiler_options))
    return EvalFunctions(step.make_eval_step(graphdef, dropout=cfg.eval.calib_dropout, compiler_options=compiler_options),
                         step.make_eval_step(graphdef, compiler_options=compiler_options), serve)


def spiking_run(graphdef, state: step.TrainState, cfg: config_lib.Config, input_shape):
    """``(graphdef, state, cfg)`` of the SNN that is evaluated (``method.of(cfg).evaluated``): the run itself,
    or for a QCFS ANN the IF network it converts to."""
    return method.of(cfg).evaluated(graphdef, state, cfg, input_shape)


def collect(eval_step, state, frameset, batch_size, key, mesh, *, progress=no_progress, desc="eval"):
    """Per-step logits (T, N, K), labels (N,) and spike counts per layer, step and sample (L, T, N) of a split.

    Batch i draws its calibration dropout from ``fold_in(key, i)``.
    """
    logits, labels, spikes = [], [], []
    n_batches = -(-len(frameset) // batch_size)
    batches = input_pipeline.eval_batches(frameset, batch_size, mesh.devices.size)
    for i, (batch, n) in enumerate(progress(batches, total=n_batches, desc=desc)):
        batch = parallel.shard_batch(batch, mesh)
        out, counts = eval_step(state.params, state.batch_stats, batch["frames"], jax.random.fold_in(key, i))
        logits.append(parallel.to_host(out)[:, :n])
        labels.append(parallel.to_host(batch["label"])[:n])
        spikes.append(parallel.to_host(counts)[:, :, :n])
    return np.concatenate(logits, axis=1), np.concatenate(labels), np.concatenate(spikes, axis=2)


def accuracy(eval_step, state, frameset, batch_size, mesh, *, progress=no_progress) -> float:
    """Accuracy at T (argmax of the summed logits) over a split."""
    logits, labels, _ = collect(eval_step, state, frameset, batch_size, jax.random.key(0), mesh,
                                progress=progress, desc="test")
    return float(np.mean(logits.sum(0).argmax(-1) == labels))


def serve_split(serve, state, frameset, param) -> anytime.ServeResult:
    """``serve(params, batch_stats, queue, param)`` (``EvalFunctions.serve(fires, slots)``) on a whole split,
    its recordings queued in file order; the result on the host (numpy)."""
    return jax.device_get(serve(state.params, state.batch_stats, jnp.asarray(frameset.frames), param))


def anytime_check(served: anytime.ServeResult, predictions, timesteps, counts, labels, slots) -> dict:
    """The report's ``anytime`` entry: the continuous-batching server (Top-K, epsilon 0) against
    ``apply_topk`` on the multistep logits (``predictions``, ``timesteps`` (N,)) and the multistep spike
    counts (``counts`` (L, T, N)) up to the same exits."""
    N, T = counts.shape[2], counts.shape[1]
    return {"epsilon": 0.0, "slots": slots, "accuracy": float(np.mean(served.predictions == labels)),
            "mean_timestep": float(served.timesteps.mean()),
            "fraction_of_steps_computed": int(served.slot_steps) / (N * T),
            "agrees_with_apply_topk": bool(np.array_equal(served.predictions, predictions)
                                           and np.array_equal(served.timesteps, timesteps)),
            "spikes_agree_with_multistep": bool(np.array_equal(served.spikes,
                                                               cost.spikes_to_exit(counts, timesteps)))}


def exit_cost_report(result, counts, fan_out, macs, bin_us) -> dict:
    """The report's ``cost`` entry: per rule and epsilon and for OCT (the exits of ``result =
    cutoff.sweep(...)``), and for fixed T at every t, the mean synaptic operations, energy (uJ) and decision
    time (ms of sensor time, None without ``bin_us``) per test sample (``cost.exit_costs``), with the
    equivalent ANN's energy.

    Args:
      result: ``cutoff.sweep``'s dict (host arrays).
      counts: (L, T, N) test spike counts.  fan_out: (L,).  macs: ``cost.layer_macs``.  bin_us: (N,) or None.
    """
    T, N = counts.shape[1:]

    def lists(costs):
        return {k: None if v is None else np.asarray(v).tolist() for k, v in costs.items()}

    fixed = np.broadcast_to(np.arange(1, T + 1)[:, None], (T, N))
    return {"e_ac_pj": cost.E_AC_PJ, "e_mac_pj": cost.E_MAC_PJ, "macs_per_layer": [int(m) for m in macs],
            "ann_macs": int(sum(macs)), "ann_energy_uj": cost.ann_energy_uj(macs),
            "rules": {rule: lists(cost.exit_costs(counts, r["timesteps"], fan_out, macs, bin_us))
                      for rule, r in result["rules"].items()},
            "fixed_t": lists(cost.exit_costs(counts, fixed, fan_out, macs, bin_us)),
            "oct": lists(cost.exit_costs(counts, result["oct_timesteps"], fan_out, macs, bin_us))}


def rule_params(report: dict) -> dict:
    """Each rule's parameter at each of the report's epsilons, {rule: [param per epsilon]}, as ``sweep``
    calibrated them (``topk_beta``, the epsilon itself, ``entropy_threshold``, ``spikecp_qhat``)."""
    return {"topk": [np.asarray(b, np.float32) for b in report["topk_beta"]],
            "confidence": [np.float32(e) for e in report["epsilons"]],
            "entropy": [np.float32(h) for h in report["entropy_threshold"]],
            "spikecp": [np.asarray(q, np.float32) for q in report["spikecp_qhat"]]}


def serve_throughput(functions: EvalFunctions, state, frameset, report: dict, *, slots: int, epsilons,
                     rounds: int = 3) -> dict:
    """Samples/s of continuous batching (``anytime.serve``, S = ``slots``) on a split, for every rule at each
    of ``epsilons`` (a subset of the report's) and for fixed T (``cutoff.never_fires``): the median of
    ``rounds`` timed passes after one untimed pass (which compiles).

    Returns:
      {"slots": S, "rounds": rounds, "fixed_t": {"samples_per_s", "mean_timestep"}, "rules": {rule: {"epsilons": [...],
      "samples_per_s": [...], "accuracy": [...], "mean_timestep": [...]}}}.
    Raises:
      ValueError: an epsilon that the report does not hold.
    """
    missing = [e for e in epsilons if config_lib.epsilon_index(report["epsilons"], e) is None]
    if missing:
        raise ValueError(f"epsilons {missing} are not in the report's {report['epsilons']}")
    queue = jnp.asarray(frameset.frames)

    def timed(fires, param):
        serve = functions.serve(fires, slots)
        result = jax.block_until_ready(serve(state.params, state.batch_stats, queue, param))
        seconds = []
        for _ in range(rounds):
            start = time.perf_counter()
            jax.block_until_ready(serve(state.params, state.batch_stats, queue, param))
            seconds.append(time.perf_counter() - start)
        result = jax.device_get(result)
        return {"samples_per_s": len(frameset) / float(np.median(seconds)),
                "accuracy": float(np.mean(result.predictions == frameset.labels)),
                "mean_timestep": float(result.timesteps.mean())}

    params = rule_params(report)
    rules = {}
    for rule, fires in cutoff.FIRES.items():
        rows = [timed(fires, params[rule][config_lib.epsilon_index(report["epsilons"], e)]) for e in epsilons]
        rules[rule] = {"epsilons": list(epsilons), **{k: [row[k] for row in rows] for k in rows[0]}}
    fixed = timed(cutoff.never_fires, None)
    return {"slots": slots, "rounds": rounds, "fixed_t": {"samples_per_s": fixed["samples_per_s"],
                                        "mean_timestep": fixed["mean_timestep"]}, "rules": rules}


def evaluate(graphdef, state: step.TrainState, cfg: config_lib.Config, calib_set, test_set, key, *, mesh=None,
             functions: EvalFunctions | None = None, progress=no_progress, slots: int = anytime.SLOTS) -> dict:
    """Calibrates on ``calib_set``, scores every rule on ``test_set``; returns the report.

    Args:
      graphdef, state, cfg: a spiking run (``spiking_run`` converts a QCFS ANN first).
      calib_set, test_set: ``data.FrameSet``s: the calibration split (``input_pipeline.calibration_set``)
        and the test split.
      key: the calibration dropout key (``step.run_keys(seed).calibration``).
      mesh: a ``parallel.data_mesh`` (default: all devices).  functions: ``make_eval_functions(graphdef,
        cfg)``, built here when not given (a sweep passes the same ones for every member).
      progress: ``progress(iterable, total=, desc=)`` wrapping each pass (e.g. ``tqdm.tqdm``).
      slots: S of the continuous-batching check (``anytime_check``).
    Returns:
      the report: a dict of plain Python values (``aoi_jax.reporting`` writes it as report.json); its
      ``warnings`` lists what was found non-finite (also each a ``RuntimeWarning``).
    Raises:
      ValueError: ``cfg`` is a QCFS ANN.
    """
    if method.of(cfg).converts:
        raise ValueError("evaluate needs a spiking run; convert the QCFS ANN first (evaluation.spiking_run)")
    found = []
    state_leaves = jax.tree.leaves((state.params, state.batch_stats))
    bad = sum(int(jnp.sum(~jnp.isfinite(x))) for x in state_leaves)
    if bad:
        found.append(f"the parameters and batch statistics hold {bad} non-finite values (of "
                     f"{sum(x.size for x in state_leaves)})")
    mesh = parallel.data_mesh() if mesh is None else mesh
    fns = make_eval_functions(graphdef, cfg) if functions is None else functions
    batch_size = cfg.eval.batch_size
    logits_c, labels_c, _ = collect(fns.calib_step, state, calib_set, batch_size, key, mesh, progress=progress,
                                    desc="calibration")
    logits_t, labels_t, counts = collect(fns.test_step, state, test_set, batch_size, key, mesh, progress=progress,
                                         desc="test")
    spikes = counts.sum(-1)                                          # (L, T)

    for split, logits in (("calibration", logits_c), ("test", logits_t)):
        bad = int(np.sum(~np.isfinite(logits)))
        if bad:
            found.append(f"the {split} logits hold {bad} non-finite values (of {logits.size})")
    for message in found:
        warnings.warn(f"{message}: this report's numbers are meaningless", RuntimeWarning, stacklevel=2)

    cum_c, cum_t = cutoff.cumulative(jnp.asarray(logits_c)), cutoff.cumulative(jnp.asarray(logits_t))
    epsilons = jnp.asarray(cfg.eval.epsilons, jnp.float32)
    result = jax.device_get(cutoff.sweep(cum_c, jnp.asarray(labels_c), cum_t, jnp.asarray(labels_t), epsilons,
                                         bins=cfg.eval.bins, min_support=cfg.eval.min_support))
    beta0 = cutoff.calibrate_topk(cum_c, jnp.asarray(labels_c), epsilon=0.0, bins=cfg.eval.bins,
                                  min_support=cfg.eval.min_support)
    served = serve_split(fns.serve(cutoff.topk_fires, slots), state, test_set, beta0)
    pred_m, steps_m = jax.device_get(cutoff.apply_topk(cum_t, beta0))

    model = nnx.merge(graphdef, state.params, state.batch_stats)
    fan_out = model.fan_out
    macs = cost.layer_macs(model, test_set.frames.shape[2:])
    n_test = len(labels_t)
    per_sample_spikes = spikes.sum(1) / n_test                      # (L,)
    return {
        "config": config_lib.to_dict(cfg),
        "n_calibration": int(len(labels_c)), "n_test": int(n_test),
        "accuracy_per_timestep": result["fixed_t_accuracy"].tolist(),
        "oct": {"accuracy": float(result["oct_accuracy"]), "mean_timestep": float(result["oct_timestep"])},
        "epsilons": [float(e) for e in cfg.eval.epsilons],
        "rules": {rule: {"accuracy": result["rules"][rule]["accuracy"].tolist(),
                         "mean_timestep": result["rules"][rule]["mean_timestep"].tolist()}
                  for rule in result["rules"]},
        "topk_beta": result["topk_beta"].tolist(),
        "spikecp_qhat": result["spikecp_qhat"].tolist(),
        "entropy_threshold": result["entropy_threshold"].tolist(),
        "anytime": anytime_check(served, pred_m, steps_m, counts, labels_t, slots),
        "cost": exit_cost_report(result, counts, fan_out, macs, test_set.bin_us),
        "spikes_per_sample": per_sample_spikes.tolist(),
        "spikes_per_sample_per_timestep": (spikes / n_test).tolist(),
        "fan_out": list(fan_out),
        "neurons": jax.tree.map(lambda v: np.asarray(v).tolist(), model.cell_values()),
        "synops_per_sample": (per_sample_spikes * np.asarray(fan_out)).tolist(),
        "warnings": found,
    }
