"""Writes what evaluation and sweeps return: report.json, summary.json, their figures and the printed table.

The one module the scripts call to put results on disk (``evaluation`` and ``ablation`` only return dicts):

- ``write_report(report, out_dir)``: ``report.json``, ``accuracy_per_timestep.png``,
  ``accuracy_vs_latency.png`` and ``accuracy_vs_energy.png``;
- ``write_summary(summary, workdir)``: a sweep's ``summary.json`` and ``summary.png``;
- ``summary_table(report)``: the text table ``train.py`` and ``evaluate.py`` print;
- the report statistics of a sweep (at the end): ``headline`` numbers of one report, ``summarise`` (their
  spread over seeds per setting), ``paired_contrasts`` (the effect of a swept key, paired by seed) and
  ``member_contrast`` / ``pooled`` (numbers pooled over a swept key, at seed level: ``aoi_jax.stats``).

Every JSON file aoi_jax writes is strict JSON (``to_json``): a non-finite number (NaN, +-inf) is written as
``null``, never as the ``NaN``/``Infinity`` tokens strict parsers reject. Files are written atomically.
"""

import pathlib
from collections.abc import Sequence

import numpy as np

from aoi_jax import integrity, stats
from aoi_jax.config import epsilon_index

TABLE_EPSILONS = (0.0, 0.01, 0.05)  # the epsilons of the printed table (the report has all of them)


