"""Evaluation of a trained SNN with every exit rule: accuracy against latency, as a report dict.

``evaluate_checkpoint(source, step=..., overrides=...)`` is the entry point (``evaluate.py`` is argv -> it ->
``reporting.write_report``): it restores a checkpoint and calls ``evaluate_state``, which training's final
evaluation and sweeps call on the states they hold (one compile of ``eval_functions_for`` per structure).
Compiler options default to XLA's (none); the report records those that ran (``xla_options``).

One pass over the calibration split (``input_pipeline.calibration_set``: the training samples or a held-out
validation split, with the configured dropout on spikes, seeded) and one over the test split give per-step
logits; ``aoi_jax.cutoff`` scores every registered exit rule (``cutoff.RULES``) at every epsilon on their
cumulative sums, with the cost of each exit (synaptic operations, energy and decision time up to it,
``aoi_jax.cost``); the continuous-batching server (``aoi_jax.anytime.serve``) is checked against the
multistep Top-K, and ``serve_throughput`` times it for every rule. Nothing here writes files:
``aoi_jax.reporting`` writes the report and its figures.

A QCFS ANN is evaluated as the SNN it converts to: ``spiking_run`` is the one place that converts.

A model whose parameters, batch statistics or logits hold non-finite values (e.g. a diverged run) is still
evaluated, but each such finding is a ``RuntimeWarning`` and a line of the report's ``warnings`` list (its
numbers are then meaningless).
"""

import dataclasses
import functools
import logging
import pathlib
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aoi_jax import anytime, checkpoint, config as config_lib, cost, cutoff, data, input_pipeline, method, parallel
from aoi_jax import reporting, step

log = logging.getLogger(__name__)
REPORT_FIELDS = ("xla_options", "serve", "checkpoint")  # the fields evaluate_state and evaluate_checkpoint add


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
    """Each scored rule's parameter at each of the report's epsilons, {rule: [param per epsilon]}, as ``sweep``
    calibrated them: for every rule of ``report["rules"]``, the report's field ``cutoff.RULES[rule].key``
    (``topk_beta``, ``entropy_threshold``, ``spikecp_qhat``), or the epsilon itself for a rule without one.

    Raises:
      ValueError: the report scores a rule that is not registered (``cutoff.register_rule``).
    """
    missing = [name for name in report["rules"] if name not in cutoff.RULES]
    if missing:
        raise ValueError(f"the report scores exit rules {missing} that are not registered (registered: "
                         f"{list(cutoff.RULES)}); import the module that registers them (evaluate.py --rules)")
    return {name: [np.asarray(p, np.float32) for p in
                   report["epsilons" if cutoff.RULES[name].key is None else cutoff.RULES[name].key]]
            for name in report["rules"]}


