"""Train a spiking network with the RCS regulariser, then evaluate it with the cutoff.

    python train.py --config configs/ndigits.py --workdir runs/ndigits [--set reg.alpha=0.004 ...]
                    [--data-dir DIR]

Writes into the workdir: ``config.json``, ``train.log``, ``metrics.jsonl`` (one line per epoch),
``checkpoints/`` (an orbax checkpoint per epoch, the newest two kept) and, at the end, what
``evaluate.py`` writes (``report.json`` and the figures). A config with ``model.activation = "qcfs"``
trains a QCFS ANN on one static frame per sample and evaluates the SNN of IF neurons it converts to. A workdir that already holds checkpoints of the
same config resumes from the newest one; a different config there is an error.
"""

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

import evaluate
from aoi_jax import checkpoint, convert, data, models, parallel, step
from aoi_jax import config as config_lib

log = logging.getLogger("aoi_jax")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file defining get_config()")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. reg.alpha=0.004 (repeatable)")
    p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics and the report")
    p.add_argument("--data-dir", help="shorthand for --set data.data_dir=DIR")
    p.add_argument("--no-eval", action="store_true", help="skip the final cutoff evaluation")
    return p.parse_args(argv)


def setup_logging(workdir: pathlib.Path):
    log.setLevel(logging.INFO)
    log.propagate = False                      # orbax/absl configure the root logger; print once
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(workdir / "train.log")):
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
    eval_step = step.make_eval_step(graphdef)

    first_epoch = int(state.step) // steps_per_epoch
    for epoch in range(first_epoch, cfg.train.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        t_epoch = time.time()
        history = []
        batches = data.batches(train_set, cfg.train.batch_size, rng=rng, drop_last=True)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   leave=False, dynamic_ncols=True)
        for batch in bar:
            frames = data.augment_batch(batch["frames"][:1] if ann else batch["frames"], rng, cfg.data,
                                        train_set.sensor_hw)
            state, metrics = train_step(state, parallel.shard_batch({"frames": frames, "label": batch["label"]}, mesh))
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
    return evaluate.evaluate(graphdef, state, cfg, fan_out, train_set, test_set, workdir, calib_key, mesh)


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
    args = parse_args(argv)
    cfg = config_lib.load(args.config, overrides=args.set)
    if args.data_dir:
        cfg = config_lib.override(cfg, "data.data_dir", args.data_dir)
    train_and_evaluate(cfg, pathlib.Path(args.workdir), run_eval=not args.no_eval)


if __name__ == "__main__":
    main()
