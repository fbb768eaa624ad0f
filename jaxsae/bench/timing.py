"""Clocks and memory readings shared by our process and the peers' (standard library only)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_calls(
    call: Callable[[], object], steps: int, warmup: int, sync: Callable[[object], object]
) -> list[float]:
    """Seconds of each of `steps` calls of `call` after `warmup` untimed ones; `sync(result)` waits for
    the work to finish (block_until_ready for JAX, nothing for eager torch on the CPU)."""
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    """Median, mean and min of per-call seconds, and the raw list."""
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "min": min(times),
        "all": times,
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    """This process's current resident set (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Starts VmHWM afresh from the current RSS (Linux ≥ 4.0), so that a later peak excludes what came
    before (compilation's transient heap); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Hands freed heap back to the kernel (glibc malloc_trim), so that RSS shows live memory only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
