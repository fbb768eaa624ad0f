"""Our training step, timed in a process of its own: `python -m jaxsae.bench.ours --field value ...`
prints one JSON line. Simulated devices come from XLA_FLAGS, set by the caller before JAX starts.

Order matters for memory: the training part runs first and its peak RSS (VmHWM) is read before the
floor matmul and the breakdown allocate anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsae import allocator, kernels
from jaxsae.bench import inputs, rounds, timing
from jaxsae.bench.options import BenchOptions, parse_mesh
from jaxsae.config import RunConfig, SAEConfig, TrainConfig
from jaxsae.kernels import ops
from jaxsae.sae import estimate_input_scale, pre_activations
from jaxsae.selection import DATA, MODEL, SAE
from jaxsae.sharding import BATCH, make_mesh, named, state_shardings
from jaxsae.step import TrainState, init_states, make_train_step, use_sparse_kernels


def run_config(opts: BenchOptions) -> RunConfig:
    """One SAE per seed on the `sae` axis; a constant learning rate (no warm-up or decay in range)."""
    train = dict(
        steps=10**9, batch_size=opts.batch, warmup_steps=1, seeds=tuple(range(opts.seeds)), progress=False
    )
    if "kernels" in {f.name for f in dataclasses.fields(TrainConfig)}:
        train["kernels"] = opts.kernels
    return RunConfig(
        sae=SAEConfig(
            d_in=opts.d_in, d_sae=opts.d_sae, architecture=opts.architecture, k=opts.k, dtype=opts.dtype
        ),
        train=TrainConfig(**train),
        mesh=parse_mesh(opts.mesh),
    )


def mark_dead(state: TrainState, dead: np.ndarray, dead_tokens: int, mesh) -> TrainState:
    """Latents `dead` past the dead threshold and with an encoder bias that keeps them from firing, so
    that they stay dead and aux-k has work in every timed step."""

    def mark(state: TrainState) -> TrainState:
        params = dict(state.params, b_enc=state.params["b_enc"].at[:, dead].set(inputs.DEAD_BIAS))
        tokens = state.tokens_since_fired.at[:, dead].set(dead_tokens)
        return state._replace(params=params, tokens_since_fired=tokens)

    shardings = state_shardings(state, mesh)
    return jax.jit(mark, out_shardings=shardings, donate_argnums=0)(state)


def calibrate_jumprelu(state: TrainState, x: jax.Array, k: int, mesh) -> TrainState:
    """JumpReLU thresholds at the (1 − k/F) quantile of each latent's pre-activations on the batch: L0 ≈ k,
    the sparsity of a trained SAE, rather than the ~F/6 of a fresh one (whose codes the sparse step would
    not hold: it falls back to dense then, see jaxsae.step)."""

    def calibrate(state: TrainState) -> TrainState:
        def one(params, scale, layer):
            pre = pre_activations(params, x[layer].astype(jnp.float32) * scale)
            theta = jnp.quantile(pre, 1 - k / pre.shape[1], axis=0)
            return jnp.log(jnp.maximum(theta, 1e-3))

        log_t = jax.vmap(one)(state.params, state.input_scale, state.layer)
        return state._replace(params=dict(state.params, log_threshold=log_t))

    shardings = state_shardings(state, mesh)
    return jax.jit(calibrate, out_shardings=shardings, donate_argnums=0)(state)


def state_bytes(state: TrainState) -> dict[str, int]:
    """Bytes of the parameters and of the optimiser state (global, over all devices)."""
    return {
        "params": sum(a.nbytes for a in jax.tree.leaves(state.params)),
        "optimizer": sum(a.nbytes for a in jax.tree.leaves(state.opt_state)),
    }


def encoder_screen(cfg: RunConfig, mesh) -> bool:
    """Whether the step's encoder goes through the CPU kernels' bfloat16 screen (jaxsae/kernels/
    bf16_screen.h: TopK, and BatchTopK on one data shard, on a CPU with AVX512-BF16)."""
    one_shard = mesh.shape[DATA] == 1 or cfg.sae.architecture == "topk"
    can = getattr(kernels.backend(), "can_screen", lambda: False)
    screened = cfg.sae.architecture in ("topk", "batchtopk") and one_shard
    return use_sparse_kernels(cfg, mesh) and screened and can()


def setup(opts: BenchOptions):
    """(cfg, mesh, state, x [1, B, d] sharded, ks), with the dead latents marked."""
    cfg = run_config(opts)
    mesh = make_mesh(cfg.mesh)
    rows = inputs.make_batch(opts.d_in, opts.batch)
    state = init_states(cfg, rows[None], [estimate_input_scale(rows)], mesh)
    dtype = jnp.bfloat16 if opts.dtype == "bfloat16" else jnp.float32
    x = jax.device_put(jnp.asarray(rows[None], dtype), named(mesh, BATCH))
    dead = inputs.dead_latents(opts.d_sae, opts.dead_fraction)
    state = mark_dead(state, dead, cfg.train.dead_tokens, mesh)
    if opts.architecture == "jumprelu":
        state = calibrate_jumprelu(state, x, opts.k, mesh)
    ks = jax.device_put(jnp.asarray(cfg.sae_ks(), jnp.int32), named(mesh, P(SAE)))
    return cfg, mesh, state, x, ks


def time_training(
    cfg: RunConfig, mesh, state: TrainState, x, ks, opts: BenchOptions
) -> tuple[dict, Callable[[], tuple[TrainState, dict]]]:
    """Compiles, warms up and times the step; memory read right after, before anything else allocates."""
    step_fn = make_train_step(cfg, mesh, state)
    box = {"state": state, "metrics": None}

    def call():
        box["state"], box["metrics"] = step_fn(box["state"], x, ks)
        return box["state"], box["metrics"]

    t0 = timing.time_calls(call, 1, 0, jax.block_until_ready)[0]  # the first call compiles
    compile_peak = timing.peak_rss_bytes()
    timing.trim_heap()  # compilation's freed heap out of RSS; the warm-up brings the step's working set back
    timing.time_calls(call, 0, max(opts.warmup - 1, 1), jax.block_until_ready)
    reset = timing.reset_peak_rss()
    times = timing.time_calls(call, opts.steps, 0, jax.block_until_ready)
    metrics = jax.device_get(box["metrics"])
    out = {
        "first_step_s": t0,
        "step_s": timing.summary(times),
        "peak_rss_bytes": timing.peak_rss_bytes(),
        "compile_peak_rss_bytes": compile_peak,
        "peak_reset_after_compile": reset,
        "dead_fraction": float(np.mean(metrics["dead_fraction"])),
        "aux_loss": float(np.mean(metrics["aux_loss"])),
        "l0": float(np.mean(metrics["l0"])),
    }
    return out, call


def time_floor(mesh, opts: BenchOptions, step: Callable[[], tuple[TrainState, dict]]) -> dict:
    """One [B, d]×[d, F] matmul per SAE in the step's dtype, on the same devices (rows over `data`,
    latents over `model`, SAEs over `sae`), two ways: XLA's dot and the sparse kernels' encoder matmul
    (on the CPU OpenBLAS in row blocks). The floor is the faster of the two: the best matmul we have.
    The two matmuls and the training `step` are called in turn, round after round, so that a machine
    shared with other work slows all three alike: the floor ratio is taken from these rounds."""
    dtype = jnp.bfloat16 if opts.dtype == "bfloat16" else jnp.float32
    a = jax.random.normal(jax.random.key(1), (opts.batch, opts.d_in), dtype)
    w = jax.random.normal(jax.random.key(2), (opts.seeds, opts.d_in, opts.d_sae), dtype)
    a = jax.device_put(a, NamedSharding(mesh, P(DATA, None)))
    w = jax.device_put(w, NamedSharding(mesh, P(SAE, None, MODEL)))
    xla = jax.jit(lambda a, w: jnp.einsum("bd,sdf->sbf", a, w))

    def per_device(a, w):
        return jax.vmap(lambda w: ops.encode(a, w, jnp.zeros(w.shape[1], w.dtype)))(w)

    specs = dict(in_specs=(P(DATA, None), P(SAE, None, MODEL)), out_specs=P(SAE, DATA, MODEL))
    kernel = jax.jit(jax.shard_map(per_device, mesh=mesh, **specs))

    last = {}

    def train():
        last["state"], _ = step()
        return last["state"]

    calls = {"xla": lambda: xla(a, w), "kernel": lambda: kernel(a, w), "step": train}
    times = {name: [] for name in calls}
    for _ in range(opts.warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    for _ in range(opts.steps):
        for name, call in calls.items():
            times[name] += timing.time_calls(call, 1, 0, jax.block_until_ready)
    ways = {name: timing.summary(t) for name, t in times.items()}
    best = min((ways["xla"], ways["kernel"]), key=lambda t: t["median"])
    out = {**best, "xla": ways["xla"], "kernel": ways["kernel"], "step_interleaved": ways["step"]}
    return {**out, "state": last["state"]}  # the state after the last step (`run` pops it)


def memory(opts: BenchOptions, state: TrainState, baseline: int, peak: int) -> dict:
    """Peak RSS of the timed steps against params + optimiser state + batch. The peak is taken after
    compilation (VmHWM reset), less the baseline: the Python/JAX runtime before any array existed."""
    sizes = state_bytes(state)
    batch = opts.batch * opts.d_in * (2 if opts.dtype == "bfloat16" else 4)
    bound = sizes["params"] + sizes["optimizer"] + batch
    training = peak - baseline
    return {
        **{f"{k}_bytes": v for k, v in sizes.items()},
        "batch_bytes": batch,
        "bound_bytes": bound,
        "process_peak_bytes": peak,
        "baseline_bytes": baseline,
        "training_peak_bytes": training,
        "ratio": training / bound,
    }


def run(opts: BenchOptions) -> dict:
    """The whole measurement of our step for `opts`, as a JSON-ready dict."""
    devices = jax.devices()
    jnp.zeros(()).block_until_ready()  # backend up: the baseline includes the runtime
    baseline = timing.rss_bytes()
    cfg, mesh, state, x, ks = setup(opts)
    head = {
        "architecture": opts.architecture,
        "dtype": opts.dtype,
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "n_saes": opts.seeds,
        "kernels": "sparse" if use_sparse_kernels(cfg, mesh) else "dense",  # what `train.kernels` chose
        "screen": encoder_screen(cfg, mesh),
        "dead_latents": len(inputs.dead_latents(opts.d_sae, opts.dead_fraction)),
    }
    trained, step_call = time_training(cfg, mesh, state, x, ks, opts)
    floor = time_floor(mesh, opts, step_call)
    state = floor.pop("state")
    step = trained["step_s"]["median"]
    out = {
        **head,
        **trained,
        "tokens_per_s": opts.batch / step,
        "sae_tokens_per_s": opts.batch * opts.seeds / step,
        "floor_s": floor,
        "floor_ratio": floor["step_interleaved"]["median"] / floor["median"],
        "memory": memory(opts, state, baseline, trained["peak_rss_bytes"]),
        "load_average": list(os.getloadavg()),  # after timing: how busy the machine was
    }
    if opts.breakdown:
        from jaxsae.bench.breakdown import breakdown

        out["breakdown_s"] = breakdown(cfg, mesh, state, x, ks, steps=opts.breakdown_steps)
    if opts.interleave:
        out["rounds_s"] = rounds.serve(step_call, jax.block_until_ready)
    return out


def main(argv: list[str] | None = None) -> int:
    allocator.synchronous_cpu_dispatch()  # as in training (the `jaxsae` command)
    print(json.dumps(run(BenchOptions.from_argv(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
