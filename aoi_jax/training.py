"""Training and evaluation of a run or a sweep: the one epoch loop.

``train_and_evaluate(cfg, workdir, sweep=...)`` trains every member of the sweep (``aoi_jax.sweep``; a single
run is a sweep of one member) in one compiled step per batch, then evaluates each member with every exit
rule and returns, per member, its trained state and its report; the caller writes the reports
(``aoi_jax.reporting``). Training sees the data set's training split less the held-out validation split
(``data.validation_fraction``, ``input_pipeline.split_validation``); Top-K and SpikeCP calibrate on
``input_pipeline.calibration_set`` (``eval.calibration``).

After each epoch, per member, a metrics record (one line of its ``metrics.jsonl``; ``epoch_record``):

    epoch, step            epochs and optimiser steps done
    lr                     the learning rate of the epoch's first optimiser step (``step.learning_rate``)
    train_loss, train_task, train_rcs, train_accuracy       means over the epoch's batches
    val_accuracy, val_loss the held-out validation split's accuracy at T and cross-entropy of the time-mean
                           logits (only with data.validation_fraction > 0)
    test_accuracy          accuracy at T on the test split
    best_epoch, best_<m>   with train.best_metric = m: the epoch best by m so far and its value
    images_per_s, epoch_seconds
    data_digest            what the data are (``rundir.data_digest``): a resumed run must see the same

The run's folder (the lock, resuming, config.json, checkpoints, metrics.jsonl) is ``aoi_jax.rundir``'s;
``callback(member, record)`` sees each record once it is saved (e.g. ``aoi_jax.tensorboard.TensorBoard``).

- Resuming: the batches of an epoch are a function of the seed and the epoch
  (``input_pipeline.train_batches``) and the optimiser step is stored, so a resumed run ends bit-identical
  to an uninterrupted one (README, "Reliability").
- Every step's loss and, at the end of each epoch, the state are checked for non-finite values (one fetch
  per epoch, no host sync per step): a non-finite loss stops training with ``FloatingPointError`` naming
  the epoch and the optimiser step before anything of that epoch is saved.
- Early stopping (``train.early_stop_patience`` = P > 0): training stops once ``train.best_metric`` has not
  improved for P epochs (in every member of a sweep), with a log line saying so; a resumed run that had
  stopped trains no further.

Logs go to the ``aoi_jax`` logger; progress bars through the ``progress`` argument.
"""

import dataclasses
import logging
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aoi_jax import config as config_lib, data, evaluation, input_pipeline, method, parallel, reporting, rundir, step
from aoi_jax import sweep as sweep_lib
from aoi_jax import xla_tuning

log = logging.getLogger("aoi_jax")

DISPATCH_AHEAD = 2  # train steps dispatched before the host waits for the oldest one (no data is fetched)


@dataclasses.dataclass
class RunResult:
    """One trained member: its sweep entry, its folder, its evaluation report (None if not evaluated) and
    its trained model: ``nnx.merge(graphdef, state.params, state.batch_stats)`` for frames (T, N, H, W, C)
    with (H, W, C) = ``input_shape``."""

    member: sweep_lib.Member
    workdir: pathlib.Path
    report: dict | None
    state: step.TrainState | None = None  # after the last epoch, on the host (numpy arrays)
    graphdef: Any = None
    input_shape: tuple | None = None


