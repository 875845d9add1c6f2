"""Result files are strict JSON: a non-finite number is written as null. The sweep summary figure: a
symmetric-log alpha axis (0 and the smallest alpha apart) and bars that are the summary's 95 % intervals."""

import json

import numpy as np
import pytest

from aoi_jax import config, integrity, reporting, sweep


def strict_load(text):
    """json.loads that rejects the NaN / Infinity tokens, as strict parsers (JavaScript, jq, Go) do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null(tmp_path):
    obj = {"a": [1.0, float("nan"), np.float32(np.inf)], "b": {"c": -np.inf, "d": (np.float64(0.5), 2)},
           "e": "NaN", "f": True, "g": None}
    want = {"a": [1.0, None, None], "b": {"c": None, "d": [0.5, 2]}, "e": "NaN", "f": True, "g": None}
    assert strict_load(integrity.to_json(obj)) == want
    reporting.write_json(tmp_path / "report.json", obj)
    assert strict_load((tmp_path / "report.json").read_text()) == want
    with pytest.raises(ValueError, match="non-standard JSON token NaN"):
        strict_load(json.dumps({"x": float("nan")}))                   # what json.dumps writes by default


@pytest.fixture
def summary():
    cfg = config.Config(model=config.ModelConfig(channels=(4, 8), num_classes=3))
    mem = sweep.members(cfg, config.parse_sweep(["reg.alpha=0,0.005,0.08", "seed=0,1,2"]))
    reports = []
    for i, m in enumerate(mem):
        acc = 0.5 + 0.01 * i
        reports.append({"epsilons": [0.0, 0.05], "accuracy_per_timestep": [0.1, acc],
                        "oct": {"accuracy": acc, "mean_timestep": 1.0 + 0.1 * i}, "synops_per_sample": [10.0],
                        "rules": {"topk": {"accuracy": [acc, acc - 0.1], "mean_timestep": [3.0 + (i % 3), 2.0]}}})
    return {"sweep": {"reg.alpha": [0.0, 0.005, 0.08], "seed": [0, 1, 2]}, **reporting.summarise(mem, reports)}


def test_summary_figure_symlog_axis_and_interval_bars(summary, tmp_path):
    fig = reporting.summary_figure(summary)
    acc_ax, exit_ax = fig.axes
    for ax in (acc_ax, exit_ax):
        assert ax.get_xscale() == "symlog"
        assert ax.xaxis.get_transform().linthresh == 0.005               # the smallest non-zero alpha
        np.testing.assert_array_equal(ax.get_xticks(), [0.0, 0.005, 0.08])
        x0, x1 = ax.transData.transform([(0.0, 0.0), (0.005, 0.0)])[:, 0]
        assert x1 - x0 > 20                                                 # pixels apart at 100 dpi
    labels = [c.get_label() for c in exit_ax.containers]
    assert labels == ["Top-K mean exit, epsilon 0", "Top-K mean exit, epsilon 0.05", "OCT mean exit (oracle)"]
    # Top-K exit at epsilon 0 is 3, 4, 5 over the seeds of every alpha: mean 4, interval 4 +- t(0.975, 2) / sqrt(3)
    topk = exit_ax.containers[0]
    segments = topk.lines[2][0].get_segments()
    half = 4.302653 * 1.0 / np.sqrt(3)
    for seg in segments:
        np.testing.assert_allclose(seg[:, 1], [4 - half, 4 + half], atol=1e-5)
    reporting.plot_summary(summary, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_table_and_figures_show_every_rule_the_report_scores():
    """A report scoring a registered rule ("margin") besides Top-K: its rows in the table (at the table's
    epsilons only) and its line in both trade-off figures, with the report's values."""
    cost = {"synops": [10.0, 8.0], "energy_uj": [1.0, 0.5], "decision_ms": [20.0, 10.0]}
    report = {"accuracy_per_timestep": [0.5, 0.9], "oct": {"accuracy": 0.9, "mean_timestep": 1.2},
              "epsilons": [0.0, 0.05, 0.2],
              "rules": {"topk": {"accuracy": [0.9, 0.88, 0.8], "mean_timestep": [1.5, 1.4, 1.1]},
                        "margin": {"accuracy": [0.9, 0.85, 0.7], "mean_timestep": [2.0, 1.25, 1.0]}},
              "cost": {"rules": {r: {k: v + [0.1] for k, v in cost.items()} for r in ("topk", "margin")},
                       "fixed_t": cost, "oct": {"synops": 9.0, "energy_uj": 0.8, "decision_ms": 12.0},
                       "ann_macs": 100, "ann_energy_uj": 2.0, "e_ac_pj": 0.9, "e_mac_pj": 4.6, "macs_per_layer": [60]},
              "anytime": {"slots": 4, "accuracy": 0.9, "mean_timestep": 1.5, "fraction_of_steps_computed": 0.8,
                          "agrees_with_apply_topk": True}, "warnings": []}
    rows = [line.split() for line in reporting.summary_table(report).splitlines() if line.startswith("margin ")]
    assert [row[:4] for row in rows] == [["margin", "0.00", "0.9000", "2.000"], ["margin", "0.05", "0.8500", "1.250"]]
    for figure, x in ((reporting.latency_figure(report), [2.0, 1.25, 1.0]),
                      (reporting.energy_figure(report), [1.0, 0.5, 0.1])):
        (line,) = [ln for ln in figure.axes[0].get_lines() if ln.get_label() == "margin"]
        np.testing.assert_array_equal(line.get_xdata(), x)
        np.testing.assert_array_equal(line.get_ydata(), np.asarray([0.9, 0.85, 0.7]) * 100)
