"""Train a spiking network with the RCS regulariser, then evaluate it with the cutoff.

    python train.py --config configs/ndigits.py --workdir runs/ndigits [--set reg.alpha=0.004 ...]
                    [--data-dir DIR]
    python train.py --config configs/ndigits.py --workdir runs/abl --sweep reg.alpha=0,0.001,0.002,0.004 \
                    --sweep seed=0,1,2          # 12 members trained together in one compiled program

Writes into the workdir: ``config.json``, ``train.log``, ``metrics.jsonl`` (one line per epoch),
``checkpoints/`` (an orbax checkpoint per epoch, the newest two kept) and, at the end, what
``evaluate.py`` writes (``report.json`` and the figures). A config with ``model.activation = "qcfs"``
trains a QCFS ANN on one static frame per sample and evaluates the SNN of IF neurons it converts to. A workdir that already holds checkpoints of the
same config resumes from the newest one; a different config there is an error.

With ``--sweep`` (keys of ``aoi_jax.ablation.SWEEP_KEYS``) every combination is a member, trained together
(``aoi_jax.ablation``): ``members/<name>/`` holds what a single run writes, and the workdir gets
``summary.json`` and ``summary.png`` (accuracy and Top-K mean exit timestep against the first swept key
other than seed, mean and spread over seeds). On GPUs and TPUs all members train in this process, split over
its devices (``member_mesh``). On a CPU, where members gain most from cores of their own, ``--processes``
(default auto: one per core, at most one per member) splits them over pinned local processes, each
training its share in one compiled program and logging to ``process_<i>.log`` (``train_sweep_in_processes``;
``--processes 1`` keeps them in this one; benchmarks/ablation.py measures both).
"""

if __name__ == "__main__":  # first, before jax loads: it may restart this command with huge pages on
    from aoi_jax import hugepages

    hugepages.reexec_with_huge_pages()

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys
import time

import jax
import matplotlib
import numpy as np
from flax import nnx
from tqdm import tqdm

import evaluate
from aoi_jax import ablation, checkpoint, convert, data, models, parallel, step
from aoi_jax import config as config_lib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("aoi_jax")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file defining get_config()")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. reg.alpha=0.004 (repeatable)")
    p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics and the report")
    p.add_argument("--data-dir", help="shorthand for --set data.data_dir=DIR")
    p.add_argument("--no-eval", action="store_true", help="skip the final cutoff evaluation")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="train every combination of these values together, e.g. reg.alpha=0,0.002 "
                        f"(repeatable; keys: {', '.join(ablation.SWEEP_KEYS)})")
    p.add_argument("--processes", metavar="N|auto",
                   help="with --sweep: split the members over N local processes, each on cores of its own "
                        "(auto: on CPU one per core, at most one per member; on GPU/TPU 1)")
    p.add_argument("--member-shard", help=argparse.SUPPRESS)  # I/N: a --processes child trains shard I of N
    p.add_argument("--cores", help=argparse.SUPPRESS)  # a --processes child's cores, comma-separated
    return p.parse_args(argv)


