"""Opt-in XLA compiler options for the backend in use: the one place that tunes for a machine.

Nothing here changes what a step computes in exact arithmetic; it changes which kernels and which schedule
XLA uses. The library never applies these on its own: ``training.train_and_evaluate(..., tuning="none")``
compiles with XLA's defaults unless asked for ``"auto"``, which ``train.py --xla-tuning`` passes by default;
the callers pass ``compiler_options(tuning, ...)`` into ``step.make_train_step``, ``step.make_eval_step`` and
``sweep.make_multi_step``, and a run records the options it used (``xla_options`` in ``config.json`` and
``report.json``). docs/performance.md has the measurements behind each option, with the commands.

XLA:CPU (the only backend tuned; other backends get no options):

- ``CPU_OPTIONS``: dots and reductions (BatchNorm statistics, gradient sums, RCS) through XLA:CPU's YNNPACK
  library, convolutions through its default kernels. Reductions then sum in another order than XLA's own
  kernels, so results differ from ``tuning="none"`` by float32 rounding.
- ``CPU_REMAT_OPTIONS``, added for a train step with ``model.remat``: the memory-optimised scheduler, and
  optimisation barriers kept until scheduling (``cse_barrier_expander`` off), so each layer is recomputed
  only when its cotangent arrives. With XLA's default options XLA:CPU removes the barriers of
  ``jax.checkpoint`` (and those ``models.SpikingLayer`` puts around a rematerialised layer) before common
  subexpression elimination, which merges the recomputation back into the forward pass: remat then saves
  nothing (``benchmarks/memory.py``, docs/performance.md).

One more setting helps XLA:CPU but is read by the C library when the process starts, so no library can set
it: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35, transparent huge pages in ``madvise`` or
``always`` mode) backs XLA's per-step buffers with huge pages. Set it in the shell if you want it.
"""

import jax

TUNINGS = ("auto", "none")  # auto: the measured options of the backend in use; none: XLA's defaults

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
CPU_REMAT_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                     "xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(tuning: str = "auto", *, remat: bool = False, backend: str | None = None) -> dict:
    """XLA options for ``jax.jit(..., compiler_options=...)``.

    Args:
      tuning: "auto" (the options measured for ``backend``) or "none" (XLA's defaults, ``{}``).
      remat: for a train step of a model with ``model.remat``.
      backend: "cpu", "gpu", "tpu", ...; default ``jax.default_backend()``.
    Returns:
      a new dict: on XLA:CPU with "auto" ``CPU_OPTIONS`` (and ``CPU_REMAT_OPTIONS`` with ``remat``); else {}.
    Raises:
      ValueError: unknown ``tuning``.
    """
    if tuning not in TUNINGS:
        raise ValueError(f"XLA tuning must be one of {list(TUNINGS)}, got {tuning!r}")
    backend = jax.default_backend() if backend is None else backend
    if tuning == "none" or backend != "cpu":
        return {}
    return {**CPU_OPTIONS, **(CPU_REMAT_OPTIONS if remat else {})}
