"""Where a C++ compiler exists, the CPU kernels must build: a compile error would otherwise only turn the
kernel tests into skips (and the library into its slow reference fallback)."""

import shutil

import pytest

from jaxsae.kernels import build, cpu


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on this machine")
def test_cpu_kernels_build_where_a_compiler_exists():
    assert cpu.available(), f"the C++ kernels failed to build (see the log); source {build.SOURCE}"
