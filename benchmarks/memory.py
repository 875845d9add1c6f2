"""Peak train-step memory with and without rematerialisation (``model.remat``), at T=10 and T=40.

For each model and T, three compilations of the train step (``aoi_jax.step.make_train_step``):

- ``plain``: ``model.remat=False``, XLA's default scheduler;
- ``plain+memsched``: the same program compiled with XLA:CPU's memory-optimised scheduler (one of the
  options remat turns on, ``step.compiler_options``), to separate the scheduler's share from remat's;
- ``remat``: ``model.remat=True``: each spiking layer's spikes kept, its conv, BatchNorm, cell and RCS
  scores recomputed in the backward pass (``models.REMAT_POLICY``, ``layer_fn``); memory-optimised
  scheduler and, on CPU, no CSE (which would merge the recomputation back into the forward pass).

Reported: XLA's ``memory_analysis().temp_size_in_bytes`` (activations and other temporaries; parameters
and optimiser state are arguments, not temporaries), the program's FLOPs (remat's recomputation shows
there) and, with ``--rss``, the resident memory of a fresh process before one step and its peak during
the step (Linux ``VmHWM``, reset after compilation; it includes the runtime, the parameters and the
inputs, so the step's own share is peak minus before).

    python -m benchmarks.memory                          # vggsnn (batch 8) and ndigits, T = 10 and 40
    python -m benchmarks.memory --models vggsnn --T 10,40
    python -m benchmarks.memory --models vggsnn --T 40 --rss

Measured (2-core x86 CPU, jax 0.10; VGGSNN, batch 8, 2x128x128 input; MiB, ``vs plain`` = plain / variant)::

    before (11836bd)   T=10 temp      T=40 temp      T=40: GFLOP  RSS peak - before = step's  step s
    plain              1475           5684           1092   6924 - 797 = 6127            15.9
    plain+memsched     1062 (1.39x)   4130 (1.38x)   1092   5376 - 784 = 4592            12.9
    remat               937 (1.57x)   3624 (1.57x)   1195   4876 - 797 = 4079            12.6

    after cell VJP     T=10 temp      T=40 temp      T=40: GFLOP  RSS peak - before = step's  step s
    plain               620           2287           1096   3506 - 755 = 2751            11.9
    plain+memsched      434 (1.43x)   1651 (1.39x)   1096   2836 - 750 = 2086            10.0
    remat               384 (1.62x)   1493 (1.53x)   1466   2704 - 747 = 1957            12.1

    now (CPU_OPTIONS)  T=10 temp      T=40 temp      T=40: GFLOP  RSS peak - before = step's  step s
    plain               479           1724           1096   2600 - 845 = 1755             6.78
    plain+memsched      434 (1.10x)   1651 (1.04x)   1096   2539 - 863 = 1676             6.91
    remat               386 (1.24x)   1575 (1.09x)   1466   2437 - 836 = 1601             8.65

The cell's custom VJP (``neurons.lif`` keeps only h) cut both modes, ``layer_fn`` and CSE off cut remat
(T=40: plain 5684 -> 2287, remat 3624 -> 1493 MiB). ``step.CPU_OPTIONS`` (convolutions off YNNPACK, for
speed) then cut plain's temporaries further (2287 -> 1724 MiB) and left remat's about where it was, so
against today's plain remat saves only 1.09x of the temporaries (1.10x of the step's resident memory),
for 1.34x the FLOPs; against the plain step of 11836bd it is 3.6x lower. (Remat without ``CPU_OPTIONS``
had fewer temporaries, 1493 MiB, but a larger step RSS, 2698 - 762 = 1936 MiB, and took 12.2 s.) Remat's floor at T=40 is
XLA:CPU's schedule, not what remat keeps (all layers' spikes, 580 MiB): at the peak (the first layer's
backward pass, per the compiled module's live ranges) ~960 MiB are cotangents of layers 1-6 (conv output
and BatchNorm output, 2 x 160 MiB for the 32x32x128 layer) that the scheduler holds until the end of the
step for the conv-bias and BatchNorm-parameter gradient sums (an optimisation barrier on the gradients
before the optimiser did not change it); the first layer's own conv output and cotangents take ~240 MiB.
"""

if __name__ == "__main__":  # first, before jax loads: it may restart this command with huge pages on
    from aoi_jax import hugepages

    hugepages.reexec_with_huge_pages()

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
VARIANTS = ("plain", "plain+memsched", "remat")


def build(model_name, T, variant):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from aoi_jax import config, models, step

    path, sets, shape = MODELS[model_name]
    cfg = config.load(ROOT / path, list(sets) + [f"data.timesteps={T}", f"model.remat={variant == 'remat'}"])
    model = models.build(cfg.model, shape, rngs=nnx.Rngs(0))
    opt = step.make_optimizer(cfg.optim, 1000)
    graphdef, state = step.init_state(model, opt)
    B = cfg.train.batch_size
    rng = np.random.default_rng(0)
    batch = {"frames": jnp.asarray(rng.poisson(0.3, (T, B, *shape)).astype(np.float32)),
             "label": jnp.asarray(rng.integers(0, cfg.model.num_classes, B), jnp.int32)}
    lowered = step.make_train_step(graphdef, cfg, opt).lower(state, batch)
    options = dict(step.compiler_options(cfg), xla_cpu_scheduler_type="CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED") \
        if variant == "plain+memsched" else None
    compiled = lowered.compile(options) if options else lowered.compile()
    return compiled, state, batch


def analyse(model_name, T, variant):
    compiled, _, _ = build(model_name, T, variant)
    return {"temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2 ** 20,
            "gflop": compiled.cost_analysis()["flops"] / 1e9}


def _status_mib(field):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss_worker(model_name, T, variant):
    """Runs in a fresh process: compiles, resets the peak-RSS mark (Linux ``clear_refs`` 5), runs one step;
    prints the resident memory before the step and its peak during the step (``VmHWM``)."""
    import jax

    compiled, state, batch = build(model_name, T, variant)
    jax.block_until_ready((state, batch))
    pathlib.Path("/proc/self/clear_refs").write_text("5")        # VmHWM := VmRSS (compilation's peak is gone)
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
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
    p.add_argument("--rss-worker", nargs=3, help=argparse.SUPPRESS)
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
