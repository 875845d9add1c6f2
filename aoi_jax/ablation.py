"""Ablations in one compiled program: several members (configs differing in a few keys) trained together.

``python train.py --config C --sweep reg.alpha=0,0.001 --sweep seed=0,1`` trains the Cartesian product of
the sweeps. A member differs from the base config only in keys of ``SWEEP_KEYS``: the training ``seed``
(initialisation, shuffling, augmentation, calibration) and the loss weights ``aoi_jax.step.TRACEABLE``
(``reg.alpha``, ``train.tet_lambda``), which enter the one compiled step as traced scalars. Everything
that shapes the program (model, T, batch size, optimiser, schedule) is shared, so one compile serves all.

Layout: every leaf of the members' ``TrainState``s is stacked on a new leading member axis (M, ...);
batches are (M, T, B, ...) (each member its own seeded shuffle and augmentation, exactly as its single
run: ``member_batches``); metrics come back (M,).

How the members run (``make_multi_step``), measured with ``python -m benchmarks.ablation`` on XLA:CPU (2
cores; N-Digits small SNN, T=10, batch 32; 4 alphas; median seconds per round of 4 member steps; this VM
varies by up to ~15 % from run to run):

- four single train steps (separate runs, each on both cores): 0.279-0.340 s (0.288-0.292 s on an earlier
  day);
- ``loop``, a Python loop over the members inside the jitted function (M copies of the step in one
  program, one compile): 0.262-0.277 s (1.04-1.25x). The same kernels as single runs; XLA:CPU may run
  kernels of different members at once, which only helps while a single step leaves a core idle;
- ``vmap`` over the member axis: 1.61 s (0.20x). Under ``vmap`` XLA:CPU splits the BatchNorm statistics
  into padded reduce-windows that YNNPACK runs slowly (three of them: 1.33 s of thread time in a 1.27 s
  profiled round); the grouped convolutions that batching the members' weights makes took 31 ms.
  Earlier, before reductions went through YNNPACK, grouped convolutions made it slow (4.7 s against
  0.91 s) and a convolution whose batching rule looped over members (``custom_vmap`` inside a
  ``custom_vjp``) was slower than ``loop`` (0.49-0.51 s against 0.40-0.41 s). On GPU/TPU batched kernels
  are fast and ``vmap`` is the natural choice: on one H200, 6 ms per round against 12 ms for four single
  steps (2.04-2.14x; ``loop`` 1.76-1.84x);
- members split over a ``members`` mesh axis (``member_mesh``; on CPU
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` makes two host devices) with ``shard_map``,
  each device looping over its share: 0.258-0.274 s (1.05-1.26x); host devices share one thread pool, so
  two of them do not add compute on two cores. On several GPUs this is what spreads the members;
- members split over processes (``processes``, ``shard``, ``core_groups``: ``train.py --sweep
  --processes``, by default one process per core on CPU), each pinned to its core and looping over its
  share: 0.223-0.246 s (1.20-1.50x against the same run's single steps).

Why the split wins on CPU, and where it stops: members share no work (each has its own weights, so its own
activations and gradients), so together they can only use what a single run leaves idle. A single step takes
0.104-0.107 s pinned to one core against 0.074 s on both (70 % parallel efficiency), so one member per core
gains at most 1.4x per step, less the 10-15 % by which two pinned processes slow each other (memory
bandwidth, shared cache): ``--ceiling`` puts four member steps at 1.24-1.25x at most. End to end (``python
-m benchmarks.ablation --e2e 20 --with-eval --sweep-processes auto,1``, on two days: the default config, 20
epochs, each member's per-epoch test accuracy and checkpoint and its final evaluation): four ``train.py``
runs 391-438 s, the sweep split over two processes 296-323 s (1.28-1.37x; with everything outside the
epochs shared it could reach 1.50x at most), in one process 333-346 s (1.27-1.30x).

``strategy="auto"`` is ``loop`` on CPU and ``vmap`` elsewhere.
"""

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from aoi_jax import config as config_lib
from aoi_jax import step as step_lib
from aoi_jax.config import Config

SWEEP_KEYS = ("seed",) + step_lib.TRACEABLE  # keys a sweep may vary: they do not change the program
STRATEGIES = ("auto", "loop", "vmap")


@dataclasses.dataclass(frozen=True)
class Member:
    """One configuration of a sweep: its directory name, its overrides and its whole config."""

    name: str  # e.g. "alpha=0.001_seed=1": the swept keys' last parts and values, in sweep order
    overrides: dict  # {swept key: value}
    cfg: Config


