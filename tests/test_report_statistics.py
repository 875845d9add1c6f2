"""The report statistics of a sweep (``aoi_jax.reporting``): headline numbers, the summary over seeds,
contrasts paired by seed, and numbers pooled over a swept key at seed level, against hand computations."""

import numpy as np
import pytest

from aoi_jax import config, reporting
from aoi_jax import sweep as sweep_lib


def tiny_cfg():
    return config.Config(model=config.ModelConfig(channels=(4, 8), num_classes=3),
                         optim=config.OptimConfig(lr=0.05, schedule="constant"))


def test_summarise_by_hand():
    cfg = tiny_cfg()
    mem = sweep_lib.members(cfg, config.parse_sweep(["reg.alpha=0,0.002", "seed=0,1"]))

    def report(acc, topk_acc, topk_t, oct_t=1.5):
        return {"epsilons": [0.05, 0.0, 0.01], "accuracy_per_timestep": [0.1, acc],
                "oct": {"accuracy": acc, "mean_timestep": oct_t}, "synops_per_sample": [100.0, 20.5],
                "rules": {"topk": {"accuracy": [0.6, topk_acc, 0.0], "mean_timestep": [1.0, topk_t, 9.0]}}}

    reports = [report(0.8, 0.7, 3.0), report(0.6, 0.5, 5.0), report(0.9, 0.9, 2.0, 1.0), report(0.9, 0.8, 2.5)]
    s = reporting.summarise(mem, reports)
    assert s["fields"] == ["accuracy_at_1", "accuracy_at_T", "oct_mean_timestep", "synops_per_sample", "topk_accuracy@0",
                           "topk_mean_timestep@0", "topk_accuracy@0.05", "topk_mean_timestep@0.05"]
    assert s["members"][1] == {"name": "alpha=0.0_seed=1", "overrides": {"reg.alpha": 0.0, "seed": 1},
                               "accuracy_at_1": 0.1, "accuracy_at_T": 0.6, "oct_mean_timestep": 1.5, "synops_per_sample": 120.5,
                               "topk_accuracy@0": 0.5, "topk_mean_timestep@0": 5.0,
                               "topk_accuracy@0.05": 0.6, "topk_mean_timestep@0.05": 1.0}
    g0, g1 = s["groups"]
    assert g0["settings"] == {"reg.alpha": 0.0} and g0["seeds"] == [0, 1]
    assert g0["accuracy_at_T"]["mean"] == pytest.approx(0.7)
    assert g0["accuracy_at_T"]["std"] == pytest.approx(np.sqrt(0.02))     # sample std of 0.8, 0.6
    # two seeds: half width t(0.975, 1) * s / sqrt(2) = 12.706205 * sqrt(0.125) / sqrt(2) = 12.706205 * 0.25
    spread = dict(g1["topk_mean_timestep@0"])
    assert spread.pop("ci95") == pytest.approx([2.25 - 3.176551, 2.25 + 3.176551], abs=1e-6)
    assert spread == pytest.approx({"mean": 2.25, "std": np.sqrt(0.125), "min": 2.0, "max": 2.5})
    one = reporting.summarise(mem[:1], reports[:1], epsilons=(0.01,))        # one seed: no interval
    assert one["fields"][4:] == ["topk_accuracy@0.01", "topk_mean_timestep@0.01"]
    assert one["groups"][0]["oct_mean_timestep"] == {"mean": 1.5, "std": 0.0, "min": 1.5, "max": 1.5, "ci95": None}

    # paired by seed against alpha = 0: Top-K mean exit differences (2.0 - 3.0, 2.5 - 5.0) = (-1, -2.5):
    # mean -1.75, s = sqrt(1.125), half width 12.706205 * sqrt(1.125) / sqrt(2) = 12.706205 * 0.75
    (c,) = reporting.paired_contrasts(s, "topk_mean_timestep@0", "reg.alpha", 0.0)
    assert c["settings"] == {"reg.alpha": 0.002} and c["seeds"] == [0, 1] and c["differences"] == [-1.0, -2.5]
    assert c["df"] == 1 and c["mean"] == -1.75 and c["ci95"] == pytest.approx([-1.75 - 9.529654, -1.75 + 9.529654], abs=1e-6)
    with pytest.raises(ValueError, match=r"no run with reg.alpha = 0.01 for the settings \{'reg.alpha': 0.0\}"):
        reporting.paired_contrasts(s, "accuracy_at_T", "reg.alpha", 0.01)
    with pytest.raises(ValueError, match=r"only treated: \[\], only baseline: \[1\]"):
        reporting.paired_contrasts(reporting.summarise(mem[:3], reports[:3]), "accuracy_at_T", "reg.alpha", 0.0)