def setup_logging(workdir: pathlib.Path, *, to_file: bool = True):
    """Logs to stdout and, with ``to_file``, to ``workdir/train.log``."""
    log.setLevel(logging.INFO)
    log.propagate = False                      # orbax/absl configure the root logger; print once
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if to_file and jax.process_index() == 0:   # several processes share the workdir: one writes its files
        handlers.append(logging.FileHandler(workdir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)


def check_workdir_config(workdir: pathlib.Path, cfg: config_lib.Config):
    """Writes config.json, or checks that an existing run in ``workdir`` used the same config."""
    path = workdir / "config.json"
    if path.exists() and checkpoint.latest_step(workdir / "checkpoints") is not None:
        stored = config_lib.from_dict(json.loads(path.read_text()))
        if stored != cfg:
            raise ValueError(f"{path} holds a run of a different config; use another --workdir "
                             f"(stored: {config_lib.to_json(stored)})")
    if jax.process_index() == 0:
        path.write_text(config_lib.to_json(cfg))


def train_and_evaluate(cfg: config_lib.Config, workdir: pathlib.Path, *, run_eval: bool = True) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    setup_logging(workdir)
    check_workdir_config(workdir, cfg)
    mesh = parallel.data_mesh()
    log.info("devices: %s (data parallel over %d)", jax.devices(), mesh.devices.size)

    t0 = time.time()
    train_set, test_set = data.load(cfg.data)
    input_shape = train_set.frames.shape[2:]
    log.info("data %s: train %d, test %d, frames (T, H, W, C) = %s, %d classes (%.1f s)", cfg.data.name,
             len(train_set.labels), len(test_set.labels), train_set.frames.shape[1:], train_set.num_classes,
             time.time() - t0)
    if train_set.num_classes != cfg.model.num_classes:
        raise ValueError(f"model.num_classes = {cfg.model.num_classes} but data set {cfg.data.name!r} has "
                         f"{train_set.num_classes} classes")

    ann = cfg.model.activation == "qcfs"        # a QCFS ANN: trained on one static frame, then converted
    steps_per_epoch = data.num_batches(len(train_set.labels), cfg.train.batch_size, drop_last=True)
    init_key, calib_key = jax.random.split(jax.random.key(cfg.seed))
    model = models.build(cfg.model, input_shape, rngs=nnx.Rngs(init_key))
    optimizer = step.make_optimizer(cfg.optim, cfg.train.epochs * steps_per_epoch)
    graphdef, state = step.init_state(model, optimizer)
    log.info("model %s: %d parameters, %d spiking layers", cfg.model.name,
             sum(x.size for x in jax.tree.leaves(state.params)), len(model.fan_out))

    ckpt_dir = workdir / "checkpoints"
    if checkpoint.latest_step(ckpt_dir) is not None:
        graphdef, state, _, _ = checkpoint.restore(ckpt_dir)
        log.info("resumed from %s at step %d", ckpt_dir, int(state.step))
    state = parallel.replicate(state, mesh)
    train_step = step.make_train_step(graphdef, cfg, optimizer)
    fns, eval_step = eval_functions(graphdef, cfg)

    first_epoch = int(state.step) // steps_per_epoch
    for epoch in range(first_epoch, cfg.train.epochs):
        t_epoch = time.time()
        history = []
        bar = tqdm(ablation.run_batches(train_set, cfg, epoch), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True)
        for batch in bar:
            state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
            history.append(metrics)
            if len(history) % 10 == 0:
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        bar.close()
        metrics = {k: float(np.mean([m[k] for m in jax.device_get(history)])) for k in history[0]}
        train_seconds = time.time() - t_epoch
        test_acc = evaluate.accuracy(eval_step, state, first_step(test_set) if ann else test_set,
                                     cfg.eval.batch_size, mesh)
        record = {"epoch": epoch + 1, "step": int(state.step), **{f"train_{k}": v for k, v in metrics.items()},
                  "test_accuracy": test_acc, "images_per_s": steps_per_epoch * cfg.train.batch_size / train_seconds,
                  "epoch_seconds": time.time() - t_epoch}
        if jax.process_index() == 0:
            with open(workdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        log.info("epoch %3d  loss %.4f (task %.4f, rcs %.3f)  train acc %.4f  test acc %.4f  %.0f img/s",
                 epoch + 1, metrics["loss"], metrics["task"], metrics["rcs"], metrics["accuracy"], test_acc,
                 record["images_per_s"])
        checkpoint.save(ckpt_dir, state, cfg, input_shape)
    log.info("training done in %.1f s", time.time() - t0)
    if not run_eval:
        return {}
    if ann:
        graphdef, state, cfg = convert_ann(graphdef, state, cfg, input_shape)
    fan_out = nnx.merge(graphdef, state.params, state.batch_stats).fan_out
    return evaluate.evaluate(graphdef, state, cfg, fan_out, train_set, test_set, workdir, calib_key, mesh, fns)


def train_sweep_and_evaluate(cfg: config_lib.Config, sweep: dict, workdir: pathlib.Path, *,
                             run_eval: bool = True, strategy: str = "auto",
                             shard: tuple[int, int] | None = None) -> dict:
    """Trains every member of ``sweep`` (``ablation.members``) together, then evaluates each.

    Writes ``members/<name>/`` (config.json, metrics.jsonl, checkpoints/, report.json, figures, as a single
    run) and ``summary.json`` + ``summary.png``; returns the summary. Resumes when every member holds a
    checkpoint of the same step.

    ``shard=(i, n)``: only ``ablation.shard(members, i, n)``, logged to stdout alone, and no summary
    (process i of ``train_sweep_in_processes``, which writes it); returns {}.
    """
    member_list = ablation.members(cfg, sweep)
    if shard is not None:
        member_list = ablation.shard(member_list, *shard)
    base = ablation.shared_config(member_list)
    if jax.process_count() > 1:
        raise ValueError("--sweep runs in one process (members are split over its devices); "
                         f"this is process {jax.process_index()} of {jax.process_count()}")
    workdir.mkdir(parents=True, exist_ok=True)
    setup_logging(workdir, to_file=shard is None)
    dirs = member_dirs(workdir, member_list)
    M = len(member_list)
    mesh, eval_mesh = ablation.member_mesh(M), parallel.data_mesh()
    log.info("sweep %s%s: %d members (%s) over %d device(s), strategy %s", dict(sweep),
             f", process {shard[0]} of {shard[1]}" if shard else "", M, ", ".join(m.name for m in member_list),
             mesh.devices.size, strategy)

    t0 = time.time()
    train_set, test_set = data.load(base.data)
    input_shape = train_set.frames.shape[2:]
    if train_set.num_classes != base.model.num_classes:
        raise ValueError(f"model.num_classes = {base.model.num_classes} but data set {base.data.name!r} has "
                         f"{train_set.num_classes} classes")
    ann = base.model.activation == "qcfs"
    steps_per_epoch = data.num_batches(len(train_set.labels), base.train.batch_size, drop_last=True)
    optimizer = step.make_optimizer(base.optim, base.train.epochs * steps_per_epoch)
    graphdef, states = ablation.init_members(member_list, input_shape, optimizer)
    found = [checkpoint.latest_step(d / "checkpoints") for d in dirs]
    if any(f is not None for f in found):
        if len(set(found)) != 1:
            raise ValueError(f"cannot resume the sweep in {workdir}: members hold checkpoints of different "
                             f"steps {dict(zip((m.name for m in member_list), found))}")
        states = ablation.stack([checkpoint.restore(d / "checkpoints")[1] for d in dirs])
        log.info("resumed %d members at step %d", M, found[0])
    states = ablation.place(states, mesh)
    scalars = ablation.place(ablation.scalars(member_list), mesh)
    multi_step = ablation.make_multi_step(graphdef, base, optimizer, mesh=mesh, strategy=strategy)
    shared, eval_step = eval_functions(graphdef, base)                      # one compile for all members
    test_eval = first_step(test_set) if ann else test_set

    first_epoch = int(states.step[0]) // steps_per_epoch
    for epoch in range(first_epoch, base.train.epochs):
        t_epoch = time.time()
        history = []
        bar = tqdm(ablation.member_batches(train_set, member_list, epoch), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{base.train.epochs} ({M} members)", leave=False, dynamic_ncols=True)
        for batch in bar:
            states, metrics = multi_step(states, ablation.place(batch, mesh), scalars)
            history.append(metrics)
        bar.close()
        means = {k: np.mean([h[k] for h in jax.device_get(history)], axis=0) for k in history[0]}   # (M,)
        train_seconds = time.time() - t_epoch
        members_now = ablation.unstack(jax.device_get(states), M)
        for i, (m, d) in enumerate(zip(member_list, dirs)):
            state_m = parallel.replicate(members_now[i], eval_mesh)
            test_acc = evaluate.accuracy(eval_step, state_m, test_eval, base.eval.batch_size, eval_mesh)
            record = {"epoch": epoch + 1, "step": int(members_now[i].step),
                      **{f"train_{k}": float(v[i]) for k, v in means.items()}, "test_accuracy": test_acc,
                      "images_per_s": steps_per_epoch * base.train.batch_size / train_seconds,
                      "epoch_seconds": time.time() - t_epoch}
            with open(d / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("epoch %3d  %-28s loss %.4f (task %.4f, rcs %.3f)  train acc %.4f  test acc %.4f", epoch + 1,
                     m.name, record["train_loss"], record["train_task"], record["train_rcs"],
                     record["train_accuracy"], test_acc)
            checkpoint.save(d / "checkpoints", state_m, m.cfg, input_shape)
        log.info("epoch %3d: %.0f member-images/s", epoch + 1, M * record["images_per_s"])
    log.info("training done in %.1f s", time.time() - t0)
    if not run_eval:
        return {}
    reports = []
    for m, d, state_m in zip(member_list, dirs, ablation.unstack(jax.device_get(states), M)):
        g, st, c = graphdef, parallel.replicate(state_m, eval_mesh), m.cfg
        if ann:
            g, st, c = convert_ann(g, st, c, input_shape)
        log.info("evaluating member %s", m.name)
        fan_out = nnx.merge(g, st.params, st.batch_stats).fan_out
        reports.append(evaluate.evaluate(g, st, c, fan_out, train_set, test_set, d,
                                         ablation.calibration_key(m.cfg.seed), eval_mesh, shared))
    return {} if shard is not None else write_summary(sweep, member_list, reports, workdir)


def member_dirs(workdir: pathlib.Path, member_list) -> list[pathlib.Path]:
    """Each member's ``workdir/members/<name>/``, created and holding its config (``check_workdir_config``)."""
    dirs = [workdir / "members" / m.name for m in member_list]
    for m, d in zip(member_list, dirs):
        d.mkdir(parents=True, exist_ok=True)
        check_workdir_config(d, m.cfg)
    return dirs


def write_summary(sweep: dict, member_list, reports, workdir: pathlib.Path) -> dict:
    """Writes ``summary.json`` (``ablation.summarise``) and ``summary.png``; returns the summary."""
    summary = {"sweep": {k: list(v) for k, v in sweep.items()}, **ablation.summarise(member_list, reports)}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_summary(summary, workdir / "summary.png")
    log.info("wrote %s and %s", workdir / "summary.json", workdir / "summary.png")
    return summary


def usable_cores() -> list[int]:
    """The cores this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def train_sweep_in_processes(cfg: config_lib.Config, sweep: dict, workdir: pathlib.Path, argv: list[str],
                             n_processes: int, *, run_eval: bool = True) -> dict:
    """``train_sweep_and_evaluate`` with the members split over ``n_processes`` local processes.

    Process i runs ``python train.py ARGV --member-shard i/n --cores C``: it trains and evaluates
    ``ablation.shard(members, i, n)`` together on the cores ``ablation.core_groups(usable_cores(), n)[i]``
    (pinned), logging to ``workdir/process_<i>.log``. This process shows the member epochs written so far,
    then writes the summary from the members' ``report.json``. The members' files are those of
    ``train_sweep_and_evaluate``; running the command again resumes each process's members.

    Raises:
      RuntimeError: a process failed (the others are stopped); the message names its log and quotes
        its end.
    """
    member_list = ablation.members(cfg, sweep)
    ablation.shared_config(member_list)
    workdir.mkdir(parents=True, exist_ok=True)
    setup_logging(workdir)
    dirs = member_dirs(workdir, member_list)
    shards = [ablation.shard(member_list, i, n_processes) for i in range(n_processes)]
    log.info("sweep %s: %d members over %d processes (each on cores of its own; --processes 1 trains them "
             "all in this one)", dict(sweep), len(member_list), n_processes)

    def epochs_done():
        files = [d / "metrics.jsonl" for d in dirs]
        return sum(len(f.read_text().splitlines()) for f in files if f.exists())

    t0, procs, logs = time.time(), [], []
    env = dict(os.environ, TQDM_DISABLE="1")                  # progress is shown here, not in the logs
    try:
        for i, cores in enumerate(ablation.core_groups(usable_cores(), n_processes)):
            logs.append(workdir / f"process_{i}.log")
            cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *argv, "--member-shard",
                   f"{i}/{n_processes}", "--cores", ",".join(map(str, cores))]
            with open(logs[-1], "w") as f:
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
            log.info("process %d on core(s) %s: %s (log %s)", i, ",".join(map(str, cores)),
                     ", ".join(m.name for m in shards[i]), logs[-1])
        with tqdm(total=len(member_list) * cfg.train.epochs, initial=epochs_done(), desc="member epochs",
                  dynamic_ncols=True) as bar:
            while True:
                codes = [p.poll() for p in procs]
                bar.update(epochs_done() - bar.n)
                failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    i = failed[0]
                    names = ", ".join(m.name for m in shards[i])
                    tail = logs[i].read_text(errors="replace").replace("\r", "\n").splitlines()[-20:]
                    raise RuntimeError(f"sweep process {i} ({names}) exited with code {codes[i]}; its log {logs[i]} "
                                       "ends with:\n" + "\n".join(tail))
                if all(c == 0 for c in codes):
                    break
                time.sleep(1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    log.info("%d processes done in %.1f s", n_processes, time.time() - t0)
    if not run_eval:
        return {}
    reports = [json.loads((d / "report.json").read_text()) for d in dirs]
    return write_summary(sweep, member_list, reports, workdir)


def plot_summary(summary: dict, path: pathlib.Path):
    """Accuracy and Top-K mean exit timestep against the first swept key other than seed (one line per
    setting of the others), mean over seeds with min-max bars."""
    keys = [k for k in summary["sweep"] if k != "seed"]
    x_key = keys[0] if keys else None
    lines = {}
    for g in summary["groups"]:
        rest = tuple((k, v) for k, v in g["settings"].items() if k != x_key)
        lines.setdefault(rest, []).append(g)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for rest, groups in lines.items():
        xs = [g["settings"][x_key] if x_key else 0 for g in groups]
        label = ", ".join(f"{k}={v}" for k, v in rest) or None
        for ax, field, what in ((axes[0], "accuracy_at_T", "accuracy at T"),
                                (axes[0], "topk_accuracy", "Top-K accuracy"),
                                (axes[1], "topk_mean_timestep", "Top-K mean exit timestep")):
            mean = np.asarray([g[field]["mean"] for g in groups])
            err = np.asarray([[g[field]["mean"] - g[field]["min"], g[field]["max"] - g[field]["mean"]]
                              for g in groups]).T
            scale = 100 if "accuracy" in field else 1
            ax.errorbar(xs, mean * scale, yerr=err * scale, fmt="o-", capsize=3,
                        label=f"{what}" + (f" ({label})" if label else ""))
    eps = summary["members"][0]["topk_epsilon"]
    for ax, ylabel in ((axes[0], "test accuracy (%)"), (axes[1], f"mean exit timestep (Top-K, epsilon {eps})")):
        ax.set_xticks(sorted({g["settings"][x_key] for g in summary["groups"]}) if x_key else [0])
        ax.set_xlabel(x_key or "(seeds only)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = summary["sweep"].get("seed", [])
    fig.suptitle(f"sweep: mean over {max(len(seeds), 1)} seed(s), bars min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_functions(graphdef, cfg: config_lib.Config):
    """``(functions, eval_step)``: the final evaluation's compiled functions (None for a QCFS ANN, which is
    converted before it is evaluated) and the step for per-epoch test accuracy, which is their test step,
    so it compiles once."""
    if cfg.model.activation == "qcfs":
        return None, step.make_eval_step(graphdef)
    fns = evaluate.make_eval_functions(graphdef, cfg)
    return fns, fns.test_step


def first_step(frameset):
    """The frame set with only its first time step (N, 1, H, W, C): a QCFS ANN's static input."""
    return dataclasses.replace(frameset, frames=frameset.frames[:, :1])


def convert_ann(graphdef, state, cfg, input_shape):
    """The QCFS ANN converted to IF neurons (``convert.convert``), as (graphdef, state, cfg) of the SNN."""
    snn_model, graphdef, params, batch_stats = convert.convert(cfg.model, input_shape, state.params,
                                                               state.batch_stats)
    log.info("converted the QCFS ANN to IF neurons; thresholds %s",
             np.round(np.asarray(params["thresholds"][...]), 3).tolist())
    return graphdef, step.TrainState(state.step, params, batch_stats, ()), dataclasses.replace(cfg, model=snn_model)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.cores and hasattr(os, "sched_setaffinity"):    # a --processes child: before XLA starts threads
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    parallel.initialize_distributed()
    cfg = config_lib.load(args.config, overrides=args.set)
    if args.data_dir:
        cfg = config_lib.override(cfg, "data.data_dir", args.data_dir)
    workdir, run_eval = pathlib.Path(args.workdir), not args.no_eval
    if not args.sweep:
        if args.processes is not None:
            raise ValueError("--processes splits the members of a --sweep; this command has no --sweep")
        train_and_evaluate(cfg, workdir, run_eval=run_eval)
        return
    sweep = ablation.parse_sweep(args.sweep)
    if args.member_shard:
        i, n = (int(x) for x in args.member_shard.split("/"))
        train_sweep_and_evaluate(cfg, sweep, workdir, run_eval=run_eval, shard=(i, n))
        return
    n = 1 if jax.process_count() > 1 else ablation.processes(
        args.processes or "auto", len(ablation.members(cfg, sweep)), jax.default_backend(), len(usable_cores()))
    if n > 1:
        train_sweep_in_processes(cfg, sweep, workdir, argv, n, run_eval=run_eval)
    else:
        train_sweep_and_evaluate(cfg, sweep, workdir, run_eval=run_eval)


if __name__ == "__main__":
    main()
