"""K alphas trained together (``aoi_jax.ablation``) against the same K trained one after another.

Step level (default): per round of K member steps on N-Digits (configs/ndigits.py: small SNN, T=10,
batch 32; seeded random events), the median time of

- ``sequential``: K single train steps (one compiled program per alpha, as K separate runs);
- ``loop``: one ``sweep.make_multi_step`` program with the members unrolled, one device;
- ``loop, 2 host devices`` (CPU): the members split over two host devices (a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2``);
- ``vmap`` (``--vmap``): the members vmapped.

Every program is compiled with ``xla_tuning.compiler_options()`` (``--xla-tuning none``: XLA's defaults).
"cores busy" is the process's CPU time over wall time while timing (spinning worker threads count).

End to end (``--e2e EPOCHS``): wall-clock of one ``python train.py --sweep reg.alpha=...`` against K runs of
``python train.py --set reg.alpha=...``, each a fresh process (start-up, data from the on-disk cache,
compile, training, per-epoch test accuracy, checkpoints; ``--no-eval`` unless ``--with-eval``).

    python -m benchmarks.ablation                            # step level, K = 4 alphas
    python -m benchmarks.ablation --rounds 10 --vmap
    python -m benchmarks.ablation --e2e 20 --with-eval       # the default config, end to end
    python -m benchmarks.ablation --platform cuda --vmap --rounds 20       # on one GPU
"""

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


def step_level(strategies, alphas, rounds, n_devices, overrides=(), tuning="auto"):
    """{strategy: {compile_s, median_s, min_s, max_s, cores_busy}} per round of K member steps."""
    import jax
    import numpy as np

    from aoi_jax import config, step, sweep, xla_tuning

    cfg = config.load(CONFIG, list(overrides))
    mem = sweep.members(cfg, {"reg.alpha": tuple(alphas)})
    K, T, B, shape = len(mem), cfg.data.timesteps, cfg.train.batch_size, (34, 34, 2)
    opt = step.make_optimizer(cfg.optim, 1000)
    options = xla_tuning.compiler_options(tuning, remat=cfg.model.remat)
    graphdef, states0 = sweep.init_members(mem, shape, opt)
    rng = np.random.default_rng(0)
    batch = {"frames": rng.poisson(0.3, (T, B, *shape)).astype(np.float32),
             "label": rng.integers(0, 10, B).astype(np.int32)}
    stacked = {k: np.stack([v] * K) for k, v in batch.items()}
    out = {}
    for strategy in strategies:
        if strategy == "sequential":
            states = [jax.tree.map(np.asarray, s) for s in sweep.unstack(states0, K)]
            weights = [step.loss_weights(m.cfg) for m in mem]
            t0 = time.perf_counter()
            fns = [step.make_train_step(graphdef, m.cfg, opt, compiler_options=options).lower(s, batch, w).compile()
                   for m, s, w in zip(mem, states, weights)]
            compile_s = time.perf_counter() - t0

            def one_round(states):
                outs = [f(s, batch, w) for f, s, w in zip(fns, states, weights)]
                jax.block_until_ready(outs)
                return [o[0] for o in outs]
        else:
            mesh = sweep.member_mesh(K, jax.devices()[:n_devices]) if n_devices > 1 else None
            multi = sweep.make_multi_step(graphdef, cfg, opt, mesh=mesh, strategy=strategy,
                                             compiler_options=options)
            states = sweep.place(jax.tree.map(np.asarray, states0), mesh)
            weights, placed = sweep.place(sweep.loss_weights(mem), mesh), sweep.place(stacked, mesh)
            t0 = time.perf_counter()
            fn = multi.lower(states, placed, weights).compile()
            compile_s = time.perf_counter() - t0

            def one_round(states):
                states, metrics = fn(states, placed, weights)
                jax.block_until_ready(metrics)
                return states
        states = one_round(states)                                              # warm-up
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


