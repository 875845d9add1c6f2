"""Training and evaluation of a run or a sweep: the one epoch loop.

``train_and_evaluate(cfg, workdir, sweep=...)`` trains every member of the sweep (``ablation.members``; a
single run is a sweep of one member) in one compiled step per batch, writes per-member metrics and
checkpoints, then evaluates each member with every exit rule and returns the reports; the caller writes
them (``aoi_jax.reporting``). Per member, in its folder (the workdir itself for a single run,
``workdir/members/<name>/`` in a sweep):

- ``config.json``: the member's whole config (a folder that already holds checkpoints of another config
  is refused);
- ``metrics.jsonl``: one JSON line per epoch (train loss, task loss, RCS loss, train accuracy, test
  accuracy, images/s, seconds);
- ``checkpoints/<step>/``: the state after each epoch (``aoi_jax.checkpoint``), the newest two kept.

A folder whose members hold checkpoints resumes from them: the batches of an epoch are a function of the
seed and the epoch (``input_pipeline.train_batches``), so a resumed run continues exactly as an
uninterrupted one. Logs go to the ``aoi_jax`` logger; progress bars through the ``progress`` argument.
"""

import dataclasses
import json
import logging
import pathlib
import time

import jax
import numpy as np

from aoi_jax import ablation, checkpoint, config as config_lib, data, evaluation, input_pipeline, parallel, step
from aoi_jax import xla_tuning

log = logging.getLogger("aoi_jax")

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


def check_workdir_config(folder: pathlib.Path, cfg: config_lib.Config) -> None:
    """Writes ``folder/config.json``, or checks that the run whose checkpoints ``folder`` holds used ``cfg``.

    Raises:
      ValueError: ``folder`` holds checkpoints of a different config.
    """
    path = folder / "config.json"
    if path.exists() and checkpoint.latest_step(folder / "checkpoints") is not None:
        stored = config_lib.from_dict(json.loads(path.read_text()))
        if stored != cfg:
            raise ValueError(f"{path} holds a run of a different config; use another --workdir "
                             f"(stored: {config_lib.to_json(stored)})")
    if jax.process_index() == 0:
        path.write_text(config_lib.to_json(cfg))