def parse_sweep(items: Sequence[str]) -> dict[str, tuple]:
    """Parses ``KEY=V1,V2,...`` strings into {key: (values...)}, in the order given.

    Values are Python literals (``0``, ``1e-3``); their types are checked when members are built.

    Raises:
      ValueError: an item is not KEY=V1,V2,..., a key is given twice, or a key repeats a value.
      KeyError: a key that cannot be swept in one program; the message names it and lists ``SWEEP_KEYS``.
    """
    sweep = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ValueError(f"sweep {item!r} is not of the form KEY=V1,V2,...")
        if key not in SWEEP_KEYS:
            raise KeyError(f"config key {key!r} cannot be swept in one compiled program (it changes the "
                           f"program or is not a config key); supported sweep keys: {', '.join(SWEEP_KEYS)}")
        if key in sweep:
            raise ValueError(f"sweep key {key!r} given twice")
        values = tuple(config_lib._parse_literal(v.strip()) for v in text.split(","))
        if len(set(values)) != len(values):
            raise ValueError(f"sweep {key!r} repeats a value: {values}")
        sweep[key] = values
    return sweep


def members(cfg: Config, sweep: dict[str, tuple]) -> list[Member]:
    """The Cartesian product of ``sweep`` applied to ``cfg`` (the last key varies fastest).

    Raises:
      ValueError: an empty sweep, a value of the wrong type (``config.override``'s message), or a sweep
        of ``train.tet_lambda`` when ``train.loss`` is not "tet" (its members would all be the same).
    """
    if not sweep:
        raise ValueError("a sweep needs at least one KEY=V1,V2,... (supported keys: "
                         f"{', '.join(SWEEP_KEYS)})")
    if "train.tet_lambda" in sweep and cfg.train.loss != "tet":
        raise ValueError(f"train.tet_lambda is read only by the TET loss; this config has train.loss = "
                         f"{cfg.train.loss!r} (add --set train.loss=tet)")
    out = []
    for values in itertools.product(*sweep.values()):
        member_cfg, overrides = cfg, {}
        for key, value in zip(sweep, values):
            member_cfg = config_lib.override(member_cfg, key, value)
            overrides[key] = _get(member_cfg, key)
        name = "_".join(f"{k.rpartition('.')[2]}={v}" for k, v in overrides.items())
        out.append(Member(name, overrides, member_cfg))
    return out


def shared_config(member_list: Sequence[Member]) -> Config:
    """The config that fixes the program: the first member's (members differ only in ``SWEEP_KEYS``).

    Raises:
      ValueError: two members differ in a key outside ``SWEEP_KEYS``.
    """
    base = member_list[0].cfg

    def strip(c):
        for key in SWEEP_KEYS:
            c = config_lib.override(c, key, _get(base, key))
        return c

    for m in member_list[1:]:
        if strip(m.cfg) != strip(base):
            raise ValueError(f"member {m.name!r} differs from {member_list[0].name!r} outside the sweep keys "
                             f"{list(SWEEP_KEYS)}")
    return base


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def scalars(member_list: Sequence[Member]) -> dict[str, jax.Array]:
    """{key: (M,) float32} of the traced loss weights (``step.TRACEABLE``), one entry per member."""
    return {key: jnp.asarray([_get(m.cfg, key) for m in member_list], jnp.float32) for key in step_lib.TRACEABLE}


def init_key(seed: int) -> jax.Array:
    """The initialisation key of a run of ``seed``: ``split(key(seed))[0]``, as ``train.py`` uses."""
    return jax.random.split(jax.random.key(seed))[0]


def calibration_key(seed: int) -> jax.Array:
    """The Top-K calibration key of a run of ``seed``: ``split(key(seed))[1]``, as ``train.py`` uses."""
    return jax.random.split(jax.random.key(seed))[1]


def run_batches(train_set, cfg: Config, epoch: int) -> Iterator[dict]:
    """The training batches of epoch ``epoch`` (0-based) of one run of ``cfg``, augmented::

        rng = np.random.default_rng([cfg.seed, epoch])   # shuffles (data.batches), then augments
        for batch in data.batches(train_set, batch_size, rng=rng, drop_last=True):
            frames = data.augment_batch(frames, rng, cfg.data, sensor_hw)   # QCFS ANN: frames[:1] first

    Yields:
      {"frames": (T, B, H, W, C) float32, "label": (B,) int32} (T = 1 for a QCFS ANN).
    """
    from aoi_jax import data  # noqa: PLC0415  (data imports tonic; keep this module light)

    ann = cfg.model.activation == "qcfs"
    rng = np.random.default_rng([cfg.seed, epoch])
    for batch in data.batches(train_set, cfg.train.batch_size, rng=rng, drop_last=True):
        frames = data.augment_batch(batch["frames"][:1] if ann else batch["frames"], rng, cfg.data,
                                    train_set.sensor_hw)
        yield {"frames": frames, "label": batch["label"]}


