"""K alphas trained together (``aoi_jax.ablation``) against the same K trained one after another.

Step level (default): per round of K member steps on N-Digits (configs/ndigits.py: small SNN, T=10,
batch 32; seeded random events), the median time of

- ``sequential``: K single train steps (``step.make_train_step``, one compiled program per alpha), one after
  the other, as K separate runs would do;
- ``together/loop``: one ``ablation.make_multi_step`` program, members unrolled, one device;
- ``together/loop x2``: the same with the members split over two host devices (a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2``);
- ``together/vmap`` (``--vmap``): members vmapped; slow on XLA:CPU (padded reduce-windows);
- ``together/loop, n processes`` (CPU): ``train.py --sweep``'s default there, the members split over one
  process per core (``aoi_jax.ablation.processes``), each pinned and looping over its share; all time
  their rounds at once, and a round lasts as long as the slowest process's.

Compile times are listed separately (sequential: the sum of K compiles). "cores busy": the process's CPU
time over wall time while timing (spinning worker threads count as busy); on 2 cores a strategy can at
most reach 2 / (cores busy of sequential) times its speed.

Ceiling (``--ceiling``): members share no work (each has its own weights, so its own activations and
gradients), so together they can only gain the cores that a single run leaves idle. The best use of them
is one independent single run per core: ``ceiling`` times a single step on all cores, pinned to one core
alone, and pinned one process per core with all stepping at once (they then compete for memory bandwidth
and the shared cache), and prints the most a round of K member steps can gain over K single steps.

End to end (``--e2e EPOCHS``): wall-clock of ``python train.py --sweep reg.alpha=... --processes P`` (for each
P of ``--sweep-processes``) against K runs of ``python train.py --set reg.alpha=...``, each a fresh process
(start-up, data from the on-disk cache, compile, training, per-epoch test accuracy, checkpoints;
``--no-eval`` unless ``--with-eval``). With
``--ceiling`` too, it also prints the least a sweep could take (``e2e_bound``): everything outside the
single runs' epochs shared, their epochs at the step-level ceiling.

    python -m benchmarks.ablation                            # step level, K = 4 alphas
    python -m benchmarks.ablation --rounds 10 --vmap
    python -m benchmarks.ablation --e2e 20 --with-eval --sweep-processes auto,1   # the default config, end to end
    python -m benchmarks.ablation --ceiling                  # what one process per core can gain at most
    python -m benchmarks.ablation --platform cuda --vmap --rounds 20       # on one GPU
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
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ndigits.py"


def step_level(strategies, alphas, rounds, n_devices, overrides=(), *, ready_dir=None, n_ready=1):
    """Median seconds per round of K member steps (and compile seconds) for each strategy.

    Strategy "single": one member's train step alone (K = 1). With ``ready_dir``, timing starts only when
    ``n_ready`` processes have written a file there (so that processes started together time together).
    """
    import jax
    import numpy as np

    from aoi_jax import ablation, config, step

    cfg = config.load(CONFIG, list(overrides))
    mem = ablation.members(cfg, {"reg.alpha": tuple(alphas)})
    K, T, B, shape = len(mem), cfg.data.timesteps, cfg.train.batch_size, (34, 34, 2)
    opt = step.make_optimizer(cfg.optim, 1000)
    graphdef, states0 = ablation.init_members(mem, shape, opt)
    rng = np.random.default_rng(0)
    batch = {"frames": rng.poisson(0.3, (T, B, *shape)).astype(np.float32),
             "label": rng.integers(0, 10, B).astype(np.int32)}
    stacked = {k: np.stack([v] * K) for k, v in batch.items()}
    out = {}
    for strategy in strategies:
        if strategy in ("sequential", "single"):
            states = [jax.tree.map(np.asarray, s) for s in ablation.unstack(states0, K)]
            t0 = time.perf_counter()
            fns = [step.make_train_step(graphdef, m.cfg, opt).lower(s, batch).compile() for m, s in zip(mem, states)]
            compile_s = time.perf_counter() - t0

            def one_round(states):
                outs = [f(s, batch) for f, s in zip(fns, states)]
                jax.block_until_ready(outs)
                return [o[0] for o in outs]
        else:
            mesh = ablation.member_mesh(K, jax.devices()[:n_devices]) if n_devices > 1 else None
            multi = ablation.make_multi_step(graphdef, cfg, opt, mesh=mesh, strategy=strategy)
            states = ablation.place(jax.tree.map(np.asarray, states0), mesh)
            scalars, placed = ablation.place(ablation.scalars(mem), mesh), ablation.place(stacked, mesh)
            t0 = time.perf_counter()
            fn = multi.lower(states, placed, scalars).compile()
            compile_s = time.perf_counter() - t0

            def one_round(states):
                states, metrics = fn(states, placed, scalars)
                jax.block_until_ready(metrics)
                return states
        states = one_round(states)                                              # warm-up
        if ready_dir:
            _wait_for_all(ready_dir, n_ready)
        times = []
        cpu0, wall0 = os.times(), time.perf_counter()
        for _ in range(rounds):
            t0 = time.perf_counter()
            states = one_round(states)
            times.append(time.perf_counter() - t0)
        cpu1, wall1 = os.times(), time.perf_counter()
        out[strategy] = {"compile_s": compile_s, "median_s": float(np.median(times)), "min_s": min(times),
                         "max_s": max(times),
                         "cores_busy": (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (wall1 - wall0)}
    return out


def _wait_for_all(ready_dir, n):
    """Writes this process's file into ``ready_dir`` and waits until ``n`` files are there."""
    path = pathlib.Path(ready_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / str(os.getpid())).touch()
    while len(list(path.iterdir())) < n:
        time.sleep(0.05)


