"""Times the C++ CPU kernels against the pure-JAX reference and a dense matmul of the same shapes.

    .venv/bin/python bench/kernels_cpu.py                  # b 4096, d 768, k 50, F 6144 and 24576
    .venv/bin/python bench/kernels_cpu.py --latents 6144 --no-reference --repeats 10

Inputs: pre-activations ~ N(0, 1) [b, F]; TopK codes (one chunk of K = k per row, C·K = b·k nonzeros);
a BatchTopK threshold for row_counts / compact (b·k entries in total, 2b chunks available). Times are the
best of `--repeats` calls of the jitted function, in ms; the machine is shared, so compare ratios.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.kernels import cpu
from jaxsae.kernels import reference as ref


def best_ms(fn: Callable, args: tuple, repeats: int) -> float:
    """Best wall time of fn(*args) in ms, after one compiling call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def inputs(b: int, n_latents: int, d: int, k: int, seed: int = 0) -> dict:
    """Device arrays for every kernel at one shape."""
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((b, n_latents), dtype=np.float32)
    mask = np.ones(n_latents, bool)
    idx = np.asarray(cpu.topk_rows(acts, k, mask, k))
    row = np.arange(b, dtype=np.int32)
    val = (rng.random(idx.shape, dtype=np.float32) + 0.1) * (idx >= 0)
    thr_value = np.partition(acts.reshape(-1), -b * k)[-b * k]  # BatchTopK: b·k entries above
    thr = np.full(n_latents, thr_value, np.float32)
    above, equal = (np.asarray(x) for x in cpu.row_counts(acts, thr))
    quota = np.zeros(b, np.int32)
    n_chunks_row = (above + k - 1) // k
    chunk_start = (np.cumsum(n_chunks_row) - n_chunks_row).astype(np.int32)
    arrays = dict(
        acts=acts,
        mask=mask,
        idx=idx,
        row=row,
        val=val,
        thr=thr,
        quota=quota,
        chunk_start=chunk_start,
        w=rng.standard_normal((n_latents, d), dtype=np.float32) / np.sqrt(d),
        y=rng.standard_normal((b, d), dtype=np.float32),
        x=rng.standard_normal((b, d), dtype=np.float32),
        w_enc=rng.standard_normal((d, n_latents), dtype=np.float32),
    )
    return {key: jnp.asarray(v) for key, v in arrays.items()}


def cases(a: dict, b: int, n_latents: int, k: int) -> dict[str, tuple[Callable[..., object], tuple]]:
    """name -> (function of (module, *args), args)."""
    return {
        "gather_sum": (
            lambda m, r, i, v, w: m.gather_sum(r, i, v, w, b),
            (a["row"], a["idx"], a["val"], a["w"]),
        ),
        "gather_dot": (lambda m, r, i, y, w: m.gather_dot(r, i, y, w), (a["row"], a["idx"], a["y"], a["w"])),
        "scatter_rows": (
            lambda m, r, i, v, y: m.scatter_rows(r, i, v, y, n_latents),
            (a["row"], a["idx"], a["val"], a["y"]),
        ),
        "topk_rows": (lambda m, x, kk, mk: m.topk_rows(x, kk, mk, k), (a["acts"], jnp.int32(k), a["mask"])),
        "histogram L0": (lambda m, x: m.positive_histogram(x, 0, 0), (a["acts"],)),
        "histogram L1": (lambda m, x: m.positive_histogram(x, 0x3F80, 1), (a["acts"],)),
        "row_counts": (lambda m, x, t: m.row_counts(x, t), (a["acts"], a["thr"])),
        "compact": (
            lambda m, x, t, q, s: m.compact(x, t, q, s, 2 * b, k),
            (a["acts"], a["thr"], a["quota"], a["chunk_start"]),
        ),
    }


def run(b: int, n_latents: int, d: int, k: int, repeats: int, reference: bool) -> None:
    """Prints one table for one shape."""
    a = inputs(b, n_latents, d, k)
    matmul = best_ms(jax.jit(jnp.matmul), (a["x"], a["w_enc"]), repeats)
    print(f"\nb {b}, F {n_latents}, d {d}, k {k}: dense [b,d]x[d,F] matmul {matmul:.1f} ms")
    print(f"{'kernel':<14}{'cpu ms':>9}{'ref ms':>10}{'ref/cpu':>9}{'cpu/matmul':>12}")
    for name, (fn, args) in cases(a, b, n_latents, k).items():
        fast = best_ms(jax.jit(lambda *xs, fn=fn: fn(cpu, *xs)), args, repeats)
        slow = None
        if reference:
            slow = best_ms(jax.jit(lambda *xs, fn=fn: fn(ref, *xs)), args, max(1, repeats // 4))
        ratio = f"{slow / fast:9.1f}" if slow else f"{'-':>9}"
        slow_s = f"{slow:10.1f}" if slow else f"{'-':>10}"
        print(f"{name:<14}{fast:9.2f}{slow_s}{ratio}{fast / matmul:12.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--latents", type=int, nargs="+", default=[6144, 24576])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) pure-JAX reference")
    p.add_argument("--tile", type=int, default=0, help="floats of d per pass (tuning; 0 = built-in default)")
    args = p.parse_args()
    if not cpu.available():
        raise SystemExit("the CPU kernels are not available (see the log above)")
    if args.tile:
        cpu.set_tile(args.tile)
    for n_latents in args.latents:
        run(args.rows, n_latents, args.d, args.k, args.repeats, not args.no_reference)


if __name__ == "__main__":
    main()
