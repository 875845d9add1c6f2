"""Train-step speed: compile time, steady-state step time, samples/s, model FLOPs and the fraction of this
machine's dense-matmul peak they reach, on one device and on two host devices (data parallel).

Models: ``vggsnn`` (configs/cifar10_dvs.py: VGGSNN, T=10, batch 8, 2x128x128 event frames, TET + RCS,
float32) and ``ndigits`` (configs/ndigits.py: the small SNN, T=10, batch 32, 2x34x34). Inputs are seeded
random event counts. The train step is ``aoi_jax.step.make_train_step``, as ``train.py`` runs it; with two
devices the batch is split over the ``data`` mesh (``aoi_jax.parallel``).

FLOPs per step: XLA:CPU's ``cost_analysis()`` of the one-device program lowered for the CPU, on every
platform (``model_flops``: a GPU's compiled program has its convolutions as cuDNN calls, which its cost
analysis does not count, 2.4 of VGGSNN's 273 GFLOP on an H200, and its lowered program has no analysis).
Peak: the best of several float32 matmuls (2048x2048 on CPU, 8192x8192 on an accelerator), measured in the
same process at JAX's default precision, which the model's convolutions use too (on GPUs that lets XLA use
TF32 tensor cores); on two devices one matmul per device, concurrently. Each device count runs in its own
subprocess, since ``XLA_FLAGS=--xla_force_host_platform_device_count`` must be set before jax starts.
``--platform cuda`` (or ``tpu``) runs the same on that platform's devices (``--devices`` then counts
those). On a shared machine the step times are noisy: the median and the min-max range of ``--steps``
timed steps are printed, and ``--repeats`` reruns everything. "cores busy" is the process's CPU time over
wall time during the timed steps (spinning worker threads count as busy).

    python -m benchmarks.train_step                                  # both models, 1 and 2 devices
    python -m benchmarks.train_step --models vggsnn --devices 1 --steps 8 --repeats 3
    python -m benchmarks.train_step --xla-flags=--xla_cpu_use_onednn=true     # try an XLA:CPU flag
    python -m benchmarks.train_step --platform cuda --devices 1 --steps 20    # on one GPU
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


def matmul_peak(devices, n=None, repeats=7):
    """Best float32 matmul FLOP/s over ``devices`` (one n x n matmul per device, dispatched together).

    ``n`` defaults to 2048 on CPU and 8192 elsewhere (a 2048^2 matmul is launch-bound on a GPU)."""
    import jax
    import jax.numpy as jnp

    n = n or (2048 if devices[0].platform == "cpu" else 8192)
    f = jax.jit(lambda a, b: a @ b)
    xs = [jax.device_put(jnp.ones((n, n), jnp.float32), d) for d in devices]
    jax.block_until_ready([f(x, x) for x in xs])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready([f(x, x) for x in xs])
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * len(devices) / best


def model_flops(train_step, *args):
    """FLOPs of one ``train_step(*args)``: XLA:CPU's cost analysis of the step lowered for the CPU."""
    import jax

    return float(train_step.lower(*jax.device_put(args, jax.devices("cpu")[0])).cost_analysis()["flops"])


def measure(model_name, n_devices, steps, overrides=(), tuning="auto"):
    """One model on the first ``n_devices`` devices: compile and step times, FLOPs, samples/s."""
    import jax
    import numpy as np
    from flax import nnx

    from aoi_jax import config, models, parallel, step, xla_tuning

    path, sets, shape = MODELS[model_name]
    cfg = config.load(ROOT / path, list(sets) + list(overrides))
    T, B = cfg.data.timesteps, cfg.train.batch_size
    model = models.build(cfg.model, shape, rngs=nnx.Rngs(0))
    opt = step.make_optimizer(cfg.optim, 1000)
    graphdef, state = step.init_state(model, opt)
    mesh = parallel.data_mesh(jax.devices()[:n_devices])
    state = parallel.replicate(state, mesh)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch({"frames": rng.poisson(0.3, (T, B, *shape)).astype(np.float32),
                                  "label": rng.integers(0, cfg.model.num_classes, B).astype(np.int32)}, mesh)
    weights = parallel.replicate(step.loss_weights(cfg), mesh)
    train_step = step.make_train_step(graphdef, cfg, opt,
                                      compiler_options=xla_tuning.compiler_options(tuning, remat=cfg.model.remat))
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch, weights).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch, weights)                          # warm-up
    jax.block_until_ready(metrics)
    times = []
    cpu0, wall0 = os.times(), time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, weights)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    cpu1, wall1 = os.times(), time.perf_counter()
    cores = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (wall1 - wall0)
    return {"model": model_name, "devices": n_devices, "T": T, "batch": B, "input": list(shape),
            "compile_s": compile_s, "step_s_median": float(np.median(times)), "step_s_min": min(times),
            "step_s_max": max(times), "samples_per_s": B / float(np.median(times)),
            "flops_per_step_program": model_flops(train_step, state, batch, weights),
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2 ** 20, "cores_busy": cores}