def _pyplot():
    """matplotlib's ``pyplot`` on the Agg backend (files only, no display). Imported at the first figure, not
    with this module: a process that writes no figure does not import matplotlib at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_per_timestep(report: dict, path) -> None:
    plt = _pyplot()
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
    plt = _pyplot()
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
    plt = _pyplot()
    fig = summary_figure(summary)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_figure(summary: dict):
    """Accuracy and mean exit timestep against the first swept key other than seed (one line per setting
    of the others): the mean over seeds with its 95 % Student t interval (``summarise``; no bar for
    a single seed). The x axis is symmetric-log (linear within the smallest non-zero |value|), so 0 and
    small values stay apart."""
    plt = _pyplot()
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


SUMMARY_EPSILONS = (0.0, 0.05)  # the epsilons whose Top-K numbers a summary carries (those the report has)


def headline(report: dict, epsilons: Sequence[float] = SUMMARY_EPSILONS) -> dict[str, float]:
    """The headline numbers of one report (``evaluation.evaluate``), by field name::

        accuracy_at_1          accuracy of the cumulative output after the first step
        accuracy_at_T          and at the last step
        oct_mean_timestep      the oracle's mean exit step (1-based)
        synops_per_sample      synaptic operations per test sample, summed over layers
        topk_accuracy@e        Top-K's accuracy and mean exit step at epsilon e, for each e of
        topk_mean_timestep@e   ``epsilons`` the report holds (e written with ``:g``: "0", "0.05")
    """
    out = {"accuracy_at_1": report["accuracy_per_timestep"][0], "accuracy_at_T": report["accuracy_per_timestep"][-1],
           "oct_mean_timestep": report["oct"]["mean_timestep"],
           "synops_per_sample": float(np.sum(report["synops_per_sample"]))}
    for e in epsilons:
        i = epsilon_index(report["epsilons"], e)
        if i is not None:
            out[f"topk_accuracy@{e:g}"] = report["rules"]["topk"]["accuracy"][i]
            out[f"topk_mean_timestep@{e:g}"] = report["rules"]["topk"]["mean_timestep"][i]
    return out


def spread(values, level: float = 0.95) -> dict:
    """{mean, std (ddof 1; 0 for one value), min, max, ci95: [low, high] (Student t interval of the mean,
    ``stats.mean_interval``; None for one value)} of ``values`` (n,)."""
    v = np.asarray(values, np.float64)
    ci = stats.mean_interval(v, level) if len(v) > 1 else None
    return {"mean": float(v.mean()), "std": ci["std"] if ci else 0.0, "min": float(v.min()), "max": float(v.max()),
            "ci95": [ci["low"], ci["high"]] if ci else None}


def _settings(row: dict) -> tuple:
    """A summary row's swept settings other than the seed, ((key, value), ...): the runs that differ only in
    seed share them."""
    return tuple((k, v) for k, v in row["overrides"].items() if k != "seed")


def summarise(member_list: Sequence, reports: Sequence[dict],
              epsilons: Sequence[float] = SUMMARY_EPSILONS) -> dict:
    """The sweep's summary: each member's ``headline`` numbers, and their spread over seeds.

    ``member_list``: the sweep's members (``sweep.Member``: ``name``, ``overrides``), one per report.

    Members that differ only in ``seed`` form a group; for each field a group gives the mean, sample std
    (ddof 1), min, max and the 95 % Student t interval of the mean over its seeds (``stats.mean_interval``;
    None for a single seed).

    Returns:
      {"fields": [headline field names],
       "members": [{name, overrides, <field>: number, ...}],
       "groups": [{settings: {key: value, no seed}, seeds, <field>: {mean, std, min, max, ci95}, ...}]}.
    """
    rows = [{"name": m.name, "overrides": dict(m.overrides), **headline(report, epsilons)}
            for m, report in zip(member_list, reports, strict=True)]
    fields = [k for k in rows[0] if k not in ("name", "overrides")]
    groups = {}
    for row in rows:
        groups.setdefault(_settings(row), []).append(row)
    out = [{"settings": dict(settings), "seeds": [r["overrides"].get("seed") for r in group],
            **{f: spread([r[f] for r in group]) for f in fields}} for settings, group in groups.items()]
    return {"fields": fields, "members": rows, "groups": out}


def paired_contrasts(summary: dict, field: str, key: str, baseline, level: float = 0.95) -> list[dict]:
    """The effect of ``key`` on ``field``, paired by seed: for each setting with ``key`` != ``baseline``::

        d_s = field[key = v, seed = s] - field[key = baseline, seed = s]     (the other settings equal)

    summarised by ``stats.mean_interval`` (Student t interval of ``level`` over the seeds, df = seeds - 1).

    Args:
      summary: ``summarise``'s output (its "members").  field: a headline field, e.g.
        "topk_mean_timestep@0".  key: a swept key, e.g. "reg.alpha".  baseline: its reference value.
    Returns:
      [{settings, seeds, differences, mean, ci95: [low, high] (None for one seed), df (seeds - 1)}], in
      summary order.
    Raises:
      ValueError: a setting has no baseline run, or its seeds differ from the baseline's.
    """
    by_setting = {}
    for row in summary["members"]:
        by_setting.setdefault(_settings(row), {})[row["overrides"].get("seed")] = row[field]
    out = []
    for settings, values in by_setting.items():
        if dict(settings)[key] == baseline:
            continue
        base = tuple((k, baseline if k == key else v) for k, v in settings)
        if base not in by_setting:
            raise ValueError(f"no run with {key} = {baseline} for the settings {dict(settings)}")
        seeds, d = stats.paired_differences(values, by_setting[base])
        ci = stats.mean_interval(d, level) if len(d) > 1 else None
        out.append({"settings": dict(settings), "seeds": seeds, "differences": d.tolist(), "mean": float(d.mean()),
                    "ci95": [ci["low"], ci["high"]] if ci else None, "df": len(d) - 1})
    return out


def _seed_interval(values, seeds, level: float = 0.95) -> dict:
    """{mean, ci95, df, members}: ``stats.cluster_mean_interval`` over the seeds (the mean alone, ci95
    None and df 0, for one seed)."""
    if len(set(seeds)) < 2:
        return {"mean": float(np.mean(values)), "ci95": None, "df": 0, "members": len(values)}
    r = stats.cluster_mean_interval(values, seeds, level)
    return {"mean": r["mean"], "ci95": [r["low"], r["high"]], "df": r["df"], "members": r["members"]}


def pooled(summary: dict, field: str, level: float = 0.95) -> dict:
    """``field`` pooled over every member of a sweep (all settings and seeds) at seed level::

        x_s  = mean of field over the members of seed s        (S seeds)
        mean = mean_s x_s,  ci95 = Student t interval over the x_s, df = S - 1

    The members of one seed share the initialisation, batch order and calibration key, so they are not
    independent samples: an interval over the members would be too narrow.

    Returns:
      {mean, ci95: [low, high] (None for one seed), df, members}.
    """
    rows = summary["members"]
    return _seed_interval([r[field] for r in rows], [r["overrides"].get("seed") for r in rows], level)


def member_contrast(treated: dict, baseline: dict, field: str, level: float = 0.95) -> dict:
    """``field`` of ``treated`` minus ``baseline``, paired by member, pooled at seed level::

        d_m  = treated[m] - baseline[m]      for each member m (the same swept settings and seed)
        x_s  = mean of d_m over the members of seed s
        mean = mean_s x_s,  ci95 = Student t interval over the x_s, df = S - 1

    E.g. two losses' sweeps (4 alphas x 5 seeds: 5 seed means, 4 degrees of freedom), or two evaluations
    of the same weights.

    Args:
      treated, baseline: ``summarise`` outputs of sweeps with the same member names.
    Returns:
      {mean, ci95: [low, high] (None for one seed), df, members}.
    Raises:
      ValueError: the member names differ (``stats.paired_differences``).
    """
    t, b = ({r["name"]: r for r in s["members"]} for s in (treated, baseline))
    names, d = stats.paired_differences({k: v[field] for k, v in t.items()}, {k: v[field] for k, v in b.items()})
    return _seed_interval(d, [t[k]["overrides"].get("seed") for k in names], level)
