"""Does RCS shorten latency? The study of issue 17: writes docs/results.md and its figures.

    python -m benchmarks.rcs_study                  # the grid below -> docs/results.md, docs/results/*.png
    python -m benchmarks.rcs_study --epochs ndigits=8 --epochs ndigits_hard=10 --whole-split ndigits:mean \
        --set data.data_dir=data_cache           # what made docs/results.md (data in ./data_cache)
    python -m benchmarks.rcs_study --quick          # a small slice (smoke test) into a temporary folder

Grid: for each data set (``configs/<name>.py``) and loss (mean, tet), one sweep ``reg.alpha`` x ``seed``
trained together in one compiled program by ``training.train_and_evaluate`` in ``<runs>/<data>_<loss>/``
(resumable: a cell resumes from its members' checkpoints, and reports already written are read back).
Every cell holds ``data.validation_fraction`` of each class of the training split out (never trained on),
and every trained member is evaluated twice from its last checkpoint:

- ``validation``: Top-K and SpikeCP calibrated on the held-out split, without dropout;
- ``train``: calibrated on the samples it was trained on with the reference's 0.3 dropout on spikes
  (today's default rule), so the two calibrations are compared on the same weights.

Numbers (``ablation.summarise``): accuracy at T, Top-K accuracy and mean exit at epsilon 0 and 0.05, OCT's
mean exit, synaptic operations per sample; the mean over seeds with a 95 % Student t interval. The effect of
alpha is the difference against alpha = 0 with the same seed (``ablation.paired_contrasts``); the effect of
the calibration the difference between the two evaluations of each member; the effect of the loss the
difference between the two losses' members of the same alpha and seed. ``--whole-split DATA:LOSS``
also trains the data set's own alpha (its config's ``reg.alpha``) for each seed on the whole training split,
calibrated on it with dropout 0.3 (today's default), in ``<runs>/<data>_<loss>_whole_split/``: what holding
the validation split out costs, paired by seed with the grid's member of that alpha. Every number in the written
file comes from the runs; the file's first lines give the command that made it.
"""

import argparse
import json
import logging
import os
import pathlib
import platform
import shlex
import sys
import tempfile
import time

import jax
import matplotlib
import numpy as np

from aoi_jax import ablation, checkpoint, config, data, evaluation, input_pipeline, parallel, reporting, stats, step
from aoi_jax import training, xla_tuning

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="ndigits,ndigits_hard", help="config names (configs/<name>.py)")
    p.add_argument("--losses", default="mean,tet")
    p.add_argument("--alphas", default="0,0.002,0.01,0.05", help="reg.alpha values; the first is the baseline")
    p.add_argument("--seeds", default="0,1,2,3,4")
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
    if args.quick:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="rcs_study_"))
        args.datasets, args.alphas, args.seeds = QUICK["datasets"], QUICK["alphas"], QUICK["seeds"]
        args.epochs, args.whole_split = args.epochs or QUICK["epochs"], args.whole_split or QUICK["whole_split"]
        args.runs, args.out = args.runs or str(tmp / "runs"), args.out or str(tmp)
    args.runs, args.out = pathlib.Path(args.runs or "runs/rcs_study"), pathlib.Path(args.out or "docs")
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


