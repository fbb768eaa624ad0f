"""Builds `cpu_kernels.cc` (with the headers it includes) into a shared library, once per (source, jax
version, compiler, flags, CPU).

The library lands in `$JAXSAE_CACHE/kernels/<hash>/libjaxsae_cpu.so` (default `~/.cache/jaxsae`).
Concurrent processes take a file lock, and the compiler writes a temporary file that is renamed into
place, so a reader never sees a half-written library.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import scipy_openblas32

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
HEADERS = (Path(__file__).with_name("bf16_screen.h"),)  # included by SOURCE
LIB_NAME = "libjaxsae_cpu.so"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


class BuildError(RuntimeError):
    """The kernels could not be compiled (no compiler, or it failed)."""


def compiler() -> str:
    """The C++ compiler: $CXX, else g++ on the PATH."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise BuildError("no C++ compiler: g++ is not on the PATH and $CXX is unset")
    return cxx


def _cpu_signature() -> str:
    """Identifies the CPU, since -march=native code may not run on another one (shared cache folders)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor() or platform.machine()


def _openblas_flags() -> list[str]:
    """Compile and link flags for OpenBLAS from the scipy-openblas32 wheel (symbols prefixed `scipy_`)."""
    lib_dir = scipy_openblas32.get_lib_dir()
    return [
        f"-I{scipy_openblas32.get_include_dir()}",
        f"-L{lib_dir}",
        f"-l{scipy_openblas32.get_library()}",
        f"-Wl,-rpath,{lib_dir}",
    ]


def cache_dir() -> Path:
    """The folder for this build: the hash covers everything that changes the binary."""
    cxx = compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{cxx} --version failed: {e}") from e
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        *(header.read_bytes() for header in HEADERS),
        jax.__version__.encode(),
        " ".join(FLAGS).encode(),
        version.encode(),
        _cpu_signature().encode(),
        scipy_openblas32.__version__.encode(),
    ):
        h.update(part)
        h.update(b"\0")
    root = Path(os.environ.get("JAXSAE_CACHE") or Path.home() / ".cache" / "jaxsae")
    return root / "kernels" / h.hexdigest()[:16]


def build(verbose: bool = False) -> Path:
    """Path of the compiled library, compiling it first if no process has; raises BuildError."""
    out_dir = cache_dir()
    lib = out_dir / LIB_NAME
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the second process waits here, then finds the library
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), *_openblas_flags(), "-o", tmp]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            Path(tmp).unlink(missing_ok=True)
            raise BuildError(f"{' '.join(cmd)}: {e}") from e
        if proc.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            raise BuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it private; a shared cache folder must be readable
        os.replace(tmp, lib)
        if verbose:
            print(f"built {lib} in {time.perf_counter() - t0:.1f} s")
    return lib


if __name__ == "__main__":
    build(verbose=True)
