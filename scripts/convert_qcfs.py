"""Train a QCFS ANN, convert it to an SNN of IF neurons, evaluate the SNN with the cutoff.

    python -m scripts.convert_qcfs --config configs/ndigits_qcfs.py --workdir runs/ndigits_qcfs
                                   [--set reg.alpha=0 ...] [--data-dir DIR] [--no-eval]

Run from the repository root (``-m`` puts it on the path for ``evaluate``). The config's model must have
``model.activation = "qcfs"``; the ANN sees one static image per sample (the first of the T repeated
frames), CIFAR batches get the reference's augmentation (``aoi_jax.data.cifar.augment``). Writes into the
workdir: ``config.json``, ``train.log``, ``metrics.jsonl`` (one line per epoch: ANN loss, RCS, train and
test accuracy, thresholds), ``checkpoints/`` (the ANN, orbax, resumable), ``ann.json`` (final ANN test
accuracy and thresholds) and ``snn/`` with what ``evaluate.evaluate`` writes for the converted SNN at
T = data.timesteps (``report.json``, figures).
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

import evaluate
from aoi_jax import checkpoint, convert, data, models, step
from aoi_jax import config as config_lib
from aoi_jax.data import cifar, static

log = logging.getLogger("aoi_jax")

# Data sets not (yet) in aoi_jax.data.DATASETS; once registered there, data.load resolves them alone.
STATIC_DATASETS = {"cifar10": cifar.load_splits, "cifar100": cifar.load_splits,
                   "ndigits_summed": static.ndigits_summed}


def load_data(data_cfg):
    if data_cfg.name in data.DATASETS:
        return data.load(data_cfg)
    if data_cfg.name not in STATIC_DATASETS:
        raise ValueError(f"unknown data set {data_cfg.name!r}; valid: {sorted({**data.DATASETS, **STATIC_DATASETS})}")
    return STATIC_DATASETS[data_cfg.name](data_cfg)


def first_step(frameset):
    """The same set with only its first time step, (N, 1, H, W, C): the ANN's static input."""
    return dataclasses.replace(frameset, frames=frameset.frames[:, :1])


def ann_accuracy(eval_step, state, frameset, batch_size) -> float:
    correct = 0
    for batch in data.batches(frameset, batch_size):
        logits, _ = eval_step(state.params, state.batch_stats, batch["frames"], jax.random.key(0))
        correct += int((np.asarray(logits)[0].argmax(-1) == batch["label"]).sum())
    return correct / len(frameset.labels)


