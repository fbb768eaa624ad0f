"""The training processes' glibc malloc settings (jaxsae.allocator): set once by re-executing, left alone
when the user set GLIBC_TUNABLES, and in effect in the new process (checked through glibc itself)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxsae import allocator

# In the child: whether a 1.5 MiB block, allocated again after one was freed, is still mapped on its
# own (one more in mallinfo2's hblks). glibc's default raises its mmap threshold to 1.5 MiB on that
# free, so the second block comes from the heap; with the fixed 1 MiB threshold it is mapped again.
CHILD = """
import ctypes, os, sys
from jaxsae.allocator import reexec_with_tunables
reexec_with_tunables()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(3 << 19))
before = libc.mallinfo2().hblks
block = libc.malloc(3 << 19)
print(f"{os.environ.get('GLIBC_TUNABLES')}|{libc.mallinfo2().hblks - before}")
"""


def _child(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    tunables, mapped = out.stdout.strip().split("|")
    return tunables, int(mapped)


def _env_without_tunables() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_reexec_puts_the_tunables_in_effect():
    if not allocator.huge_pages_on_request():
        assert _child(_env_without_tunables()) == ("None", 0)
        return
    assert _child(_env_without_tunables()) == (allocator.TUNABLES, 1)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_tunables_set_by_the_user_are_left_alone():
    # Empty: glibc's defaults, the opt-out; the child neither re-executes nor changes them.
    assert _child(dict(_env_without_tunables(), GLIBC_TUNABLES="")) == ("", 0)


def test_training_env_only_where_huge_pages_are_given(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator, "huge_pages_on_request", lambda: False)
    assert "GLIBC_TUNABLES" not in allocator.training_env({})
    monkeypatch.setattr(allocator, "huge_pages_on_request", lambda: True)
    assert allocator.training_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": allocator.TUNABLES}
    assert allocator.training_env({"GLIBC_TUNABLES": "x"}) == {"GLIBC_TUNABLES": "x"}


def test_synchronous_cpu_dispatch_returns_finished_results():
    """After synchronous_cpu_dispatch a jitted call returns once its result is computed (so a step's
    buffers are freed before the next one's are allocated); by default JAX returns at once."""
    child = """
import sys, jax, jax.numpy as jnp
from jaxsae.allocator import synchronous_cpu_dispatch
if sys.argv[1] == "sync":
    synchronous_cpu_dispatch()
f = jax.jit(lambda a: jnp.linalg.matrix_power(a, 40))
a = jnp.eye(1200) * 0.5
f(a).block_until_ready()
print(all(f(a).is_ready() for _ in range(3)))
"""

    def ready(mode: str) -> str:
        run = subprocess.run([sys.executable, "-c", child, mode], capture_output=True, text=True, check=True)
        return run.stdout.strip()

    assert ready("sync") == "True"
    assert ready("async") == "False"
