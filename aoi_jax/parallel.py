"""Data parallelism with ``jax.sharding``: the batch is split over a ``data`` mesh axis, the parameters
and optimiser state are replicated, and ``jax.jit`` inserts the cross-device reductions (gradients,
BatchNorm statistics), so a step computes exactly what it computes on one device.

Across hosts the same code runs under JAX's multi-process runtime (``jax.distributed.initialize``): each
process builds the same global batch order (same seed) and contributes its own slice of every batch.
"""

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def initialize_distributed(environ=None) -> bool:
    """Calls ``jax.distributed.initialize`` when launched as one of several processes.

    Two ways to say so:

    - ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``:
      passed on explicitly (``jax.distributed.initialize`` reads only the address from the environment);
    - ``AOI_JAX_DISTRIBUTED=1`` where JAX finds the cluster itself (TPU pod slices, SLURM, Open MPI).

    Args:
      environ: the environment to read (default ``os.environ``).
    Returns:
      whether it initialised.
    Raises:
      ValueError: ``JAX_COORDINATOR_ADDRESS`` without integer ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        try:
            n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES (the number of processes) "
                             "and JAX_PROCESS_ID (0 .. N-1) as integers too") from e
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i)
        return True
    if env.get("AOI_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def replicate(tree, mesh):
    """Places every array of ``tree`` on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def check_batch_size(batch_size: int, n_devices: int | None = None) -> None:
    """Checks that a batch splits evenly over ``n_devices`` (default: every device), e.g. before training
    (or resuming a checkpoint saved on another device count) on this machine.

    Raises:
      ValueError: ``batch_size`` is not a multiple of ``n_devices``; one line naming both numbers.
    """
    n_devices = jax.device_count() if n_devices is None else int(n_devices)
    if batch_size % n_devices:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {n_devices} devices of the data mesh; "
                         f"choose train.batch_size / eval.batch_size divisible by {n_devices}")


def shard_batch(batch: dict, mesh) -> dict:
    """Splits a global batch over the ``data`` axis along B: frames (..., T, B, H, W, C), labels (..., B).

    Leading axes (a sweep's member axis) are kept whole. Each process passes the same global batch; it
    contributes the rows of its own devices.

    Raises:
      ValueError: the batch size is not a multiple of the number of devices.
    """
    n_dev = mesh.devices.size
    check_batch_size(batch["label"].shape[-1], n_dev)
    out = {}
    for name, batch_axis in (("frames", -4), ("label", -1)):
        value = np.asarray(batch[name])
        spec = [None] * value.ndim
        spec[batch_axis] = "data"
        sharding = NamedSharding(mesh, P(*spec))
        out[name] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
    return out


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) global array as numpy, the same on every process.

    One process: ``np.asarray``. Several: the shards of other processes are all-gathered
    (``multihost_utils.process_allgather``), so every process sees the whole array; fully replicated
    arrays are read locally.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