def train_and_evaluate(cfg: config_lib.Config, workdir, *, sweep: dict | None = None, run_eval: bool = True,
                       strategy: str = "auto", tuning: str = "auto",
                       progress=evaluation.no_progress) -> list[RunResult]:
    """Trains ``cfg`` (every member of ``sweep``), then evaluates each member; resumes from checkpoints.

    Args:
      cfg: the base config.  workdir: the run's folder (created).
      sweep: {key: values} (``ablation.parse_sweep``); None or {} trains ``cfg`` alone.
      run_eval: evaluate each member after training (report in its ``RunResult``).
      strategy: how members share a program (``ablation.make_multi_step``).
      tuning: "auto" or "none": the XLA options of ``xla_tuning.compiler_options``.
      progress: ``progress(iterable, total=, desc=)`` wrapping each pass over data (e.g. ``tqdm.tqdm``).
    Returns:
      one ``RunResult`` per member, in sweep order.
    Raises:
      ValueError: the data set's classes differ from ``model.num_classes``; a member folder holds another
        config; members hold checkpoints of different steps; a sweep across several processes.
    """
    workdir = pathlib.Path(workdir)
    members = ablation.members(cfg, sweep or {})
    base = ablation.shared_config(members)
    M = len(members)
    if M > 1 and jax.process_count() > 1:
        raise ValueError("a sweep runs in one process (members are split over its devices); "
                         f"this is process {jax.process_index()} of {jax.process_count()}")
    dirs = [member_dir(workdir, m) for m in members]
    for m, d in zip(members, dirs):
        d.mkdir(parents=True, exist_ok=True)
        check_workdir_config(d, m.cfg)
    data_mesh = parallel.data_mesh()
    member_mesh = ablation.member_mesh(M) if M > 1 else None
    log.info("%d member(s)%s on %s; data parallel over %d device(s)", M,
             f" ({', '.join(m.name for m in members)})" if M > 1 else "", jax.devices(), data_mesh.devices.size)

    t0 = time.time()
    train_set, test_set = data.load(base.data)
    input_shape = train_set.frames.shape[2:]
    log.info("data %s: train %d, test %d, frames (T, H, W, C) = %s, %d classes (%.1f s)", base.data.name,
             len(train_set), len(test_set), train_set.frames.shape[1:], train_set.num_classes, time.time() - t0)
    if train_set.num_classes != base.model.num_classes:
        raise ValueError(f"model.num_classes = {base.model.num_classes} but data set {base.data.name!r} has "
                         f"{train_set.num_classes} classes")

    steps_per_epoch = input_pipeline.steps_per_epoch(len(train_set), base)
    optimizer = step.make_optimizer(base.optim, base.train.epochs * steps_per_epoch)
    graphdef, states = ablation.init_members(members, input_shape, optimizer)
    log.info("model %s: %d parameters per member", base.model.name,
             sum(x[0].size for x in jax.tree.leaves(states.params)))
    found = [checkpoint.latest_step(d / "checkpoints") for d in dirs]
    if any(f is not None for f in found):
        if len(set(found)) != 1:
            raise ValueError(f"cannot resume in {workdir}: members hold checkpoints of different steps "
                             f"{dict(zip((m.name for m in members), found))}")
        states = ablation.stack([checkpoint.restore(d / "checkpoints")[1] for d in dirs])
        log.info("resumed from step %d", found[0])

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
    eval_functions = None if base.model.is_ann else \
        evaluation.make_eval_functions(graphdef, base, compiler_options=eval_options)
    test_step = step.make_eval_step(graphdef, compiler_options=eval_options) if base.model.is_ann \
        else eval_functions.test_step                                       # per-epoch test accuracy
    test_input = input_pipeline.model_input(test_set, base)
    configs = [m.cfg for m in members]

    for epoch in range(int(states.step[0]) // steps_per_epoch, base.train.epochs):
        t_epoch, history = time.time(), []
        batches = input_pipeline.member_batches(train_set, configs, epoch)
        for batch in progress(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{base.train.epochs}"):
            states, metrics = multi_step(states, place_batch(batch), weights)
            history.append(metrics)
            if len(history) > DISPATCH_AHEAD:       # bounds the batches in flight (and keeps progress honest)
                jax.block_until_ready(history[-1 - DISPATCH_AHEAD])
        means = {k: np.mean([h[k] for h in jax.device_get(history)], axis=0) for k in history[0]}   # (M,)
        train_seconds = time.time() - t_epoch
        for i, state_m in enumerate(ablation.unstack(jax.device_get(states), M)):
            m, d, state_m = members[i], dirs[i], parallel.replicate(state_m, data_mesh)
            test_acc = evaluation.accuracy(test_step, state_m, test_input, base.eval.batch_size, data_mesh)
            record = {"epoch": epoch + 1, "step": int(state_m.step),
                      **{f"train_{k}": float(v[i]) for k, v in means.items()}, "test_accuracy": test_acc,
                      "images_per_s": steps_per_epoch * base.train.batch_size / train_seconds,
                      "epoch_seconds": time.time() - t_epoch}
            if jax.process_index() == 0:
                with open(d / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            log.info("epoch %3d  %sloss %.4f (task %.4f, rcs %.3f)  train acc %.4f  test acc %.4f  %.0f img/s",
                     epoch + 1, f"{m.name:<28} " if m.name else "", record["train_loss"], record["train_task"],
                     record["train_rcs"], record["train_accuracy"], test_acc, record["images_per_s"])
            checkpoint.save(d / "checkpoints", state_m, m.cfg, input_shape)
    log.info("training done in %.1f s", time.time() - t0)

    results = [RunResult(m, d, None) for m, d in zip(members, dirs)]
    if not run_eval:
        return results
    for r, state_m in zip(results, ablation.unstack(jax.device_get(states), M)):
        g, st, c = evaluation.spiking_run(graphdef, parallel.replicate(state_m, data_mesh), r.member.cfg,
                                          input_shape)
        if eval_functions is None:                                          # a QCFS ANN's SNN: once
            eval_functions = evaluation.make_eval_functions(g, c, compiler_options=eval_options)
        log.info("evaluating %s", r.member.name or "the run")
        r.report = evaluation.evaluate(g, st, c, train_set, test_set, step.run_keys(c.seed).calibration,
                                       mesh=data_mesh, functions=eval_functions, progress=progress)
    return results


def summarise(sweep: dict, results: list[RunResult]) -> dict:
    """A sweep's summary (``ablation.summarise`` of the evaluated members) with the sweep itself."""
    return {"sweep": {k: list(v) for k, v in sweep.items()},
            **ablation.summarise([r.member for r in results], [r.report for r in results])}