def member_batches(train_set, member_list: Sequence[Member], epoch: int) -> Iterator[dict]:
    """One pass over the data for all members: ``run_batches`` of every member, stacked.

    Members of the same seed share one stream (the same shuffle and augmentation, computed once).

    Yields:
      {"frames": (M, T, B, H, W, C), "label": (M, B)} numpy arrays.
    """
    seeds = list(dict.fromkeys(m.cfg.seed for m in member_list))
    streams = [run_batches(train_set, next(m.cfg for m in member_list if m.cfg.seed == s), epoch)
               for s in seeds]
    index = [seeds.index(m.cfg.seed) for m in member_list]
    for per_seed in zip(*streams):
        yield {k: np.stack([per_seed[i][k] for i in index]) for k in ("frames", "label")}


def stack(trees: Sequence[Any]):
    """Stacks pytrees of equal structure leaf by leaf on a new leading axis: M trees -> one tree (M, ...)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, n: int) -> list:
    """Inverse of ``stack``: a tree with leading axis ``n`` -> ``n`` trees."""
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def mesh_size(n_members: int, n_devices: int) -> int:
    """The largest d <= n_devices dividing n_members: how many devices a sweep of M members uses."""
    return max(k for k in range(1, min(n_devices, n_members) + 1) if n_members % k == 0)


def member_mesh(n_members: int, devices=None) -> jax.sharding.Mesh:
    """A 1-D ``members`` mesh over the first ``mesh_size(M, D)`` of ``devices`` (default: all), so every
    device holds M / d members (one device when M is prime and larger than D)."""
    devices = jax.devices() if devices is None else list(devices)
    d = mesh_size(n_members, len(devices))
    return jax.make_mesh((d,), ("members",), axis_types=(AxisType.Auto,), devices=devices[:d])


def _resolve(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "auto":
        return "loop" if jax.default_backend() == "cpu" else "vmap"
    return strategy


def make_multi_step(graphdef, cfg: Config, optimizer: optax.GradientTransformation, *, mesh=None,
                    strategy: str = "auto") -> Callable:
    """Returns the jit-compiled ``multi_step(states, batch, scalars) -> (states, metrics)``.

    Each member m computes exactly ``step.make_update(graphdef, cfg, optimizer)`` on its own state, batch
    and loss weights::

        states[m], metrics[m] = update(states[m], {frames[m], label[m]}, {key: scalars[key][m]})

    Args:
      graphdef, cfg, optimizer: shared by all members (``cfg`` fixes the program; its swept values are
        ignored in favour of ``scalars``).
      mesh: a ``member_mesh``; members are split over its devices (``shard_map``). None: one device.
      strategy: "loop" (members unrolled in the program), "vmap", or "auto" (loop on CPU, vmap
        elsewhere; see the module docstring for the measurements behind the choice).
    Returns:
      multi_step: states a stacked ``TrainState`` (M, ...); batch {"frames": (M, T, B, ...),
      "label": (M, B)}; scalars {key: (M,)} for keys of ``step.TRACEABLE``; metrics {name: (M,)}.
      ``states`` is donated.
    """
    update = step_lib.make_update(graphdef, cfg, optimizer)
    strategy = _resolve(strategy)

    def local(states, batch, scalars):
        if strategy == "vmap":
            return jax.vmap(update)(states, batch, scalars)
        n = jax.tree.leaves(batch)[0].shape[0]
        outs = [update(*(jax.tree.map(lambda x, i=i: x[i], a) for a in (states, batch, scalars)))
                for i in range(n)]
        return stack([o[0] for o in outs]), stack([o[1] for o in outs])

    options = step_lib.compiler_options(cfg)
    if mesh is None or mesh.devices.size == 1:
        return jax.jit(local, donate_argnums=0, compiler_options=options)
    spec = P("members")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec),
                            check_vma=False)
    return jax.jit(sharded, donate_argnums=0, compiler_options=options)


def processes(spec: str, n_members: int, backend: str, n_cores: int) -> int:
    """How many local processes ``train.py --sweep --processes SPEC`` splits the members over.

    Members share no work, so on XLA:CPU the cores gain most when each one trains its own members: one
    process per group of cores (``core_groups``), each running ``make_multi_step`` over its share
    (``shard``). "auto" is ``min(n_members, n_cores)`` on XLA:CPU and 1 on other backends (one device
    trains all members at once; several devices share them through ``member_mesh``).

    Args:
      spec: "auto" or a positive integer (as text).  n_members: the sweep's size.
      backend: ``jax.default_backend()``.  n_cores: the cores this process may run on.
    Returns:
      the number of processes, 1 <= n <= min(n_members, n_cores) (1: train in this process).
    Raises:
      ValueError: ``spec`` is neither, or asks for more processes than members or cores.
    """
    if spec == "auto":
        return max(1, min(n_members, n_cores)) if backend == "cpu" else 1
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--processes must be a positive integer or 'auto', got {spec!r}")
    if n > n_members:
        raise ValueError(f"--processes {n}: the sweep has only {n_members} member(s); use at most {n_members}")
    if n > n_cores:
        raise ValueError(f"--processes {n}: this process may run on only {n_cores} core(s); use at most "
                         f"{n_cores} (each process gets cores of its own)")
    return n


def shard(member_list: Sequence[Member], index: int, count: int) -> list[Member]:
    """Process ``index`` of ``count``'s members: every ``count``-th from ``index`` (sizes differ by <= 1)."""
    if not 0 <= index < count:
        raise ValueError(f"member shard {index}/{count}: the index must be in 0..{count - 1}")
    return list(member_list[index::count])


