"""Train a spiking network with the RCS regulariser, then evaluate it with the cutoff.

    python train.py --config configs/ndigits.py --workdir runs/ndigits [--set reg.alpha=0.004 ...]
                    [--data-dir DIR]
    python train.py --config configs/ndigits.py --workdir runs/abl --sweep reg.alpha=0,0.001,0.002,0.004 \
                    --sweep seed=0,1,2          # 12 members trained together in one compiled program

Writes into the workdir ``config.json``, ``train.log``, ``metrics.jsonl`` (one line per epoch),
``checkpoints/`` and, after training, ``report.json`` with its figures (``aoi_jax.training``,
``aoi_jax.rundir``, ``aoi_jax.reporting``); with ``--tensorboard`` also ``tensorboard/`` (event files). A
workdir that holds checkpoints of the same config resumes from the newest intact one (more epochs continue a
finished run); the workdir is locked while training runs; a non-finite loss stops
the run with exit status 1 (README, "Reliability").
With ``--sweep`` every combination is a member with its own ``members/<name>/`` folder, and the workdir
gets ``summary.json`` and ``summary.png``.
"""

import argparse
import contextlib
import logging
import pathlib
import sys

import jax

from aoi_jax import config, parallel, progress, reporting, sweep as sweep_lib, tensorboard, training, xla_tuning
from aoi_jax.commands import storage_failures_exit

log = logging.getLogger("aoi_jax")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help=f"config file defining get_config(), or a shipped config: {', '.join(config.shipped())}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. reg.alpha=0.004 (repeatable)")
    p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics and the report")
    p.add_argument("--data-dir", help="shorthand for --set data.data_dir=DIR (default: $AOI_JAX_DATA, else "
                                      "~/.cache/aoi_jax)")
    p.add_argument("--no-eval", action="store_true", help="skip the final cutoff evaluation")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="train every combination of these values together, e.g. reg.alpha=0,0.002 "
                        f"(repeatable; keys: {', '.join(config.SWEEP_KEYS)})")
    p.add_argument("--strategy", default="auto", choices=sweep_lib.STRATEGIES,
                   help="how a sweep's members share the program (auto: loop on CPU, vmap elsewhere)")
    p.add_argument("--xla-tuning", default="auto", choices=xla_tuning.TUNINGS,
                   help="XLA options measured for this backend (aoi_jax.xla_tuning), or none (XLA's defaults); "
                        "recorded in config.json and report.json")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each epoch's metrics as TensorBoard scalars into WORKDIR/tensorboard "
                        "(needs the [tensorboard] extra, tensorboardX)")
    return p.parse_args(argv)


def setup_logging(workdir: pathlib.Path):
    """Logs the ``aoi_jax`` logger to stdout and (process 0) to ``workdir/train.log``."""
    log.setLevel(logging.INFO)
    log.propagate = False                      # orbax/absl configure the root logger; print once
    log.handlers.clear()
    handlers = [logging.StreamHandler(sys.stdout)]
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(workdir / "train.log"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)


@storage_failures_exit
def main(argv=None):
    args = parse_args(argv)
    parallel.initialize_distributed()
    cfg = config.load(args.config, overrides=args.set + ([f"data.data_dir={args.data_dir}"] if args.data_dir else []))
    sweep = config.parse_sweep(args.sweep)
    workdir = pathlib.Path(args.workdir)
    setup_logging(workdir)
    with tensorboard.TensorBoard(workdir) if args.tensorboard else contextlib.nullcontext() as callback:
        results = training.train_and_evaluate(cfg, workdir, sweep=sweep, run_eval=not args.no_eval,
                                              strategy=args.strategy, tuning=args.xla_tuning, progress=progress.progress,
                                              callback=callback)
    if args.no_eval or jax.process_index() != 0:
        return
    for r in results:
        reporting.write_report(r.report, r.workdir)
        print((f"\n== {r.member.name}" if r.member.name else "") + reporting.summary_table(r.report))
    if sweep:
        reporting.write_summary(training.summarise(sweep, results), workdir)
        log.info("wrote %s and %s", workdir / "summary.json", workdir / "summary.png")


if __name__ == "__main__":
    main()