def train_ann(cfg, workdir, train_set, test_set, init_key):
    """Trains (or resumes) the QCFS ANN; returns (graphdef, state, input_shape)."""
    input_shape = tuple(train_set.frames.shape[2:])
    steps_per_epoch = data.num_batches(len(train_set), cfg.train.batch_size, drop_last=True)
    model = models.build(cfg.model, input_shape, rngs=nnx.Rngs(init_key))
    optimizer = step.make_optimizer(cfg.optim, cfg.train.epochs * steps_per_epoch)
    graphdef, state = step.init_state(model, optimizer)
    ckpt_dir = workdir / "checkpoints"
    if checkpoint.latest_step(ckpt_dir) is not None:
        graphdef, state, stored, _ = checkpoint.restore(ckpt_dir)
        if stored != cfg:
            raise ValueError(f"{ckpt_dir} holds a run of a different config; use another --workdir")
        log.info("resumed from %s at step %d", ckpt_dir, int(state.step))
    train_step = step.make_ann_train_step(graphdef, cfg, optimizer)
    eval_step = step.make_eval_step(graphdef)
    ann_train, ann_test = first_step(train_set), first_step(test_set)
    augment = cfg.data.name in cifar.SPECS
    for epoch in range(int(state.step) // steps_per_epoch, cfg.train.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        t0, history = time.time(), []
        for batch in data.batches(ann_train, cfg.train.batch_size, rng=rng, drop_last=True):
            frames = cifar.augment(batch["frames"], rng, cfg.data) if augment else batch["frames"]
            state, metrics = train_step(state, {"frames": frames, "label": batch["label"]})
            history.append(metrics)
        metrics = {k: float(np.mean([m[k] for m in jax.device_get(history)])) for k in history[0]}
        record = {"epoch": epoch + 1, "step": int(state.step), **{f"train_{k}": v for k, v in metrics.items()},
                  "test_accuracy": ann_accuracy(eval_step, state, ann_test, cfg.eval.batch_size),
                  "thresholds": np.asarray(state.params["thresholds"][...]).tolist(),
                  "epoch_seconds": time.time() - t0}
        with open(workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("epoch %3d  loss %.4f (task %.4f, rcs %.3f)  train acc %.4f  test acc %.4f  %.1f s", epoch + 1,
                 metrics["loss"], metrics["task"], metrics["rcs"], metrics["accuracy"], record["test_accuracy"],
                 record["epoch_seconds"])
        checkpoint.save(ckpt_dir, state, cfg, input_shape)
    return graphdef, state, input_shape


def run(cfg: config_lib.Config, workdir: pathlib.Path, *, run_eval: bool = True) -> dict:
    if cfg.model.activation != "qcfs":
        raise ValueError(f"convert_qcfs trains a QCFS ANN: set model.activation='qcfs' (got {cfg.model.activation!r})")
    workdir.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(workdir / "train.log")):
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    (workdir / "config.json").write_text(config_lib.to_json(cfg))

    train_set, test_set = load_data(cfg.data)
    if train_set.num_classes != cfg.model.num_classes:
        raise ValueError(f"model.num_classes = {cfg.model.num_classes} but {cfg.data.name!r} has "
                         f"{train_set.num_classes} classes")
    log.info("data %s: train %d, test %d, frames (T, H, W, C) = %s", cfg.data.name, len(train_set), len(test_set),
             train_set.frames.shape[1:])
    init_key, calib_key = jax.random.split(jax.random.key(cfg.seed))
    graphdef, state, input_shape = train_ann(cfg, workdir, train_set, test_set, init_key)

    ann_acc = ann_accuracy(step.make_eval_step(graphdef), state, first_step(test_set), cfg.eval.batch_size)
    thresholds = np.asarray(state.params["thresholds"][...]).tolist()
    (workdir / "ann.json").write_text(json.dumps({"test_accuracy": ann_acc, "thresholds": thresholds}, indent=2))
    log.info("ANN test accuracy %.4f; thresholds %s", ann_acc, np.round(thresholds, 3).tolist())
    if not run_eval:
        return {"ann_accuracy": ann_acc}

    snn_model_cfg, snn_graphdef, params, batch_stats = convert.convert(cfg.model, input_shape, state.params,
                                                                       state.batch_stats)
    snn_cfg = dataclasses.replace(cfg, model=snn_model_cfg)
    fan_out = nnx.merge(snn_graphdef, params, batch_stats).fan_out
    snn_state = step.TrainState(state.step, params, batch_stats, ())
    log.info("converted to IF neurons; evaluating the SNN at T = %d", cfg.data.timesteps)
    report = evaluate.evaluate(snn_graphdef, snn_state, snn_cfg, fan_out, train_set, test_set, workdir / "snn",
                               calib_key)
    return {"ann_accuracy": ann_acc, "snn": report}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file defining get_config() (model.activation 'qcfs')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics and the reports")
    p.add_argument("--data-dir", help="shorthand for --set data.data_dir=DIR")
    p.add_argument("--no-eval", action="store_true", help="train the ANN only; no conversion or cutoff")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = config_lib.load(args.config, overrides=args.set)
    if args.data_dir:
        cfg = config_lib.override(cfg, "data.data_dir", args.data_dir)
    run(cfg, pathlib.Path(args.workdir), run_eval=not args.no_eval)


if __name__ == "__main__":
    main()
