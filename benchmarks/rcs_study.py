"""Does RCS shorten latency? The studies of issues 17 and 24: write docs/results.md and its figures.

    python -m benchmarks.rcs_study                  # the grid below -> docs/results.md, docs/results/*.png
    python -m benchmarks.rcs_study --epochs ndigits=8 --epochs ndigits_hard=10 --whole-split ndigits:mean \
        --set data.data_dir=data_cache           # what made docs/results.md (data in ./data_cache)
    python -m benchmarks.rcs_study --quick          # a small slice (smoke test) into a temporary folder
    python -m benchmarks.rcs_study --experiment deep --runs DIR   # the second experiment (``DEEP``)
    python -m benchmarks.rcs_study --experiment deep --quick      # its smoke test
    python -m benchmarks.rcs_study --resummarise docs/results.md  # the grid's Summary from its own tables

Grid: for each data set (``configs/<name>.py``) and loss (mean, tet), one sweep ``reg.alpha`` x ``seed``
trained together in one compiled program by ``training.train_and_evaluate`` in ``<runs>/<data>_<loss>/``
(resumable: a cell resumes from its members' checkpoints, and reports already written are read back).
Every cell holds ``data.validation_fraction`` of each class of the training split out (never trained on),
and every trained member is evaluated twice from its last checkpoint:

- ``validation``: Top-K and SpikeCP calibrated on the held-out split, without dropout;
- ``train``: calibrated on the samples it was trained on with the reference's 0.3 dropout on spikes
  (today's default rule), so the two calibrations are compared on the same weights.

Numbers (``reporting.summarise``): accuracy at T, Top-K accuracy and mean exit at epsilon 0 and 0.05, OCT's
mean exit, synaptic operations per sample; the mean over seeds with a 95 % Student t interval. The effect of
alpha is the difference against alpha = 0 with the same seed (``reporting.paired_contrasts``); the effect of
the calibration the difference between the two evaluations of each member; the effect of the loss the
difference between the two losses' members of the same alpha and seed. ``--whole-split DATA:LOSS``
also trains the data set's own alpha (its config's ``reg.alpha``) for each seed on the whole training split,
calibrated on it with dropout 0.3 (today's default), in ``<runs>/<data>_<loss>_whole_split/``: what holding
the validation split out costs, paired by seed with the grid's member of that alpha. Every number in the written
file comes from the runs; the file's first lines give the command that made it.

Every interval is at seed level with its degrees of freedom: a number pooled over the alphas of a cell
(the loss and calibration comparisons) is averaged within each seed first (``reporting.pooled``,
``reporting.member_contrast``), since the alphas of one seed share initialisation, batches and calibration
key. The summary gives, per paired difference, the largest reduction of the mean exit the interval leaves
possible (``stats.excluded_reduction``). "Does RCS bite?" shows the RCS term (metrics.jsonl's ``train_rcs``)
against alpha and epoch per cell.

Second experiment (``--experiment deep``, protocol in docs/results.md): one cell (``DEEP``: data set, loss,
model, epochs, alphas, seeds), trained on the whole training split and evaluated with the training-sample
calibration only; every ``--keep-every``-th epoch's checkpoint is copied to ``<member>/kept/`` as training
runs (``keep_checkpoints``), and each kept checkpoint's per-layer cosine similarity (what RCS targets) is
computed on a fixed test batch and cached in ``<member>/layer_cosine.json``. Its section (summary, primary
outcome and decision, per-setting and paired tables, convergence, "does RCS bite": the RCS term and the
cosine against alpha and epoch) replaces the block between ``BEGIN`` and ``END`` in ``<out>/results.md``
(appended the first time). Rerunning resumes training, reports and cosines from what is on disk.
"""

import argparse
import json
import logging
import os
import pathlib
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time

import functools

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx

from aoi_jax import checkpoint, config, data, evaluation, input_pipeline, parallel, reporting, rundir, stats
from aoi_jax import sweep as sweep_lib
from aoi_jax import integrity, regularisers, training, xla_tuning

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
log = logging.getLogger("aoi_jax")

# The two calibration rules compared, as eval overrides of each trained member's config.
CALIBRATIONS = {"validation": ("eval.calibration=validation", "eval.calib_dropout=0.0"),
                "train": ("eval.calibration=train", "eval.calib_dropout=0.3")}
ARM_TEXT = {"validation": "held-out validation split, no dropout", "train": "training samples, dropout 0.3"}
EPSILONS = (0.0, 0.05)
QUICK = {"datasets": "ndigits", "alphas": "0,0.002", "seeds": "0,1", "epochs": ["ndigits=1"],
         "whole_split": ["ndigits:mean"]}
GRID = {"datasets": "ndigits,ndigits_hard", "losses": "mean,tet", "alphas": "0,0.002,0.01,0.05", "seeds": "0,1,2,3,4",
        "epochs": [], "set": [], "keep_every": 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=("grid", "deep"), default="grid",
                   help="grid: the first study (issue 17); deep: the second experiment (issue 24, one cell, "
                        "defaults from DEEP, its section written into results.md)")
    p.add_argument("--datasets", help="config names (configs/<name>.py); grid default ndigits,ndigits_hard")
    p.add_argument("--losses", help="grid default mean,tet")
    p.add_argument("--alphas", help="reg.alpha values; the first is the baseline; grid default 0,0.002,0.01,0.05")
    p.add_argument("--seeds", help="grid default 0,1,2,3,4")
    p.add_argument("--keep-every", type=int, help="keep every K-th epoch's checkpoint (deep default: DEEP's)")
    p.add_argument("--resummarise", metavar="RESULTS_MD",
                   help="rewrite the Summary of an existing results.md from its own tables (per-setting and "
                        "paired differences) with the reduction each interval excludes; trains nothing")
    p.add_argument("--epochs", action="append", default=[], metavar="DATA=E",
                   help="training epochs of a data set (default: its config's)")
    p.add_argument("--validation-fraction", type=float, default=0.2,
                   help="data.validation_fraction of every cell (the held-out calibration split)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every cell")
    p.add_argument("--whole-split", action="append", default=[], metavar="DATA:LOSS",
                   help="also train DATA with LOSS at its config's reg.alpha on the whole training split, "
                        "calibrated on it with dropout 0.3 (today's default), for each seed")
    p.add_argument("--runs", help="run folders (default runs/rcs_study; --quick: a temporary folder)")
    p.add_argument("--out", help="where results.md and results/ go (default docs; --quick: the temporary folder)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK['datasets']}, alphas {QUICK['alphas']}, seeds {QUICK['seeds']}, 1 epoch, "
                        f"--whole-split {QUICK['whole_split'][0]}")
    args = p.parse_args(argv)
    preset = {"grid": GRID, "deep": DEEP_QUICK if args.quick else DEEP}[args.experiment]
    for key in ("datasets", "losses", "alphas", "seeds", "keep_every"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.epochs, args.set = args.epochs or preset["epochs"], [*preset["set"], *args.set]
    if args.experiment == "deep" and ("," in args.datasets or "," in args.losses):
        raise ValueError(f"--experiment deep trains one cell: one data set and one loss, got --datasets "
                         f"{args.datasets} --losses {args.losses}")
    if args.quick and args.experiment == "deep":
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="rcs_study_deep_"))
        args.runs, args.out = args.runs or str(tmp / "runs"), args.out or str(tmp)
    elif args.quick:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="rcs_study_"))
        args.datasets, args.alphas, args.seeds = QUICK["datasets"], QUICK["alphas"], QUICK["seeds"]
        args.epochs, args.whole_split = args.epochs or QUICK["epochs"], args.whole_split or QUICK["whole_split"]
        args.runs, args.out = args.runs or str(tmp / "runs"), args.out or str(tmp)
    default_runs = "runs/rcs_study" if args.experiment == "grid" else "runs/rcs_study_deep"
    args.runs, args.out = pathlib.Path(args.runs or default_runs), pathlib.Path(args.out or "docs")
    return args


def cell_config(args, dataset: str, loss: str, validation_fraction: float) -> config.Config:
    """The config of a cell: the data set's config file with the loss, the held-out fraction, the epochs
    and ``--set``; calibrated on the validation split when one is held out, else on the training samples."""
    epochs = dict(item.split("=") for item in args.epochs)
    overrides = [f"train.loss={loss}", f"data.validation_fraction={validation_fraction}",
                 *CALIBRATIONS["validation" if validation_fraction > 0 else "train"], *args.set]
    if dataset in epochs:
        overrides.append(f"train.epochs={int(epochs[dataset])}")
    return config.load(ROOT / "configs" / f"{dataset}.py", overrides)


def stored_report(path: pathlib.Path, cfg: config.Config):
    """The report at ``path`` if it exists and was made with ``cfg``, else None."""
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    return report if config.from_dict(report["config"]) == cfg else None


