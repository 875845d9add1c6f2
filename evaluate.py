"""Evaluate a trained SNN with every exit rule: accuracy against latency.

    python evaluate.py --workdir runs/ndigits          # the newest checkpoint of a train.py run
    python evaluate.py --checkpoint runs/x/checkpoints --step 900 --out runs/x/eval_900
                       [--data-dir DIR] [--calib-dropout 0.3] [--min-support 0]

The model is rebuilt from the config stored in the checkpoint (neuron settings included) and a
mismatch between stored weights and that config is an error. One pass over the training split
(calibration, with the configured dropout on spikes, seeded) and one over the test split give per-step
logits; ``aoi_jax.cutoff`` scores every exit rule at every epsilon on them. Writes into the output
folder ``report.json`` and two figures, ``accuracy_per_timestep.png`` and ``accuracy_vs_latency.png``,
and prints a summary table.
"""

if __name__ == "__main__":  # first, before jax loads: it may restart this command with huge pages on
    from aoi_jax import hugepages

    hugepages.reexec_with_huge_pages()

import argparse
import dataclasses
import functools
import json
import logging
import pathlib
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx
from tqdm import tqdm

from aoi_jax import anytime, checkpoint, convert, cutoff, data, parallel, step
from aoi_jax import config as config_lib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("aoi_jax")

REPORT_EPSILONS = (0.0, 0.01, 0.05)


def padded_batches(frameset, batch_size, mesh, desc):
    """Test-order batches, each padded to a multiple of the mesh size and sharded.

    Padding repeats the last sample, so it exits the anytime loop with it. Yields (batch, n_valid): the
    rows past n_valid are padding.
    """
    n_dev = mesh.devices.size
    n_batches = data.num_batches(len(frameset.labels), batch_size, drop_last=False)
    for batch in tqdm(data.batches(frameset, batch_size), total=n_batches, desc=desc, leave=False,
                      dynamic_ncols=True):
        n = len(batch["label"])
        pad = -n % n_dev
        if pad:
            batch = {"frames": np.pad(batch["frames"], [(0, 0), (0, pad)] + [(0, 0)] * 3, mode="edge"),
                     "label": np.pad(batch["label"], (0, pad), mode="edge")}
        yield parallel.shard_batch(batch, mesh), n


def collect(eval_step, state, frameset, batch_size, key, mesh, desc="eval"):
    """Per-step logits (T, N, K), labels (N,) and spike totals per layer and step (L, T) of a split."""
    logits, labels, spikes = [], [], 0.0
    for i, (batch, n) in enumerate(padded_batches(frameset, batch_size, mesh, desc)):
        out, counts = eval_step(state.params, state.batch_stats, batch["frames"], jax.random.fold_in(key, i))
        logits.append(parallel.to_host(out)[:, :n])
        labels.append(parallel.to_host(batch["label"])[:n])
        spikes = spikes + parallel.to_host(counts)[:, :, :n].sum(-1)
    return np.concatenate(logits, axis=1), np.concatenate(labels), spikes


def accuracy(eval_step, state, frameset, batch_size, mesh) -> float:
    """Accuracy at T (argmax of the summed logits) over a split."""
    logits, labels, _ = collect(eval_step, state, frameset, batch_size, jax.random.key(0), mesh, "test")
    return float(np.mean(logits.sum(0).argmax(-1) == labels))


class EvalFunctions(NamedTuple):
    """The compiled functions of one model structure; members of a sweep share them (one compile)."""

    calib_step: Callable  # step.make_eval_step with calibration dropout
    test_step: Callable  # step.make_eval_step without dropout
    run_topk: Callable  # jitted anytime.run_topk


def make_eval_functions(graphdef, cfg: config_lib.Config) -> EvalFunctions:
    """``EvalFunctions`` for ``graphdef``, compiled with the same XLA options as the eval step (so the
    anytime loop and the multistep logits see the same arithmetic)."""
    return EvalFunctions(step.make_eval_step(graphdef, dropout=cfg.eval.calib_dropout),
                         step.make_eval_step(graphdef),
                         jax.jit(functools.partial(anytime.run_topk, graphdef), compiler_options=step.compiler_options()))


