"""``aoi_jax.hugepages``: when the command re-executes itself with glibc's huge-page tunable, and that it does."""

import os
import subprocess
import sys

import pytest

from aoi_jax import hugepages


def test_adds_the_tunable_when_it_helps():
    env = hugepages.huge_page_env({"PATH": "/bin"}, (2, 36), "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hugepages.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 35), "always")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ,glibc,thp", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise"),     # the user's own choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise"),     # already re-executed
    ({"AOI_JAX_HUGEPAGES": "0"}, (2, 36), "madvise"),                      # switched off
    ({}, (2, 34), "madvise"),                                              # glibc without the tunable
    ({}, None, "madvise"),                                                 # not glibc (musl, macOS)
    ({}, (2, 36), "never"),                                                # kernel gives no huge pages
    ({}, (2, 36), None),                                                   # no THP file (not Linux)
])
def test_leaves_the_command_alone_otherwise(environ, glibc, thp):
    assert hugepages.huge_page_env(environ, glibc, thp) is None


def test_reexecutes_once_with_the_same_arguments():
    """A real ``python -c`` re-executes itself: the child sees the tunable and its original arguments,
    and runs the code after the call exactly once (the second start finds the variable set)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.SWITCH)}
    if hugepages.huge_page_env(env, hugepages._glibc_version(), hugepages._thp_mode()) is None:
        pytest.skip("no glibc >= 2.35 with transparent huge pages here: nothing to re-execute")
    code = ("import sys; print('start', flush=True); from aoi_jax import hugepages; "
            "hugepages.reexec_with_huge_pages(); import os; print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    run = subprocess.run([sys.executable, "-c", code, "a", "--b"], env=env, capture_output=True, text=True,
                         check=True)
    assert run.stdout.splitlines() == ["start", "start", "glibc.malloc.hugetlb=1 ['a', '--b']"]
    assert run.stderr.count("restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == 1     # said once
    off = subprocess.run([sys.executable, "-c", code], env=dict(env, AOI_JAX_HUGEPAGES="0"), capture_output=True,
                         text=True)
    assert off.stdout.splitlines()[:1] == ["start"] and "KeyError" in off.stderr     # no re-execution