def run_cell(cfg: config.Config, workdir: pathlib.Path, sweep: dict, arms=tuple(CALIBRATIONS)) -> dict:
    """Trains (or resumes) one cell, evaluates each member with each calibration of ``arms`` from its last
    checkpoint (adding the seconds to ``workdir/eval_seconds.json``); returns {arm: [report per member]}."""
    members = ablation.members(cfg, sweep)
    dirs = [training.member_dir(workdir, m) for m in members]
    arm_cfgs = {arm: [config.apply_overrides(m.cfg, CALIBRATIONS[arm]) for m in members] for arm in arms}
    reports = {arm: [stored_report(d / f"eval_{arm}" / "report.json", c) for d, c in zip(dirs, arm_cfgs[arm])]
               for arm in arms}
    if all(r is not None for arm in reports for r in reports[arm]):
        log.info("%s: all reports present", workdir)
        return reports
    training.train_and_evaluate(cfg, workdir, sweep=sweep, run_eval=False)
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
    lines = [[json.loads(x) for x in (training.member_dir(workdir, m) / "metrics.jsonl").read_text().splitlines()]
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


def fmt_interval(mean: float, ci, scale: float = 1.0, digits: int = 2) -> str:
    """'mean [low, high]' with signs; the mean alone without an interval."""
    if ci is None:
        return f"{mean * scale:+.{digits}f}"
    return f"{mean * scale:+.{digits}f} [{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]"


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
        per_field = [ablation.paired_contrasts(cell["summary"][arm], field, "reg.alpha", baseline)
                     for arm, field, _, _ in PAIRED_FIELDS]
        contrasts[(d, loss)] = per_field
        for row in zip(*per_field):
            alpha = row[0]["settings"]["reg.alpha"]
            out.append(f"| {d} | {loss} | {alpha:g} | " + " | ".join(
                fmt_interval(c["mean"], c["ci95"], f[3]) for c, f in zip(row, PAIRED_FIELDS)) + " |")
    return out, contrasts


def calibration_rows(cells) -> tuple[list[str], list[str]]:
    """Per cell, both calibrations pooled over the cell's members (all alphas and seeds), and the paired
    difference validation - train per member."""
    fields = [("topk_accuracy@0", "Top-K acc eps 0 (%)", 100), ("topk_mean_timestep@0", "Top-K exit eps 0", 1),
              ("topk_accuracy@0.05", "Top-K acc eps 0.05 (%)", 100),
              ("topk_mean_timestep@0.05", "Top-K exit eps 0.05", 1)]
    means = ["| data | loss | members | acc at T (%) | calibration | " + " | ".join(f[1] for f in fields) + " |",
             "|" + "---|" * (5 + len(fields))]
    diffs = ["| data | loss | members | " + " | ".join(f"{f[1]}: validation - train" for f in fields) + " |",
             "|" + "---|" * (3 + len(fields))]
    for (d, loss), cell in cells.items():
        rows = {arm: {m["name"]: m for m in cell["summary"][arm]["members"]} for arm in CALIBRATIONS}
        n = len(rows["validation"])
        acc_t = fmt(ablation.spread([m["accuracy_at_T"] for m in rows["validation"].values()]), 100)
        for arm in CALIBRATIONS:
            cols = [fmt(ablation.spread([m[field] for m in rows[arm].values()]), scale) for field, _, scale in fields]
            means.append(f"| {d} | {loss} | {n} | {acc_t} | {ARM_TEXT[arm]} | " + " | ".join(cols) + " |")
        cols = []
        for field, _, scale in fields:
            _, dv = stats.paired_differences({k: v[field] for k, v in rows["validation"].items()},
                                             {k: v[field] for k, v in rows["train"].items()})
            ci = ablation.spread(dv)["ci95"]
            cols.append(f"{fmt_interval(float(dv.mean()), ci, scale)} ({verdict(ci)})")
        diffs.append(f"| {d} | {loss} | {n} | " + " | ".join(cols) + " |")
    return means, diffs


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
    initialisation, batches and augmentation), pooled over the cell's members."""
    first, second = losses
    lines = [f"## Loss: {second} against {first}, paired by alpha and seed", "",
             f"Per member (alpha, seed), the {second} run's number minus the {first} run's; mean over the "
             "members and 95 % Student t interval.", "",
             "| data | pairs | " + " | ".join(f[2] for f in LOSS_FIELDS) + " |", "|" + "---|" * (2 + len(LOSS_FIELDS))]
    for d in dict.fromkeys(k[0] for k in cells):
        if (d, first) not in cells or (d, second) not in cells:
            continue
        cols = []
        for arm, field, _, scale in LOSS_FIELDS:
            a, b = ({m["name"]: m[field] for m in cells[(d, loss)]["summary"][arm]["members"]} for loss in losses)
            keys, diff = stats.paired_differences(b, a)
            ci = ablation.spread(diff)["ci95"]
            cols.append(f"{fmt_interval(float(diff.mean()), ci, scale)} ({verdict(ci)})")
        lines.append(f"| {d} | {len(keys)} | " + " | ".join(cols) + " |")
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
             "differences: held-out minus whole, mean [95 % t interval].", "",
             "| data | loss | alpha | setting | " + " | ".join(f[1] for f in WHOLE_FIELDS) + " |",
             "|" + "---|" * (4 + len(WHOLE_FIELDS))]
    for key, w in whole.items():
        grid = cells[key]
        held = {m.cfg.seed: ablation.headline(r) for m, r in zip(grid["members"], grid["reports"]["validation"])
                if m.cfg.reg.alpha == w["alpha"]}
        full = {m.cfg.seed: ablation.headline(r) for m, r in zip(w["members"], w["reports"])}
        rows = (("whole split, train calibration, dropout 0.3", full), ("held out, validation calibration", held))
        for name, by_seed in rows:
            cols = [fmt(ablation.spread([h[f] for h in by_seed.values()]), scale) for f, _, scale in WHOLE_FIELDS]
            lines.append(f"| {key[0]} | {key[1]} | {w['alpha']:g} | {name} | " + " | ".join(cols) + " |")
        cols = []
        for f, _, scale in WHOLE_FIELDS:
            _, d = stats.paired_differences({s: h[f] for s, h in held.items()}, {s: h[f] for s, h in full.items()})
            ci = ablation.spread(d)["ci95"]
            cols.append(f"{fmt_interval(float(d.mean()), ci, scale)} ({verdict(ci)})")
        lines.append(f"| {key[0]} | {key[1]} | {w['alpha']:g} | held out - whole | " + " | ".join(cols) + " |")
    return lines + [""]


SUMMARY_ARM = "train"  # the calibration of the summary table: the library's default (eval.calibration)


