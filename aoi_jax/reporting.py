"""Writes what evaluation and sweeps return: report.json, summary.json, their figures and the printed table.

The one module the scripts call to put results on disk (``evaluation`` and ``ablation`` only return dicts):

- ``write_report(report, out_dir)``: ``report.json``, ``accuracy_per_timestep.png``,
  ``accuracy_vs_latency.png`` and ``accuracy_vs_energy.png``;
- ``write_summary(summary, workdir)``: a sweep's ``summary.json`` and ``summary.png``;
- ``summary_table(report)``: the text table ``train.py`` and ``evaluate.py`` print.

Every JSON file aoi_jax writes is strict JSON (``to_json``): a non-finite number (NaN, +-inf) is written as
``null``, never as the ``NaN``/``Infinity`` tokens strict parsers reject. Files are written atomically.
"""

import pathlib

import matplotlib
import numpy as np

from aoi_jax import integrity
from aoi_jax.config import epsilon_index

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TABLE_EPSILONS = (0.0, 0.01, 0.05)  # the epsilons of the printed table (the report has all of them)


def write_json(path: pathlib.Path, obj) -> None:
    """``integrity.strict(obj)`` as JSON into ``path``, atomically (``integrity.write_json_atomic``)."""
    integrity.write_json_atomic(path, integrity.strict(obj))


def write_report(report: dict, out_dir) -> None:
    """Writes ``report.json`` and the three figures of one evaluated run into ``out_dir`` (created)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    plot_accuracy_per_timestep(report, out_dir / "accuracy_per_timestep.png")
    plot_accuracy_vs_latency(report, out_dir / "accuracy_vs_latency.png")
    plot_accuracy_vs_energy(report, out_dir / "accuracy_vs_energy.png")


def write_summary(summary: dict, workdir) -> None:
    """Writes a sweep's ``summary.json`` and ``summary.png`` into ``workdir``."""
    workdir = pathlib.Path(workdir)
    write_json(workdir / "summary.json", summary)
    plot_summary(summary, workdir / "summary.png")


def table_epsilons(report: dict) -> list[float]:
    """The report's epsilons that the printed table shows (those of ``TABLE_EPSILONS``)."""
    return [e for e in report["epsilons"] if epsilon_index(TABLE_EPSILONS, e) is not None]


def _served(report: dict, rule: str, epsilon: float):
    """samples/s of ``report["serve"]`` (evaluate.py --serve) for a rule at an epsilon, or None."""
    row = report.get("serve", {}).get("rules", {}).get(rule)
    if row is None:
        return None
    i = epsilon_index(row["epsilons"], epsilon)
    return None if i is None else row["samples_per_s"][i]


