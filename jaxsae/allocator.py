"""glibc malloc settings for a training process, chosen by measurement (README, "Throughput"; 32x BatchTopK
on this 2-core machine, batch 4096):

- `glibc.malloc.mmap_threshold=1048576`, fixed: buffers of 1 MiB or more (the step's XLA temporaries, the
  kernels' block buffers) are mapped when allocated and returned when freed. By default glibc raises the
  threshold to 32 MiB after the first such free, and the freed buffers then stay resident in per-thread
  arenas: the step's peak resident memory went from 781 MB to 680 MB above the runtime's.
- `glibc.malloc.hugetlb=1`: those mappings in transparent huge pages (madvise), so that mapping them each
  step takes 2 MiB page faults rather than 4 KiB ones: with the fixed threshold alone the step was 15%
  slower, with both it is as fast as glibc's default or faster (0.62-0.64 s against 0.66-0.72 s).

GLIBC_TUNABLES is read when a process starts, so the `jaxsae` command re-executes itself once with these
(`reexec_with_tunables`), and `jaxsae bench` starts its measuring process with them. A GLIBC_TUNABLES
already set (even empty) is left alone: that is how to opt out.

And JAX's CPU client without asynchronous dispatch (`synchronous_cpu_dispatch`): it runs a step inline,
so that the next step starts only once the last one has freed its buffers. Dispatched asynchronously,
the next step's temporaries were at times allocated before the last one's were freed (one step in five
at 32x: +18 MB on the peak). On the CPU the dispatching thread has nothing else to overlap with the
step (the loader has threads of its own).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_on_request() -> bool:
    """Whether the kernel gives transparent huge pages to regions that ask (mode `always` or `madvise`):
    without them the fixed threshold only costs page faults."""
    try:
        with open(_THP) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def training_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with GLIBC_TUNABLES = TUNABLES, unless it names GLIBC_TUNABLES already or the machine has no
    use for them (not Linux, or no transparent huge pages)."""
    out = dict(env)
    if "GLIBC_TUNABLES" not in out and sys.platform == "linux" and huge_pages_on_request():
        out["GLIBC_TUNABLES"] = TUNABLES
    return out


def reexec_with_tunables() -> None:
    """Replaces this process by the same command line with `training_env`'s variables, when they add
    anything; returns only when they do not (then, or in the process it started)."""
    env = training_env(os.environ)
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def synchronous_cpu_dispatch() -> None:
    """JAX's CPU client runs computations inline (see the module's docstring). Call before JAX's first
    computation: the client reads the setting when it is created."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
