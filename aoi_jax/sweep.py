"""Several runs in one compiled program: a sweep's members (configs differing in a few keys) trained together.

``python train.py --config C --sweep reg.alpha=0,0.001 --sweep seed=0,1`` trains the Cartesian product of
the sweeps (``config.parse_sweep``, ``aoi_jax.training``). A member differs from the base config only in keys
of ``config.SWEEP_KEYS``: the training ``seed`` (initialisation, shuffling, augmentation, calibration) and the
loss weights (``step.WEIGHT_KEYS``: ``reg.alpha``, ``train.tet_lambda``), which enter the one compiled step as
a traced ``step.LossWeights``. Everything that shapes the program (model, T, batch size, optimiser, schedule)
is shared, so one compile serves all. A single run is a sweep of one member.

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
from aoi_jax import models
from aoi_jax import step as step_lib
from aoi_jax.config import SWEEP_KEYS, Config

STRATEGIES = ("auto", "loop", "vmap")


@dataclasses.dataclass(frozen=True)
class Member:
    """One configuration of a sweep: its directory name, its overrides and its whole config."""

    name: str  # e.g. "alpha=0.001_seed=1": the swept keys' last parts and values, in sweep order
    overrides: dict  # {swept key: value}
    cfg: Config


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


def init_members(member_list: Sequence[Member], input_shape, optimizer: optax.GradientTransformation, *,
                 shapes_only: bool = False):
    """Builds every member's model and optimiser state exactly as its single run would.

    Member m is initialised from ``step.run_keys(m.cfg.seed).init`` (``models.build``, then
    ``step.init_state``).

    Args:
      shapes_only: trace the initialisation only (``step.abstract_init``): the states are ShapeDtypeStructs and
        nothing is computed, for a run that restores its states from checkpoints.
    Returns:
      (graphdef, stacked TrainState (M, ...)).
    """
    def init():
        states = []
        for m in member_list:
            model = models.build(m.cfg.model, input_shape, rngs=nnx.Rngs(step_lib.run_keys(m.cfg.seed).init))
            graphdef, state = step_lib.init_state(model, optimizer)
            states.append(state)
        return graphdef, stack(states)

    return step_lib.abstract_init(init) if shapes_only else init()