def summary_table(report: dict) -> str:
    """The printed table: accuracy per timestep, OCT, each rule at ``TABLE_EPSILONS`` with the mean synaptic
    operations, energy and decision time per sample up to its exit (and samples/s of continuous batching
    when the report has ``serve``), fixed T, the equivalent ANN's energy, the continuous-batching check."""
    acc = report["accuracy_per_timestep"]
    costs = report["cost"]
    timed = costs["fixed_t"]["decision_ms"] is not None                # event data: bins have a duration
    serve = report.get("serve")

    def cells(synops, energy, decision, served):
        return (f"{synops:>11.4g}{energy:>11.4g}" + (f"{decision:>12.1f}" if timed else "")
                + ("" if serve is None else f"{served:>11.0f}" if served is not None else f"{'':>11}"))

    lines = ["", "accuracy per timestep: " + "  ".join(f"{t + 1}:{a:.4f}" for t, a in enumerate(acc)),
             f"OCT (oracle): accuracy {report['oct']['accuracy']:.4f}, mean timestep "
             f"{report['oct']['mean_timestep']:.3f}, energy {costs['oct']['energy_uj']:.4g} uJ", "",
             f"{'rule':<12}{'epsilon':>9}{'accuracy':>10}{'mean T':>9}{'synops':>11}{'energy uJ':>11}"
             + (f"{'decision ms':>12}" if timed else "") + ("" if serve is None else f"{'samples/s':>11}")]
    shown = table_epsilons(report)
    for rule, res in report["rules"].items():
        c = costs["rules"][rule]
        for i, e in enumerate(report["epsilons"]):
            if e in shown:
                lines.append(f"{rule:<12}{e:>9.2f}{res['accuracy'][i]:>10.4f}{res['mean_timestep'][i]:>9.3f}"
                             + cells(c["synops"][i], c["energy_uj"][i], c["decision_ms"][i] if timed else None,
                                     _served(report, rule, e)))
    f = costs["fixed_t"]
    lines.append(f"{'fixed T':<12}{'':>9}{acc[-1]:>10.4f}{len(acc):>9.3f}"
                 + cells(f["synops"][-1], f["energy_uj"][-1], f["decision_ms"][-1] if timed else None,
                         None if serve is None else serve["fixed_t"]["samples_per_s"]))
    a = report["anytime"]
    lines += ["", f"equivalent ANN: {costs['ann_macs']:.4g} MACs, {costs['ann_energy_uj']:.4g} uJ per sample "
                  f"({costs['e_mac_pj']} pJ per MAC; the SNN {costs['e_ac_pj']} pJ per accumulate, its first layer "
                  f"{costs['macs_per_layer'][0]:.4g} MACs per step)",
              f"anytime loop (Top-K, epsilon 0): continuous batching with {a['slots']} slots, accuracy "
              f"{a['accuracy']:.4f}, mean exit {a['mean_timestep']:.3f}, {100 * a['fraction_of_steps_computed']:.1f}% "
              f"of N x T steps computed, agrees with apply_topk: {a['agrees_with_apply_topk']}"]
    if serve is not None:
        lines.append(f"samples/s: continuous batching with {serve['slots']} slots on the test set (median of "
                     f"{serve['rounds']} passes)")
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    _save(fig, path)


def _tradeoff_figure(report: dict, *, fixed_t, rules: dict, oct_x, xlabel: str, what: str, ann_x=None):
    """Test accuracy against a cost per sample: fixed T at every t (``fixed_t`` (T,)), each rule over the
    report's epsilons (``rules``: {rule: (E,)}), OCT (``oct_x``), and an optional vertical line at ``ann_x``."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(fixed_t, np.asarray(report["accuracy_per_timestep"]) * 100, "k.-", alpha=0.5,
            label="fixed T" if ann_x is None else "fixed T (t = 1..T)")
    for rule, res in report["rules"].items():
        ax.plot(rules[rule], np.asarray(res["accuracy"]) * 100, "o-", ms=4, label=rule)
    ax.plot([oct_x], [report["oct"]["accuracy"] * 100], "r*", ms=14, label="OCT (oracle)")
    if ann_x is not None:
        ax.axvline(ann_x, ls=":", c="gray", label="equivalent ANN, one pass")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy vs {what}, epsilon {min(report['epsilons'])}-{max(report['epsilons'])}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def latency_figure(report: dict):
    """Accuracy against the mean exit timestep (the paper's figure): every rule the report scores over its
    epsilons, fixed T at every t, OCT."""
    return _tradeoff_figure(report, fixed_t=range(1, len(report["accuracy_per_timestep"]) + 1),
                            rules={rule: res["mean_timestep"] for rule, res in report["rules"].items()},
                            oct_x=report["oct"]["mean_timestep"], xlabel="mean exit timestep", what="latency")


def energy_figure(report: dict):
    """Accuracy against energy per sample (uJ, up to each exit): every rule the report scores over its
    epsilons, fixed T at every t, OCT; the equivalent ANN's energy as a vertical line."""
    costs = report["cost"]
    return _tradeoff_figure(report, fixed_t=costs["fixed_t"]["energy_uj"],
                            rules={rule: c["energy_uj"] for rule, c in costs["rules"].items()},
                            oct_x=costs["oct"]["energy_uj"], ann_x=costs["ann_energy_uj"], what="energy",
                            xlabel=f"energy per sample (uJ; {costs['e_ac_pj']} pJ/AC, {costs['e_mac_pj']} pJ/MAC)")


def plot_accuracy_vs_latency(report: dict, path) -> None:
    """Writes ``latency_figure(report)`` to ``path``."""
    _save(latency_figure(report), path)


def plot_accuracy_vs_energy(report: dict, path) -> None:
    """Writes ``energy_figure(report)`` to ``path``."""
    _save(energy_figure(report), path)


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
