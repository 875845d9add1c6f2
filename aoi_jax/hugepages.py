"""Transparent huge pages for XLA:CPU's buffers: one glibc setting, applied by re-executing the command.

XLA:CPU allocates each execution's temporaries afresh with ``malloc``; at these sizes (hundreds of MiB for
a train step) glibc serves them with ``mmap`` and returns them with ``munmap``, so every step touches new
4 KiB pages: ~100k minor page faults per N-Digits step, ~40 % of the step in the kernel (measured with
``/usr/bin/time`` and ``strace -c``). With glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35)
malloc asks for transparent huge pages on those mappings (``madvise(MADV_HUGEPAGE)``), so a step faults
2 MiB pages instead: ~20x fewer faults (5.9 M -> 0.24 M over 10 VGGSNN steps); on 2 cores the N-Digits
train step went from 0.197 s to 0.124 s and the VGGSNN one (T=10, batch 8, 128x128) from 1.43 s to
1.18 s (``python -m benchmarks.train_step``; figures in the README).

The tunable is read when the process starts, so ``train.py``, ``evaluate.py`` and the benchmarks call
``reexec_with_huge_pages()`` first thing: when the setting would help and is not set yet, the process
replaces itself (``os.execve``, same PID and arguments) with the variable added. It changes where memory
comes from, never what is computed. ``AOI_JAX_HUGEPAGES=0`` switches it off.
"""

import os
import pathlib
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "AOI_JAX_HUGEPAGES"
THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version():
    """(major, minor) of the running glibc, or None (not Linux/glibc)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError, OSError):
        return None


def _thp_mode():
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None when unknown."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    return text[text.find("[") + 1:text.find("]")] if "[" in text else None


def huge_page_env(environ, glibc_version, thp_mode):
    """The environment to re-execute with, or None when there is nothing to gain.

    None when: ``AOI_JAX_HUGEPAGES=0``; glibc older than 2.35 (no ``hugetlb`` tunable) or not glibc;
    the kernel's THP mode is "never" or unknown (no huge pages to get); ``GLIBC_TUNABLES`` already names
    ``glibc.malloc.hugetlb`` (set by the user, or by an earlier re-execution).

    Args:
      environ: the current environment (a mapping).  glibc_version: (major, minor) or None.
      thp_mode: "always" | "madvise" | "never" | None.
    Returns:
      a new dict with ``TUNABLE`` appended to ``GLIBC_TUNABLES`` (colon-separated), or None.
    """
    if environ.get(SWITCH, "1") == "0" or glibc_version is None or glibc_version < (2, 35):
        return None
    if thp_mode not in ("always", "madvise"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def reexec_with_huge_pages():
    """Re-executes this Python command with ``GLIBC_TUNABLES`` asking for huge pages, when that helps.

    Call it before importing jax (the new process starts from scratch). Returns only when nothing is
    done; otherwise the process is replaced by ``sys.executable`` with the original arguments
    (``sys.orig_argv``, so ``python -m module`` stays a module run).
    """
    env = huge_page_env(os.environ, _glibc_version(), _thp_mode())
    if env is None:
        return
    print(f"aoi_jax: restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages for XLA:CPU's buffers; "
          f"{SWITCH}=0 switches this off)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as e:  # the command goes on without; only speed is lost
        print(f"aoi_jax.hugepages: could not re-execute with {TUNABLE} ({e}); continuing without",
              file=sys.stderr)
