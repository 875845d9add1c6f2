"""Training and evaluation of a run or a sweep: the one epoch loop.

``train_and_evaluate(cfg, workdir, sweep=...)`` trains every member of the sweep (``ablation.members``; a
single run is a sweep of one member) in one compiled step per batch, writes per-member metrics and
checkpoints, then evaluates each member with every exit rule and returns the reports; the caller writes
them (``aoi_jax.reporting``). Training sees the data set's training split less the held-out validation
split (``data.validation_fraction``, ``input_pipeline.split_validation``); Top-K and SpikeCP calibrate on
``input_pipeline.calibration_set`` (``eval.calibration``). Per member, in its folder (the workdir itself
for a single run, ``workdir/members/<name>/`` in a sweep):

- ``config.json``: the member's whole config;
- ``checkpoints/<step>/``: the state after each epoch (``aoi_jax.checkpoint``, with a checksum record and the
  epoch's metrics record), the newest two kept;
- ``metrics.jsonl``: one strict-JSON line per epoch (train loss, task loss, RCS loss, train accuracy, test
  accuracy, images/s, seconds), appended once the epoch's checkpoint is saved.

Reliability (README, "Reliability"):

- One run at a time: the workdir is locked (``workdir_lock``) for the whole call.
- Resuming: a folder whose members hold checkpoints continues from the newest step that is intact in every
  member (``resume_step``); newer steps (damaged, unfinished, or missing from another member) are set aside
  and ``metrics.jsonl`` is cut back to the records of that step (``reconcile_metrics``). The batches of an
  epoch are a function of the seed and the epoch (``input_pipeline.train_batches``) and the optimiser step
  is stored, so a resumed run ends bit-identical to an uninterrupted one.
- The checkpoint's stored config must equal the requested one, except ``train.epochs``: more epochs continue
  a run (the cosine schedule then decays over the new total; fewer than already trained is an error). A
  refusal names the keys that differ.
- Every step's loss and, at the end of each epoch, the state are checked for non-finite values (one fetch
  per epoch, no host sync per step): a non-finite loss stops training with ``FloatingPointError`` naming
  the epoch and the optimiser step before anything of that epoch is saved.

Logs go to the ``aoi_jax`` logger; progress bars through the ``progress`` argument.
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from aoi_jax import ablation, checkpoint, config as config_lib, data, evaluation, input_pipeline, integrity
from aoi_jax import method, parallel, reporting, step, xla_tuning

log = logging.getLogger("aoi_jax")

LOCK_FILE = ".lock"  # in the workdir: holds the PID of the run that has it locked
CONTINUABLE = ("train.epochs",)  # the keys a resumed run may change
DISPATCH_AHEAD = 2  # train steps dispatched before the host waits for the oldest one (no data is fetched)


@dataclasses.dataclass
class RunResult:
    """One trained member: its sweep entry, its folder and its evaluation report (None if not evaluated)."""

    member: ablation.Member
    workdir: pathlib.Path
    report: dict | None


def member_dir(workdir: pathlib.Path, member: ablation.Member) -> pathlib.Path:
    """The folder of a member: ``workdir`` for a single run (name ""), else ``workdir/members/<name>``."""
    return workdir / "members" / member.name if member.name else workdir


@contextlib.contextmanager
def workdir_lock(workdir):
    """Holds an exclusive lock on ``workdir`` while the block runs.

    ``fcntl.flock`` on ``workdir/.lock`` (created), which then holds this process's PID. The kernel releases
    the lock when the process ends in any way (kill -9 included), so a stale lock file never blocks a rerun.

    Raises:
      RuntimeError: "workdir ... in use by PID N": another process holds the lock.
    """
    path = pathlib.Path(workdir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RuntimeError(f"workdir {workdir} in use by PID {pid} (it holds the lock {path}); wait for that "
                               "run to end or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)                                            # releases the lock


def check_resumable(stored: config_lib.Config, requested: config_lib.Config, folder: pathlib.Path) -> None:
    """Checks that a run of ``requested`` may continue the checkpoints of ``stored`` in ``folder``.

    Raises:
      ValueError: the configs differ in a key outside ``CONTINUABLE``; the message names each such key with
        its stored and requested values.
    """
    diff = [d for d in config_lib.differences(stored, requested) if d[0] not in CONTINUABLE]
    if diff:
        keys = ", ".join(f"{k}: stored {a!r}, requested {b!r}" for k, a, b in diff)
        raise ValueError(f"{folder} holds checkpoints of a different config ({keys}); use another --workdir "
                         f"(a run continues only with the same config; {', '.join(CONTINUABLE)} may change)")


def resume_step(members, dirs) -> int | None:
    """The step a run continues from: the newest checkpoint step intact in every member folder (None: none
    holds a checkpoint; a fresh start).

    Raises:
      ValueError: some member holds checkpoints but no step is intact in every member; the message lists
        each member's steps and what is wrong with them.
    """
    surveys = [{s: checkpoint.check(d / "checkpoints", s) for s in checkpoint.all_steps(d / "checkpoints")}
               for d in dirs]
    if not any(surveys):
        return None
    common = set.intersection(*({s for s, problem in sv.items() if problem is None} for sv in surveys))
    if common:
        return max(common)
    held = "; ".join(f"{m.name or d / 'checkpoints'}: " + (", ".join(
        f"step {s}" + (f" damaged ({problem})" if problem else "") for s, problem in sv.items()) or "none")
        for m, d, sv in zip(members, dirs, surveys))
    where, every = (dirs[0].parent, " in every member") if len(dirs) > 1 else (dirs[0], "")
    raise ValueError(f"cannot resume in {where}: no checkpoint step is intact{every} ({held}); train in a new "
                     "workdir, or delete the checkpoints to start afresh")


def reconcile_metrics(path: pathlib.Path, step_: int, record: dict | None) -> None:
    """Makes the metrics file ``path`` hold exactly the epochs up to optimiser step ``step_`` (the checkpoint a
    run continues from; 0 for a fresh start).

    Drops the lines of later steps (their checkpoints were lost or set aside) and a line cut short by a
    kill, and appends ``record`` (the checkpoint's own, kept in its meta) when the line of ``step_`` itself is
    missing (a kill between the save and the append). Rewrites the file atomically when it changes and logs
    what it dropped or restored; ``train.log`` keeps its lines (it is the log of what happened).
    """
    lines = path.read_text().splitlines() if path.exists() else []
    kept, beyond, cut = [], [], False
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            cut = True
            continue
        if rec["step"] <= step_:
            kept.append(rec)
        else:
            beyond.append(rec["epoch"])
    restored = record is not None and step_ > 0 and (not kept or kept[-1]["step"] != step_)
    if restored:
        kept.append(record)
    changes = [f"dropped the lines of epochs {beyond} (beyond step {step_})"] if beyond else []
    changes += ["dropped a line cut short"] if cut else []
    changes += [f"restored the line of epoch {record['epoch']} from its checkpoint"] if restored else []
    if changes:
        text = "".join(integrity.to_json(r) + "\n" for r in kept).encode()
        integrity.write_atomic(path, lambda f: f.write(text))
        log.warning("%s: %s", path, "; ".join(changes))


def append_metrics(path: pathlib.Path, record: dict) -> None:
    """Appends ``record`` as one strict-JSON line to ``path``, flushed to disk."""
    with open(path, "a") as f:
        f.write(integrity.to_json(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _all_finite(states) -> jax.Array:
    """(M,) bool: every floating-point leaf of member m's state is finite (states stacked (M, ...))."""
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


def train_and_evaluate(cfg: config_lib.Config, workdir, *, sweep: dict | None = None, run_eval: bool = True,
                       strategy: str = "auto", tuning: str = "auto",
                       progress=evaluation.no_progress) -> list[RunResult]:
    """Trains ``cfg`` (every member of ``sweep``), then evaluates each member; resumes from checkpoints.

    Args:
      cfg: the base config.  workdir: the run's folder (created; locked while this runs).
      sweep: {key: values} (``ablation.parse_sweep``); None or {} trains ``cfg`` alone.
      run_eval: evaluate each member after training (report in its ``RunResult``).
      strategy: how members share a program (``ablation.make_multi_step``).
      tuning: "auto" or "none": the XLA options of ``xla_tuning.compiler_options``.
      progress: ``progress(iterable, total=, desc=)`` wrapping each pass over data (e.g. ``tqdm.tqdm``).
    Returns:
      one ``RunResult`` per member, in sweep order.
    Raises:
      RuntimeError: another process holds the workdir (``workdir_lock``).
      ValueError: the checkpoints hold another config (``check_resumable``), more epochs than
        ``train.epochs``, or no step intact in every member (``resume_step``); ``train.batch_size`` exceeds
        the training set; the data set's classes differ from ``model.num_classes``; a sweep across several
        processes.
      FloatingPointError: training went non-finite (``non_finite`` gives the message).
    """
    workdir = pathlib.Path(workdir)
    members = ablation.members(cfg, sweep or {})
    if len(members) > 1 and jax.process_count() > 1:
        raise ValueError("a sweep runs in one process (members are split over its devices); "
                         f"this is process {jax.process_index()} of {jax.process_count()}")
    with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train_and_evaluate(workdir, members, run_eval, strategy, tuning, progress)


def _train_and_evaluate(workdir, members, run_eval, strategy, tuning, progress) -> list[RunResult]:
    base = ablation.shared_config(members)
    M = len(members)
    dirs = [member_dir(workdir, m) for m in members]
    resume = resume_step(members, dirs)
    stored = None if resume is None else [checkpoint.stored_meta(d / "checkpoints", resume) for d in dirs]
    for m, d, meta in zip(members, dirs, stored or [None] * M):
        if meta is not None:
            check_resumable(config_lib.from_dict(meta["config"]), m.cfg, d)
    data_mesh = parallel.data_mesh()
    member_mesh = ablation.member_mesh(M) if M > 1 else None
    log.info("%d member(s)%s on %s; data parallel over %d device(s)", M,
             f" ({', '.join(m.name for m in members)})" if M > 1 else "", jax.devices(), data_mesh.devices.size)

    t0 = time.time()
    train_split, test_set = data.load(base.data, progress=progress)
    train_set, validation_set = input_pipeline.split_validation(train_split, base.data)
    calib_set = input_pipeline.calibration_set(train_set, validation_set, base)
    input_shape = train_set.frames.shape[2:]
    log.info("data %s from %s: train %d, validation %d (held out), test %d, frames (T, H, W, C) = %s, %d classes; "
             "calibration on %s (%.1f s)", base.data.name, data.data_root(base.data.data_dir), len(train_set),
             0 if validation_set is None else len(validation_set), len(test_set), train_set.frames.shape[1:],
             train_set.num_classes, base.eval.calibration, time.time() - t0)
    if train_set.num_classes != base.model.num_classes:
        raise ValueError(f"model.num_classes = {base.model.num_classes} but data set {base.data.name!r} has "
                         f"{train_set.num_classes} classes")
    if base.train.batch_size > len(train_set):
        raise ValueError(f"train.batch_size = {base.train.batch_size} is larger than the training set of "
                         f"{base.data.name!r} ({len(train_set)} samples); it must be at most {len(train_set)}")
    steps_per_epoch = input_pipeline.steps_per_epoch(len(train_set), base)
    total_steps = base.train.epochs * steps_per_epoch
    done = 0 if resume is None else resume // steps_per_epoch
    if done > base.train.epochs:
        raise ValueError(f"train.epochs = {base.train.epochs} but the checkpoints in {workdir} have trained {done} "
                         f"epochs; ask for train.epochs >= {done} to continue this run")

    if jax.process_index() == 0:
        for m, d, meta in zip(members, dirs, stored or [None] * M):
            for s in checkpoint.all_steps(d / "checkpoints"):
                if s > (resume or 0):
                    problem = checkpoint.check(d / "checkpoints", s)
                    moved = checkpoint.set_aside(d / "checkpoints", s)
                    log.warning("checkpoint step %d %s: moved to %s; continuing from step %d", s,
                                f"is damaged ({problem})" if problem else "is missing in another member",
                                moved, resume)
            integrity.write_atomic(d / "config.json", lambda f, c=m.cfg: f.write(config_lib.to_json(c).encode()))
            reconcile_metrics(d / "metrics.jsonl", resume or 0, meta and meta["record"])

    optimizer = step.make_optimizer(base.optim, total_steps)
    graphdef, states = ablation.init_members(members, input_shape, optimizer)
    log.info("model %s: %d parameters per member", base.model.name,
             sum(x[0].size for x in jax.tree.leaves(states.params)))
    if resume is not None:
        states = ablation.stack([checkpoint.restore(d / "checkpoints", resume)[1] for d in dirs])
        stored_epochs = stored[0]["config"]["train"]["epochs"]
        log.info("resumed from step %d (epoch %d)%s", resume, done, "" if stored_epochs == base.train.epochs else
                 f"; train.epochs {stored_epochs} -> {base.train.epochs}: the learning-rate schedule now spans "
                 f"{total_steps} steps, lr at step {resume} = "
                 f"{float(step.learning_rate(base.optim, total_steps)(resume)):.4g}")

    if member_mesh is None:
        place_batch = lambda b: parallel.shard_batch(b, data_mesh)  # noqa: E731
        place_tree = lambda t: parallel.replicate(t, data_mesh)  # noqa: E731
    else:
        place_batch = place_tree = lambda t: ablation.place(t, member_mesh)  # noqa: E731
    states, weights = place_tree(states), place_tree(ablation.loss_weights(members))
    train_options = xla_tuning.compiler_options(tuning, remat=base.model.remat)
    eval_options = xla_tuning.compiler_options(tuning)
    multi_step = ablation.make_multi_step(graphdef, base, optimizer, mesh=member_mesh, strategy=strategy,
                                          compiler_options=train_options)
    eval_functions = None if method.of(base).converts else \
        evaluation.make_eval_functions(graphdef, base, compiler_options=eval_options)
    test_step = step.make_eval_step(graphdef, compiler_options=eval_options) if method.of(base).converts \
        else eval_functions.test_step                                       # per-epoch test accuracy
    test_input = input_pipeline.model_input(test_set, base)
    configs = [m.cfg for m in members]

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
        for i, state_m in enumerate(ablation.unstack(jax.device_get(states), M)):
            m, d, state_m = members[i], dirs[i], parallel.replicate(state_m, data_mesh)
            test_acc = evaluation.accuracy(test_step, state_m, test_input, base.eval.batch_size, data_mesh)
            record = {"epoch": epoch + 1, "step": int(state_m.step),
                      **{f"train_{k}": float(v[i]) for k, v in means.items()}, "test_accuracy": test_acc,
                      "images_per_s": steps_per_epoch * base.train.batch_size / train_seconds,
                      "epoch_seconds": time.time() - t_epoch}
            checkpoint.save(d / "checkpoints", state_m, m.cfg, input_shape, record=integrity.strict(record))
            if jax.process_index() == 0:
                append_metrics(d / "metrics.jsonl", record)   # after the save: a record always has its checkpoint
            log.info("epoch %3d  %sloss %.4f (task %.4f, rcs %.3f)  train acc %.4f  test acc %.4f  %.0f img/s",
                     epoch + 1, f"{m.name:<28} " if m.name else "", record["train_loss"], record["train_task"],
                     record["train_rcs"], record["train_accuracy"], test_acc, record["images_per_s"])
    log.info("training done in %.1f s", time.time() - t0)

    results = [RunResult(m, d, None) for m, d in zip(members, dirs)]
    if not run_eval:
        return results
    for r, state_m in zip(results, ablation.unstack(jax.device_get(states), M)):
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


def summarise(sweep: dict, results: list[RunResult]) -> dict:
    """A sweep's summary (``reporting.summarise`` of the evaluated members) with the sweep itself."""
    return {"sweep": {k: list(v) for k, v in sweep.items()},
            **reporting.summarise([r.member for r in results], [r.report for r in results])}