def summary_section(cells, alphas, n_seeds) -> list[str]:
    """One row per (data set, loss): the baseline alpha's accuracy and exits, and the paired differences in
    Top-K's exit at epsilon 0 (each other alpha) and OCT's (the largest alpha)."""
    base, top = alphas[0], alphas[-1]
    lines = ["## Summary", "",
             f"alpha = {base:g} runs: mean over {n_seeds} seeds ± half width of the 95 % t interval; Top-K "
             f"calibrated on the {ARM_TEXT[SUMMARY_ARM]} (the library's default). Differences: the alpha's run "
             f"minus the alpha = {base:g} run of the same seed, mean [95 % t interval].", "",
             "| data | loss | acc at T (%) | Top-K exit eps 0 | OCT mean exit | "
             + " | ".join(f"Top-K exit eps 0, alpha {a:g}" for a in alphas[1:]) + f" | OCT, alpha {top:g} |",
             "|" + "---|" * (5 + len(alphas))]
    for (d, loss), cell in cells.items():
        summary = cell["summary"][SUMMARY_ARM]
        g = next(g for g in summary["groups"] if g["settings"]["reg.alpha"] == base)
        topk = ablation.paired_contrasts(summary, "topk_mean_timestep@0", "reg.alpha", base)
        oct_ = ablation.paired_contrasts(summary, "oct_mean_timestep", "reg.alpha", base)
        cols = [fmt(g["accuracy_at_T"], 100), fmt(g["topk_mean_timestep@0"]), fmt(g["oct_mean_timestep"]),
                *(fmt_interval(c["mean"], c["ci95"]) for c in topk),
                fmt_interval(oct_[-1]["mean"], oct_[-1]["ci95"])]
        lines.append(f"| {d} | {loss} | " + " | ".join(cols) + " |")
    return lines + [""]


def study_span(folders) -> float:
    """Seconds from the oldest member config.json (written when a cell starts or resumes) to the newest
    report.json in the cell folders ``folders``."""
    starts = [p.stat().st_mtime for f in folders for p in f.glob("members/*/config.json")]
    ends = [p.stat().st_mtime for f in folders for p in f.glob("members/*/eval_*/report.json")]
    return max(ends) - min(starts)


def _paired(a: dict, b: dict, field: str, scale: float = 1.0):
    """('mean [low, high]', 95 % interval) of the differences a - b of ``field`` paired by key (``a`` and
    ``b`` map member names to headline rows)."""
    _, d = stats.paired_differences({k: v[field] for k, v in a.items()}, {k: v[field] for k, v in b.items()})
    ci = ablation.spread(d)["ci95"]
    return fmt_interval(float(d.mean()), ci, scale), ci


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
                contrasts = ablation.paired_contrasts(c["summary"][arm], field, "reg.alpha", alphas[0])
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
        held = {m.cfg.seed: ablation.headline(r) for m, r in grid if m.cfg.reg.alpha == w["alpha"]}
        full = {m.cfg.seed: ablation.headline(r) for m, r in zip(w["members"], w["reports"])}
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

    losses = args.losses.split(",")
    if len(losses) == 2:
        lines += loss_section(cells, losses)
    means, diffs = calibration_rows(cells)
    lines += ["## Calibration: held-out validation split (no dropout) against training samples (dropout 0.3)", "",
              "Same weights, two calibrations; pooled over each cell's members (every alpha and seed): mean ± "
              "half width of the 95 % t interval over the members.", "", *means, "",
              "Paired per member (validation - train), mean [95 % t interval]:", "", *diffs, ""]
    if whole:
        lines += whole_split_section(cells, whole)
    lines += decisions_section(cells, whole, alphas, losses)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", out / "results.md")


def main(argv=None):
    args = parse_args(argv)
    log.propagate = False
    log.handlers[:] = [logging.StreamHandler(sys.stdout)]
    log.handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.rcs_study", *(shlex.quote(a) for a in argv)])
    t0, load_start = time.time(), os.getloadavg()[0]
    sweep = ablation.parse_sweep([f"reg.alpha={args.alphas}", f"seed={args.seeds}"])
    cells = {}
    for dataset in args.datasets.split(","):
        for loss in args.losses.split(","):
            cfg = cell_config(args, dataset, loss, args.validation_fraction)
            workdir = args.runs / f"{dataset}_{loss}"
            log.info("cell %s, %s loss: %d epochs, %d members", dataset, loss, cfg.train.epochs,
                     len(ablation.members(cfg, sweep)))
            reports = run_cell(cfg, workdir, sweep)
            members = ablation.members(cfg, sweep)
            timing = workdir / "eval_seconds.json"
            train_split, _ = data.load(cfg.data)
            cells[(dataset, loss)] = {
                "members": members, "reports": reports,
                "summary": {arm: ablation.summarise(members, reports[arm], EPSILONS) for arm in CALIBRATIONS},
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
        whole[(dataset, loss)] = {"alpha": cfg.reg.alpha, "members": ablation.members(cfg, seeds),
                                  "reports": reports["train"],
                                  "training": training_record(workdir, ablation.members(cfg, seeds)),
                                  "eval_seconds": json.loads((workdir / "eval_seconds.json").read_text())}
    write_results(args, cells, whole, command, time.time() - t0, load_start, os.getloadavg()[0])


if __name__ == "__main__":
    main()
