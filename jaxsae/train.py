"""The training loop: data -> jitted multi-SAE step -> progress bar, JSONL metrics, orbax checkpoints.

Run folder: `config.yaml`, `metrics.jsonl` (one record per SAE per log step), `checkpoints/<step>/`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxsae import checkpoint
from jaxsae.config import ConfigError, RunConfig, save_config
from jaxsae.data import RowSource, batches, check_finite, load_source, sample_rows
from jaxsae.sae import estimate_input_scale
from jaxsae.sharding import BATCH, make_mesh, named
from jaxsae.step import TrainState, init_states, make_train_step
from jaxsae.synthetic import atoms_recovered

# Firing-rate histogram bins (log10 of the fraction of tokens a latent fires on); "never" counted apart.
RATE_BINS = np.arange(-8.0, 0.5, 1.0)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the last checkpoint."""


@dataclass
class TrainResult:
    state: TrainState  # leaves with a leading [S] sae axis
    metrics: list[dict]  # the last logged record of each SAE
    atoms_recovered: list[float] | None  # per SAE, when the source is a planted dictionary


def train(cfg: RunConfig, source: RowSource | None = None, *, resume: bool = False) -> TrainResult:
    """Trains every SAE of `cfg` (one per seed/k on the `sae` axis) on `source` (default: cfg.data)."""
    tc = cfg.train
    source = source or load_source(cfg.data, cfg.sae.d_in)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    sample = sample_rows(source.rows, tc.scale_sample_rows, cfg.data.seed)
    check_finite(sample, f"{source.description} (input-scale sample)")
    mesh = make_mesh(cfg.mesh)
    check_divisible(cfg, mesh)
    state = init_states(cfg, jnp.asarray(sample), estimate_input_scale(sample), mesh)
    mgr = checkpoint.manager(out / "checkpoints")
    if resume and mgr.latest_step() is not None:
        state = checkpoint.restore_state(mgr, state)
    start = int(np.asarray(state.step)[0])
    try:
        state, last = _loop(cfg, mesh, source, state, start, mgr, out / "metrics.jsonl")
        if int(np.asarray(state.step)[0]) != mgr.latest_step():
            checkpoint.save(mgr, state, cfg, {"tokens_seen": int(state.step[0]) * tc.batch_size})
    finally:
        mgr.wait_until_finished()
        mgr.close()
    found = None
    if source.atoms is not None:
        found = [atoms_recovered(source.atoms, np.asarray(w)) for w in state.params["W_dec"]]
    return TrainResult(state, last, found)


def check_divisible(cfg: RunConfig, mesh) -> None:
    """The mesh must split the SAEs, the batch and the latents evenly."""
    for what, n, axis in (
        ("train.seeds (SAEs)", cfg.train.n_saes, "sae"),
        ("train.batch_size", cfg.train.batch_size, "data"),
        ("sae.d_sae", cfg.sae.d_sae, "model"),
    ):
        if n % mesh.shape[axis]:
            raise ConfigError(f"{what} = {n} is not divisible by the mesh's {axis} axis ({mesh.shape[axis]})")


def _loop(cfg, mesh, source, state, start, mgr, metrics_path):
    tc = cfg.train
    step_fn = make_train_step(cfg, mesh, state)
    ks = jnp.asarray(cfg.sae_ks(), jnp.int32)
    batch_sharding = named(mesh, BATCH)
    data = batches(source.rows, tc.batch_size, cfg.data.seed, start_step=start)
    last: list[dict] = []
    bar = tqdm(total=tc.steps, initial=start, unit="step", disable=not tc.progress, dynamic_ncols=True)
    t0, window_start, fire_since = time.perf_counter(), start, start
    with bar, open(metrics_path, "a") as log:
        for step in range(start, tc.steps):
            state, metrics = step_fn(state, jax.device_put(next(data), batch_sharding), ks)
            bar.update(1)
            done = step + 1
            if step == start:  # time from here: the first step includes compilation
                jax.block_until_ready(state)
                t0, window_start = time.perf_counter(), done
            if done % tc.log_every and done != tc.steps:
                continue
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - t0
            tokens_per_s = (done - window_start) * tc.batch_size / elapsed if done > window_start else 0.0
            last = _records(cfg, state, metrics, done, tokens_per_s, (done - fire_since) * tc.batch_size)
            _check_finite_loss(last, done, mgr)
            log.writelines(json.dumps(rec) + "\n" for rec in last)
            log.flush()
            bar.set_postfix_str(_postfix(last, tokens_per_s))
            zeros = jnp.zeros(state.fire_count.shape, state.fire_count.dtype)
            state = state._replace(fire_count=jax.device_put(zeros, state.fire_count.sharding))
            if tc.checkpoint_every and done % tc.checkpoint_every == 0:
                checkpoint.save(mgr, state, cfg, {"tokens_seen": done * tc.batch_size})
            t0, window_start, fire_since = time.perf_counter(), done, done
    return state, last


def _records(cfg: RunConfig, state, metrics, step: int, tokens_per_s: float, fire_tokens: int) -> list[dict]:
    """One JSON-ready record per SAE: its metrics, hyper-parameters and firing-rate histogram."""
    metrics = jax.device_get(metrics)
    fire_count = np.asarray(state.fire_count)
    records = []
    for i, (seed, k) in enumerate(zip(cfg.train.seeds, cfg.sae_ks(), strict=True)):
        rec = {"step": step, "sae": i, "seed": seed, "k": k, "tokens_per_s": tokens_per_s}
        rec.update({name: float(v[i]) for name, v in metrics.items()})
        rec["firing_rate_hist"] = firing_rate_histogram(fire_count[i], fire_tokens)
        records.append(rec)
    return records


def firing_rate_histogram(fire_count: np.ndarray, tokens: int) -> dict:
    """Counts of latents by log10 firing rate: {"never": n, "bins": RATE_BINS edges, "counts": [...]}."""
    rates = fire_count / max(tokens, 1)
    fired = rates > 0
    counts, _ = np.histogram(np.log10(rates[fired]), bins=np.append(RATE_BINS, 0.5))
    return {"never": int((~fired).sum()), "bins": RATE_BINS.tolist(), "counts": counts.tolist()}


def _check_finite_loss(records: list[dict], step: int, mgr) -> None:
    for rec in records:
        if not np.isfinite(rec["loss"]):
            last = mgr.latest_step()
            where = f"checkpoint at step {last}" if last is not None else "no checkpoint yet"
            raise TrainingError(f"non-finite loss at step {step} (SAE {rec['sae']}); last good: {where}")


def _postfix(records: list[dict], tokens_per_s: float) -> str:
    mean = lambda key: np.mean([r[key] for r in records])
    return (
        f"loss={mean('loss'):.4g} fve={mean('fve'):.3f} L0={mean('l0'):.1f} "
        f"dead={100 * mean('dead_fraction'):.1f}% tok/s={tokens_per_s:,.0f}"
    )