def anytime_check(run_topk, state, frameset, beta, batch_size, mesh):
    """Runs the step-by-step early-exit loop (``run_topk(params, batch_stats, frames, beta)``) on a split;
    returns predictions, exit timesteps and the fraction of (sample, step) frames actually computed (a
    batch runs until its last sample exits)."""
    preds, steps, computed, total = [], [], 0, 0
    for batch, n in padded_batches(frameset, batch_size, mesh, "anytime"):
        res = run_topk(state.params, state.batch_stats, batch["frames"], beta)
        preds.append(parallel.to_host(res.predictions)[:n])
        steps.append(parallel.to_host(res.timesteps)[:n])
        computed += int(res.steps_computed) * n
        total += batch["frames"].shape[0] * n
    return np.concatenate(preds), np.concatenate(steps), computed / total


def evaluate(graphdef, state, cfg: config_lib.Config, fan_out, train_set, test_set, out_dir: pathlib.Path,
             key, mesh=None, functions: EvalFunctions | None = None) -> dict:
    """Calibrates on ``train_set``, scores every rule on ``test_set``, writes the report and figures.

    ``functions``: ``make_eval_functions(graphdef, cfg)``, built here when not given (a sweep passes the
    same ones for every member). Only process 0 writes files; every process returns the report.
    """
    mesh = parallel.data_mesh() if mesh is None else mesh
    fns = make_eval_functions(graphdef, cfg) if functions is None else functions
    logits_c, labels_c, _ = collect(fns.calib_step, state, train_set, cfg.eval.batch_size, key, mesh, "calibration")
    logits_t, labels_t, spikes = collect(fns.test_step, state, test_set, cfg.eval.batch_size, key, mesh, "test")

    cum_c, cum_t = cutoff.cumulative(jnp.asarray(logits_c)), cutoff.cumulative(jnp.asarray(logits_t))
    epsilons = jnp.asarray(cfg.eval.epsilons, jnp.float32)
    result = jax.device_get(cutoff.sweep(cum_c, jnp.asarray(labels_c), cum_t, jnp.asarray(labels_t), epsilons,
                                         bins=cfg.eval.bins, min_support=cfg.eval.min_support))
    beta0 = cutoff.calibrate_topk(cum_c, jnp.asarray(labels_c), epsilon=0.0, bins=cfg.eval.bins,
                                  min_support=cfg.eval.min_support)
    pred_a, steps_a, frac = anytime_check(fns.run_topk, state, test_set, beta0, cfg.eval.batch_size, mesh)
    pred_m, steps_m = cutoff.apply_topk(cum_t, beta0)

    n_test = len(labels_t)
    per_sample_spikes = spikes.sum(1) / n_test                      # (L,)
    report = {
        "config": config_lib.to_dict(cfg),
        "n_calibration": int(len(labels_c)), "n_test": int(n_test),
        "accuracy_per_timestep": result["fixed_t_accuracy"].tolist(),
        "oct": {"accuracy": float(result["oct_accuracy"]), "mean_timestep": float(result["oct_timestep"])},
        "epsilons": [float(e) for e in cfg.eval.epsilons],
        "rules": {rule: {"accuracy": result["rules"][rule]["accuracy"].tolist(),
                         "mean_timestep": result["rules"][rule]["mean_timestep"].tolist()}
                  for rule in result["rules"]},
        "topk_beta": result["topk_beta"].tolist(),
        "spikecp_qhat": result["spikecp_qhat"].tolist(),
        "entropy_threshold": result["entropy_threshold"].tolist(),
        "anytime": {"epsilon": 0.0, "accuracy": float(np.mean(pred_a == labels_t)),
                    "mean_timestep": float(steps_a.mean()), "fraction_of_steps_computed": frac,
                    "agrees_with_apply_topk": bool(np.array_equal(pred_a, np.asarray(pred_m))
                                                   and np.array_equal(steps_a, np.asarray(steps_m)))},
        "spikes_per_sample": per_sample_spikes.tolist(),
        "spikes_per_sample_per_timestep": (spikes / n_test).tolist(),
        "fan_out": list(fan_out),
        "synops_per_sample": (per_sample_spikes * np.asarray(fan_out)).tolist(),
    }
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        plot_accuracy_per_timestep(report, out_dir / "accuracy_per_timestep.png")
        plot_accuracy_vs_latency(report, out_dir / "accuracy_vs_latency.png")
        print(summary_table(report))
    return report


