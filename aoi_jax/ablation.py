"""A sweep's report statistics: each member's headline numbers and their spread over seeds.

(The sweep itself, its members and their one compiled program, is ``aoi_jax.sweep``; its parsing
``config.parse_sweep``.)
"""

from collections.abc import Sequence

import numpy as np

from aoi_jax import config as config_lib
from aoi_jax import stats
from aoi_jax.sweep import Member

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
        i = config_lib.epsilon_index(report["epsilons"], e)
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


def summarise(member_list: Sequence[Member], reports: Sequence[dict],
              epsilons: Sequence[float] = SUMMARY_EPSILONS) -> dict:
    """The sweep's summary: each member's ``headline`` numbers, and their spread over seeds.

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


def paired_contrasts(summary: dict, field: str, key: str, baseline) -> list[dict]:
    """The effect of ``key`` on ``field``, paired by seed: for each setting with ``key`` != ``baseline``::

        d_s = field[key = v, seed = s] - field[key = baseline, seed = s]     (the other settings equal)

    summarised by ``stats.mean_interval`` (95 % Student t interval over the seeds).

    Args:
      summary: ``summarise``'s output (its "members").  field: a headline field, e.g.
        "topk_mean_timestep@0".  key: a swept key, e.g. "reg.alpha".  baseline: its reference value.
    Returns:
      [{settings, seeds, differences, mean, ci95: [low, high] (None for one seed)}], in summary order.
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
        ci = stats.mean_interval(d) if len(d) > 1 else None
        out.append({"settings": dict(settings), "seeds": seeds, "differences": d.tolist(), "mean": float(d.mean()),
                    "ci95": [ci["low"], ci["high"]] if ci else None})
    return out
