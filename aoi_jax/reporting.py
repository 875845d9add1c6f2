"""Writes what evaluation and sweeps return: report.json, summary.json, their figures and the printed table.

The one module the scripts call to put results on disk (``evaluation`` and ``ablation`` only return dicts):

- ``write_report(report, out_dir)``: ``report.json``, ``accuracy_per_timestep.png`` and
  ``accuracy_vs_latency.png``;
- ``write_summary(summary, workdir)``: a sweep's ``summary.json`` and ``summary.png``;
- ``summary_table(report)``: the text table ``train.py`` and ``evaluate.py`` print.

Every JSON file aoi_jax writes is strict JSON (``to_json``): a non-finite number (NaN, +-inf) is written as
``null``, never as the ``NaN``/``Infinity`` tokens strict parsers reject. Files are written atomically.
"""

import json
import math
import pathlib

import matplotlib
import numpy as np

from aoi_jax import integrity

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TABLE_EPSILONS = (0.0, 0.01, 0.05)  # the epsilons of the printed table (the report has all of them)


def strict(obj):
    """``obj`` (dicts, lists, tuples, numbers, strings) with every non-finite float replaced by None."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def to_json(obj, indent: int | None = None) -> str:
    """Strict JSON of ``obj``: ``json.dumps(strict(obj), allow_nan=False)`` (non-finite numbers as null)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_json(path: pathlib.Path, obj) -> None:
    """``strict(obj)`` as JSON into ``path``, atomically (``integrity.write_json_atomic``)."""
    integrity.write_json_atomic(path, strict(obj))


def write_report(report: dict, out_dir) -> None:
    """Writes ``report.json`` and the two figures of one evaluated run into ``out_dir`` (created)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    plot_accuracy_per_timestep(report, out_dir / "accuracy_per_timestep.png")
    plot_accuracy_vs_latency(report, out_dir / "accuracy_vs_latency.png")


def write_summary(summary: dict, workdir) -> None:
    """Writes a sweep's ``summary.json`` and ``summary.png`` into ``workdir``."""
    workdir = pathlib.Path(workdir)
    write_json(workdir / "summary.json", summary)
    plot_summary(summary, workdir / "summary.png")


def summary_table(report: dict) -> str:
    """The printed table: accuracy per timestep, OCT, each rule at ``TABLE_EPSILONS``, the anytime loop."""
    acc = report["accuracy_per_timestep"]
    lines = ["", "accuracy per timestep: " + "  ".join(f"{t + 1}:{a:.4f}" for t, a in enumerate(acc)),
             f"OCT (oracle): accuracy {report['oct']['accuracy']:.4f}, mean timestep "
             f"{report['oct']['mean_timestep']:.3f}", "",
             f"{'rule':<12}{'epsilon':>9}{'accuracy':>10}{'mean T':>9}"]
    eps = report["epsilons"]
    for rule, res in report["rules"].items():
        for i, e in enumerate(eps):
            if any(abs(e - r) < 1e-9 for r in TABLE_EPSILONS):
                lines.append(f"{rule:<12}{e:>9.2f}{res['accuracy'][i]:>10.4f}{res['mean_timestep'][i]:>9.3f}")
    lines.append(f"{'fixed T':<12}{'':>9}{acc[-1]:>10.4f}{len(acc):>9.3f}")
    a = report["anytime"]
    lines += ["", f"anytime loop (Top-K, epsilon 0): accuracy {a['accuracy']:.4f}, mean exit "
                  f"{a['mean_timestep']:.3f}, {100 * a['fraction_of_steps_computed']:.1f}% of steps computed, "
                  f"agrees with apply_topk: {a['agrees_with_apply_topk']}",
              "synaptic operations per sample: " + f"{sum(report['synops_per_sample']):.4g}"]
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def plot_accuracy_per_timestep(report: dict, path) -> None:
    acc = report["accuracy_per_timestep"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(acc) + 1), np.asarray(acc) * 100, "o-", label="fixed T")
    ax.axhline(report["oct"]["accuracy"] * 100, ls=":", c="gray", label="accuracy at T (= OCT)")
    ax.set_xlabel("timestep")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy per timestep (cumulative output)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_latency(report: dict, path) -> None:
    acc = report["accuracy_per_timestep"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(range(1, len(acc) + 1), np.asarray(acc) * 100, "k.-", alpha=0.5, label="fixed T")
    for rule, res in report["rules"].items():
        ax.plot(res["mean_timestep"], np.asarray(res["accuracy"]) * 100, "o-", ms=4, label=rule)
    ax.plot([report["oct"]["mean_timestep"]], [report["oct"]["accuracy"] * 100], "r*", ms=14, label="OCT (oracle)")
    ax.set_xlabel("mean exit timestep")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs latency, epsilon " + f"{min(report['epsilons'])}-{max(report['epsilons'])}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_summary(summary: dict, path) -> None:
    """Writes ``summary_figure(summary)`` to ``path``."""
    fig = summary_figure(summary)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_figure(summary: dict):
    """Accuracy and mean exit timestep against the first swept key other than seed (one line per setting
    of the others): the mean over seeds with its 95 % Student t interval (``ablation.summarise``; no bar for
    a single seed). The x axis is symmetric-log (linear within the smallest non-zero |value|), so 0 and
    small values stay apart."""
    keys = [k for k in summary["sweep"] if k != "seed"]
    x_key = keys[0] if keys else None
    lines = {}
    for g in summary["groups"]:
        rest = tuple((k, v) for k, v in g["settings"].items() if k != x_key)
        lines.setdefault(rest, []).append(g)
    topk = [f for f in summary["fields"] if f.startswith("topk_")]
    panels = ((0, "accuracy_at_T", "accuracy at T"),
              *((0, f, f"Top-K accuracy, epsilon {f.partition('@')[2]}") for f in topk if "accuracy" in f),
              *((1, f, f"Top-K mean exit, epsilon {f.partition('@')[2]}") for f in topk if "timestep" in f),
              (1, "oct_mean_timestep", "OCT mean exit (oracle)"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for rest, groups in lines.items():
        xs = np.asarray([g["settings"][x_key] if x_key else 0 for g in groups], np.float64)
        label = ", ".join(f"{k}={v}" for k, v in rest)
        for panel, field, what in panels:
            scale = 100 if "accuracy" in field else 1
            mean = np.asarray([g[field]["mean"] for g in groups]) * scale
            err = np.asarray([[0.0, 0.0] if g[field]["ci95"] is None else
                              [g[field]["mean"] - g[field]["ci95"][0], g[field]["ci95"][1] - g[field]["mean"]]
                              for g in groups]).T * scale
            axes[panel].errorbar(xs, mean, yerr=err, fmt="o-", ms=4, capsize=3,
                                 label=what + (f" ({label})" if label else ""))
    values = sorted({g["settings"][x_key] for g in summary["groups"]}) if x_key else [0]
    nonzero = [abs(v) for v in values if v != 0]
    for ax, ylabel in ((axes[0], "test accuracy (%)"), (axes[1], "mean exit timestep")):
        if x_key:
            ax.set_xscale("symlog", linthresh=min(nonzero) if nonzero else 1.0)
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:g}" for v in values])
        ax.set_xlabel(x_key or "(seeds only)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = summary["sweep"].get("seed", [])
    fig.suptitle(f"sweep: mean over {max(len(seeds), 1)} seed(s), bars: 95 % Student t interval of the mean")
    fig.tight_layout()
    return fig
