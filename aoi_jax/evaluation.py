"""Evaluation of a trained SNN with every exit rule: accuracy against latency, as a report dict.

One pass over the calibration split (``input_pipeline.calibration_set``: the training samples or a held-out
validation split, with the configured dropout on spikes, seeded) and one over the test split give per-step
logits; ``aoi_jax.cutoff`` scores every exit rule at every epsilon on their
cumulative sums; the step-by-step anytime loop (``aoi_jax.anytime``) is checked against the multistep
Top-K. Nothing here writes files: ``aoi_jax.reporting`` writes the report and its figures.

A QCFS ANN is evaluated as the SNN it converts to: ``spiking_run`` is the one place that converts.

A model whose parameters, batch statistics or logits hold non-finite values (e.g. a diverged run) is still
evaluated, but each such finding is a ``RuntimeWarning`` and a line of the report's ``warnings`` list (its
numbers are then meaningless).
"""

import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aoi_jax import anytime, config as config_lib, convert, cutoff, input_pipeline, parallel, step


def no_progress(iterable, **_):
    """The default ``progress``: the iterable itself (a shell passes e.g. ``tqdm.tqdm``)."""
    return iterable


class EvalFunctions(NamedTuple):
    """The compiled functions of one model structure; members of a sweep share them (one compile)."""

    calib_step: Callable  # step.make_eval_step with calibration dropout
    test_step: Callable  # step.make_eval_step without dropout
    run_topk: Callable  # jitted anytime.run_topk


def make_eval_functions(graphdef, cfg: config_lib.Config, *, compiler_options: dict | None = None) -> EvalFunctions:
    """``EvalFunctions`` for ``graphdef``, all compiled with the same XLA options (so the anytime loop and
    the multistep logits see the same arithmetic)."""
    return EvalFunctions(step.make_eval_step(graphdef, dropout=cfg.eval.calib_dropout, compiler_options=compiler_options),
                         step.make_eval_step(graphdef, compiler_options=compiler_options),
                         jax.jit(functools.partial(anytime.run_topk, graphdef), compiler_options=compiler_options))


def spiking_run(graphdef, state: step.TrainState, cfg: config_lib.Config, input_shape):
    """``(graphdef, state, cfg)`` of the SNN that is evaluated: the run itself, or for a QCFS ANN
    (``cfg.model.is_ann``) the IF network it converts to (``convert.to_snn``)."""
    if cfg.model.is_ann:
        return convert.to_snn(state, cfg, input_shape)
    return graphdef, state, cfg


def collect(eval_step, state, frameset, batch_size, key, mesh, *, progress=no_progress, desc="eval"):
    """Per-step logits (T, N, K), labels (N,) and spike totals per layer and step (L, T) of a split.

    Batch i draws its calibration dropout from ``fold_in(key, i)``.
    """
    logits, labels, spikes = [], [], 0.0
    n_batches = -(-len(frameset) // batch_size)
    batches = input_pipeline.eval_batches(frameset, batch_size, mesh.devices.size)
    for i, (batch, n) in enumerate(progress(batches, total=n_batches, desc=desc)):
        batch = parallel.shard_batch(batch, mesh)
        out, counts = eval_step(state.params, state.batch_stats, batch["frames"], jax.random.fold_in(key, i))
        logits.append(parallel.to_host(out)[:, :n])
        labels.append(parallel.to_host(batch["label"])[:n])
        spikes = spikes + parallel.to_host(counts)[:, :, :n].sum(-1)
    return np.concatenate(logits, axis=1), np.concatenate(labels), spikes


def accuracy(eval_step, state, frameset, batch_size, mesh, *, progress=no_progress) -> float:
    """Accuracy at T (argmax of the summed logits) over a split."""
    logits, labels, _ = collect(eval_step, state, frameset, batch_size, jax.random.key(0), mesh,
                                progress=progress, desc="test")
    return float(np.mean(logits.sum(0).argmax(-1) == labels))


def anytime_topk(run_topk, state, frameset, beta, batch_size, mesh, *, progress=no_progress):
    """Runs the step-by-step early-exit loop (``run_topk(params, batch_stats, frames, beta)``) on a split;
    returns predictions, exit timesteps and the fraction of (sample, step) frames actually computed (a
    batch runs until its last sample exits)."""
    preds, steps, computed, total = [], [], 0, 0
    n_batches = -(-len(frameset) // batch_size)
    batches = input_pipeline.eval_batches(frameset, batch_size, mesh.devices.size)
    for batch, n in progress(batches, total=n_batches, desc="anytime"):
        batch = parallel.shard_batch(batch, mesh)
        res = run_topk(state.params, state.batch_stats, batch["frames"], beta)
        preds.append(parallel.to_host(res.predictions)[:n])
        steps.append(parallel.to_host(res.timesteps)[:n])
        computed += int(res.steps_computed) * n
        total += batch["frames"].shape[0] * n
    return np.concatenate(preds), np.concatenate(steps), computed / total


def evaluate(graphdef, state: step.TrainState, cfg: config_lib.Config, calib_set, test_set, key, *, mesh=None,
             functions: EvalFunctions | None = None, progress=no_progress) -> dict:
    """Calibrates on ``calib_set``, scores every rule on ``test_set``; returns the report.

    Args:
      graphdef, state, cfg: a spiking run (``spiking_run`` converts a QCFS ANN first).
      calib_set, test_set: ``data.FrameSet``s: the calibration split (``input_pipeline.calibration_set``)
        and the test split.
      key: the calibration dropout key (``step.run_keys(seed).calibration``).
      mesh: a ``parallel.data_mesh`` (default: all devices).  functions: ``make_eval_functions(graphdef,
        cfg)``, built here when not given (a sweep passes the same ones for every member).
      progress: ``progress(iterable, total=, desc=)`` wrapping each pass (e.g. ``tqdm.tqdm``).
    Returns:
      the report: a dict of plain Python values (``aoi_jax.reporting`` writes it as report.json); its
      ``warnings`` lists what was found non-finite (also each a ``RuntimeWarning``).
    Raises:
      ValueError: ``cfg`` is a QCFS ANN.
    """
    if cfg.model.is_ann:
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
    logits_t, labels_t, spikes = collect(fns.test_step, state, test_set, batch_size, key, mesh, progress=progress,
                                         desc="test")

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
    pred_a, steps_a, frac = anytime_topk(fns.run_topk, state, test_set, beta0, batch_size, mesh, progress=progress)
    pred_m, steps_m = cutoff.apply_topk(cum_t, beta0)

    fan_out = nnx.merge(graphdef, state.params, state.batch_stats).fan_out
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
        "anytime": {"epsilon": 0.0, "accuracy": float(np.mean(pred_a == labels_t)),
                    "mean_timestep": float(steps_a.mean()), "fraction_of_steps_computed": frac,
                    "agrees_with_apply_topk": bool(np.array_equal(pred_a, np.asarray(pred_m))
                                                   and np.array_equal(steps_a, np.asarray(steps_m)))},
        "spikes_per_sample": per_sample_spikes.tolist(),
        "spikes_per_sample_per_timestep": (spikes / n_test).tolist(),
        "fan_out": list(fan_out),
        "synops_per_sample": (per_sample_spikes * np.asarray(fan_out)).tolist(),
        "warnings": found,
    }