def keep_checkpoints(dirs, every: int) -> None:
    """Copies each member's intact checkpoint steps of every ``every``-th epoch (and the newest) from
    ``<member>/checkpoints/`` into ``<member>/kept/<step>/`` (atomically: a temporary copy renamed), so that
    the study can read the weights against epoch after training keeps only its newest steps. Steps already
    kept are left alone."""
    for d in dirs:
        steps = checkpoint.all_steps(d / "checkpoints")
        for s in steps:
            kept = d / "kept" / str(s)
            if kept.exists() or checkpoint.check(d / "checkpoints", s) is not None:
                continue
            epoch = checkpoint.stored_meta(d / "checkpoints", s)["record"]["epoch"]
            if epoch % every and s != steps[-1]:
                continue
            tmp = kept.with_name(f"{s}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(d / "checkpoints" / str(s), tmp)
            tmp.rename(kept)


def run_cell(cfg: config.Config, workdir: pathlib.Path, sweep: dict, arms=tuple(CALIBRATIONS),
             keep_every: int = 0) -> dict:
    """Trains (or resumes) one cell, evaluates each member with each calibration of ``arms`` from its last
    checkpoint (adding the seconds to ``workdir/eval_seconds.json``); returns {arm: [report per member]}.
    With ``keep_every`` > 0 every ``keep_every``-th epoch's checkpoint is kept (``keep_checkpoints``, at the
    start of each epoch and after the last)."""
    members = sweep_lib.members(cfg, sweep)
    dirs = [rundir.member_dir(workdir, m) for m in members]
    arm_cfgs = {arm: [config.apply_overrides(m.cfg, CALIBRATIONS[arm]) for m in members] for arm in arms}
    reports = {arm: [stored_report(d / f"eval_{arm}" / "report.json", c) for d, c in zip(dirs, arm_cfgs[arm])]
               for arm in arms}
    if all(r is not None for arm in reports for r in reports[arm]):
        log.info("%s: all reports present", workdir)
        return reports
    def keeper(iterable, total=None, desc=""):   # training's progress hook: called as each epoch starts
        if keep_every and desc.startswith("epoch"):
            keep_checkpoints(dirs, keep_every)
        return iterable

    training.train_and_evaluate(cfg, workdir, sweep=sweep, run_eval=False, tuning="auto", progress=keeper)
    if keep_every:
        keep_checkpoints(dirs, keep_every)
    train_split, test_set = data.load(cfg.data)
    mesh, options = parallel.data_mesh(), xla_tuning.compiler_options("auto")
    for arm in arms:
        t0, functions = time.time(), None
        for i, (d, c) in enumerate(zip(dirs, arm_cfgs[arm])):
            if reports[arm][i] is not None:
                continue
            graphdef, state, stored, input_shape = checkpoint.restore(d / "checkpoints")
            if stored != members[i].cfg:
                raise ValueError(f"{d} holds a checkpoint of another config")
            functions = functions or evaluation.eval_functions_for(graphdef, state, c, input_shape,
                                                                   compiler_options=options)
            reports[arm][i] = evaluation.evaluate_state(graphdef, state, c, input_shape, train_split, test_set,
                                                        mesh=mesh, functions=functions, compiler_options=options)
            reports[arm][i]["checkpoint"] = {"step": int(state.step),
                                             "path": str((d / "checkpoints" / str(int(state.step))).resolve())}
            reporting.write_report(reports[arm][i], d / f"eval_{arm}")
        seconds = time.time() - t0
        timing = workdir / "eval_seconds.json"
        spent = json.loads(timing.read_text()) if timing.exists() else {}
        spent[arm] = spent.get(arm, 0.0) + seconds
        timing.write_text(json.dumps(spent))
        log.info("%s: evaluated (%s calibration) in %.0f s", workdir, arm, seconds)
    return reports


def training_record(workdir: pathlib.Path, members) -> dict:
    """Per epoch: mean and min test accuracy over the members, and the epoch's seconds (the slowest
    member's record: members share one epoch); from the members' metrics.jsonl."""
    lines = [[json.loads(x) for x in (rundir.member_dir(workdir, m) / "metrics.jsonl").read_text().splitlines()]
             for m in members]
    acc = np.asarray([[r["test_accuracy"] for r in rows] for rows in lines])          # (M, E)
    seconds = np.asarray([[r["epoch_seconds"] for r in rows] for rows in lines]).max(0)
    return {"test_accuracy_mean": acc.mean(0).tolist(), "test_accuracy_min": acc.min(0).tolist(),
            "epoch_seconds": seconds.tolist()}


def fmt(spread: dict, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± half width of the 95 % interval' (just the mean for one seed)."""
    m = spread["mean"] * scale
    if spread["ci95"] is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {(spread['ci95'][1] - spread['mean']) * scale:.{digits}f}"


def fmt_interval(mean: float, ci, scale: float = 1.0, digits: int = 2, df: int | None = None) -> str:
    """'mean [low, high]' with signs, and ', df = n' when ``df`` is given; the mean alone without an
    interval."""
    if ci is None:
        return f"{mean * scale:+.{digits}f}"
    text = f"{mean * scale:+.{digits}f} [{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]"
    return text if df is None else f"{text}, df = {df}"


def fmt_contrast(c: dict, scale: float = 1.0) -> str:
    """A contrast dict ({mean, ci95, df}: ``reporting.paired_contrasts``, ``member_contrast``) as
    'mean [low, high], df = n'."""
    return fmt_interval(c["mean"], c["ci95"], scale, df=c["df"])


def fmt_excluded(baseline_mean: float, ci) -> str:
    """The relative reduction beyond which the interval ``ci`` of a difference excludes it
    (``stats.excluded_reduction``): '> 12 %' (larger reductions excluded), or 'any' when the interval
    lies at or above 0 (every reduction excluded)."""
    if ci is None:
        return "-"
    r = stats.excluded_reduction(baseline_mean, ci[0])
    return "any" if r <= 0 else f"> {r * 100:.0f} %"


def verdict(ci) -> str:
    """What a 95 % interval of a difference says: below 0, above 0, or containing 0."""
    if ci is None:
        return "(one seed)"
    return "lower" if ci[1] < 0 else "higher" if ci[0] > 0 else "no detectable difference"


def main_table(cells, dataset, arm) -> list[str]:
    head = ("| loss | alpha | acc at t=1 (%) | acc at T (%) | Top-K acc eps 0 (%) | Top-K exit eps 0 "
            "| Top-K acc eps 0.05 (%) | Top-K exit eps 0.05 | OCT mean exit | synops per sample (M) |")
    out = [head, "|" + "---|" * 10]
    for (d, loss), cell in cells.items():
        if d != dataset:
            continue
        for g in cell["summary"][arm]["groups"]:
            out.append(f"| {loss} | {g['settings']['reg.alpha']:g} | {fmt(g['accuracy_at_1'], 100)} "
                       f"| {fmt(g['accuracy_at_T'], 100)} "
                       f"| {fmt(g['topk_accuracy@0'], 100)} | {fmt(g['topk_mean_timestep@0'])} "
                       f"| {fmt(g['topk_accuracy@0.05'], 100)} | {fmt(g['topk_mean_timestep@0.05'])} "
                       f"| {fmt(g['oct_mean_timestep'])} | {fmt(g['synops_per_sample'], 1e-6, 3)} |")
    return out


PAIRED_FIELDS = (("validation", "topk_mean_timestep@0", "Top-K exit eps 0 (validation cal.)", 1),
                 ("validation", "topk_mean_timestep@0.05", "Top-K exit eps 0.05 (validation cal.)", 1),
                 ("train", "topk_mean_timestep@0", "Top-K exit eps 0 (train cal.)", 1),
                 ("train", "topk_mean_timestep@0.05", "Top-K exit eps 0.05 (train cal.)", 1),
                 ("validation", "oct_mean_timestep", "OCT mean exit", 1),
                 ("validation", "accuracy_at_1", "acc at t=1 (points)", 100),
                 ("validation", "accuracy_at_T", "acc at T (points)", 100))


def paired_table(cells, baseline) -> tuple[list[str], dict]:
    out = ["| data | loss | alpha | " + " | ".join(f[2] for f in PAIRED_FIELDS) + " |",
           "|" + "---|" * (3 + len(PAIRED_FIELDS))]
    contrasts = {}
    for (d, loss), cell in cells.items():
        per_field = [reporting.paired_contrasts(cell["summary"][arm], field, "reg.alpha", baseline)
                     for arm, field, _, _ in PAIRED_FIELDS]
        contrasts[(d, loss)] = per_field
        for row in zip(*per_field):
            alpha = row[0]["settings"]["reg.alpha"]
            out.append(f"| {d} | {loss} | {alpha:g} | " + " | ".join(
                fmt_contrast(c, f[3]) for c, f in zip(row, PAIRED_FIELDS)) + " |")
    return out, contrasts


def calibration_rows(cells) -> tuple[list[str], list[str]]:
    """Per cell, both calibrations pooled over the cell's members (all alphas and seeds) at seed level
    (``reporting.pooled``: the mean within each seed first, t interval over the seeds), and the difference
    validation - train per member pooled the same way (``reporting.member_contrast``)."""
    fields = [("topk_accuracy@0", "Top-K acc eps 0 (%)", 100), ("topk_mean_timestep@0", "Top-K exit eps 0", 1),
              ("topk_accuracy@0.05", "Top-K acc eps 0.05 (%)", 100),
              ("topk_mean_timestep@0.05", "Top-K exit eps 0.05", 1)]
    means = ["| data | loss | members | seeds | acc at T (%) | calibration | " + " | ".join(f[1] for f in fields)
             + " |", "|" + "---|" * (6 + len(fields))]
    diffs = ["| data | loss | members | " + " | ".join(f"{f[1]}: validation - train" for f in fields) + " |",
             "|" + "---|" * (3 + len(fields))]
    for (d, loss), cell in cells.items():
        summary = cell["summary"]
        acc_t = reporting.pooled(summary["validation"], "accuracy_at_T")
        n, n_seeds = acc_t["members"], acc_t["df"] + 1
        for arm in CALIBRATIONS:
            cols = [fmt_pooled(reporting.pooled(summary[arm], field), scale) for field, _, scale in fields]
            means.append(f"| {d} | {loss} | {n} | {n_seeds} | {fmt_pooled(acc_t, 100)} | {ARM_TEXT[arm]} | "
                         + " | ".join(cols) + " |")
        cols = []
        for field, _, scale in fields:
            c = reporting.member_contrast(summary["validation"], summary["train"], field)
            cols.append(f"{fmt_contrast(c, scale)} ({verdict(c['ci95'])})")
        diffs.append(f"| {d} | {loss} | {n} | " + " | ".join(cols) + " |")
    return means, diffs


def fmt_pooled(p: dict, scale: float = 1.0, digits: int = 2) -> str:
    """A ``reporting.pooled`` dict as 'mean ± half width, df = n'."""
    if p["ci95"] is None:
        return f"{p['mean'] * scale:.{digits}f}"
    return f"{p['mean'] * scale:.{digits}f} ± {(p['ci95'][1] - p['mean']) * scale:.{digits}f}, df = {p['df']}"


def plot_paired(contrasts, alphas, path):
    """One panel per (data set, loss): the paired exit differences against alpha, 95 % intervals as bars
    (the lines' x positions slightly offset so the bars do not hide each other)."""
    keys = list(contrasts)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.2), squeeze=False, sharey=True)
    treated = [a for a in alphas if a != alphas[0]]
    for ax, key in zip(axes[0], keys):
        fields = PAIRED_FIELDS[:5]
        for j, ((_, _, what, _), cs) in enumerate(zip(fields, contrasts[key][:5])):
            xs = np.asarray([c["settings"]["reg.alpha"] for c in cs]) * 1.06 ** (j - (len(fields) - 1) / 2)
            mean = np.asarray([c["mean"] for c in cs])
            err = np.asarray([[0, 0] if c["ci95"] is None else [c["mean"] - c["ci95"][0], c["ci95"][1] - c["mean"]]
                              for c in cs]).T
            ax.errorbar(xs, mean, yerr=err, fmt="o-", ms=3, capsize=3, label=what)
        ax.axhline(0, c="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(treated)
        ax.set_xticklabels([f"{a:g}" for a in treated])
        ax.minorticks_off()
        ax.set_xlabel("reg.alpha")
        ax.set_title(f"{key[0]}, {key[1]} loss", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean exit: alpha minus alpha = {alphas[0]:g}, same seed")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("paired differences in mean exit timestep: mean over seeds, bars 95 % Student t interval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(cells, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for (d, loss), cell in cells.items():
        rec = cell["training"]
        epochs = np.arange(1, len(rec["test_accuracy_mean"]) + 1)
        line, = ax.plot(epochs, np.asarray(rec["test_accuracy_mean"]) * 100, "o-", ms=3, label=f"{d}, {loss}: mean")
        ax.plot(epochs, np.asarray(rec["test_accuracy_min"]) * 100, ":", c=line.get_color(), label=f"{d}, {loss}: min")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy at T (%) over the cell's members")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_per_timestep(cells, alphas, path):
    datasets = list(dict.fromkeys(d for d, _ in cells))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for (dd, loss), cell in cells.items():
            if dd != d:
                continue
            for alpha in (alphas[0], alphas[-1]):
                acc = np.asarray([r["accuracy_per_timestep"]
                                  for r, m in zip(cell["reports"]["validation"], cell["members"])
                                  if m.cfg.reg.alpha == alpha])                     # (seeds, T)
                t = np.arange(1, acc.shape[1] + 1)
                ax.plot(t, acc.mean(0) * 100, "o-", ms=3, label=f"{loss}, alpha {alpha:g}")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("test accuracy of the cumulative output (%)")
        ax.set_title(f"{d}: mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LOSS_FIELDS = (("validation", "accuracy_at_1", "acc at t=1 (points)", 100),
               ("validation", "accuracy_at_T", "acc at T (points)", 100),
               ("validation", "oct_mean_timestep", "OCT mean exit", 1),
               ("validation", "topk_accuracy@0", "Top-K acc eps 0 (points, validation cal.)", 100),
               ("validation", "topk_mean_timestep@0", "Top-K exit eps 0 (validation cal.)", 1),
               ("train", "topk_mean_timestep@0", "Top-K exit eps 0 (train cal.)", 1),
               ("validation", "topk_mean_timestep@0.05", "Top-K exit eps 0.05 (validation cal.)", 1))


def loss_section(cells, losses) -> list[str]:
    """The second loss against the first, paired by member (the same alpha and seed: the same
    initialisation, batches and augmentation), pooled over the cell's alphas at seed level
    (``reporting.member_contrast``: the seed's mean difference over the alphas, t interval over the seeds)."""
    first, second = losses
    lines = [f"## Loss: {second} against {first}, paired by alpha and seed", "",
             f"Per member (alpha, seed), the {second} run's number minus the {first} run's, averaged over the "
             "alphas within each seed; mean over the seeds and 95 % Student t interval over the seed means "
             "(seeds - 1 degrees of freedom: the alphas of one seed share initialisation, batches and "
             "calibration key, so they are not independent).", "",
             "| data | pairs | " + " | ".join(f[2] for f in LOSS_FIELDS) + " |", "|" + "---|" * (2 + len(LOSS_FIELDS))]
    for d in dict.fromkeys(k[0] for k in cells):
        if (d, first) not in cells or (d, second) not in cells:
            continue
        cols = []
        for arm, field, _, scale in LOSS_FIELDS:
            c = reporting.member_contrast(cells[(d, second)]["summary"][arm], cells[(d, first)]["summary"][arm],
                                          field)
            cols.append(f"{fmt_contrast(c, scale)} ({verdict(c['ci95'])})")
        lines.append(f"| {d} | {c['members']} | " + " | ".join(cols) + " |")
    return lines + [""]


WHOLE_FIELDS = (("accuracy_at_T", "acc at T (%)", 100), ("topk_accuracy@0", "Top-K acc eps 0 (%)", 100),
                ("topk_mean_timestep@0", "Top-K exit eps 0", 1), ("topk_accuracy@0.05", "Top-K acc eps 0.05 (%)", 100),
                ("topk_mean_timestep@0.05", "Top-K exit eps 0.05", 1))


def whole_split_section(cells, whole) -> list[str]:
    """Today's default (trained on the whole training split, calibrated on it with dropout 0.3) against the
    grid's members of the same alpha and seed (trained without the held-out split, calibrated on it)."""
    lines = ["## What holding the validation split out costs", "",
             "The grid trains every member without the held-out split. Here the config's own alpha is also "
             "trained on the whole training split and calibrated on it with dropout 0.3 (today's default), "
             "same seeds and epochs; paired by seed with the grid's member of that alpha calibrated on the "
             "held-out split without dropout. Mean ± half width of the 95 % t interval over seeds; "
             "differences: held-out minus whole, mean [95 % t interval], df = seeds - 1.", "",
             "| data | loss | alpha | setting | " + " | ".join(f[1] for f in WHOLE_FIELDS) + " |",
             "|" + "---|" * (4 + len(WHOLE_FIELDS))]
    for key, w in whole.items():
        grid = cells[key]
        held = {m.cfg.seed: reporting.headline(r) for m, r in zip(grid["members"], grid["reports"]["validation"])
                if m.cfg.reg.alpha == w["alpha"]}
        full = {m.cfg.seed: reporting.headline(r) for m, r in zip(w["members"], w["reports"])}
        rows = (("whole split, train calibration, dropout 0.3", full), ("held out, validation calibration", held))
        for name, by_seed in rows:
            cols = [fmt(reporting.spread([h[f] for h in by_seed.values()]), scale) for f, _, scale in WHOLE_FIELDS]
            lines.append(f"| {key[0]} | {key[1]} | {w['alpha']:g} | {name} | " + " | ".join(cols) + " |")
        cols = []
        for f, _, scale in WHOLE_FIELDS:
            text, ci = _paired(held, full, f, scale)
            cols.append(f"{text} ({verdict(ci)})")
        lines.append(f"| {key[0]} | {key[1]} | {w['alpha']:g} | held out - whole | " + " | ".join(cols) + " |")
    return lines + [""]


SUMMARY_ARM = "train"  # the calibration of the summary table: the library's default (eval.calibration)


SUMMARY_METRICS = (("topk_mean_timestep@0", "Top-K exit eps 0"), ("topk_mean_timestep@0.05", "Top-K exit eps 0.05"),
                   ("oct_mean_timestep", "OCT mean exit"))
EXCLUDED_TEXT = ("Reduction excluded: the 95 % interval [low, high] of the paired difference excludes every "
                 "reduction of the mean exit larger than R = -low / b of the alpha = 0 mean b "
                 "(`aoi_jax.stats.excluded_reduction`; b taken as known); 'any': the interval lies at or "
                 "above 0, so it excludes every reduction.")


def summary_rows(baselines: dict, contrasts: list) -> list[str]:
    """The summary's two tables from numbers alone (shared by a study's runs and ``--resummarise``).

    Args:
      baselines: {(data, loss): {"accuracy_at_T" and each field of ``SUMMARY_METRICS``: (mean, half width
        or None)}}, the alpha = 0 runs over the seeds.
      contrasts: [(data, loss, alpha, {field of ``SUMMARY_METRICS``: {mean, ci95, df}})], the paired
        differences against alpha = 0.
    """
    lines = ["| data | loss | acc at T (%) | " + " | ".join(f"{t} (alpha 0)" for _, t in SUMMARY_METRICS) + " |",
             "|" + "---|" * (3 + len(SUMMARY_METRICS))]
    for (d, loss), b in baselines.items():
        cols = [b["accuracy_at_T"]] + [b[f] for f, _ in SUMMARY_METRICS]
        lines.append(f"| {d} | {loss} | " + " | ".join(
            f"{m * (100 if k == 0 else 1):.2f}" + ("" if h is None else f" ± {h * (100 if k == 0 else 1):.2f}")
            for k, (m, h) in enumerate(cols)) + " |")
    lines += ["", "| data | loss | alpha | " + " | ".join(f"{t}: difference | {t}: reduction excluded"
                                                           for _, t in SUMMARY_METRICS) + " |",
              "|" + "---|" * (3 + 2 * len(SUMMARY_METRICS))]
    for d, loss, alpha, by_field in contrasts:
        cols = []
        for f, _ in SUMMARY_METRICS:
            c = by_field[f]
            cols += [fmt_contrast(c), fmt_excluded(baselines[(d, loss)][f][0], c["ci95"])]
        lines.append(f"| {d} | {loss} | {alpha:g} | " + " | ".join(cols) + " |")
    return lines


def summary_section(cells, alphas, n_seeds, arm=SUMMARY_ARM) -> list[str]:
    """The alpha = 0 runs' accuracy and exits per (data set, loss), and per other alpha the paired
    differences in Top-K's exit (epsilon 0 and 0.05) and OCT's with the reduction each interval excludes."""
    base = alphas[0]
    baselines, contrasts = {}, []
    for (d, loss), cell in cells.items():
        summary = cell["summary"][arm]
        g = next(g for g in summary["groups"] if g["settings"]["reg.alpha"] == base)
        half = lambda s: None if s["ci95"] is None else s["ci95"][1] - s["mean"]  # noqa: E731
        baselines[(d, loss)] = {f: (g[f]["mean"], half(g[f])) for f in ("accuracy_at_T", *dict(SUMMARY_METRICS))}
        per_field = {f: reporting.paired_contrasts(summary, f, "reg.alpha", base) for f, _ in SUMMARY_METRICS}
        for k, a in enumerate(alphas[1:]):
            contrasts.append((d, loss, a, {f: cs[k] for f, cs in per_field.items()}))
    return ["## Summary", "",
            f"alpha = {base:g} runs: mean over {n_seeds} seeds ± half width of the 95 % t interval ({n_seeds - 1} "
            f"degrees of freedom); Top-K calibrated on the {ARM_TEXT[arm]} (the library's default). Differences: "
            f"the alpha's run minus the alpha = {base:g} run of the same seed, mean [95 % t interval], df = "
            f"seeds - 1. {EXCLUDED_TEXT}", "", *summary_rows(baselines, contrasts), ""]


def study_span(folders) -> float:
    """Seconds from the oldest member config.json (written when a cell starts or resumes) to the newest
    report.json in the cell folders ``folders``."""
    starts = [p.stat().st_mtime for f in folders for p in f.glob("members/*/config.json")]
    ends = [p.stat().st_mtime for f in folders for p in f.glob("members/*/eval_*/report.json")]
    return max(ends) - min(starts)


def _paired(a: dict, b: dict, field: str, scale: float = 1.0):
    """('mean [low, high], df = n', 95 % interval) of the differences a - b of ``field`` paired by key, at
    seed level: ``a`` and ``b`` map member names to summary member rows (pooled over the other swept keys
    within each seed first, ``stats.cluster_mean_interval``) or seeds to headline rows."""
    keys, d = stats.paired_differences({k: v[field] for k, v in a.items()}, {k: v[field] for k, v in b.items()})
    seeds = [a[k]["overrides"]["seed"] if "overrides" in a[k] else k for k in keys]
    r = stats.cluster_mean_interval(d, seeds)
    ci = [r["low"], r["high"]]
    return fmt_interval(r["mean"], ci, scale, df=r["df"]), ci


def below(ci) -> bool:
    """A 95 % interval that lies below 0."""
    return ci is not None and ci[1] < 0


def decisions_section(cells, whole, alphas, losses) -> list[str]:
    """The defaults read off the tables by fixed rules (each stated with its outcome), and what
    configs/ndigits.py sets."""
    default = config.load(ROOT / "configs" / "ndigits.py")
    rows = {key: {arm: {m["name"]: m for m in c["summary"][arm]["members"]} for arm in CALIBRATIONS}
            for key, c in cells.items()}
    lines = ["## Decisions", "", "Each default follows the rule stated with it. The rules were written while the "
             "study ran, after part of its results had been seen: read them as stated criteria, not as "
             "pre-registered ones. The numbers come from the tables above.", ""]
    helps = []
    for a in alphas[1:]:
        found = []
        for c in cells.values():
            for arm, field in (("validation", "topk_mean_timestep@0"), ("train", "topk_mean_timestep@0"),
                               ("validation", "oct_mean_timestep")):
                contrasts = reporting.paired_contrasts(c["summary"][arm], field, "reg.alpha", alphas[0])
                found.append(below(next(x["ci95"] for x in contrasts if x["settings"]["reg.alpha"] == a)))
        if all(found):
            helps.append(f"{a:g}")
    lines.append("- **reg.alpha.** Rule: an alpha shortens latency if its paired differences in Top-K's exit "
                 f"(epsilon 0, both calibrations) and in OCT's against alpha = {alphas[0]:g} lie below 0 in "
                 "every cell. Outcome: " + (f"alpha {', '.join(helps)}." if helps else
                                            "none; RCS shows no latency benefit in this study.")
                 + f" configs/ndigits.py sets reg.alpha = {default.reg.alpha:g}.")
    if len(losses) == 2:
        first, second = losses
        parts, better = [], True
        for d in dict.fromkeys(d for d, _ in cells):
            if (d, first) not in rows or (d, second) not in rows:
                continue
            b, a = rows[(d, second)], rows[(d, first)]
            acc, acc_ci = _paired(b["validation"], a["validation"], "accuracy_at_T", 100)
            ex, ex_ci = _paired(b["train"], a["train"], "topk_mean_timestep@0")
            better &= below(ex_ci) and acc_ci is not None and acc_ci[1] >= 0
            parts.append(f"{d}: accuracy at T {acc} points, Top-K exit (epsilon 0, training-sample "
                         f"calibration) {ex} steps")
        lines.append(f"- **train.loss.** Rule: {second} replaces {first} if, paired by alpha and seed, it exits "
                     "earlier at epsilon 0 (interval below 0) without lower accuracy at T (interval not below 0) "
                     f"on every data set. {second} - {first}: " + "; ".join(parts) + ". Outcome: "
                     + (f"{second}." if better else f"{first}.")
                     + f" configs/ndigits.py sets train.loss = {default.train.loss!r}.")
    parts, better = [], True
    for key in cells:
        val, tr = rows[key]["validation"], rows[key]["train"]
        acc, acc_ci = _paired(val, tr, "topk_accuracy@0", 100)
        ex, ex_ci = _paired(val, tr, "topk_mean_timestep@0")
        better &= below(ex_ci) and acc_ci is not None and acc_ci[1] >= 0
        parts.append(f"{key[0]} {key[1]}: accuracy {acc} points, exit {ex} steps")
    for key, w in whole.items():
        grid = zip(cells[key]["members"], cells[key]["reports"]["validation"])
        held = {m.cfg.seed: reporting.headline(r) for m, r in grid if m.cfg.reg.alpha == w["alpha"]}
        full = {m.cfg.seed: reporting.headline(r) for m, r in zip(w["members"], w["reports"])}
        acc, acc_ci = _paired(held, full, "topk_accuracy@0", 100)
        better &= acc_ci is not None and acc_ci[1] >= 0
        parts.append(f"{key[0]} {key[1]}, held out against today's default (whole split): Top-K accuracy "
                     f"{acc} points")
    lines.append("- **eval.calibration.** Rule: the held-out split without dropout replaces the training samples "
                 "with dropout 0.3 if, at epsilon 0, it exits earlier (interval below 0) without lower accuracy "
                 "(interval not below 0) in every cell, and holding the split out does not lower Top-K's "
                 "accuracy at epsilon 0 against today's default. validation - train: " + "; ".join(parts)
                 + ". Outcome: " + ("the held-out split." if better else
                                    "the training samples with dropout 0.3 stay; the held-out split stays selectable.")
                 + f" configs/ndigits.py sets eval.calibration = {default.eval.calibration!r}, eval.calib_dropout "
                 f"= {default.eval.calib_dropout:g}, data.validation_fraction = {default.data.validation_fraction:g}.")
    return lines + [""]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} logical cores visible, {jax.default_backend()} backend ({jax.devices()}), "
            f"jax {jax.__version__}, Python {platform.python_version()}")


def write_results(args, cells, whole, command, wall_s, load_start, load_end):
    out, fig_dir = args.out, args.out / "results"
    fig_dir.mkdir(parents=True, exist_ok=True)
    datasets = list(dict.fromkeys(d for d, _ in cells))
    alphas = [float(a) for a in args.alphas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rel = lambda p: p.relative_to(out).as_posix()  # noqa: E731
    lines = ["# RCS study: does RCS shorten the Top-K exit? (generated)", "",
             f"Generated by `{command}` (run from the repository root); every number below comes from the runs "
             f"in `{args.runs}/`.", ""]
    lines += summary_section(cells, alphas, len(seeds))
    lines += ["## Setup", ""]
    train_total = sum(sum(c["training"]["epoch_seconds"]) for c in [*cells.values(), *whole.values()])
    eval_total = sum(sum(c["eval_seconds"].values()) for c in [*cells.values(), *whole.values()])
    span = study_span([args.runs / f"{d}_{loss}" for d, loss in cells]
                      + [args.runs / f"{d}_{loss}_whole_split" for d, loss in whole])
    lines += [f"- Machine: {machine()}; shared with other jobs (load average {load_start:.1f} when this "
              f"invocation started, {load_end:.1f} when it ended), so times are indicative only.",
              f"- Wall time: training {train_total / 3600:.2f} h (sum of the cells' epochs, from metrics.jsonl), "
              f"evaluation {eval_total / 3600:.2f} h (both calibrations, all members); from the first cell's "
              f"start to the last report written {span / 3600:.2f} h (file times in `{args.runs}/`, including "
              f"any time the runs waited); this invocation {wall_s / 3600:.2f} h "
              "(a resumed invocation reuses what earlier ones trained and evaluated).",
              f"- Grid: data sets {', '.join(datasets)}; losses {args.losses}; "
              f"reg.alpha {', '.join(f'{a:g}' for a in alphas)}; "
              f"seeds {', '.join(map(str, seeds))} (each (data set, loss) is one sweep of "
              f"{len(alphas) * len(seeds)} members trained together).",
              f"- Every cell trains on the training split less a held-out {args.validation_fraction:g} of each class "
              "(`data.validation_fraction`); each member is evaluated twice from the same weights: calibrated on the "
              "held-out split without dropout (`eval.calibration=validation`) and on its training samples with the "
              "reference's dropout 0.3 (`eval.calibration=train`).",
              f"- Extra overrides: {', '.join(args.set) or 'none'}.", ""]
    lines += ["| data | loss | epochs (config file's) | train samples | validation | test | T |",
              "|---|---|---|---|---|---|---|"]
    for (d, loss), cell in cells.items():
        r = cell["reports"]["validation"][0]
        cfg = cell["members"][0].cfg
        own = config.load(ROOT / "configs" / f"{d}.py").train.epochs
        lines.append(f"| {d} | {loss} | {cfg.train.epochs} ({own}) | {cell['n_fit']} | {r['n_calibration']} "
                     f"| {r['n_test']} | {cfg.data.timesteps} |")
    lines += ["", "## Convergence", "",
              "Test accuracy at T after each epoch, mean and minimum over the cell's members (metrics.jsonl), "
              "and its gain over the last two epochs. The cosine schedule decays to 0 at the last epoch, so a "
              "flat end is partly the schedule: a longer schedule may still end higher.", "",
              "| data | loss | " + " | ".join(f"epoch {e}" for e in ("1", "E/2", "E-2", "E-1", "E"))
              + " | gain over the last 2 epochs (points) | epoch seconds (mean) |",
              "|" + "---|" * 9]
    for (d, loss), cell in cells.items():
        acc = cell["training"]["test_accuracy_mean"]
        E = len(acc)
        picks = [0, E // 2 - 1, E - 3, E - 2, E - 1]
        gain = f"{(acc[-1] - acc[-3]) * 100:+.2f}" if E >= 3 else "-"
        lines.append(f"| {d} | {loss} | " + " | ".join(f"{acc[i] * 100:.2f}" if 0 <= i < E else "-" for i in picks)
                     + f" | {gain} | {np.mean(cell['training']['epoch_seconds']):.0f} |")
    plot_convergence(cells, fig_dir / "convergence.png")
    lines += ["", f"![convergence]({rel(fig_dir / 'convergence.png')})", ""]

    lines += ["## Results per setting", "",
              "Mean over seeds ± half width of the 95 % Student t interval of the mean. Top-K exit: mean exit "
              "timestep (1-based) on the test set; OCT: the oracle's mean exit (the earliest step from which the "
              "prediction stays correct); synops: synaptic operations per test sample (spikes times fan-out).", ""]
    for d in datasets:
        for arm in CALIBRATIONS:
            lines += [f"### {d}, Top-K calibrated on the {ARM_TEXT[arm]}", "", *main_table(cells, d, arm), ""]
        for (dd, loss), cell in cells.items():
            if dd != d:
                continue
            for arm in CALIBRATIONS:
                name = f"{d}_{loss}_{arm}.png"
                fig = reporting.summary_figure({"sweep": {"reg.alpha": alphas, "seed": seeds}, **cell["summary"][arm]})
                fig.suptitle(f"{d}, {loss} loss, Top-K calibrated on the {ARM_TEXT[arm]}: mean over {len(seeds)} "
                             "seeds, bars 95 % t interval")
                fig.savefig(fig_dir / name, dpi=120)
                plt.close(fig)
                lines.append(f"![{d} {loss} {arm}]({rel(fig_dir / name)})")
        lines.append("")
    plot_accuracy_per_timestep(cells, alphas, fig_dir / "accuracy_per_timestep.png")
    lines += [f"![accuracy per timestep]({rel(fig_dir / 'accuracy_per_timestep.png')})", ""]

    table, contrasts = paired_table(cells, alphas[0])
    lines += [f"## Paired differences against alpha = {alphas[0]:g} (same seed)", "",
              f"Per seed, the setting's number minus the alpha = {alphas[0]:g} run's of the same seed; mean over "
              f"{len(seeds)} seeds and 95 % Student t interval ({len(seeds) - 1} degrees of freedom, "
              "`aoi_jax.stats`). Negative exit differences mean RCS exits earlier.", "", *table, ""]
    lines += ["Reading of each interval (lower: the whole interval below 0; higher: above 0):", "",
              "| data | loss | alpha | " + " | ".join(f[2] for f in PAIRED_FIELDS) + " |",
              "|" + "---|" * (3 + len(PAIRED_FIELDS))]
    for (d, loss), per_field in contrasts.items():
        for row in zip(*per_field):
            lines.append(f"| {d} | {loss} | {row[0]['settings']['reg.alpha']:g} | "
                         + " | ".join(verdict(c["ci95"]) for c in row) + " |")
    intervals = [c["ci95"] for per_field in contrasts.values() for cs in per_field for c in cs if c["ci95"]]
    excluding = sum(ci[1] < 0 or ci[0] > 0 for ci in intervals)
    lines += ["", f"{excluding} of these {len(intervals)} intervals exclude 0. Each is a 95 % interval on its own "
              f"(no correction for the number of comparisons): with no effect anywhere, about "
              f"{len(intervals) / 20:.1f} of {len(intervals)} would exclude 0 by chance, and the columns are "
              "correlated (the same runs)."]
    plot_paired(contrasts, alphas, fig_dir / "paired_exit.png")
    lines += ["", f"![paired differences]({rel(fig_dir / 'paired_exit.png')})", ""]
    lines += ["## Does RCS bite?", "", "The grid keeps no checkpoint per epoch, so only the RCS term (metrics.jsonl) "
              "is shown; the second experiment also tracks the per-layer cosine similarity.", ""]
    for (d, loss), cell in cells.items():
        dirs = [rundir.member_dir(args.runs / f"{d}_{loss}", m) for m in cell["members"]]
        lines += bite_section(cell["members"], dirs, alphas, {}, fig_dir / f"{d}_{loss}_bite.png", rel,
                              title=f"### {d}, {loss} loss")

    losses = args.losses.split(",")
    if len(losses) == 2:
        lines += loss_section(cells, losses)
    means, diffs = calibration_rows(cells)
    lines += ["## Calibration: held-out validation split (no dropout) against training samples (dropout 0.3)", "",
              "Same weights, two calibrations; pooled over each cell's members (every alpha and seed) at seed "
              "level: each seed's mean over the alphas, then mean ± half width of the 95 % t interval over the "
              "seeds (df = seeds - 1; the alphas of one seed share initialisation, batches and calibration "
              "key).", "", *means, "",
              "Paired per member (validation - train), averaged over the alphas within each seed; mean [95 % t "
              "interval over the seed means], df = seeds - 1:", "", *diffs, ""]
    if whole:
        lines += whole_split_section(cells, whole)
    lines += decisions_section(cells, whole, alphas, losses)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", out / "results.md")


# --- The second experiment (issue 24): one deeper, converged cell decided in advance (docs/results.md) ---

DEEP = {"datasets": "ndigits_hard", "losses": "tet", "alphas": "0,0.002,0.05,1.0", "seeds": "0,1,2,3,4,5",
        "epochs": ["ndigits_hard=50"], "set": ["model.channels=(16,32,64,64,64)"], "keep_every": 5}
DEEP_QUICK = {"datasets": "ndigits", "losses": "tet", "alphas": "0,0.5", "seeds": "0,1", "epochs": ["ndigits=2"],
              "set": ["model.channels=(4,8,8,8,8)"], "keep_every": 1}
BEGIN, END = "<!-- second experiment: generated results begin -->", "<!-- second experiment: generated results end -->"
BITE_SAMPLES = 128  # the fixed test batch of the per-layer cosine similarity: the test split's first samples
DEEP_FIELDS = (("topk_mean_timestep@0", "Top-K exit eps 0", 1), ("topk_mean_timestep@0.05", "Top-K exit eps 0.05", 1),
               ("oct_mean_timestep", "OCT mean exit", 1), ("accuracy_at_1", "acc at t=1 (points)", 100),
               ("accuracy_at_T", "acc at T (points)", 100), ("topk_accuracy@0", "Top-K acc eps 0 (points)", 100),
               ("synops_per_sample", "synops per sample (M)", 1e-6))


def make_cosine_fn(graphdef, cfg: config.Config):
    """Jitted ``(params, batch_stats, frames (T, N, H, W, C)) -> (L,)``: per spiking layer, the mean over
    the samples of the cosine similarity RCS targets, from ``regularisers.rcs_scores`` (eval-mode BatchNorm,
    no dropout)::

        mean_t cos_t[n] = 1 / score[n] - 1e-5        (score = 1 / (mean_t cos_t + 1e-5))
    """
    score = functools.partial(regularisers.rcs_scores, vth=cfg.model.neuron.vth, window=cfg.reg.window)

    def cosines(params, batch_stats, frames):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        _, scores = model(frames, train=False, layer_fn=score)
        return jnp.stack([jnp.mean(1.0 / s - 1e-5) for s in scores])

    return jax.jit(cosines)


def layer_cosines(member_dir: pathlib.Path, frames, fn_cache: dict) -> dict:
    """{epoch: [mean cosine per layer]} of every kept checkpoint of a member (``make_cosine_fn`` on
    ``frames``), cached in ``<member>/layer_cosine.json`` (one entry per kept step, added as steps appear)."""
    cache_path = member_dir / "layer_cosine.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    changed = False
    for kept in sorted((member_dir / "kept").glob("[0-9]*"), key=lambda p: int(p.name)):
        if not kept.name.isdigit() or kept.name in cache:
            continue
        graphdef, state, cfg, _ = checkpoint.restore(member_dir / "kept", int(kept.name))
        if "fn" not in fn_cache:
            fn_cache["fn"] = make_cosine_fn(graphdef, cfg)
        epoch = checkpoint.stored_meta(member_dir / "kept", int(kept.name))["record"]["epoch"]
        cache[kept.name] = {"epoch": epoch,
                            "cosine": np.asarray(fn_cache["fn"](state.params, state.batch_stats, frames)).tolist()}
        changed = True
    if changed:
        reporting.write_json(cache_path, cache)
    return {v["epoch"]: v["cosine"] for v in cache.values()}


def metrics_lines(member_dir: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (member_dir / "metrics.jsonl").read_text().splitlines()]


def by_alpha(members, values) -> dict:
    """{alpha: {seed: value}} of per-member ``values``."""
    out = {}
    for m, v in zip(members, values):
        out.setdefault(m.cfg.reg.alpha, {})[m.cfg.seed] = v
    return out


def seed_contrast(treated: dict, baseline: dict, level: float = 0.95) -> dict:
    """{mean, ci95, df} of treated - baseline paired by seed ({seed: number} each)."""
    _, d = stats.paired_differences(treated, baseline)
    if len(d) < 2:
        return {"mean": float(d.mean()), "ci95": None, "df": 0}
    r = stats.mean_interval(d, level)
    return {"mean": r["mean"], "ci95": [r["low"], r["high"]], "df": len(d) - 1}


def plot_bite(alphas, rcs, cos, path):
    """Left: the RCS term (train_rcs, the epoch's mean) against epoch per alpha; then one panel per spiking
    layer: the mean cosine similarity on the fixed test batch against epoch per alpha. Mean over seeds,
    shaded min to max."""
    n_layers = len(next(iter(next(iter(next(iter(cos.values())).values())).values()))) if cos else 0
    fig, axes = plt.subplots(1, 1 + n_layers, figsize=(4.2 * (1 + n_layers), 3.8), squeeze=False)
    for a in alphas:
        x = np.asarray(list(rcs[a].values()))                                  # (seeds, E)
        ep = np.arange(1, x.shape[1] + 1)
        line, = axes[0][0].plot(ep, x.mean(0), label=f"alpha {a:g}")
        axes[0][0].fill_between(ep, x.min(0), x.max(0), color=line.get_color(), alpha=0.2)
        if cos:
            epochs = sorted(next(iter(cos[a].values())))
            c = np.asarray([[cos[a][s][e] for e in epochs] for s in cos[a]])   # (seeds, K, L)
            for l in range(n_layers):
                ax = axes[0][1 + l]
                ax.plot(epochs, c[:, :, l].mean(0), "o-", ms=3, c=line.get_color(), label=f"alpha {a:g}")
                ax.fill_between(epochs, c[:, :, l].min(0), c[:, :, l].max(0), color=line.get_color(), alpha=0.2)
                ax.set_title(f"layer {l + 1}: mean cos(r_t, r_d)", fontsize=9)
                ax.set_xlabel("epoch")
                ax.grid(alpha=0.3)
    axes[0][0].set_yscale("log")
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_title("RCS term (train_rcs, mean over the epoch)", fontsize=9)
    axes[0][0].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("does RCS bite? mean over seeds, shaded: min to max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bite_section(members, dirs, alphas, cos, fig_path, rel, title="### Does RCS bite?") -> list[str]:
    """The RCS term per epoch (metrics.jsonl) and the per-layer cosine similarity (``layer_cosines``;
    {} when no checkpoint was kept) against alpha and epoch, with paired differences at the last epoch."""
    lines = [metrics_lines(d) for d in dirs]
    rcs = by_alpha(members, [[r["train_rcs"] for r in rows] for rows in lines])   # {alpha: {seed: [E]}}
    E = min(len(v) for per in rcs.values() for v in per.values())
    picks = sorted({1, max(1, E // 4), max(1, E // 2), max(1, 3 * E // 4), E})
    base = alphas[0]
    out = [title, "",
           "The RCS term (the number alpha multiplies, `train_rcs` in metrics.jsonl: the epoch's mean over its "
           "batches) per alpha, mean over seeds at the given epochs; the last column is the difference at the "
           f"last epoch against alpha = {base:g} of the same seed, mean [95 % t interval], df = seeds - 1.", "",
           "| alpha | " + " | ".join(f"epoch {e}" for e in picks) + f" | epoch {E}: alpha - alpha {base:g} |",
           "|" + "---|" * (2 + len(picks))]
    moved, moved_cos = {}, {}
    for a in alphas:
        last = {s: v[E - 1] for s, v in rcs[a].items()}
        c = seed_contrast(last, {s: v[E - 1] for s, v in rcs[base].items()}) if a != base else None
        moved[a] = c
        out.append(f"| {a:g} | " + " | ".join(f"{np.mean([v[e - 1] for v in rcs[a].values()]):.4f}" for e in picks)
                   + f" | {'-' if c is None else fmt_contrast(c, 1) + ' (' + verdict(c['ci95']) + ')'} |")
    cos_by = by_alpha(members, [cos.get(d.name, {}) for d in dirs]) if cos else {}
    if cos and all(cos_by[a][s] for a in alphas for s in cos_by[a]):
        last = max(next(iter(cos_by[base].values())))
        n_layers = len(next(iter(cos_by[base].values()))[last])
        out += ["", f"Mean cosine similarity of each spiking layer's r_t with its delayed target r_d (what RCS raises; "
                f"`regularisers.rcs_scores`) on the test split's first {BITE_SAMPLES} samples, eval mode, from the "
                f"checkpoint of epoch {last}: mean ± half width of the 95 % t interval over seeds; last column: "
                f"the mean over layers minus alpha = {base:g}'s, same seed, mean [95 % t interval], df = seeds - 1.", "",
                "| alpha | " + " | ".join(f"layer {l + 1}" for l in range(n_layers)) + f" | mean over layers: alpha - "
                f"alpha {base:g} |", "|" + "---|" * (2 + n_layers)]
        for a in alphas:
            per_layer = [reporting.spread([cos_by[a][s][last][l] for s in cos_by[a]]) for l in range(n_layers)]
            c = None if a == base else seed_contrast({s: float(np.mean(v[last])) for s, v in cos_by[a].items()},
                                                     {s: float(np.mean(v[last])) for s, v in cos_by[base].items()})
            moved_cos[a] = c
            out.append(f"| {a:g} | " + " | ".join(fmt(p, 1, 3) for p in per_layer)
                       + f" | {'-' if c is None else fmt_interval(c['mean'], c['ci95'], 1, 3, c['df'])} |")
    plot_bite(alphas, rcs, {a: {s: v for s, v in cos_by.get(a, {}).items()} for a in alphas} if cos_by else {},
              fig_path)
    def says(c, what):
        return (f"moves {what}" if c["ci95"] and (c["ci95"][1] < 0 or c["ci95"][0] > 0)
                else f"no detectable change of {what}")

    words = [f"alpha {a:g}: " + says(c, "the RCS term at the last epoch")
             + ("" if moved_cos.get(a) is None else ", " + says(moved_cos[a], "the mean cosine over layers"))
             for a, c in moved.items() if c is not None]
    out += ["", "Reading: " + "; ".join(words) + ".", "", f"![does RCS bite]({rel(fig_path)})", ""]
    return out


def deep_section(args, command, members, dirs, reports, cos, wall_s, load, eval_s) -> list[str]:
    """The second experiment's generated section: setup, primary outcome and decision, per-setting table,
    paired differences, convergence, does RCS bite."""
    out, fig_dir = args.out, args.out / "results"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rel = lambda p: p.relative_to(out).as_posix()  # noqa: E731
    alphas = [float(a) for a in args.alphas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    base, arm = alphas[0], "train"
    summary = reporting.summarise(members, reports, EPSILONS)
    d, loss = args.datasets, args.losses
    cells = {(d, loss): {"summary": {arm: summary}}}
    cfg = members[0].cfg
    lines = [metrics_lines(x) for x in dirs]
    acc = by_alpha(members, [[r["test_accuracy"] for r in rows] for rows in lines])
    E = len(lines[0])
    train_s = max(sum(r["epoch_seconds"] for r in rows) for rows in lines)
    k = len(alphas) - 1
    level = 1 - 0.05 / k
    lines_md = ["## Second experiment: results (generated)", "",
                f"Generated by `{command}` (run from the repository root) from the runs in `{args.runs}/`, by the "
                "protocol above.", "",
                f"- Machine: {machine()}; shared with other jobs (load average {load[0]:.1f} when this invocation "
                f"started, {load[1]:.1f} when it ended), so times are indicative only.",
                f"- Wall time: training {train_s / 3600:.2f} h (the cell's epochs, from metrics.jsonl), evaluation "
                f"{eval_s / 3600:.2f} h; this invocation {wall_s / 3600:.2f} h (a resumed invocation reuses what "
                "earlier ones trained and evaluated).",
                f"- Cell: {d}, {loss} loss, model {cfg.model.name} {cfg.model.channels} ({len(members[0].cfg.model.channels)} "
                f"spiking conv layers), {E} epochs of {cfg.train.epochs} ({lines[0][-1]['step']} SGD steps), "
                f"reg.alpha {', '.join(f'{a:g}' for a in alphas)}, seeds {', '.join(map(str, seeds))}; trained on "
                f"the whole training split, Top-K calibrated on its training samples with dropout "
                f"{cfg.eval.calib_dropout:g}.", ""]
    lines_md += summary_section(cells, alphas, len(seeds), arm)[2:]
    lines_md += ["### Primary outcome and decision", "",
                 f"Paired Top-K exit at epsilon 0 (alpha minus alpha = {base:g}, same seed), seed-level t interval, "
                 f"df = {len(seeds) - 1}; the decision uses the Bonferroni level 1 - 0.05 / {k} = {level * 100:.1f} % "
                 "and the paired accuracy at T at the same level.", "",
                 f"| alpha | Top-K exit eps 0: 95 % | Top-K exit eps 0: {level * 100:.1f} % | acc at T (points): "
                 f"{level * 100:.1f} % | shortens latency (rule) |", "|---|---|---|---|---|"]
    topk95 = reporting.paired_contrasts(summary, "topk_mean_timestep@0", "reg.alpha", base)
    topk_b = reporting.paired_contrasts(summary, "topk_mean_timestep@0", "reg.alpha", base, level)
    acc_b = reporting.paired_contrasts(summary, "accuracy_at_T", "reg.alpha", base, level)
    helps = []
    for c95, cb, ca in zip(topk95, topk_b, acc_b):
        a = c95["settings"]["reg.alpha"]
        ok = cb["ci95"] is not None and cb["ci95"][1] < 0 and ca["ci95"][1] >= 0
        if ok:
            helps.append((cb["mean"], a))
        lines_md.append(f"| {a:g} | {fmt_contrast(c95)} | {fmt_contrast(cb)} | {fmt_contrast(ca, 100)} | "
                        f"{'yes' if ok else 'no'} |")
    if helps:
        decision = f"reg.alpha = {min(helps)[1]:g} (the alpha that shortens latency with the most negative mean)"
    else:
        small = next((c for c in acc_b if c["settings"]["reg.alpha"] == alphas[1]), None)
        lower = small is not None and small["ci95"] is not None and small["ci95"][1] < 0
        decision = ("reg.alpha = 0 (no alpha shortens latency, and alpha "
                    f"{alphas[1]:g} lowers accuracy at T)" if lower else
                    f"reg.alpha stays {config.load(ROOT / 'configs' / 'ndigits.py').reg.alpha:g} (no alpha shortens "
                    "latency; the default is not changed without evidence)")
    lines_md += ["", f"Decision by the pre-registered rule: {decision}.", "",
                 "### Results per setting", "", *main_table(cells, d, arm), ""]
    fig = reporting.summary_figure({"sweep": {"reg.alpha": alphas, "seed": seeds}, **summary})
    fig.savefig(fig_dir / "deep_summary.png", dpi=120)
    plt.close(fig)
    lines_md += [f"![second experiment]({rel(fig_dir / 'deep_summary.png')})", "",
                 "### Paired differences against alpha = 0 (same seed)", "",
                 "| alpha | " + " | ".join(f[1] for f in DEEP_FIELDS) + " |", "|" + "---|" * (1 + len(DEEP_FIELDS))]
    per_field = [reporting.paired_contrasts(summary, f, "reg.alpha", base) for f, _, _ in DEEP_FIELDS]
    for row in zip(*per_field):
        lines_md.append(f"| {row[0]['settings']['reg.alpha']:g} | "
                        + " | ".join(fmt_contrast(c, f[2]) for c, f in zip(row, DEEP_FIELDS)) + " |")
    picks = sorted({1, max(1, E // 4), max(1, E // 2), max(1, E - 5), E})
    lines_md += ["", "### Convergence", "",
                 "Test accuracy at T (%) after each epoch, mean over seeds; the rule: the alpha = 0 members' mean gains "
                 "less than 0.2 points over the last 5 epochs.", "",
                 "| alpha | " + " | ".join(f"epoch {e}" for e in picks) + " | gain over the last 5 epochs (points) |",
                 "|" + "---|" * (2 + len(picks))]
    for a in alphas:
        m = np.asarray(list(acc[a].values())).mean(0) * 100
        gain = f"{m[-1] - m[-6]:+.2f}" if E > 5 else "-"
        lines_md.append(f"| {a:g} | " + " | ".join(f"{m[e - 1]:.2f}" for e in picks) + f" | {gain} |")
    m0 = np.asarray(list(acc[base].values())).mean(0) * 100
    converged = E > 5 and m0[-1] - m0[-6] < 0.2
    lines_md += ["", f"Rule: {'met' if converged else 'NOT met'} (alpha = {base:g}: "
                 + (f"{m0[-1] - m0[-6]:+.2f} points over the last 5 epochs)." if E > 5 else
                    f"only {E} epochs, fewer than the rule's 5).") + "", ""]
    lines_md += bite_section(members, dirs, alphas, cos, fig_dir / "deep_bite.png", rel)
    return lines_md


def run_deep(args, command):
    """The second experiment: trains (or resumes) its one cell keeping every ``--keep-every``-th epoch's
    checkpoint, evaluates each member (training-sample calibration, dropout 0.3), computes the per-layer
    cosine similarity of each kept checkpoint (cached per member), and writes its section into
    ``<out>/results.md`` between ``BEGIN`` and ``END`` (appended the first time, replaced after)."""
    t0, load_start = time.time(), os.getloadavg()[0]
    sweep = config.parse_sweep([f"reg.alpha={args.alphas}", f"seed={args.seeds}"])
    cfg = cell_config(args, args.datasets, args.losses, 0.0)
    workdir = args.runs / f"{args.datasets}_{args.losses}"
    members = sweep_lib.members(cfg, sweep)
    log.info("second experiment %s, %s loss: %d epochs, %d members, model %s %s", args.datasets, args.losses,
             cfg.train.epochs, len(members), cfg.model.name, cfg.model.channels)
    reports = run_cell(cfg, workdir, sweep, ("train",), keep_every=args.keep_every)["train"]
    dirs = [rundir.member_dir(workdir, m) for m in members]
    _, test_set = data.load(cfg.data)
    frames = jnp.asarray(np.asarray(test_set.frames[:BITE_SAMPLES], np.float32).swapaxes(0, 1))   # (T, N, H, W, C)
    fn_cache = {}
    cos = {d.name: layer_cosines(d, frames, fn_cache) for d in dirs}
    timing = workdir / "eval_seconds.json"
    eval_s = sum(json.loads(timing.read_text()).values()) if timing.exists() else 0.0
    section = deep_section(args, command, members, dirs, reports, cos, time.time() - t0,
                           (load_start, os.getloadavg()[0]), eval_s)
    path = args.out / "results.md"
    text = path.read_text() if path.exists() else ""
    block = "\n".join([BEGIN, *section, END])
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    integrity.write_atomic(path, lambda f: f.write(text.encode()))
    log.info("wrote the second experiment's section into %s", path)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_after(lines: list[str], start: int) -> list[list[str]]:
    """The rows (cells) of the first markdown table at or after line ``start``, without header and rule."""
    i = next(k for k in range(start, len(lines)) if lines[k].startswith("|"))
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append(_cells(lines[i]))
        i += 1
    return rows[2:]


def _pm(text: str) -> tuple[float, float]:
    m, _, h = text.partition("±")
    return float(m), float(h.split(",")[0])


def _ci(text: str) -> dict:
    m, _, rest = text.partition("[")
    lo, hi = rest.split("]")[0].split(",")
    return {"mean": float(m), "ci95": [float(lo), float(hi)]}


def resummarise(path: pathlib.Path) -> None:
    """Rewrites the Summary of a report like docs/results.md written by the grid (``write_results``) from two of its own
    tables, for a study whose runs are gone: the alpha = 0 rows of "Results per setting" (Top-K calibrated on
    the training samples, dropout 0.3) and the "Paired differences" rows (train calibration, epsilon 0 and
    0.05; OCT), with the reduction each interval excludes (``summary_rows``). The numbers are the tables'
    two-decimal roundings.

    Raises:
      ValueError: a table or the number of seeds is not found (the message names what).
    """
    text = path.read_text()
    lines = text.splitlines()
    paired_at = next((k for k, x in enumerate(lines) if x.startswith("## Paired differences against alpha")), None)
    if paired_at is None:
        raise ValueError(f"{path}: no '## Paired differences against alpha' section")
    seeds = re.search(r"mean over (\d+) seeds", "\n".join(lines[paired_at:paired_at + 4]))
    if seeds is None:
        raise ValueError(f"{path}: the paired section does not say 'mean over N seeds'")
    df = int(seeds.group(1)) - 1
    baselines = {}
    for k, x in enumerate(lines):
        m = re.match(r"### (\S+), Top-K calibrated on the " + re.escape(ARM_TEXT["train"]) + "$", x)
        if not m:
            continue
        for row in _table_after(lines, k):
            if float(row[1]) == 0:
                acc_t, exit0, exit05, oct_ = (_pm(row[i]) for i in (3, 5, 7, 8))
                baselines[(m.group(1), row[0])] = {"accuracy_at_T": (acc_t[0] / 100, acc_t[1] / 100),
                                                   "topk_mean_timestep@0": exit0, "topk_mean_timestep@0.05": exit05,
                                                   "oct_mean_timestep": oct_}
    if not baselines:
        raise ValueError(f"{path}: no '### <data>, Top-K calibrated on the {ARM_TEXT['train']}' table")
    contrasts = []
    for row in _table_after(lines, paired_at):
        by_field = {f: {**_ci(row[i]), "df": df} for f, i in
                    (("topk_mean_timestep@0", 5), ("topk_mean_timestep@0.05", 6), ("oct_mean_timestep", 7))}
        contrasts.append((row[0], row[1], float(row[2]), by_field))
    start = lines.index("## Summary")
    end = next(k for k in range(start + 1, len(lines)) if lines[k].startswith("## "))
    new = ["## Summary", "",
           f"Regenerated by `python -m benchmarks.rcs_study --resummarise {path}` from this file's own tables "
           f"(the runs are no longer available): the alpha = 0 rows of \"Results per setting\" (Top-K "
           f"calibrated on the {ARM_TEXT['train']}, the library's default) and the train-calibration and OCT "
           f"columns of \"Paired differences\", as rounded there (two decimals). alpha = 0 runs: mean over "
           f"{df + 1} seeds ± half width of the 95 % t interval. Differences: the alpha's run minus the alpha = 0 "
           f"run of the same seed, mean [95 % t interval], df = {df} (seed level: one difference per seed). "
           f"{EXCLUDED_TEXT}", "", *summary_rows(baselines, contrasts), ""]
    path.write_text("\n".join(lines[:start] + new + lines[end:]) + ("\n" if text.endswith("\n") else ""))
    log.info("rewrote the Summary of %s", path)


def main(argv=None):
    args = parse_args(argv)
    if args.resummarise:
        resummarise(pathlib.Path(args.resummarise))
        return
    log.propagate = False
    log.handlers[:] = [logging.StreamHandler(sys.stdout)]
    log.handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.rcs_study", *(shlex.quote(a) for a in argv)])
    if args.experiment == "deep":
        run_deep(args, command)
        return
    t0, load_start = time.time(), os.getloadavg()[0]
    sweep = config.parse_sweep([f"reg.alpha={args.alphas}", f"seed={args.seeds}"])
    cells = {}
    for dataset in args.datasets.split(","):
        for loss in args.losses.split(","):
            cfg = cell_config(args, dataset, loss, args.validation_fraction)
            workdir = args.runs / f"{dataset}_{loss}"
            log.info("cell %s, %s loss: %d epochs, %d members", dataset, loss, cfg.train.epochs,
                     len(sweep_lib.members(cfg, sweep)))
            reports = run_cell(cfg, workdir, sweep)
            members = sweep_lib.members(cfg, sweep)
            timing = workdir / "eval_seconds.json"
            train_split, _ = data.load(cfg.data)
            cells[(dataset, loss)] = {
                "members": members, "reports": reports,
                "summary": {arm: reporting.summarise(members, reports[arm], EPSILONS) for arm in CALIBRATIONS},
                "training": training_record(workdir, members),
                "eval_seconds": json.loads(timing.read_text()) if timing.exists() else {},
                "n_fit": len(input_pipeline.split_validation(train_split, cfg.data)[0])}
    whole = {}
    for item in args.whole_split:
        dataset, _, loss = item.partition(":")
        cfg = cell_config(args, dataset, loss, 0.0)
        if (dataset, loss) not in cells or cfg.reg.alpha not in sweep["reg.alpha"]:
            raise ValueError(f"--whole-split {item}: needs the grid cell ({dataset}, {loss}) and its config's "
                             f"reg.alpha {cfg.reg.alpha} among --alphas")
        workdir = args.runs / f"{dataset}_{loss}_whole_split"
        seeds = {"seed": sweep["seed"]}
        log.info("whole training split: %s, %s loss, alpha %g, %d seeds", dataset, loss, cfg.reg.alpha,
                 len(seeds["seed"]))
        reports = run_cell(cfg, workdir, seeds, ("train",))
        whole[(dataset, loss)] = {"alpha": cfg.reg.alpha, "members": sweep_lib.members(cfg, seeds),
                                  "reports": reports["train"],
                                  "training": training_record(workdir, sweep_lib.members(cfg, seeds)),
                                  "eval_seconds": json.loads((workdir / "eval_seconds.json").read_text())}
    write_results(args, cells, whole, command, time.time() - t0, load_start, os.getloadavg()[0])


if __name__ == "__main__":
    main()
