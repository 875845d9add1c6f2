"""Evaluate a trained SNN with every exit rule: accuracy against latency.

    python evaluate.py --workdir runs/ndigits          # the newest checkpoint of a train.py run
    python evaluate.py --checkpoint runs/x/checkpoints --step 900 --out runs/x/eval_900
                       [--data-dir DIR] [--set eval.calib_dropout=0] [--set eval.min_support=5]
                       [--set eval.calibration=validation]   # needs a run trained with data.validation_fraction > 0
    python evaluate.py --workdir runs/ndigits --serve [--slots 16]   # + samples/s of continuous batching

The model is rebuilt from the config stored in the checkpoint (neuron settings included); a mismatch between
stored weights and that config is an error. ``--set`` changes evaluation settings (``eval.*`` keys) only.
Writes ``report.json``, ``accuracy_per_timestep.png``, ``accuracy_vs_latency.png`` and
``accuracy_vs_energy.png`` into the output folder (``aoi_jax.evaluation``, ``aoi_jax.reporting``) and prints
the summary table. ``--serve`` also times continuous batching (``aoi_jax.anytime.serve``) on the test set for
every rule at the table's epsilons and for fixed T (``evaluation.serve_throughput``): samples/s in the table
and in report.json (``serve``).
"""

import argparse
import dataclasses
import functools
import logging
import pathlib
import sys

from tqdm import tqdm

from aoi_jax import anytime, checkpoint, config, data, evaluation, input_pipeline, integrity, parallel, reporting, step
from aoi_jax import xla_tuning

log = logging.getLogger("aoi_jax")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a train.py workdir: its checkpoints/ are read, the report goes there")
    src.add_argument("--checkpoint", help="an orbax checkpoint folder (holding step folders)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--out", help="output folder (default: the workdir, or the checkpoint's parent)")
    p.add_argument("--data-dir", help="where the data set lives, if not where training read it")
    p.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an evaluation setting, e.g. eval.calib_dropout=0 (repeatable)")
    p.add_argument("--serve", action="store_true",
                   help="time continuous batching on the test set for every rule (samples/s in the table)")
    p.add_argument("--slots", type=int, default=anytime.SLOTS,
                   help=f"continuous-batching slots S (default {anytime.SLOTS})")
    p.add_argument("--xla-tuning", default="auto", choices=xla_tuning.TUNINGS,
                   help="XLA options measured for this backend (aoi_jax.xla_tuning), or none")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    not_eval = [item for item in args.set if not item.startswith("eval.")]
    if not_eval:
        raise ValueError(f"evaluate.py --set changes evaluation settings (eval.*) only, got {not_eval}; the "
                         "model, data and training settings are those stored with the checkpoint")
    parallel.initialize_distributed()
    ckpt_dir = pathlib.Path(args.checkpoint) if args.checkpoint else pathlib.Path(args.workdir) / "checkpoints"
    out = pathlib.Path(args.out) if args.out else (pathlib.Path(args.workdir) if args.workdir else ckpt_dir.parent)
    graphdef, state, cfg, input_shape = checkpoint.restore(ckpt_dir, args.step)
    cfg = config.apply_overrides(cfg, args.set + ([f"data.data_dir={args.data_dir}"] if args.data_dir else []))
    log.info("restored %s step %d (%s, %s, neuron %s)", ckpt_dir, int(state.step), cfg.model.name,
             cfg.model.activation, dataclasses.asdict(cfg.model.neuron))
    train_set, test_set = data.load(cfg.data)
    log.info("data %s from %s", cfg.data.name, data.data_root(cfg.data.data_dir))
    if tuple(train_set.frames.shape[2:]) != tuple(input_shape):
        raise ValueError(f"data frames {train_set.frames.shape[2:]} do not match the checkpoint's input shape "
                         f"{tuple(input_shape)}")
    graphdef, state, cfg = evaluation.spiking_run(graphdef, state, cfg, input_shape)
    functions = evaluation.make_eval_functions(graphdef, cfg, compiler_options=xla_tuning.compiler_options(args.xla_tuning))
    calib_set = input_pipeline.calibration_set(*input_pipeline.split_validation(train_set, cfg.data), cfg)
    state = parallel.replicate(state, parallel.data_mesh())
    report = evaluation.evaluate(graphdef, state, cfg, calib_set, test_set, step.run_keys(cfg.seed).calibration,
                                 functions=functions, progress=functools.partial(tqdm, leave=False, dynamic_ncols=True),
                                 slots=args.slots)
    if args.serve:
        report["serve"] = evaluation.serve_throughput(functions, state, test_set, report, slots=args.slots,
                                                      epsilons=reporting.table_epsilons(report))
    reporting.write_report(report, out)
    print(reporting.summary_table(report))


if __name__ == "__main__":
    try:
        main()
    except OSError as e:                       # a full disk, quota, file-size limit: one short message, exit 1
        if integrity.failure_message(e) is None:
            raise
        sys.exit(integrity.failure_message(e))