def worker(args):
    import jax

    peak = matmul_peak(jax.devices()[:args.devices])
    rows = [measure(m, args.devices, args.steps, args.set, args.xla_tuning) for m in args.models.split(",")]
    devices = jax.devices()[:args.devices]
    print("RESULT" + json.dumps({"peak_flops": peak, "rows": rows, "platform": devices[0].platform,
                                 "device_kind": devices[0].device_kind, "jax": jax.__version__}))


def run_worker(n_devices, args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    flags = " ".join(f for f in [f"--xla_force_host_platform_device_count={n_devices}", args.xla_flags] if f)
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS=args.platform if args.platform == "cpu" else f"{args.platform},cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker", "--devices", str(n_devices),
           "--models", args.models, "--steps", str(args.steps), "--xla-tuning", args.xla_tuning]
    cmd += [f"--set={s}" for s in args.set]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker with {n_devices} device(s) failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[6:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vggsnn,ndigits", help="comma-separated: vggsnn, ndigits")
    p.add_argument("--devices", default="1,2", help="comma-separated device counts (on CPU: host devices)")
    p.add_argument("--platform", default="cpu", help="JAX platform of the workers: cpu, cuda, rocm or tpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--repeats", type=int, default=1, help="run everything this many times (noise)")
    p.add_argument("--set", action="append", default=[], help="config override for both models, e.g. "
                                                             "model.remat=True")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the workers")
    p.add_argument("--xla-tuning", default="auto", choices=("auto", "none"),
                   help="compiler options of aoi_jax.xla_tuning (auto) or XLA's defaults (none)")
    p.add_argument("--worker", action="store_true",
                   help="measure in this process with its devices (what each --devices entry runs in a fresh one)")
    args = p.parse_args(argv)
    if args.worker:
        args.devices = int(args.devices)
        return worker(args)

    if args.xla_flags:
        print(f"extra XLA_FLAGS: {args.xla_flags}")
    one_device_flops = {}
    for r in range(args.repeats):
        for n in (int(d) for d in args.devices.split(",")):
            res = run_worker(n, args)
            print(f"\n[repeat {r + 1}/{args.repeats}] {n} {res['platform']} device(s) ({res['device_kind']}, jax "
                  f"{res['jax']}): matmul peak {res['peak_flops'] / 1e9:.0f} GFLOP/s (float32, default precision, "
                  f"best of 7)")
            print(f"{'model':<9}{'compile s':>10}{'step s (median [min-max])':>28}{'samples/s':>11}"
                  f"{'GFLOP/step':>11}{'GFLOP/s':>9}{'% peak':>8}{'temp MiB':>10}{'cores busy':>11}")
            for row in res["rows"]:
                if n == 1:
                    one_device_flops[row["model"]] = row["flops_per_step_program"]
                flops = one_device_flops.get(row["model"], row["flops_per_step_program"] * n)
                achieved = flops / row["step_s_median"]
                print(f"{row['model']:<9}{row['compile_s']:>10.2f}"
                      f"{row['step_s_median']:>12.4f} [{row['step_s_min']:.4f}-{row['step_s_max']:.4f}]"
                      f"{row['samples_per_s']:>11.1f}{flops / 1e9:>11.1f}{achieved / 1e9:>9.0f}"
                      f"{100 * achieved / res['peak_flops']:>8.1f}{row['temp_mib']:>10.0f}{row['cores_busy']:>11.2f}")


if __name__ == "__main__":
    main()