@jax.jit
def _all_finite(states) -> jax.Array:
    """(M,) bool: every floating-point leaf of member m's state is finite (states stacked (M, ...)).

    One compiled program rather than three eager operations per leaf: on XLA:CPU with several (forced host)
    devices, dozens of small multi-device programs dispatched behind the epoch's last train steps could
    deadlock in a collective's rendezvous (measured; see ``tests/test_storage_faults.py``)."""
    leaves = [x for x in jax.tree.leaves(states) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack([jnp.isfinite(x).reshape(x.shape[0], -1).all(1) for x in leaves]).all(0)


def non_finite(losses: np.ndarray, states_finite: np.ndarray, members, epoch: int, first_step: int) -> str | None:
    """The error message of an epoch that went non-finite (None: it did not), checked before it is saved.

    Args:
      losses: (S, M) the loss of each of the epoch's S optimiser steps, per member.
      states_finite: (M,) whether each member's state at the end of the epoch is finite.
      epoch: 0-based.  first_step: optimiser steps taken before the epoch (step s of the epoch, 0-based, is
        optimiser step ``first_step + s + 1``).
    Returns:
      "loss became non-finite at epoch E, step S; ..." (S: the first optimiser step, counted from 1, whose
      loss is NaN or infinite in any member; a sweep names the members), or, every loss finite, "the state
      became non-finite at epoch E; ...", or None.
    """
    bad = ~np.isfinite(losses)
    if bad.any():
        s = int(np.argwhere(bad)[0][0])
        what = f"loss became non-finite at epoch {epoch + 1}, step {first_step + s + 1}"
        who = np.flatnonzero(bad[s])
    elif not states_finite.all():
        what = f"the state became non-finite at epoch {epoch + 1} (every loss was finite)"
        who = np.flatnonzero(~states_finite)
    else:
        return None
    if len(members) > 1:
        what += f" (member{'s' if len(who) > 1 else ''} {', '.join(members[i].name for i in who)})"
    kept = f"the checkpoints keep step {first_step}" if first_step else "no checkpoint was written"
    return f"{what}; epoch {epoch + 1} was not saved and {kept}. Lower optim.lr or check the data"


def split_metrics(eval_step, state, frameset, batch_size, mesh) -> tuple[float, float]:
    """(accuracy, loss) of a split: accuracy at T (argmax of the summed logits) and the mean cross-entropy of
    the time-mean logits::

        loss = mean_n CE( (1/T) sum_t o_t[n], y_n )          (losses.mean_loss)
    """
    logits, labels, _ = evaluation.collect(eval_step, state, frameset, batch_size, jax.random.key(0), mesh,
                                           desc="validation")
    mean = logits.mean(0).astype(np.float64)                                # (N, K)
    shifted = mean - mean.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return (float(np.mean(logits.sum(0).argmax(-1) == labels)),
            float(-np.mean(log_p[np.arange(len(labels)), labels])))


def best_so_far(record: dict, previous: dict | None, metric: str) -> dict:
    """``{"best_epoch": e, "best_<metric>": v}``: the epoch best by ``record[metric]`` up to ``record``'s, given
    the previous epoch's record (None: ``record`` is the first, or the previous predates best tracking).
    Better is higher for accuracies, lower for losses (``config.BEST_METRICS``); ties keep the earlier."""
    key, value = f"best_{metric}", record[metric]
    if previous is not None and key in previous:
        best = previous[key]
        improved = value > best if config_lib.BEST_METRICS[metric] == "max" else value < best
        if not improved:
            return {"best_epoch": previous["best_epoch"], key: best}
    return {"best_epoch": record["epoch"], key: value}


def patience_spent(record: dict | None, cfg: config_lib.Config) -> bool:
    """Whether ``train.best_metric`` has not improved for ``train.early_stop_patience`` epochs by ``record``."""
    patience = cfg.train.early_stop_patience
    return bool(patience and record and "best_epoch" in record and record["epoch"] - record["best_epoch"] >= patience)


def check_stopping(cfg: config_lib.Config) -> None:
    """Checks the keys that watch a metric against the rest of the config (before any work).

    Raises:
      ValueError: ``train.early_stop_patience`` > 0 without ``train.best_metric``, or a ``val_*`` best metric
        without a held-out split (``data.validation_fraction`` 0).
    """
    metric, patience = cfg.train.best_metric, cfg.train.early_stop_patience
    if patience and not metric:
        raise ValueError(f"train.early_stop_patience = {patience} needs train.best_metric, the metric it watches "
                         f"(one of {list(config_lib.BEST_METRICS)})")
    if metric.startswith("val_") and cfg.data.validation_fraction == 0:
        raise ValueError(f"train.best_metric = {metric!r} needs a held-out validation split: set "
                         "data.validation_fraction > 0 (e.g. 0.2)")


def train_and_evaluate(cfg: config_lib.Config, workdir, *, sweep: dict | None = None, run_eval: bool = True,
                       strategy: str = "auto", tuning: str = "none", progress=evaluation.no_progress,
                       callback: Callable[[sweep_lib.Member, dict], None] | None = None) -> list[RunResult]:
    """Trains ``cfg`` (every member of ``sweep``), then evaluates each member; resumes from checkpoints.

    Args:
      cfg: the base config.  workdir: the run's folder (created; locked while this runs; ``aoi_jax.rundir``).
      sweep: {key: values} (``config.parse_sweep``); None or {} trains ``cfg`` alone.
      run_eval: evaluate each member after training (report in its ``RunResult``).
      strategy: how members share a program (``sweep.make_multi_step``).
      tuning: "none" (XLA's defaults) or "auto": the XLA options of ``xla_tuning.compiler_options``; the
        options used are recorded in each ``config.json`` and report (``"xla_options"``).
      progress: ``progress(iterable, total=, desc=)`` wrapping each pass over data (e.g. ``tqdm.tqdm``).
      callback: called as ``callback(member, record)`` for each member after each epoch, once the record (the
        epoch's ``metrics.jsonl`` line, a dict) is saved; e.g. ``aoi_jax.tensorboard.TensorBoard(workdir)``.
    Returns:
      one ``RunResult`` per member, in sweep order, with its trained state.
    Raises:
      RuntimeError: another process holds the workdir (``rundir.workdir_lock``).
      ValueError: ``check_stopping``; the checkpoints hold another config (``rundir.check_resumable``) or
        were trained on other data (``RunDir.check_data``), more epochs than ``train.epochs``, or no step
        intact in every member (``rundir.resume_step``); ``train.batch_size`` exceeds the training set; the
        data set's classes differ from ``model.num_classes``; a sweep across several processes.
      FloatingPointError: training went non-finite (``non_finite`` gives the message).
    """
    check_stopping(cfg)
    members = sweep_lib.members(cfg, sweep or {})
    if len(members) > 1 and jax.process_count() > 1:
        raise ValueError("a sweep runs in one process (members are split over its devices); "
                         f"this is process {jax.process_index()} of {jax.process_count()}")
    run = rundir.RunDir(pathlib.Path(workdir), members)
    with run.locked():
        return _train_and_evaluate(run, run_eval, strategy, tuning, progress, callback)


def _train_and_evaluate(run: rundir.RunDir, run_eval, strategy, tuning, progress, callback) -> list[RunResult]:
    members = run.members
    base = sweep_lib.shared_config(members)
    M = len(members)
    resume = run.survey()
    data_mesh = parallel.data_mesh()
    member_mesh = sweep_lib.member_mesh(M) if M > 1 else None
    if member_mesh is None:                       # the batch is split over the devices: refused before any work
        parallel.check_batch_size(base.train.batch_size, data_mesh.devices.size)
    log.info("%d member(s)%s on %s; data parallel over %d device(s)", M,
             f" ({', '.join(m.name for m in members)})" if M > 1 else "", jax.devices(), data_mesh.devices.size)

    t0 = time.time()
    train_split, test_set = data.load(base.data, progress=progress)
    digest = rundir.data_digest(train_split, test_set)
    train_set, validation_set = input_pipeline.split_validation(train_split, base.data)
    # refuses eval.calibration=validation without a held-out split before any work (evaluation builds the set)
    input_pipeline.calibration_set(train_set, validation_set, base)
    input_shape = train_set.frames.shape[2:]
    log.info("data %s from %s: train %d, validation %d (held out), test %d, frames (T, H, W, C) = %s, %d classes; "
             "calibration on %s (%.1f s)", base.data.name, data.data_root(base.data.data_dir), len(train_set),
             0 if validation_set is None else len(validation_set), len(test_set), train_set.frames.shape[1:],
             train_set.num_classes, base.eval.calibration, time.time() - t0)
    run.check_data(digest)
    if train_set.num_classes != base.model.num_classes:
        raise ValueError(f"model.num_classes = {base.model.num_classes} but data set {base.data.name!r} has "
                         f"{train_set.num_classes} classes")
    if base.train.batch_size > len(train_set):
        raise ValueError(f"train.batch_size = {base.train.batch_size} is larger than the training set of "
                         f"{base.data.name!r} ({len(train_set)} samples); it must be at most {len(train_set)}")
    steps_per_epoch = input_pipeline.steps_per_epoch(len(train_set), base)
    total_steps = base.train.epochs * steps_per_epoch
    done = run.step // steps_per_epoch
    if done > base.train.epochs:
        raise ValueError(f"train.epochs = {base.train.epochs} but the checkpoints in {run.workdir} have trained "
                         f"{done} epochs; ask for train.epochs >= {done} to continue this run")

    train_options = xla_tuning.compiler_options(tuning, remat=base.model.remat)
    eval_options = xla_tuning.compiler_options(tuning)
    run.prepare({"train": train_options, "evaluation": eval_options}, steps_per_epoch)

    optimizer = step.make_optimizer(base.optim, total_steps)
    schedule = step.learning_rate(base.optim, total_steps)
    graphdef, states = sweep_lib.init_members(members, input_shape, optimizer, shapes_only=resume is not None)
    log.info("model %s: %d parameters per member", base.model.name,
             sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(states.params)))
    if resume is not None:
        states = sweep_lib.stack(run.restore())
        log.info("resumed from step %d (epoch %d)%s", resume, done, "" if run.stored_epochs == base.train.epochs else
                 f"; train.epochs {run.stored_epochs} -> {base.train.epochs}: the learning-rate schedule now spans "
                 f"{total_steps} steps, lr at step {resume} = {float(schedule(resume)):.4g}")

    if member_mesh is None:
        place_batch = lambda b: parallel.shard_batch(b, data_mesh)  # noqa: E731
        place_tree = lambda t: parallel.replicate(t, data_mesh)  # noqa: E731
    else:
        place_batch = place_tree = lambda t: sweep_lib.place(t, member_mesh)  # noqa: E731
    states, weights = place_tree(states), place_tree(sweep_lib.loss_weights(members))
    multi_step = sweep_lib.make_multi_step(graphdef, base, optimizer, mesh=member_mesh, strategy=strategy,
                                           compiler_options=train_options)
    eval_functions = None if method.of(base).converts else \
        evaluation.make_eval_functions(graphdef, base, compiler_options=eval_options)
    test_step = step.make_eval_step(graphdef, compiler_options=eval_options) if method.of(base).converts \
        else eval_functions.test_step                                       # per-epoch test accuracy
    test_input = input_pipeline.model_input(test_set, base)
    validation_input = None if validation_set is None else input_pipeline.model_input(validation_set, base)
    configs = [m.cfg for m in members]
    previous = list(run.records) if run.records else [None] * M
    metric = base.train.best_metric

    if done < base.train.epochs and all(patience_spent(r, base) for r in previous):
        log.info("stopped early at epoch %d (%s); not training further", done, _stop_reason(previous[0], base))
        done = base.train.epochs
    for epoch in range(done, base.train.epochs):
        t_epoch, history = time.time(), []
        batches = input_pipeline.member_batches(train_set, configs, epoch)
        for batch in progress(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{base.train.epochs}"):
            states, metrics = multi_step(states, place_batch(batch), weights)
            history.append(metrics)
            if len(history) > DISPATCH_AHEAD:       # bounds the batches in flight (and keeps progress honest)
                jax.block_until_ready(history[-1 - DISPATCH_AHEAD])
        history, finite = jax.device_get((history, _all_finite(states)))   # the epoch's one fetch
        problem = non_finite(np.stack([h["loss"] for h in history]), np.asarray(finite), members, epoch,
                             epoch * steps_per_epoch)
        if problem is not None:
            log.error("%s", problem)
            raise FloatingPointError(problem)
        means = {k: np.mean([h[k] for h in history], axis=0) for k in history[0]}   # (M,)
        train_seconds = time.time() - t_epoch
        for i, state_m in enumerate(sweep_lib.unstack(jax.device_get(states), M)):
            m, state_m = members[i], parallel.replicate(state_m, data_mesh)
            record = {"epoch": epoch + 1, "step": int(state_m.step), "lr": float(schedule(epoch * steps_per_epoch)),
                      **{f"train_{k}": float(v[i]) for k, v in means.items()}}
            if validation_input is not None:
                record["val_accuracy"], record["val_loss"] = split_metrics(
                    test_step, state_m, validation_input, base.eval.batch_size, data_mesh)
            record["test_accuracy"] = evaluation.accuracy(test_step, state_m, test_input, base.eval.batch_size,
                                                          data_mesh)
            if metric:
                record.update(best_so_far(record, previous[i], metric))
            record.update({"images_per_s": steps_per_epoch * base.train.batch_size / train_seconds,
                           "epoch_seconds": time.time() - t_epoch, "data_digest": digest})
            run.save(i, state_m, input_shape, record)
            previous[i] = record
            log.info("epoch %3d  %sloss %.4f (task %.4f, rcs %.3f)  train acc %.4f  %stest acc %.4f  lr %.3g  "
                     "%.0f img/s", epoch + 1, f"{m.name:<28} " if m.name else "", record["train_loss"],
                     record["train_task"], record["train_rcs"], record["train_accuracy"],
                     "" if validation_input is None else
                     f"val acc {record['val_accuracy']:.4f} (loss {record['val_loss']:.4f})  ",
                     record["test_accuracy"], record["lr"], record["images_per_s"])
            if callback is not None:
                callback(m, record)
        if epoch + 1 < base.train.epochs and all(patience_spent(r, base) for r in previous):
            log.info("early stop after epoch %d of %d: %s", epoch + 1, base.train.epochs,
                     _stop_reason(previous[0], base) + (" in every member" if M > 1 else ""))
            break
    log.info("training done in %.1f s", time.time() - t0)

    final = sweep_lib.unstack(jax.device_get(states), M)
    results = [RunResult(m, d, None, s, graphdef, tuple(input_shape)) for m, d, s in zip(members, run.dirs, final)]
    if not run_eval:
        return results
    for r in results:
        state_m = parallel.replicate(r.state, data_mesh)
        if eval_functions is None:                                          # a QCFS ANN's SNN: once
            eval_functions = evaluation.eval_functions_for(graphdef, state_m, r.member.cfg, input_shape,
                                                           compiler_options=eval_options)
        log.info("evaluating %s", r.member.name or "the run")
        r.report = evaluation.evaluate_state(graphdef, state_m, r.member.cfg, input_shape, train_split, test_set,
                                             mesh=data_mesh, functions=eval_functions,
                                             compiler_options=eval_options, progress=progress)
        r.report["checkpoint"] = {"step": int(state_m.step),
                                  "path": str((r.workdir / "checkpoints" / str(int(state_m.step))).resolve())}
    return results


def _stop_reason(record: dict, cfg: config_lib.Config) -> str:
    metric = cfg.train.best_metric
    return (f"{metric} has not improved for {cfg.train.early_stop_patience} epochs (train.early_stop_patience); "
            f"the best was {record[f'best_{metric}']:.4g} at epoch {record['best_epoch']}")


def summarise(sweep: dict, results: list[RunResult]) -> dict:
    """A sweep's summary (``reporting.summarise`` of the evaluated members) with the sweep itself."""
    return {"sweep": {k: list(v) for k, v in sweep.items()},
            **reporting.summarise([r.member for r in results], [r.report for r in results])}
