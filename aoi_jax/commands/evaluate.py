"""Evaluate a trained SNN with every exit rule: accuracy against latency.

    python evaluate.py --workdir runs/ndigits          # the newest checkpoint of a train.py run
    python evaluate.py --checkpoint runs/x/checkpoints --step 900 --out runs/x/eval_900
                       [--data-dir DIR] [--set eval.calib_dropout=0] [--set eval.min_support=5]
                       [--set eval.calibration=validation]   # needs a run trained with data.validation_fraction > 0
    python evaluate.py --workdir runs/ndigits --serve [--slots 16]   # + samples/s of continuous batching
    python evaluate.py --workdir runs/ndigits --rules my_rules      # + the exit rules my_rules.py registers

The model is rebuilt from the config stored in the checkpoint (neuron settings included); a mismatch between
stored weights and that config is an error. ``--set`` changes evaluation settings (``eval.*`` keys) only.
``--rules MODULE`` imports a module (from the current folder or the Python path) before evaluating, so that
the exit rules it registers (``aoi_jax.cutoff.register_rule``) are scored with the built-in ones.
Writes ``report.json`` (with the checkpoint step and path it evaluated, and the XLA options that ran),
``accuracy_per_timestep.png``, ``accuracy_vs_latency.png`` and ``accuracy_vs_energy.png`` into the output
folder (``aoi_jax.evaluation.evaluate_checkpoint``, ``aoi_jax.reporting``) and prints the summary table.
``--serve`` also times continuous batching (``aoi_jax.anytime.serve``) on the test set for every rule at the
table's epsilons and for fixed T (``evaluation.serve_throughput``): samples/s in the table and in report.json
(``serve``).
"""

import argparse
import importlib
import logging
import os
import pathlib
import sys

from aoi_jax import anytime, evaluation, parallel, progress, reporting, xla_tuning
from aoi_jax.commands import storage_failures_exit

log = logging.getLogger("aoi_jax")


def step_arg(text: str):
    """--step: "last", "best" or a step number."""
    return text if text in ("last", "best") else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a train.py workdir: its checkpoints/ are read, the report goes there")
    src.add_argument("--checkpoint", help="an orbax checkpoint folder (holding step folders)")
    p.add_argument("--step", type=step_arg, default="last",
                   help="checkpoint step: a number, last (default: the newest intact one) or best")
    p.add_argument("--out", help="output folder (default: the workdir, or the checkpoint's parent)")
    p.add_argument("--data-dir", help="where the data set lives, if not where training read it")
    p.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an evaluation setting, e.g. eval.calib_dropout=0 (repeatable)")
    p.add_argument("--rules", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: the exit rules it registers are scored too (repeatable)")
    p.add_argument("--serve", action="store_true",
                   help="time continuous batching on the test set for every rule (samples/s in the table)")
    p.add_argument("--slots", type=int, default=anytime.SLOTS,
                   help=f"continuous-batching slots S (default {anytime.SLOTS})")
    p.add_argument("--xla-tuning", default="auto", choices=xla_tuning.TUNINGS,
                   help="XLA options measured for this backend (aoi_jax.xla_tuning), or none")
    return p.parse_args(argv)


def setup_logging():
    """Logs the ``aoi_jax`` logger to stdout, as train.py does (orbax/absl configure the root logger first)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)


def import_rules(modules):
    """Imports each module (the current folder first on the path, as ``python -m`` has it)."""
    sys.path.insert(0, os.getcwd())
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        sys.path.remove(os.getcwd())


@storage_failures_exit
def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    import_rules(args.rules)
    parallel.initialize_distributed()
    source = pathlib.Path(args.checkpoint or args.workdir)
    out = pathlib.Path(args.out) if args.out else (source if args.workdir else source.parent)
    report = evaluation.evaluate_checkpoint(
        source, step=args.step, overrides=args.set, data_dir=args.data_dir, serve=args.serve, slots=args.slots,
        compiler_options=xla_tuning.compiler_options(args.xla_tuning),
        progress=progress.progress)
    reporting.write_report(report, out)
    log.info("wrote %s", out / "report.json")
    print(reporting.summary_table(report))


if __name__ == "__main__":
    main()