def core_groups(cores: Sequence[int], count: int) -> list[tuple[int, ...]]:
    """``cores`` (sorted) split into ``count`` contiguous groups whose sizes differ by at most one."""
    cores = sorted(cores)
    if not 1 <= count <= len(cores):
        raise ValueError(f"cannot split {len(cores)} core(s) into {count} groups")
    bounds = [round(i * len(cores) / count) for i in range(count + 1)]
    return [tuple(cores[a:b]) for a, b in zip(bounds, bounds[1:])]


def place(tree, mesh):
    """Puts a stacked tree (M, ...) onto ``mesh``, split over ``members`` (as is without a mesh)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    sharding = NamedSharding(mesh, P("members"))
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx, x=x: x[idx]),
                        jax.device_get(tree))


def init_members(member_list: Sequence[Member], input_shape, optimizer: optax.GradientTransformation):
    """Builds every member's model and optimiser state exactly as its single run would.

    Member m is initialised from ``init_key(m.cfg.seed)`` (``models.build``, then ``step.init_state``).

    Returns:
      (graphdef, stacked TrainState (M, ...)).
    """
    from flax import nnx  # noqa: PLC0415

    from aoi_jax import models  # noqa: PLC0415

    states = []
    for m in member_list:
        model = models.build(m.cfg.model, input_shape, rngs=nnx.Rngs(init_key(m.cfg.seed)))
        graphdef, state = step_lib.init_state(model, optimizer)
        states.append(state)
    return graphdef, stack(states)


def summarise(member_list: Sequence[Member], reports: Sequence[dict]) -> dict:
    """The sweep's summary: each member's headline numbers, and their mean and spread over seeds.

    Headline numbers of a member's ``report.json`` (``evaluate.evaluate``): accuracy at T, and Top-K's
    accuracy and mean exit timestep at the smallest epsilon (0 by default). Members that differ only in
    ``seed`` form a group; a group gives mean, sample std (ddof 1; 0 for one seed), min and max.

    Returns:
      {"members": [{name, overrides, accuracy_at_T, topk_epsilon, topk_accuracy, topk_mean_timestep}],
       "groups": [{settings: {key: value, no seed}, seeds, <number>: {mean, std, min, max}, ...}]}.
    """
    rows = []
    for m, report in zip(member_list, reports, strict=True):
        i = int(np.argmin(report["epsilons"]))
        rows.append({"name": m.name, "overrides": dict(m.overrides),
                     "accuracy_at_T": report["accuracy_per_timestep"][-1],
                     "topk_epsilon": report["epsilons"][i],
                     "topk_accuracy": report["rules"]["topk"]["accuracy"][i],
                     "topk_mean_timestep": report["rules"]["topk"]["mean_timestep"][i]})
    groups = {}
    for row in rows:
        settings = tuple((k, v) for k, v in row["overrides"].items() if k != "seed")
        groups.setdefault(settings, []).append(row)
    out = []
    for settings, group in groups.items():
        entry = {"settings": dict(settings), "seeds": [r["overrides"].get("seed") for r in group]}
        for field in ("accuracy_at_T", "topk_accuracy", "topk_mean_timestep"):
            v = np.asarray([r[field] for r in group], np.float64)
            entry[field] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                            "min": float(v.min()), "max": float(v.max())}
        out.append(entry)
    return {"members": rows, "groups": out}
