"""Ablations in one compiled program: several members (configs differing in a few keys) trained together.

``python train.py --config C --sweep reg.alpha=0,0.001 --sweep seed=0,1`` trains the Cartesian product of
the sweeps (``aoi_jax.training``). A member differs from the base config only in keys of ``SWEEP_KEYS``:
the training ``seed`` (initialisation, shuffling, augmentation, calibration) and the loss weights
(``step.WEIGHT_KEYS``: ``reg.alpha``, ``train.tet_lambda``), which enter the one compiled step as a traced
``step.LossWeights``. Everything that shapes the program (model, T, batch size, optimiser, schedule) is
shared, so one compile serves all. A single run is a sweep of one member.

Layout: every leaf of the members' ``TrainState``s is stacked on a new leading member axis (M, ...);
batches are (M, T, B, ...) (each member its own seeded shuffle and augmentation, exactly as its single
run: ``input_pipeline.member_batches``); metrics come back (M,).

How the members run (``make_multi_step``): ``loop`` unrolls the members in the program (M copies of the
step, one compile, the same kernels as single runs); ``vmap`` batches them (batched kernels; grouped
convolutions). ``auto`` is ``loop`` on XLA:CPU and ``vmap`` elsewhere, as measured best on each
(docs/performance.md). On several devices the members are split over a ``members`` mesh axis
(``member_mesh``, ``shard_map``), each device running its share.
"""

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from aoi_jax import config as config_lib
from aoi_jax import models, stats
from aoi_jax import step as step_lib
from aoi_jax.config import Config

SWEEP_KEYS = ("seed", *step_lib.WEIGHT_KEYS)  # keys a sweep may vary: they do not change the program
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

    An empty sweep gives one member, the run of ``cfg`` itself (name "", no overrides): a single run.

    Raises:
      ValueError: a value of the wrong type (``config.override``'s message), or a sweep of
        ``train.tet_lambda`` when ``train.loss`` is not "tet" (its members would all be the same).
    """
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


def loss_weights(member_list: Sequence[Member]) -> step_lib.LossWeights:
    """The members' ``step.LossWeights``, each field (M,) float32: ``step.loss_weights`` of each, stacked."""
    return stack([step_lib.loss_weights(m.cfg) for m in member_list])


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
                    strategy: str = "auto", compiler_options: dict | None = None) -> Callable:
    """Returns the jit-compiled ``multi_step(states, batch, weights) -> (states, metrics)``.

    Each member m computes exactly ``step.make_update(graphdef, cfg, optimizer)`` on its own state, batch
    and loss weights::

        states[m], metrics[m] = update(states[m], {frames[m], label[m]}, weights[m])

    Args:
      graphdef, cfg, optimizer: shared by all members (``cfg`` fixes the program; the loss weights come
        from ``weights``).
      mesh: a ``member_mesh``; members are split over its devices (``shard_map``). None: the program runs
        where its inputs are (one device, or a batch sharded over a ``data`` mesh for data parallelism).
      strategy: "loop" (members unrolled in the program), "vmap", or "auto" (loop on XLA:CPU, vmap
        elsewhere).
      compiler_options: XLA options for ``jax.jit`` (``aoi_jax.xla_tuning``); None: XLA's defaults.
    Returns:
      multi_step: states a stacked ``TrainState`` (M, ...); batch {"frames": (M, T, B, ...),
      "label": (M, B)}; weights a ``step.LossWeights`` of (M,) arrays (``loss_weights``); metrics
      {name: (M,)}. ``states`` is donated.
    """
    update = step_lib.make_update(graphdef, cfg, optimizer)
    strategy = _resolve(strategy)

    def local(states, batch, weights):
        if strategy == "vmap":
            return jax.vmap(update)(states, batch, weights)
        n = jax.tree.leaves(batch)[0].shape[0]
        outs = [update(*(jax.tree.map(lambda x, i=i: x[i], a) for a in (states, batch, weights)))
                for i in range(n)]
        return stack([o[0] for o in outs]), stack([o[1] for o in outs])

    if mesh is None or mesh.devices.size == 1:
        return jax.jit(local, donate_argnums=0, compiler_options=compiler_options)
    spec = P("members")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec),
                            check_vma=False)
    return jax.jit(sharded, donate_argnums=0, compiler_options=compiler_options)


