"""Single-layer cell benchmark: the Open Neuromorphic SNN benchmark's shape scaled to a 2-core machine.

A binary input (T, B, n_in) (each entry 1 with probability ``--density``) goes through one Linear layer
n_in -> n_out on the folded (T*B, n_in) batch and one LIF cell (``NeuronConfig`` defaults) scanned over T;
the jitted forward + backward computes ``loss = sum(spikes) + mean(membranes)`` and its gradient with respect
to the Linear weights and bias. Printed per cell: the wall time per call (median of ``--reps`` calls after
one compile-and-run call; on a shared machine times are noisy), XLA's ``memory_analysis()`` temporaries of
the compiled call (deterministic) and the process peak resident memory during the timed calls (Linux
``VmHWM``, reset after compilation; it includes the runtime, weights and inputs).

Cells: ``lif`` (``neurons.lif``, the default cell and its fused backward pass) and, with ``--plain``, also
``scan`` (``neurons.scan(neurons.lif_step, ...)``, plain autodiff of the scan), each in a fresh process so
that their peak memories are separate.

    python -m benchmarks.cell                      # T=500, B=16, 1024 -> 4096, the default cell
    python -m benchmarks.cell --plain              # and the plain autodiff scan
    python -m benchmarks.cell --T 20 --reps 1      # smoke run
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CELLS = ("lif", "scan")


def _status_mib(field):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def make(cell, T, B, n_in, n_out, density, seed=0):
    """The jitted forward + backward of one Linear + cell layer and its arguments (weights, bias, input)."""
    import functools

    import jax
    import jax.numpy as jnp

    from aoi_jax import config, neurons

    n = config.NeuronConfig()
    kw = dict(tau=n.tau, vth=n.vth, reset=n.reset, surrogate=n.surrogate, width=n.width)
    run = {"lif": functools.partial(neurons.lif, v0=n.v0, **kw),
           "scan": lambda x: neurons.scan(functools.partial(neurons.lif_step, **kw), x, n.v0)}[cell]

    def loss(w, b, x):
        u = (x.reshape(T * B, n_in) @ w + b).reshape(T, B, n_out)
        s, m = run(u)
        return jnp.sum(s) + jnp.mean(m)

    kx, kw_ = jax.random.split(jax.random.key(seed))
    x = (jax.random.uniform(kx, (T, B, n_in)) < density).astype(jnp.float32)
    w = jax.random.normal(kw_, (n_in, n_out)) * (2.0 / n_in ** 0.5)
    b = jnp.zeros((n_out,))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (w, b, x)


def worker(cell, T, B, n_in, n_out, density, reps):
    """Runs in a fresh process: compiles, runs once, resets the peak-RSS mark, times ``reps`` calls."""
    import jax
    import numpy as np

    fn, args = make(cell, T, B, n_in, n_out, density)
    compiled = fn.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
    jax.block_until_ready(compiled(*args))
    pathlib.Path("/proc/self/clear_refs").write_text("5")        # VmHWM := VmRSS (compilation's peak is gone)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    print("RESULT" + json.dumps({"cell": cell, "median_s": float(np.median(times)), "temp_mib": temp,
                                 "rss_peak_mib": _status_mib("VmHWM")}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=500)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--n-in", type=int, default=1024)
    p.add_argument("--n-out", type=int, default=4096)
    p.add_argument("--density", type=float, default=0.1, help="probability of a 1 in the binary input")
    p.add_argument("--reps", type=int, default=5, help="timed calls after the first")
    p.add_argument("--plain", action="store_true", help="also the plain autodiff scan of lif_step")
    p.add_argument("--worker", choices=CELLS, help="measure one cell in this process (what main runs)")
    args = p.parse_args(argv)
    sizes = [str(a) for a in (args.T, args.B, args.n_in, args.n_out, args.density, args.reps)]
    if args.worker:
        return worker(args.worker, args.T, args.B, args.n_in, args.n_out, args.density, args.reps)

    print(f"T={args.T} B={args.B} {args.n_in} -> {args.n_out}, forward + backward, median of {args.reps}")
    print(f"{'cell':<6}{'s/call':>9}{'XLA temp MiB':>14}{'peak RSS MiB':>14}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for cell in ("lif", "scan") if args.plain else ("lif",):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.cell", "--worker", cell,
                               "--T", sizes[0], "--B", sizes[1], "--n-in", sizes[2], "--n-out", sizes[3],
                               "--density", sizes[4], "--reps", sizes[5]],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        r = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[6:])
        print(f"{cell:<6}{r['median_s']:>9.3f}{r['temp_mib']:>14.0f}{r['rss_peak_mib']:>14.0f}", flush=True)


if __name__ == "__main__":
    main()