def clustered_summary(offset=0.0):
    """A summary of 4 alphas x 3 seeds whose Top-K exit at epsilon 0 is ``CLUSTERED[seed][alpha] + offset``
    (the members of a seed share a large offset)."""
    clustered = [[0, 2, 1, 1], [1, 3, 2, 2], [5, 7, 6, 6]]
    mem = sweep_lib.members(tiny_cfg(), config.parse_sweep(["reg.alpha=0,0.002,0.01,0.05", "seed=0,1,2"]))
    reports = [{"epsilons": [0.0], "accuracy_per_timestep": [0.5, 0.9], "oct": {"mean_timestep": 2.0},
                "synops_per_sample": [1.0], "rules": {"topk": {"accuracy": [0.9], "mean_timestep": [
                    clustered[m.cfg.seed][[0, 0.002, 0.01, 0.05].index(m.cfg.reg.alpha)] + offset]}}}
               for m in mem]
    return reporting.summarise(mem, reports, epsilons=(0.0,))


def test_pooled_numbers_average_within_seed_first():
    s = clustered_summary()
    # seed means 1, 2, 6 -> mean 3, h = t(0.975, 2) * sqrt(7 / 3) = 4.302653 * 1.527525 = 6.572411, df 2
    # (pooling the 12 members as independent would give 1.508433 with df 11: tests/test_stats.py)
    p = reporting.pooled(s, "topk_mean_timestep@0")
    assert p["df"] == 2 and p["members"] == 12 and p["mean"] == 3.0
    assert p["ci95"] == pytest.approx([3 - 6.572411, 3 + 6.572411], abs=1e-6)
    # treated - baseline per member: the offset 0.5 plus the baseline's values times 0 -> exactly 0.5
    c = reporting.member_contrast(clustered_summary(0.5), s, "topk_mean_timestep@0")
    assert c["df"] == 2 and c["members"] == 12 and c["mean"] == pytest.approx(0.5)
    assert c["ci95"] == pytest.approx([0.5, 0.5], abs=1e-12)
    # a baseline whose seeds differ by seed: treated (seed offsets 0, 1, 5 + member noise) minus a flat one
    flat = reporting.summarise(*_flat())
    c = reporting.member_contrast(s, flat, "topk_mean_timestep@0")
    assert c["ci95"] == pytest.approx([3 - 6.572411, 3 + 6.572411], abs=1e-6)
    with pytest.raises(ValueError, match="only treated"):
        reporting.member_contrast(s, reporting.summarise(*_flat(seeds="0,1")), "topk_mean_timestep@0")


def _flat(seeds="0,1,2"):
    """(members, reports) of 4 alphas x ``seeds`` whose Top-K exit at epsilon 0 is 0 everywhere."""
    mem = sweep_lib.members(tiny_cfg(), config.parse_sweep(["reg.alpha=0,0.002,0.01,0.05", f"seed={seeds}"]))
    return mem, [{"epsilons": [0.0], "accuracy_per_timestep": [0.5, 0.9], "oct": {"mean_timestep": 2.0},
                  "synops_per_sample": [1.0], "rules": {"topk": {"accuracy": [0.9], "mean_timestep": [0.0]}}}
                 for _ in mem]