def place(tree, mesh):
    """Puts a stacked tree (M, ...) onto ``mesh``, split over ``members`` (as is without a mesh)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    sharding = NamedSharding(mesh, P("members"))
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx, x=x: x[idx]),
                        jax.device_get(tree))


def init_members(member_list: Sequence[Member], input_shape, optimizer: optax.GradientTransformation):
    """Builds every member's model and optimiser state exactly as its single run would.

    Member m is initialised from ``step.run_keys(m.cfg.seed).init`` (``models.build``, then
    ``step.init_state``).

    Returns:
      (graphdef, stacked TrainState (M, ...)).
    """
    states = []
    for m in member_list:
        model = models.build(m.cfg.model, input_shape, rngs=nnx.Rngs(step_lib.run_keys(m.cfg.seed).init))
        graphdef, state = step_lib.init_state(model, optimizer)
        states.append(state)
    return graphdef, stack(states)


SUMMARY_EPSILONS = (0.0, 0.05)  # the epsilons whose Top-K numbers a summary carries (those the report has)


def headline(report: dict, epsilons: Sequence[float] = SUMMARY_EPSILONS) -> dict[str, float]:
    """The headline numbers of one report (``evaluation.evaluate``), by field name::

        accuracy_at_1          accuracy of the cumulative output after the first step
        accuracy_at_T          and at the last step
        oct_mean_timestep      the oracle's mean exit step (1-based)
        synops_per_sample      synaptic operations per test sample, summed over layers
        topk_accuracy@e        Top-K's accuracy and mean exit step at epsilon e, for each e of
        topk_mean_timestep@e   ``epsilons`` the report holds (e written with ``:g``: "0", "0.05")
    """
    out = {"accuracy_at_1": report["accuracy_per_timestep"][0], "accuracy_at_T": report["accuracy_per_timestep"][-1],
           "oct_mean_timestep": report["oct"]["mean_timestep"],
           "synops_per_sample": float(np.sum(report["synops_per_sample"]))}
    for e in epsilons:
        i = config_lib.epsilon_index(report["epsilons"], e)
        if i is not None:
            out[f"topk_accuracy@{e:g}"] = report["rules"]["topk"]["accuracy"][i]
            out[f"topk_mean_timestep@{e:g}"] = report["rules"]["topk"]["mean_timestep"][i]
    return out


def spread(values, level: float = 0.95) -> dict:
    """{mean, std (ddof 1; 0 for one value), min, max, ci95: [low, high] (Student t interval of the mean,
    ``stats.mean_interval``; None for one value)} of ``values`` (n,)."""
    v = np.asarray(values, np.float64)
    ci = stats.mean_interval(v, level) if len(v) > 1 else None
    return {"mean": float(v.mean()), "std": ci["std"] if ci else 0.0, "min": float(v.min()), "max": float(v.max()),
            "ci95": [ci["low"], ci["high"]] if ci else None}


def _settings(row: dict) -> tuple:
    """A summary row's swept settings other than the seed, ((key, value), ...): the runs that differ only in
    seed share them."""
    return tuple((k, v) for k, v in row["overrides"].items() if k != "seed")


def summarise(member_list: Sequence[Member], reports: Sequence[dict],
              epsilons: Sequence[float] = SUMMARY_EPSILONS) -> dict:
    """The sweep's summary: each member's ``headline`` numbers, and their spread over seeds.

    Members that differ only in ``seed`` form a group; for each field a group gives the mean, sample std
    (ddof 1), min, max and the 95 % Student t interval of the mean over its seeds (``stats.mean_interval``;
    None for a single seed).

    Returns:
      {"fields": [headline field names],
       "members": [{name, overrides, <field>: number, ...}],
       "groups": [{settings: {key: value, no seed}, seeds, <field>: {mean, std, min, max, ci95}, ...}]}.
    """
    rows = [{"name": m.name, "overrides": dict(m.overrides), **headline(report, epsilons)}
            for m, report in zip(member_list, reports, strict=True)]
    fields = [k for k in rows[0] if k not in ("name", "overrides")]
    groups = {}
    for row in rows:
        groups.setdefault(_settings(row), []).append(row)
    out = [{"settings": dict(settings), "seeds": [r["overrides"].get("seed") for r in group],
            **{f: spread([r[f] for r in group]) for f in fields}} for settings, group in groups.items()]
    return {"fields": fields, "members": rows, "groups": out}


def paired_contrasts(summary: dict, field: str, key: str, baseline) -> list[dict]:
    """The effect of ``key`` on ``field``, paired by seed: for each setting with ``key`` != ``baseline``::

        d_s = field[key = v, seed = s] - field[key = baseline, seed = s]     (the other settings equal)

    summarised by ``stats.mean_interval`` (95 % Student t interval over the seeds).

    Args:
      summary: ``summarise``'s output (its "members").  field: a headline field, e.g.
        "topk_mean_timestep@0".  key: a swept key, e.g. "reg.alpha".  baseline: its reference value.
    Returns:
      [{settings, seeds, differences, mean, ci95: [low, high] (None for one seed)}], in summary order.
    Raises:
      ValueError: a setting has no baseline run, or its seeds differ from the baseline's.
    """
    by_setting = {}
    for row in summary["members"]:
        by_setting.setdefault(_settings(row), {})[row["overrides"].get("seed")] = row[field]
    out = []
    for settings, values in by_setting.items():
        if dict(settings)[key] == baseline:
            continue
        base = tuple((k, baseline if k == key else v) for k, v in settings)
        if base not in by_setting:
            raise ValueError(f"no run with {key} = {baseline} for the settings {dict(settings)}")
        seeds, d = stats.paired_differences(values, by_setting[base])
        ci = stats.mean_interval(d) if len(d) > 1 else None
        out.append({"settings": dict(settings), "seeds": seeds, "differences": d.tolist(), "mean": float(d.mean()),
                    "ci95": [ci["low"], ci["high"]] if ci else None})
    return out