def worker(args):
    if args.pin:
        os.sched_setaffinity(0, {int(c) for c in args.pin.split(",")})     # before jax starts its threads
    res = step_level(args.strategies.split(","), [float(a) for a in args.alphas.split(",")], args.rounds,
                     args.devices, args.set, ready_dir=args.ready_dir, n_ready=args.n_ready)
    print("RESULT" + json.dumps(res))


def _worker_env(n_devices=None, platform="cpu"):
    """This process's environment for a worker: JAX on ``platform``, this checkout importable, and XLA_FLAGS
    only the host device count (``n_devices``; none given: XLA_FLAGS removed)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS=platform, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if n_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    return env


def _result(stdout):
    """The dict a worker printed after "RESULT"."""
    return json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT"))[6:])


def _pinned(jobs, args, ready_dir, rounds):
    """Starts one worker per job at once; they time together once all have compiled. A job is
    ``(cores, strategy, alphas)``: the cores to pin it to (empty: not pinned), a ``step_level`` strategy and
    its members' alphas (a list of strings). Returns each job's result (``step_level``'s dict)."""
    env = _worker_env()
    sets = [f"--set={s}" for s in args.set]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.ablation", "--worker", "--pin", ",".join(map(str, c)),
                               "--strategies", strategy, "--ready-dir", ready_dir, "--n-ready", str(len(jobs)),
                               "--alphas", ",".join(alphas), "--rounds", str(rounds)] + sets,
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, strategy, alphas in jobs]
    out = []
    for proc, (_, strategy, _) in zip(procs, jobs):
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(stderr[-3000:])
        out.append(_result(stdout)[strategy])
    return out


def split(args):
    """The K members split over one process per core (``train.py --sweep``'s default on CPU,
    ``aoi_jax.ablation.processes``): process i, pinned to core i, loops over members i, i+n, ... A round of
    K member steps ends when the slowest process ends its round: the max of their medians."""
    from aoi_jax import ablation  # noqa: PLC0415

    alphas, cores = args.alphas.split(","), sorted(os.sched_getaffinity(0))
    n = ablation.processes("auto", len(alphas), "cpu", len(cores))
    jobs = [(g, "loop", ablation.shard(alphas, i, n)) for i, g in enumerate(ablation.core_groups(cores, n))]
    with tempfile.TemporaryDirectory() as tmp:
        res = _pinned(jobs, args, f"{tmp}/split", args.rounds)
    worst = max(res, key=lambda r: r["median_s"])
    return {"processes": n, **worst, "compile_s": max(r["compile_s"] for r in res),
            "cores_busy": sum(r["cores_busy"] for r in res)}


