"""Where the training step's memory goes: resident memory by kind of mapping (/proc/self/smaps) after
setup, compile and warm-up, the peak over a few steps, and XLA's own report of the step's temporary
buffer. The setup is `jaxsae bench`'s (one SAE, dead latents marked, JumpReLU calibrated).

    .venv/bin/python scripts/memory_breakdown.py --architecture topk --expansion 32
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxsae import allocator
from jaxsae.bench import ours, timing
from jaxsae.bench.options import BenchOptions
from jaxsae.step import jit_step

MB = 1e6


def resident_by_kind() -> dict[str, float]:
    """MB resident per kind of mapping: 'lib' (file-backed code and data), '[heap]', '[anon]', ..."""
    totals: dict[str, float] = {}
    kind = None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts[0].endswith(":"):
                if parts[0] == "Rss:":
                    totals[kind] = totals.get(kind, 0.0) + int(parts[1]) * 1024 / MB
                continue
            name = parts[5] if len(parts) > 5 else "[anon]"
            kind = "lib" if name.startswith("/") else name
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v >= 0.1}


def report(stage: str, baseline: int) -> None:
    timing.trim_heap()
    rss = (timing.rss_bytes() - baseline) / MB
    print(f"{stage:14s} above baseline {rss:8.1f} MB   by kind {resident_by_kind()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="topk")
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    allocator.synchronous_cpu_dispatch()  # as in training
    jnp.zeros(()).block_until_ready()
    baseline = timing.rss_bytes()
    report("baseline", 0)
    opts = BenchOptions(
        d_in=args.d_in, expansion=args.expansion, k=args.k, batch=args.batch, architecture=args.architecture
    )
    cfg, mesh, state, x, ks = ours.setup(opts)
    sizes = ours.state_bytes(state)
    bound = (sizes["params"] + sizes["optimizer"] + x.nbytes) / MB
    report("setup", baseline)
    everyone = jnp.ones(ks.shape, bool)
    step = jit_step(cfg, mesh, state).lower(state, x, ks, everyone).compile()
    memory = step.memory_analysis()
    print(f"XLA temporary buffer of the step: {memory.temp_size_in_bytes / MB:.1f} MB")
    report("compiled", baseline)
    for _ in range(3):
        state = jax.block_until_ready(step(state, x, ks, everyone)[0])
    report("warm", baseline)
    timing.reset_peak_rss()
    for _ in range(3):
        state = jax.block_until_ready(step(state, x, ks, everyone)[0])
    peak = (timing.peak_rss_bytes() - baseline) / MB
    print(f"peak above baseline {peak:.1f} MB; params + Adam + batch {bound:.1f} MB: {peak / bound:.2f}x")


if __name__ == "__main__":
    main()