def serve_throughput(functions: EvalFunctions, state, frameset, report: dict, *, slots: int, epsilons,
                     rounds: int = 3) -> dict:
    """Samples/s of continuous batching (``anytime.serve``, S = ``slots``) on a split, for every rule the
    report scores (``rule_params``) at each of ``epsilons`` (a subset of the report's) and for fixed T
    (``cutoff.never_fires``): the median of ``rounds`` timed passes after one untimed pass (which compiles).

    Returns:
      {"slots": S, "rounds": rounds, "fixed_t": {"samples_per_s", "mean_timestep"}, "rules": {rule: {"epsilons": [...],
      "samples_per_s": [...], "accuracy": [...], "mean_timestep": [...]}}}.
    Raises:
      ValueError: an epsilon that the report does not hold; a rule that is not registered.
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
    for rule in report["rules"]:
        fires = cutoff.RULES[rule].fires
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
    head = {
        "config": config_lib.to_dict(cfg),
        "n_calibration": int(len(labels_c)), "n_test": int(n_test),
        "accuracy_per_timestep": result["fixed_t_accuracy"].tolist(),
        "oct": {"accuracy": float(result["oct_accuracy"]), "mean_timestep": float(result["oct_timestep"])},
        "epsilons": [float(e) for e in cfg.eval.epsilons],
        "rules": {rule: {"accuracy": result["rules"][rule]["accuracy"].tolist(),
                         "mean_timestep": result["rules"][rule]["mean_timestep"].tolist()}
                  for rule in result["rules"]},
    }
    params = {rule.key: result[rule.key].tolist() for rule in cutoff.RULES.values() if rule.key is not None}
    tail = {
        "anytime": anytime_check(served, pred_m, steps_m, counts, labels_t, slots),
        "cost": exit_cost_report(result, counts, fan_out, macs, test_set.bin_us),
        "spikes_per_sample": per_sample_spikes.tolist(),
        "spikes_per_sample_per_timestep": (spikes / n_test).tolist(),
        "fan_out": list(fan_out),
        "neurons": jax.tree.map(lambda v: np.asarray(v).tolist(), model.cell_values()),
        "synops_per_sample": (per_sample_spikes * np.asarray(fan_out)).tolist(),
        "warnings": found,
    }
    clash = sorted(set(params) & (set(head) | set(tail) | set(REPORT_FIELDS)))
    if clash:
        raise ValueError(f"exit rules store their parameters under {clash}, which report.json uses for its own "
                         "fields; register them with another key (cutoff.register_rule(..., key=))")
    return {**head, **params, **tail}


def eval_functions_for(graphdef, state: step.TrainState, cfg: config_lib.Config, input_shape, *,
                       compiler_options: dict | None = None) -> EvalFunctions:
    """``make_eval_functions`` of the SNN that is evaluated for this run (``spiking_run``: a QCFS ANN's IF
    network): build them once and pass them to ``evaluate_state`` for every member of one structure."""
    g, _, c = spiking_run(graphdef, state, cfg, input_shape)
    return make_eval_functions(g, c, compiler_options=compiler_options)


def evaluate_state(graphdef, state: step.TrainState, cfg: config_lib.Config, input_shape, train_split, test_set,
                   *, mesh=None, functions: EvalFunctions | None = None, serve: bool = False,
                   slots: int = anytime.SLOTS, compiler_options: dict | None = None, progress=None) -> dict:
    """The report of a trained state (a run's, or a sweep member's): ``evaluate`` on the SNN it is
    (``spiking_run``), calibrated on ``input_pipeline.calibration_set`` of ``cfg``, optionally with
    ``serve_throughput`` at the table's epsilons (``report["serve"]``).

    Args:
      graphdef, state, cfg, input_shape: the run as trained (``checkpoint.restore``'s first four values).
      train_split, test_set: ``data.load(cfg.data)``'s ``FrameSet``s (the whole training split: the held-out
        validation part is split off here, ``input_pipeline.split_validation``).
      mesh: a ``parallel.data_mesh`` (default: all devices); the state is replicated on it.
      functions: ``eval_functions_for(...)`` of this structure (a sweep passes the same ones to every member:
        one compile), or None to build them here with ``compiler_options``.
      serve: also time continuous batching for every rule (``serve_throughput``).  slots: its S, and the
        S of ``anytime_check``.
      compiler_options: XLA options of the functions built here, recorded as ``report["xla_options"]``
        (None: XLA's defaults, ``{}``); pass the ones ``functions`` were built with.
      progress: ``progress(iterable, total=, desc=)`` wrapping each pass (e.g. ``tqdm.tqdm``); None: none.
    Returns:
      the report (``evaluate``'s, with ``xla_options`` and, with ``serve``, ``serve``).
    Raises:
      ValueError: the data's frames do not have the run's input shape; as ``evaluate`` and ``spiking_run``.
    """
    if tuple(train_split.frames.shape[2:]) != tuple(input_shape):
        raise ValueError(f"data frames (H, W, C) = {tuple(train_split.frames.shape[2:])} of {cfg.data.name!r} do "
                         f"not match the run's input shape {tuple(input_shape)}")
    graphdef, state, cfg = spiking_run(graphdef, state, cfg, input_shape)
    functions = make_eval_functions(graphdef, cfg, compiler_options=compiler_options) if functions is None \
        else functions
    mesh = parallel.data_mesh() if mesh is None else mesh
    state = parallel.replicate(state, mesh)
    calib_set = input_pipeline.calibration_set(*input_pipeline.split_validation(train_split, cfg.data), cfg)
    report = evaluate(graphdef, state, cfg, calib_set, test_set, step.run_keys(cfg.seed).calibration, mesh=mesh,
                      functions=functions, progress=progress or no_progress, slots=slots)
    report["xla_options"] = dict(compiler_options or {})
    if serve:
        report["serve"] = serve_throughput(functions, state, test_set, report, slots=slots,
                                           epsilons=reporting.table_epsilons(report))
    return report


def checkpoint_dir(source) -> pathlib.Path:
    """The checkpoints folder of ``source``: a train.py workdir (its ``checkpoints/``) or the folder itself."""
    source = pathlib.Path(source)
    return source / "checkpoints" if (source / "checkpoints").is_dir() else source


def evaluate_checkpoint(source, *, step="last", overrides=(), data_dir=None, serve: bool = False,
                        slots: int = anytime.SLOTS, compiler_options: dict | None = None,
                        progress=None) -> dict:
    """Evaluates a checkpoint with every exit rule: the one evaluation entry point (``evaluate.py``).

    ::

        restore(checkpoint_dir(source), step) -> run;  cfg <- cfg + overrides (eval.*) + data.data_dir
        report = evaluate_state(run, data.load(cfg.data), ...)
        report["checkpoint"] = {"step": step restored, "path": its folder}

    Args:
      source: a train.py workdir (its ``checkpoints/``) or a checkpoints folder (holding step folders).
      step: "last" (the newest intact step), "best" (``checkpoint.resolve_step``) or a step number.
      overrides: ``"eval.KEY=VALUE"`` strings (``config.apply_overrides``); only evaluation settings.
      data_dir: where the data set lives, if not where training read it.
      serve, slots, compiler_options, progress: as ``evaluate_state`` (compiler_options None: XLA's defaults).
    Returns:
      the report (``evaluate_state``'s, with ``checkpoint``); the caller writes it (``reporting.write_report``).
    Raises:
      ValueError: an override outside ``eval.*``; the data do not fit the run; as ``evaluate_state``.
      FileNotFoundError / checkpoint.DamagedCheckpointError: no such (intact) checkpoint.
    """
    not_eval = [item for item in overrides if not item.startswith("eval.")]
    if not_eval:
        raise ValueError(f"evaluate.py --set changes evaluation settings (eval.*) only, got {not_eval}; the "
                         "model, data and training settings are those stored with the checkpoint")
    directory = checkpoint_dir(source)
    graphdef, state, cfg, input_shape = checkpoint.restore(directory, step)
    restored = int(state.step)
    cfg = config_lib.apply_overrides(cfg, list(overrides) + ([f"data.data_dir={data_dir}"] if data_dir else []))
    log.info("restored %s step %d (%s, %s, neuron %s)", directory, restored, cfg.model.name, cfg.model.activation,
             dataclasses.asdict(cfg.model.neuron))
    train_split, test_set = data.load(cfg.data, progress=progress)
    log.info("data %s from %s", cfg.data.name, data.data_root(cfg.data.data_dir))
    report = evaluate_state(graphdef, state, cfg, input_shape, train_split, test_set, serve=serve, slots=slots,
                            compiler_options=compiler_options, progress=progress)
    report["checkpoint"] = {"step": restored, "path": str((directory / str(restored)).resolve())}
    return report