def ceiling(args):
    """The most that training K members together can gain over K single runs on this machine's cores.

    Members share no work (each has its own weights, so its own activations and gradients); together they
    can only use cores that a single run leaves idle. The best such use is one run per core with nothing
    shared: n processes, each pinned to its own core, stepping at once. Measured here:

    - ``t_all``: a single train step on all cores (what a single run does);
    - ``t_one``: the same pinned to one core, alone;
    - ``t_shared``: n such pinned processes stepping at the same time (each core's step time when every
      core works: memory bandwidth and the shared cache are what they compete for).

    Each is the median over ``--ceiling-repeats`` interleaved measurements (one slow spell of a shared
    machine once made ``t_all`` 0.101 s against 0.071-0.073 s in every other run).

    Then a round of K member steps takes at least ceil(K / n) * t_shared, against K * t_all one after
    another: ``bound = K * t_all / (ceil(K / n) * t_shared)``.

    Returns:
      {"cores", "t_all", "t_one", "t_shared" (per core), "bound"}.
    """
    import numpy as np  # noqa: PLC0415

    cores = sorted(os.sched_getaffinity(0))
    K = len(args.alphas.split(","))
    single = args.alphas.split(",")[:1]
    layouts = {"all": [()], "one": [(cores[0],)], "shared": [(c,) for c in cores]}
    runs = {name: [] for name in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.ceiling_repeats):           # interleaved, so that a slow spell hits all three
            for name, pins in layouts.items():          # one single-step worker per pin, stepping together
                jobs = [(c, "single", single) for c in pins]
                runs[name].append([x["median_s"] for x in _pinned(jobs, args, f"{tmp}/{name}{r}", 4 * args.rounds)])
    (t_all,), (t_one,), t_shared = (np.median(runs[name], axis=0).tolist() for name in layouts)
    per_core = -(-K // len(cores))
    return {"cores": cores, "t_all": t_all, "t_one": t_one, "t_shared": t_shared,
            "bound": K * t_all / (per_core * sum(t_shared) / len(t_shared))}


def run_worker(n_devices, strategies, args):
    env = _worker_env(n_devices, args.platform)
    cmd = [sys.executable, "-m", "benchmarks.ablation", "--worker", "--devices", str(n_devices), "--strategies",
           ",".join(strategies), "--alphas", args.alphas, "--rounds", str(args.rounds)] + [f"--set={s}" for s in args.set]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return _result(proc.stdout)


def end_to_end(args):
    """K single runs, then one sweep per entry of ``--sweep-processes``: ``(singles, {processes: sweep
    seconds})``, singles a list of {"seconds": wall-clock, "epochs", "steady_epoch_s": median epoch after
    the first (its metrics.jsonl)}."""
    alphas = args.alphas.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        common = [sys.executable, "train.py", "--config", str(CONFIG), "--set", f"train.epochs={args.e2e}"]
        common += [f"--set={s}" for s in args.set] + ([] if args.with_eval else ["--no-eval"])
        env = _worker_env(platform=args.platform)
        warm = ("from aoi_jax import config, data; "
                f"data.load(config.load({str(CONFIG)!r}, {list(args.set)!r}).data)")   # builds the data cache
        subprocess.run([sys.executable, "-c", warm], cwd=ROOT, env=env, check=True, capture_output=True)
        singles = []
        for a in alphas:
            t0 = time.perf_counter()
            subprocess.run(common + ["--workdir", f"{tmp}/single_{a}", "--set", f"reg.alpha={a}"], cwd=ROOT, env=env,
                           check=True, capture_output=True)
            seconds = time.perf_counter() - t0
            epochs = [json.loads(line)["epoch_seconds"]
                      for line in pathlib.Path(f"{tmp}/single_{a}/metrics.jsonl").read_text().splitlines()]
            steady = sorted(epochs[1:] or epochs)[len(epochs[1:] or epochs) // 2]      # median, compile-free
            singles.append({"seconds": seconds, "epochs": len(epochs), "steady_epoch_s": steady})
        together = {}
        for n in args.sweep_processes.split(","):
            t0 = time.perf_counter()
            subprocess.run(common + ["--workdir", f"{tmp}/sweep_{n}", "--sweep", f"reg.alpha={args.alphas}",
                                     "--processes", n], cwd=ROOT, env=env, check=True, capture_output=True)
            together[n] = time.perf_counter() - t0
    return singles, together


def e2e_bound(singles, step_bound):
    """The least a sweep could take, from the single runs' own figures: each run is ``W`` = epochs x its
    median epoch (steps, per-epoch test accuracy, checkpoint) plus ``F`` = the rest (start-up, compiles,
    final evaluation), all counted as shared. A sweep takes at least ``min F + sum W / step_bound``."""
    work = [r["epochs"] * r["steady_epoch_s"] for r in singles]
    fixed = [r["seconds"] - w for r, w in zip(singles, work)]
    least = min(fixed) + sum(work) / step_bound
    return {"work_s": work, "fixed_s": fixed, "least_sweep_s": least,
            "bound": sum(r["seconds"] for r in singles) / least}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alphas", default="0,0.001,0.002,0.004")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each K member steps) after a warm-up")
    p.add_argument("--vmap", action="store_true", help="also time the vmapped program (slow on CPU)")
    p.add_argument("--e2e", type=int, default=0, help="also time whole train.py runs of this many epochs")
    p.add_argument("--with-eval", action="store_true", help="end to end: include the final evaluation")
    p.add_argument("--sweep-processes", default="auto", help="end to end: the sweep's --processes, "
                   "comma-separated to time several (e.g. 1,auto)")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. data.timesteps=4")
    p.add_argument("--platform", default="cpu", help="JAX platform: cpu, cuda, rocm or tpu (one device; the "
                   "two-host-device row and --ceiling are CPU only)")
    p.add_argument("--ceiling", action="store_true", help="also measure the most K members together can gain "
                   "on these cores (single steps pinned one per core, stepping at once)")
    p.add_argument("--ceiling-repeats", type=int, default=3, help="--ceiling: interleaved repeats of its three "
                   "measurements (medians are reported)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pin", default="", help=argparse.SUPPRESS)
    p.add_argument("--ready-dir", help=argparse.SUPPRESS)
    p.add_argument("--n-ready", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--strategies", default="sequential,loop", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.ceiling and args.platform != "cpu":
        p.error("--ceiling measures CPU cores: use it with --platform cpu")

    K = len(args.alphas.split(","))
    one = run_worker(1, ["sequential", "loop"] + (["vmap"] if args.vmap else []), args)
    rows = [("sequential (1 device)", one["sequential"]), ("together/loop (1 device)", one["loop"])]
    if args.platform == "cpu":
        rows.append(("together/loop (2 host devices)", run_worker(2, ["loop"], args)["loop"]))
        sp = split(args)
        rows.append((f"together/loop, {sp['processes']} processes", sp))
    if args.vmap:
        rows.append(("together/vmap (1 device)", one["vmap"]))
    base = one["sequential"]["median_s"]
    print(f"N-Digits train step on {args.platform}, K = {K} alphas ({args.alphas}), {args.rounds} timed rounds of "
          f"{K} member steps")
    print(f"{'':32}{'compile s':>10}{'s per round: median [min-max]':>32}{'speed-up':>10}{'cores busy':>11}")
    for name, r in rows:
        print(f"{name:<32}{r['compile_s']:>10.2f}{r['median_s']:>14.4f} [{r['min_s']:.4f}-{r['max_s']:.4f}]"
              f"{base / r['median_s']:>9.2f}x{r['cores_busy']:>11.2f}")
    bound = None
    if args.ceiling:
        c = ceiling(args)
        bound = c["bound"]
        print(f"\nceiling on {len(c['cores'])} cores: single step on all cores {c['t_all']:.3f} s, pinned to one "
              f"core {c['t_one']:.3f} s alone, {' / '.join(f'{t:.3f}' for t in c['t_shared'])} s with every core "
              f"stepping at once: K members together at most {bound:.2f}x faster than one after another")
    if args.e2e:
        singles, together = end_to_end(args)
        seq = sum(r["seconds"] for r in singles)
        each = " + ".join(f"{r['seconds']:.1f}" for r in singles)
        what = "with" if args.with_eval else "without"
        print(f"\nend to end, {args.e2e} epoch(s), {what} final evaluation: {K} single train.py runs {seq:.1f} s "
              f"({each})")
        for n, tog in together.items():
            print(f"one train.py --sweep --processes {n} run: {tog:.1f} s: {seq / tog:.2f}x")
        if bound:
            e = e2e_bound(singles, bound)
            print(f"ceiling end to end: a single run is {e['work_s'][0]:.1f} s of epochs and {e['fixed_s'][0]:.1f} s "
                  f"else; with epochs at most {bound:.2f}x faster together and everything else shared, a sweep "
                  f"takes at least {e['least_sweep_s']:.1f} s: at most {e['bound']:.2f}x")


if __name__ == "__main__":
    main()