def summary_table(report) -> str:
    acc = report["accuracy_per_timestep"]
    lines = ["", "accuracy per timestep: " + "  ".join(f"{t + 1}:{a:.4f}" for t, a in enumerate(acc)),
             f"OCT (oracle): accuracy {report['oct']['accuracy']:.4f}, mean timestep "
             f"{report['oct']['mean_timestep']:.3f}", "",
             f"{'rule':<12}{'epsilon':>9}{'accuracy':>10}{'mean T':>9}"]
    eps = report["epsilons"]
    for rule, res in report["rules"].items():
        for i, e in enumerate(eps):
            if any(abs(e - r) < 1e-9 for r in REPORT_EPSILONS):
                lines.append(f"{rule:<12}{e:>9.2f}{res['accuracy'][i]:>10.4f}{res['mean_timestep'][i]:>9.3f}")
    lines.append(f"{'fixed T':<12}{'':>9}{acc[-1]:>10.4f}{len(acc):>9.3f}")
    a = report["anytime"]
    lines += ["", f"anytime loop (Top-K, epsilon 0): accuracy {a['accuracy']:.4f}, mean exit "
                  f"{a['mean_timestep']:.3f}, {100 * a['fraction_of_steps_computed']:.1f}% of steps computed, "
                  f"agrees with apply_topk: {a['agrees_with_apply_topk']}",
              "synaptic operations per sample: " + f"{sum(report['synops_per_sample']):.4g}"]
    return "\n".join(lines)


def plot_accuracy_per_timestep(report, path):
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


def plot_accuracy_vs_latency(report, path):
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a train.py workdir: its checkpoints/ are read, the report goes there")
    src.add_argument("--checkpoint", help="an orbax checkpoint folder (holding step folders)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--out", help="output folder (default: the workdir, or the checkpoint's parent)")
    p.add_argument("--data-dir", help="where the data set lives, if not where training read it")
    p.add_argument("--calib-dropout", type=float, help="dropout on spikes during calibration (0 = off)")
    p.add_argument("--min-support", type=int, help="Top-K: calibration samples a threshold needs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    ckpt_dir = pathlib.Path(args.checkpoint) if args.checkpoint else pathlib.Path(args.workdir) / "checkpoints"
    out = pathlib.Path(args.out) if args.out else (pathlib.Path(args.workdir) if args.workdir else ckpt_dir.parent)
    graphdef, state, cfg, input_shape = checkpoint.restore(ckpt_dir, args.step)
    if args.data_dir:
        cfg = config_lib.override(cfg, "data.data_dir", args.data_dir)
    if args.calib_dropout is not None:
        cfg = config_lib.override(cfg, "eval.calib_dropout", args.calib_dropout)
    if args.min_support is not None:
        cfg = config_lib.override(cfg, "eval.min_support", args.min_support)
    if cfg.model.activation == "qcfs":                                   # a QCFS ANN: evaluate its SNN
        snn_model, graphdef, params, batch_stats = convert.convert(cfg.model, input_shape, state.params,
                                                                   state.batch_stats)
        state = step.TrainState(state.step, params, batch_stats, ())
        cfg = config_lib.override(cfg, "model.activation", snn_model.activation)
    log.info("restored %s step %d (%s, %s, neuron %s)", ckpt_dir, int(state.step), cfg.model.name,
             cfg.model.activation, dataclasses.asdict(cfg.model.neuron))
    train_set, test_set = data.load(cfg.data)
    if tuple(train_set.frames.shape[2:]) != tuple(input_shape):
        raise ValueError(f"data frames {train_set.frames.shape[2:]} do not match the checkpoint's input shape "
                         f"{tuple(input_shape)}")
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    calib_key = jax.random.split(jax.random.key(cfg.seed))[1]          # the key train.py calibrates with
    evaluate(graphdef, state, cfg, model.fan_out, train_set, test_set, out, calib_key)


if __name__ == "__main__":
    main()