def run_worker(n_devices, strategies, args):
    """``step_level`` in a fresh process with ``n_devices`` host devices (XLA_FLAGS is read at start-up)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS=args.platform, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if n_devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    code = (f"import json; from benchmarks.ablation import step_level; print('RESULT' + json.dumps(step_level("
            f"{strategies!r}, {[float(a) for a in args.alphas.split(',')]!r}, {args.rounds}, {n_devices}, "
            f"{list(args.set)!r}, {args.xla_tuning!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])


def end_to_end(args):
    """Seconds of K single ``train.py`` runs (a list) and of one ``train.py --sweep`` run."""
    alphas = args.alphas.split(",")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS=args.platform, TQDM_DISABLE="1")
    with tempfile.TemporaryDirectory() as tmp:
        common = [sys.executable, "train.py", "--config", str(CONFIG), "--set", f"train.epochs={args.e2e}",
                  "--xla-tuning", args.xla_tuning]
        common += [f"--set={s}" for s in args.set] + ([] if args.with_eval else ["--no-eval"])
        warm = ("from aoi_jax import config, data; "
                f"data.load(config.load({str(CONFIG)!r}, {list(args.set)!r}).data)")   # builds the data cache
        subprocess.run([sys.executable, "-c", warm], cwd=ROOT, env=env, check=True, capture_output=True)

        def timed(*extra):
            t0 = time.perf_counter()
            subprocess.run(common + list(extra), cwd=ROOT, env=env, check=True, capture_output=True)
            return time.perf_counter() - t0

        singles = [timed("--workdir", f"{tmp}/single_{a}", "--set", f"reg.alpha={a}") for a in alphas]
        sweep = timed("--workdir", f"{tmp}/sweep", "--sweep", f"reg.alpha={args.alphas}")
    return singles, sweep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alphas", default="0,0.001,0.002,0.004")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each K member steps) after a warm-up")
    p.add_argument("--vmap", action="store_true", help="also time the vmapped program")
    p.add_argument("--e2e", type=int, default=0, help="also time whole train.py runs of this many epochs")
    p.add_argument("--with-eval", action="store_true", help="end to end: include the final evaluation")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. data.timesteps=4")
    p.add_argument("--platform", default="cpu", help="JAX platform: cpu, cuda, rocm or tpu (one device; the "
                   "two-host-device row is CPU only)")
    p.add_argument("--xla-tuning", default="auto", choices=("auto", "none"))
    args = p.parse_args(argv)

    K = len(args.alphas.split(","))
    one = run_worker(1, ["sequential", "loop"] + (["vmap"] if args.vmap else []), args)
    rows = [("sequential (1 device)", one["sequential"]), ("loop (1 device)", one["loop"])]
    if args.platform == "cpu":
        rows.append(("loop (2 host devices)", run_worker(2, ["loop"], args)["loop"]))
    if args.vmap:
        rows.append(("vmap (1 device)", one["vmap"]))
    base = one["sequential"]["median_s"]
    print(f"N-Digits train step on {args.platform}, K = {K} alphas ({args.alphas}), {args.rounds} timed rounds of "
          f"{K} member steps, XLA tuning {args.xla_tuning}")
    print(f"{'':32}{'compile s':>10}{'s per round: median [min-max]':>32}{'speed-up':>10}{'cores busy':>11}")
    for name, r in rows:
        print(f"{name:<32}{r['compile_s']:>10.2f}{r['median_s']:>14.4f} [{r['min_s']:.4f}-{r['max_s']:.4f}]"
              f"{base / r['median_s']:>9.2f}x{r['cores_busy']:>11.2f}")
    if args.e2e:
        singles, sweep = end_to_end(args)
        what = "with" if args.with_eval else "without"
        print(f"\nend to end, {args.e2e} epoch(s), {what} final evaluation: {K} single train.py runs "
              f"{sum(singles):.1f} s ({' + '.join(f'{s:.1f}' for s in singles)}); one train.py --sweep run "
              f"{sweep:.1f} s: {sum(singles) / sweep:.2f}x")


if __name__ == "__main__":
    main()
