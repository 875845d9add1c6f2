"""Train-step memory with and without rematerialisation (``model.remat``), at T=10 and T=40.

For each model and T, four compilations of the train step (``aoi_jax.step.make_train_step``):

- ``plain``: ``model.remat=False``, no compiler options;
- ``plain+options``: the same program with the XLA:CPU options that remat needs (``xla_tuning.compiler_options``
  with ``remat=True``: memory-optimised scheduler, optimisation barriers kept), to separate their share
  from remat's;
- ``remat``: ``model.remat=True`` (``models.SpikingLayer``: each spiking layer one ``jax.checkpoint``, with
  optimisation barriers over its inputs and outputs), no compiler options: XLA:CPU then merges the
  recomputation with the forward pass, which the FLOPs show;
- ``remat+options``: the same with those options, as a caller on XLA:CPU should compile it.

Printed: XLA's ``memory_analysis().temp_size_in_bytes`` (activations and other temporaries; parameters
and optimiser state are arguments, not temporaries), its ratio to ``plain``'s, the program's GFLOP
(recomputation shows there; off CPU counted on the step lowered for the CPU, which needs
``JAX_PLATFORMS=cuda,cpu``, else nan) and, with ``--rss``, the resident memory of a fresh process before
one step and its peak during the step (Linux ``VmHWM``, reset after compilation; it includes the runtime,
the parameters and the inputs, so the step's own share is peak minus before), and that first step's time.
Models: ``vggsnn`` (VGGSNN, batch 8, 2x128x128) and ``ndigits`` (the small SNN, batch 32, 2x34x34;
``small_snn`` is accepted for it).

    python -m benchmarks.memory                          # vggsnn and ndigits, T = 10 and 40
    python -m benchmarks.memory --models vggsnn --T 40
    python -m benchmarks.memory --models vggsnn --T 40 --rss
    JAX_PLATFORMS=cuda,cpu python -m benchmarks.memory --models vggsnn --T 10,40   # on a GPU
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {
    "vggsnn": ("configs/cifar10_dvs.py", ["train.batch_size=8"], (128, 128, 2)),
    "ndigits": ("configs/ndigits.py", [], (34, 34, 2)),
}
MODELS["small_snn"] = MODELS["ndigits"]
VARIANTS = ("plain", "plain+options", "remat", "remat+options")


def build(model_name, T, variant):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from aoi_jax import config, models, step, xla_tuning

    path, sets, shape = MODELS[model_name]
    cfg = config.load(ROOT / path, list(sets) + [f"data.timesteps={T}"])
    options = xla_tuning.compiler_options("auto", remat=True) if "+options" in variant else None
    cfg = config.override(cfg, "model.remat", variant.startswith("remat"))
    model = models.build(cfg.model, shape, rngs=nnx.Rngs(0))
    opt = step.make_optimizer(cfg.optim, 1000)
    graphdef, state = step.init_state(model, opt)
    B = cfg.train.batch_size
    rng = np.random.default_rng(0)
    batch = {"frames": jnp.asarray(rng.poisson(0.3, (T, B, *shape)).astype(np.float32)),
             "label": jnp.asarray(rng.integers(0, cfg.model.num_classes, B), jnp.int32)}
    train_step = step.make_train_step(graphdef, cfg, opt, compiler_options=options)
    weights = step.loss_weights(cfg)
    return train_step.lower(state, batch, weights).compile(), (state, batch, weights), train_step


def analyse(model_name, T, variant):
    """XLA's temporaries and the step's GFLOP (recomputation included). Off CPU the FLOPs are counted on
    the step lowered for the CPU: a GPU's cost analysis leaves out its cuDNN convolutions."""
    import jax

    compiled, args, fn = build(model_name, T, variant)
    if jax.default_backend() == "cpu":
        flops = compiled.cost_analysis()["flops"]
    else:
        try:
            flops = fn.lower(*jax.device_put(args, jax.devices("cpu")[0])).cost_analysis()["flops"]
        except RuntimeError:                                   # no CPU backend in this process
            flops = float("nan")
    return {"temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2 ** 20, "gflop": flops / 1e9}


def _status_mib(field):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss_worker(model_name, T, variant):
    """Runs in a fresh process: compiles, resets the peak-RSS mark (Linux ``clear_refs`` 5), runs one step;
    prints the resident memory before the step and its peak during the step (``VmHWM``)."""
    import jax

    compiled, args, _ = build(model_name, T, variant)
    jax.block_until_ready(args)
    pathlib.Path("/proc/self/clear_refs").write_text("5")        # VmHWM := VmRSS (compilation's peak is gone)
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    state, metrics = compiled(*args)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    print("RESULT" + json.dumps({"rss_before_mib": before, "rss_peak_mib": _status_mib("VmHWM"), "step_s": seconds}))


def run_rss(model_name, T, variant):
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--rss-worker", model_name, str(T), variant],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[6:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vggsnn,ndigits")
    p.add_argument("--T", default="10,40", help="comma-separated timesteps")
    p.add_argument("--rss", action="store_true", help="also run one step per variant in a fresh process")
    p.add_argument("--rss-worker", nargs=3, metavar=("MODEL", "T", "VARIANT"),
                   help="measure one step's resident memory in this process (what --rss runs in a fresh one)")
    args = p.parse_args(argv)
    if args.rss_worker:
        model_name, T, variant = args.rss_worker
        return rss_worker(model_name, int(T), variant)

    print(f"{'model':<9}{'T':>4}  {'variant':<16}{'temp MiB':>10}{'vs plain':>9}{'GFLOP':>9}"
          + (f"{'RSS before':>12}{'RSS peak':>10}{'step s':>8}" if args.rss else ""))
    for model_name in args.models.split(","):
        for T in (int(t) for t in args.T.split(",")):
            base = None
            for variant in VARIANTS:
                r = analyse(model_name, T, variant)
                base = base or r["temp_mib"]
                line = (f"{model_name:<9}{T:>4}  {variant:<16}{r['temp_mib']:>10.0f}{base / r['temp_mib']:>8.2f}x"
                        f"{r['gflop']:>9.0f}")
                if args.rss:
                    m = run_rss(model_name, T, variant)
                    line += f"{m['rss_before_mib']:>12.0f}{m['rss_peak_mib']:>10.0f}{m['step_s']:>8.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
