"""Two host devices against one: data parallel train steps and members split over devices.

The two devices come from ``XLA_FLAGS=--xla_force_host_platform_device_count=2``, which must be set before
jax starts; the checks run in a subprocess so this test process (and every other test) keeps one device.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from aoi_jax import parallel
from conftest import subprocess_env, two_device_env

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json
import jax, numpy as np
from flax import nnx
from aoi_jax import config, models, parallel, step, sweep

assert len(jax.devices()) == 2, jax.devices()
cfg = config.Config(model=config.ModelConfig(channels=(4, 8), num_classes=3),
                    optim=config.OptimConfig(lr=0.05, schedule="constant"), reg=config.RegConfig(alpha=0.5))
opt = step.make_optimizer(cfg.optim, 100)
rng = np.random.default_rng(0)

def batch(lead=()):
    labels = rng.integers(0, 3, lead + (12,))
    frames = rng.poisson(0.2, lead + (4, 12, 8, 8, 2)).astype(np.float32)
    frames[..., :, :, 0, 0, 0] += 3.0 * (labels[..., None, :] == 0)
    return {"frames": frames, "label": labels.astype(np.int32)}

def maxdiff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))

out = {}
# data parallel: the batch split over a 2-device 'data' mesh, parameters replicated, against one device
graphdef, state0 = step.init_state(models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(0)), opt)
batches = [batch() for _ in range(3)]
runs = {}
for n in (1, 2):
    mesh = parallel.data_mesh(jax.devices()[:n])
    train_step = step.make_train_step(graphdef, cfg, opt)
    state = parallel.replicate(jax.tree.map(np.asarray, state0), mesh)
    losses = []
    for b in batches:
        state, metrics = train_step(state, parallel.shard_batch(b, mesh), step.loss_weights(cfg))
        losses.append(float(metrics["loss"]))
    runs[n] = (losses, jax.device_get(state), state.params["head"]["kernel"][...].sharding.device_set)
out["dp_loss_diff"] = max(abs(a - b) for a, b in zip(runs[1][0], runs[2][0]))
out["dp_param_diff"] = maxdiff(runs[1][1], runs[2][1])
out["dp_devices"] = len(runs[2][2])
out["dp_losses"] = runs[1][0]

# members: 2 members split over a 2-device 'members' mesh, against the same program on one device
mem = sweep.members(cfg, config.parse_sweep(["reg.alpha=0,0.5"]))
graphdef, states0 = sweep.init_members(mem, (8, 8, 2), opt)
member_batches = [batch((2,)) for _ in range(3)]
res = {}
for name, mesh, strategy in (("one", None, "loop"), ("two", sweep.member_mesh(2), "loop"),
                             ("two_vmap", sweep.member_mesh(2), "vmap")):
    multi = sweep.make_multi_step(graphdef, cfg, opt, mesh=mesh, strategy=strategy)
    states = sweep.place(jax.tree.map(np.asarray, states0), mesh)
    weights = sweep.place(sweep.loss_weights(mem), mesh)
    losses = []
    for b in member_batches:
        states, metrics = multi(states, sweep.place(b, mesh), weights)
        losses.append(np.asarray(metrics["loss"]).tolist())
    res[name] = (losses, jax.device_get(states))
    if name == "two":
        out["members_devices"] = len(states.params["head"]["kernel"][...].sharding.device_set)
        out["members_step"] = int(states.step[0])                     # train.py reads the step like this
for name in ("two", "two_vmap"):
    out[name + "_loss_diff"] = float(np.max(np.abs(np.subtract(res[name][0], res["one"][0]))))
    out[name + "_param_diff"] = maxdiff(res[name][1], res["one"][1])
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_devices():
    """The script's results, run once on two CPU devices. Like the unit tests in the worker (and unlike a
    train.py run) it compiles several programs and runs each three times: LLVM level 0 (tests/conftest.py)."""
    env = two_device_env(subprocess_env(JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_data_parallel_matches_one_device(two_devices):
    """3 SGD steps (RCS alpha 0.5, BatchNorm over the global batch): losses and parameters within 1e-5 of
    one device. The only difference is float32 summation order (per-device partial sums, then an
    all-reduce) in BatchNorm statistics and gradients; a flipped spike would show as ~1e-2."""
    r = two_devices
    assert r["dp_devices"] == 2
    assert r["dp_loss_diff"] <= 1e-5
    assert r["dp_param_diff"] <= 1e-5
    assert len(set(r["dp_losses"])) == 3                  # the steps really train


def test_members_split_over_devices_match_one_device(two_devices):
    """One member per device (shard_map over 'members'), looped or vmapped on each device (the GPU/TPU
    path), computes the one-device program's members: the same per-member ops, so the tolerance is float32
    rounding (1e-6; seen: 0 for loop, ~1e-7 for vmap)."""
    r = two_devices
    assert r["members_devices"] == 2 and r["members_step"] == 3
    for name in ("two", "two_vmap"):
        assert r[name + "_loss_diff"] <= 1e-6
        assert r[name + "_param_diff"] <= 1e-6


def test_this_process_keeps_one_device_and_no_distributed_launch():
    import jax

    assert len(jax.devices()) == 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
    assert parallel.initialize_distributed({}) is False          # a plain launch: nothing to initialise
    assert parallel.initialize_distributed({"AOI_JAX_DISTRIBUTED": "0"}) is False
    with pytest.raises(ValueError, match="set JAX_NUM_PROCESSES"):   # jax itself reads only the address
        parallel.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        parallel.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "2",
                                         "JAX_PROCESS_ID": "first"})


def test_to_host_one_process(key):
    import jax

    x = jax.random.normal(key, (4, 6))
    mesh = parallel.data_mesh()
    sharded = parallel.shard_batch({"frames": np.zeros((2, 4, 1, 1, 1), np.float32), "label": np.arange(4)}, mesh)
    np.testing.assert_array_equal(parallel.to_host(x), np.asarray(x))
    np.testing.assert_array_equal(parallel.to_host(sharded["label"]), np.arange(4))
