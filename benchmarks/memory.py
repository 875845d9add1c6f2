"""Peak train-step memory with and without rematerialisation (``model.remat``), at T=10 and T=40.

For each model and T, three compilations of the train step (``aoi_jax.step.make_train_step``):

- ``plain``: ``model.remat=False``, XLA's default scheduler;
- ``plain+memsched``: the same program compiled with XLA:CPU's memory-optimised scheduler (one of the
  options remat turns on, ``step.compiler_options``), to separate the scheduler's share from remat's;
- ``remat``: ``model.remat=True``: each spiking layer rematerialised on its own (``models._remat``): the
  backward pass keeps the layer's input (spikes straight from a LIF layer as int8) and recomputes its conv,
  BatchNorm, cell, pooling and RCS scores when its cotangent arrives; the step is compiled with
  ``step.compiler_options`` (memory-optimised scheduler; on CPU, optimisation barriers kept).

Reported: XLA's ``memory_analysis().temp_size_in_bytes`` (activations and other temporaries; parameters
and optimiser state are arguments, not temporaries), the program's FLOPs (remat's recomputation shows
there) and, with ``--rss``, the resident memory of a fresh process before one step and its peak during
the step (Linux ``VmHWM``, reset after compilation; it includes the runtime, the parameters and the
inputs, so the step's own share is peak minus before), and that first step's time.

    python -m benchmarks.memory                          # vggsnn (batch 8) and ndigits, T = 10 and 40
    python -m benchmarks.memory --models vggsnn --T 10,40
    python -m benchmarks.memory --models vggsnn --T 40 --rss

Measured with ``python -m benchmarks.memory --models vggsnn --T 10,40 --rss`` (2-core x86 CPU, jax 0.10.2;
VGGSNN batch 8, 2x128x128 input; MiB; ``vs plain`` = plain / variant; steady-state step times from
``python -m benchmarks.train_step --models vggsnn --devices 1 --steps 3 --set data.timesteps=40
[--set model.remat=True]``)::

    VGGSNN            T=10 temp      T=40 temp      T=40: GFLOP  RSS peak - before = step's  step s
    plain              603           2220           1094         3095 - 784 = 2311            4.14
    plain+memsched     389 (1.55x)   1495 (1.48x)   1094         2268 - 723 = 1545
    remat              198 (3.05x)    642 (3.46x)   1462         1493 - 751 =  742 (3.11x)    4.97

    (T=10 step's RSS: plain 643, remat 241 MiB, 2.67x.)

    N-Digits (batch 32)  T=10 temp  T=40 temp
    plain                143         549
    remat                 84 (1.71x) 308 (1.79x)   (a small net: parameters and inputs weigh more)

On one NVIDIA H200 (jax 0.11.2; ``JAX_PLATFORMS=cuda python -m benchmarks.memory --models vggsnn --T 10,40``,
run once): plain 444 / 1583 MiB of temporaries at T=10 / 40, remat 203 / 797 (2.18x / 1.99x). There the
optimisation barriers are not kept (``step.compiler_options`` gives other backends no options) and XLA's
GPU scheduler orders the step; only XLA:CPU was tuned. (The GFLOP that run printed were the GPU cost
analysis's, which leaves out cuDNN convolutions; the column now counts the CPU lowering off CPU.)

Since reductions go through YNNPACK (``step.CPU_OPTIONS``) the plain step is faster (T=40 5.03 -> 4.14 s)
but holds more temporaries: before, plain 459 / 1644 MiB (T=10 / T=40), plain+memsched 384 / 1460, remat
192 / 640 (2.39x / 2.57x), step's RSS at T=40 plain 1673, remat 668 MiB (2.50x), remat step 6.30 s.

How remat got there (T=40 temporaries; each step measured on its own): one ``jax.checkpoint`` over the
whole forward pass with a policy that saved each layer's spikes left 1575 MiB against plain's 1724, because
XLA:CPU expands ``jax.checkpoint``'s optimisation barriers early, so its scheduler recomputed layers long
before their cotangents arrived and deferred the conv-bias / BatchNorm gradient sums (fused into the
optimiser update) to the end of the step, holding every layer's cotangents. Per-layer remat with the
barriers kept (``step.compiler_options``) and a barrier over each layer's gradients: 853 MiB. Layer inputs
that are spikes kept as int8 (with a barrier so the cast is not sunk into the backward pass): 822. Each
layer's pooling inside its remat region, so the cotangent that crosses the barrier is the pooled one: 802.
The cell's scan writing h into a carried copy of its input instead of a zero-filled buffer (XLA:CPU had
shared one such buffer per layer between the forward pass and the recomputation, alive for the whole
step): 640. On the way
the RCS scores' two reductions became one variadic reduction with a hand-written gradient (XLA:CPU
materialised r (T, N, D) for two reductions). Plain gained from those two as well: 1724 -> 1664 -> 1644.
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
    train_step = step.make_train_step(graphdef, cfg, opt)
    lowered = train_step.lower(state, batch)
    options = dict(step.compiler_options(cfg), xla_cpu_scheduler_type="CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED") \
        if variant == "plain+memsched" else None
    compiled = lowered.compile(options) if options else lowered.compile()
    return compiled, state, batch, train_step


def analyse(model_name, T, variant):
    """XLA's temporaries and the step's GFLOP (recomputation included). On an accelerator the FLOPs are
    counted on the step lowered for the CPU (``train_step.model_flops``; needs ``JAX_PLATFORMS=cuda,cpu``,
    else nan): a GPU's cost analysis leaves out its cuDNN convolutions."""
    import jax

    from benchmarks.train_step import model_flops

    compiled, state, batch, fn = build(model_name, T, variant)
    if jax.default_backend() == "cpu":
        flops = compiled.cost_analysis()["flops"]
    else:
        try:
            flops = model_flops(fn, state, batch)
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

    compiled, state, batch, _ = build(model_name, T, variant)
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
